"""The daemon side of the socket API: AMP handlers authorized by SO_PEERCRED.

Every connection captures the caller's uid/gid/pid from the kernel once, at
accept; every verb then asks one predicate (``Caller.authorize``, built on
``Caller.owns``, in ``aimx.daemon.admin``) whether that uid may act on the
mailbox. Blocking work (config rewrites and directories from
``aimx.daemon.admin``, read-state rewrites, counting) runs in the reactor's
thread pool under the per-mailbox lock and then the config write lock, never
the reverse; the live config is swapped on the reactor thread, queued while
the lock is still held so swaps land in the order their rewrites did.
"""

from __future__ import annotations

import os
import resource
import socket
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import defer, protocol, threads
from twisted.internet.error import ConnectionLost
from twisted.protocols import amp
from twisted.python.failure import Failure

from aimx import config as configmod
from aimx.daemon.admin import (
    Caller,
    check_hook_fields,
    check_mailbox_name,
    check_owner_value,
    create_hook,
    create_mailbox,
    delete_hook,
    delete_mailbox,
    find_hook,
    hook_rows,
    mailbox_not_found,
    mailbox_rows,
    quoted,
    username_of,
)
from aimx.daemon.protocol import (
    COMMANDS,
    DEFAULT_TIMEOUT_SECS,
    ERROR_CODES,
    MAX_BOX_BYTES,
    REFUSED_TAG,
    ApiCommand,
    ApiError,
    HookCreate,
    HookDelete,
    HookList,
    MailboxCreate,
    MailboxDelete,
    MailboxList,
    MarkRead,
    MarkUnread,
    Send,
    Version,
    Watch,
    WatchEvent,
    clean_reason,
    error,
    parse_request,
    request_box,
    undeclared_keys,
)
from aimx.daemon.watch import MAX_UNANSWERED, MailEvent, Watcher, may_read
from aimx.logs import logger
from aimx.mail.naming import check_email_id
from aimx.mail.sendoptions import idempotency_key_problem
from aimx.version import version_info

log = logger("aimx::uds")
hook_log = logger("aimx::hook")

TIMEOUT_ENV = "AIMX_API_TIMEOUT"
_GENERIC_REASON = "internal error; see the daemon log"
REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines about one uid's refused connections
_LEGACY_HOOK_KEYS = {
    "template": "hook sets `template`; template hooks were removed. "
                "See book/hooks.md for the supported raw-cmd schema",
    "params": "hook sets `params`; template hooks were removed. "
              "See book/hooks.md for the supported raw-cmd schema",
    "run_as": "hook sets `run_as`; the field was removed — hooks now run as the mailbox's `owner`",
    "origin": "hook sets `origin`; the field was removed",
    "dangerously_support_untrusted": "hook sets `dangerously_support_untrusted`; "
                                     "the field was renamed to `fire_on_untrusted`",
    "stdin": "hook sets removed field 'stdin' — the email is always piped to hooks; "
             "remove this key from the request",
}


def api_timeout() -> float:
    """Seconds an incomplete box or an idle connection may last (env override for tests)."""
    value = os.environ.get(TIMEOUT_ENV)
    try:
        return float(value) if value else DEFAULT_TIMEOUT_SECS
    except ValueError:
        return DEFAULT_TIMEOUT_SECS


# -- peer credentials and the authorization predicate -----------------------


@attrs.frozen
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    """The kernel's record of who is on the other end of a Unix socket.

    Raises ``OSError`` when the socket carries none (the kernel reports uid -1
    for sockets that are not local stream sockets).
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    if uid < 0 or gid < 0:
        raise OSError("no peer credentials on this socket")
    return PeerCred(pid, uid, gid)


# -- connection limits -------------------------------------------------------


def socket_connection_cap(configured: int, file_limit: int) -> int:
    """How many non-root connections may be open at once.

    The configured cap, but never more than half the daemon's file limit: the
    other half stays free for root's connections, SMTP sessions, hook pipes
    and mail files, so one flood of idle sockets cannot starve them.
    """
    if file_limit < 0 or file_limit == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, file_limit // 2))


def file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@attrs.define
class ConnectionLimits:
    """Open socket connections per non-root uid, and the decision to refuse one more.

    Root (uid 0) is never refused and never counted, so an administrator's
    commands work whatever other users hold. Refusals are logged at most once
    a minute per uid (and for the global cap), so a flood cannot flood the log.
    """

    open_by_uid: Counter[int] = attrs.field(factory=Counter)
    last_logged: dict[int | None, float] = attrs.field(factory=dict)  # None: the global cap

    @property
    def total(self) -> int:
        return sum(self.open_by_uid.values())

    def admit(self, uid: int, per_user: int, cap: int, now: float) -> str | None:
        """Count a new connection from ``uid``, or return why it is refused."""
        if uid == 0:
            return None
        if self.open_by_uid[uid] >= per_user:
            if self._should_log(uid, now):
                log.warning("refusing socket connections from uid %d: %d open, the "
                            "socket_max_connections_per_user cap", uid, per_user)
            return f"too many connections for uid {uid} (limit {per_user}); close some and retry"
        if self.total >= cap:
            if self._should_log(None, now):
                log.warning("refusing socket connections from non-root users: %d open, the "
                            "socket connection cap", cap)
            return f"the daemon is at its connection limit ({cap}); retry later"
        self.open_by_uid[uid] += 1
        return None

    def release(self, uid: int) -> None:
        """Forget a connection ``admit`` counted."""
        self.open_by_uid[uid] -= 1
        if self.open_by_uid[uid] <= 0:
            del self.open_by_uid[uid]

    def _should_log(self, key: int | None, now: float) -> bool:
        last = self.last_logged.get(key)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL:
            return False
        self.last_logged[key] = now
        return True


# -- the protocol -------------------------------------------------------------


class ApiProtocol(amp.AMP):
    """One socket connection: strict request decoding, spec errors, size and time caps.

    Stock AMP answers unknown commands and bad arguments with its own
    ``UNHANDLED``/``UNKNOWN`` errors (and drops the connection on the latter);
    here ``dispatchCommand`` decodes every box itself so each bad request gets
    the API's code and reason and the connection stays usable.
    """

    def __init__(self, daemon: Any, timeout: float) -> None:
        super().__init__()
        self.daemon = daemon
        self.timeout = timeout
        self.caller: Caller | None = None
        self.cred_error: str | None = None
        self._counted_uid: int | None = None
        self._box_bytes = 0
        self._box_open = False  # a box has begun arriving and has not ended yet
        self._key_bytes = 0  # length of the key whose value comes next
        self._in_flight = 0
        self._timer = None
        self._timer_kind: str | None = None
        self._dropped = False
        self._watcher: Watcher | None = None  # set by WATCH
        self._unanswered: set[bytes] = set()  # tags of WATCH-EVENTs the client owes answers to
        self._event_tags = 0

    @property
    def reactor(self):
        return self.daemon.reactor

    # connection lifecycle (AMP's own connect/disconnect log lines are skipped)

    def makeConnection(self, transport) -> None:  # noqa: N802 (Twisted's name)
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        try:
            cred = peer_credentials(self.transport.getHandle())
        except OSError as exc:
            self.cred_error = str(exc)
            log.warning("peer cred unavailable: %s", exc)
        else:
            self.caller = Caller(cred.uid, cred.gid, cred.pid)
        uid = self.caller.uid if self.caller is not None else -1
        refusal = self.factory.admit(uid)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._counted_uid = uid
        self._arm("idle")

    def _refuse(self, reason: str) -> None:
        """Answer with one error box, then close: a refused socket holds no descriptor.

        No request has been read, so the box carries ``REFUSED_TAG`` instead
        of an ask's tag; clients raise it as the call's error.
        """
        self._dropped = True
        self.transport.write(amp.AmpBox({
            amp.ERROR: REFUSED_TAG, amp.ERROR_CODE: b"TEMP",
            amp.ERROR_DESCRIPTION: clean_reason(reason).encode("utf-8"),
        }).serialize())
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 (Twisted's name)
        if self._watcher is not None:
            self.daemon.watch.remove(self._watcher)
            self._watcher = None
        if self._counted_uid is not None:
            self.factory.release(self._counted_uid)
            self._counted_uid = None
        self._disarm()
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    # timers: one for an incomplete box, one for an idle connection

    def _arm(self, kind: str) -> None:
        if self._timer_kind == kind and self._timer is not None and self._timer.active():
            return
        self._disarm()
        self._timer_kind = kind
        self._timer = self.reactor.callLater(self.timeout, self._expire, kind)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_kind = None

    def _expire(self, kind: str) -> None:
        self._timer = None
        self._timer_kind = None
        log.info("dropping socket connection: %s for %gs", kind, self.timeout)
        if self.transport is not None:
            self.transport.abortConnection()

    def _settle_timer(self) -> None:
        if self.transport is None or self._dropped:
            self._disarm()
            return
        if self._box_open or self.recvd:
            self._arm("incomplete request")
        elif self._in_flight == 0 and self._watcher is None:  # a watch waits for mail
            self._arm("idle")
        else:
            self._disarm()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        try:
            super().dataReceived(data)
        finally:
            self._settle_timer()

    # box framing with a size cap

    def stringReceived(self, string: bytes) -> None:  # noqa: N802 (Twisted's name)
        if not self._dropped:  # bytes already buffered behind a drop are ignored
            super().stringReceived(string)

    def _drop(self, why: str) -> None:
        log.warning("dropping socket connection: %s", why)
        self._dropped = True
        self.transport.abortConnection()

    def proto_init(self, string: bytes) -> str:
        self._box_open = True
        return super().proto_init(string)

    def proto_value(self, string: bytes) -> str:
        self._box_bytes += self._key_bytes + len(string) + 4
        if self._box_bytes > MAX_BOX_BYTES:
            self._drop(f"request box over {MAX_BOX_BYTES} bytes")
            return "init"
        return super().proto_value(string)

    def proto_key(self, string: bytes) -> str:
        if string:
            self._key_bytes = len(string)
        else:  # the empty key ends the box
            self._box_bytes = 0
            self._box_open = False
            self._disarm()
        return super().proto_key(string)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:  # noqa: N802 (AMP's name)
        if amp.COMMAND in box:
            # Clients only send requests: reply keys must not turn a request into an answer.
            box.pop(amp.ANSWER, None)
            box.pop(amp.ERROR, None)
            super().ampBoxReceived(box)
        elif self._watcher is not None and (amp.ANSWER in box or amp.ERROR in box):
            self._event_answered(box.get(amp.ANSWER, box.get(amp.ERROR)))
        elif amp.ASK in box:
            try:
                self.boxSender.sendBox(amp.AmpBox({
                    amp.ERROR: box[amp.ASK],
                    amp.ERROR_CODE: b"MALFORMED",
                    amp.ERROR_DESCRIPTION: b"request box has no _command",
                }))
            except (amp.ProtocolSwitched, ConnectionLost):
                pass  # the client is gone; nothing to tell it
        else:
            # Nothing to answer to (no _ask): a client speaking something else.
            self._drop("box without _command or _ask")

    # dispatch

    def dispatchCommand(self, box: amp.AmpBox) -> defer.Deferred:  # noqa: N802 (AMP's name)
        self._in_flight += 1
        self._disarm()
        d = defer.maybeDeferred(self._run, box)
        d.addErrback(self._to_remote_error, box.get(amp.COMMAND, b""))

        def finished(result):
            self._in_flight -= 1
            self._settle_timer()
            return result

        d.addBoth(finished)
        track = getattr(self.daemon, "track", None)
        if track is not None:
            track(d)  # so the SIGTERM drain waits for this request
        return d

    def _run(self, box: amp.AmpBox):
        name = box[amp.COMMAND]
        command = COMMANDS.get(name)
        if command is None:
            raise error("PROTOCOL", f"unknown verb '{name.decode('utf-8', 'replace')}'")
        if self.caller is None:
            raise error("EACCES", f"peer cred unavailable: {self.cred_error}")
        arguments = parse_request(command, box)
        handler = _HANDLERS[command]
        d = defer.maybeDeferred(handler, self, box=box, **arguments)
        d.addCallback(command.makeResponse, self)
        return d

    def _to_remote_error(self, failure: Failure, verb: bytes) -> Failure:
        exc = failure.value
        code = getattr(exc, "code", None)
        if isinstance(exc, ApiError) or (
            code in ERROR_CODES and isinstance(getattr(exc, "reason", None), str)
        ):
            code, reason = exc.code, exc.reason
        else:
            log.error("socket %s failed unexpectedly",
                      verb.decode("utf-8", "replace"), exc_info=failure_exc_info(failure))
            code, reason = "IO", _GENERIC_REASON
        return Failure(amp.RemoteAmpError(code.encode("ascii", "replace"),
                                          clean_reason(reason)))

    # -- handlers ------------------------------------------------------------

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    def _data_dir(self) -> Path:
        return Path(self.daemon.store.data_dir)

    def _swap_later(self, new_config: Any) -> None:
        """Queue the live swap (called from a worker thread while the config lock is held)."""
        self.reactor.callFromThread(self.daemon.swap_config, new_config)

    def do_version(self, box) -> dict:
        info = version_info()
        return {"tag": info.tag, "git_hash": info.git_hash, "target": info.target,
                "build_date": info.build_date}

    def do_send(self, box, body: bytes, text_only: bool | None, html_body: bytes | None,
                idempotency_key: str | None = None):
        if text_only and html_body is not None:
            raise error("MALFORMED",
                        "AIMX/1 SEND: --text-only and --html-body are mutually exclusive")
        if idempotency_key is not None:
            problem = idempotency_key_problem(idempotency_key)
            if problem is not None:
                raise error("MALFORMED", f"invalid idempotency key {quoted(idempotency_key)}: "
                                         f"{problem}")
        send = getattr(self.daemon, "send", None)
        if send is None:
            raise error("TEMP", "sending is not available")
        d = defer.maybeDeferred(send, body, bool(text_only), html_body, self.caller.uid,
                                caller_pid=self.caller.pid, idempotency_key=idempotency_key)
        d.addCallback(lambda message_id: {"message_id": message_id})
        return d

    def _mark(self, verb: str, box, mailbox: str, id: str, read: bool):
        if any(key.lower() == "folder" for key in undeclared_keys(MarkRead, box)):
            raise error("MALFORMED", "Folder header is not allowed on MARK verbs "
                                     "(sent-mail mark removed; inbox is the only target)")
        if not check_email_id(id):
            raise error("NOTFOUND", f"email id '{id}' contains invalid characters")
        config = self.daemon.config
        target = config.mailboxes.get(mailbox)
        if target is None or not self.caller.authorize(verb, mailbox, target):
            raise mailbox_not_found(mailbox)

        def work() -> dict:
            self.daemon.store.set_read(mailbox, target.owner, id, read)
            return {}

        def marked(result: dict) -> dict:
            self.daemon.watch.read_state(self.daemon.config, mailbox, id, read)
            return result

        return self._in_thread(work).addCallback(marked)

    def do_mark_read(self, box, mailbox: str, id: str):
        return self._mark("MARK-READ", box, mailbox, id, True)

    def do_mark_unread(self, box, mailbox: str, id: str):
        return self._mark("MARK-UNREAD", box, mailbox, id, False)

    def do_mailbox_create(self, box, name: str, owner: str | None):
        if owner is not None:
            check_owner_value(owner)
        check_mailbox_name(name)
        caller = self.caller
        if caller.is_root:
            if not owner:
                raise error("VALIDATION", "MAILBOX-CREATE requires an Owner: header")
        else:
            if name in configmod.ROLE_MAILBOX_NAMES:
                raise error("EACCES", f"mailbox name '{name}' is a role address reserved for "
                                      "root (RFC 2142); ask root to create it")
            owner = username_of(caller.uid)
            if owner is None:
                raise error("VALIDATION", f"uid {caller.uid} has no passwd entry")
        caller.authorize("MAILBOX-CREATE", name, None, open_to_all=True)
        config = self.daemon.config
        if name in config.mailboxes:
            raise error("MAILBOX", f"mailbox '{name}' already exists")
        owner_limit = None if caller.is_root else config.max_mailboxes_per_user

        def work() -> dict:
            with self.daemon.store.mailbox_lock(name), self.daemon.config_lock:
                new = create_mailbox(self.daemon.config_path, self._data_dir(), name, owner,
                                     self.daemon.data_dir_override, owner_limit=owner_limit)
                self._swap_later(new)
            log.info("mailbox created verb=MAILBOX-CREATE mailbox=%s owner=%s caller_uid=%d",
                     name, owner, caller.uid)
            return {"address": new.mailboxes[name].address, "owner": owner}

        return self._in_thread(work)

    def do_mailbox_delete(self, box, name: str, force: bool | None):
        check_mailbox_name(name)
        target = self.daemon.config.mailboxes.get(name)
        if not self.caller.authorize("MAILBOX-DELETE", name, target):
            raise error("MAILBOX", f"mailbox '{name}' does not exist")
        caller = self.caller

        def work() -> dict:
            with self.daemon.store.mailbox_lock(name), self.daemon.config_lock:
                new = delete_mailbox(self.daemon.config_path, self._data_dir(), name,
                                     bool(force), self.daemon.data_dir_override)
                self._swap_later(new)
            log.info("mailbox deleted verb=MAILBOX-DELETE mailbox=%s caller_uid=%d",
                     name, caller.uid)
            return {}

        return self._in_thread(work)

    def do_mailbox_list(self, box):
        return self._in_thread(mailbox_rows, self.daemon.config, self._data_dir(), self.caller)

    def do_hook_create(self, box, mailbox: str, event: str, name: str | None,
                       cmd: list[str] | None, fire_on_untrusted: bool | None,
                       type: str | None, timeout_secs: int | None):
        config = self.daemon.config
        target = config.mailboxes.get(mailbox)
        if target is None or not self.caller.authorize("HOOK-CREATE", mailbox, target):
            raise mailbox_not_found(mailbox)
        if target.is_catchall(config.domain):
            raise error("MAILBOX", f"mailbox '{mailbox}' is the catchall; "
                                   "hooks on the catchall are forbidden")
        if event not in configmod.EVENTS:
            raise error("VALIDATION",
                        f"invalid event '{event}': expected 'on_receive' or 'after_send'")
        if name is not None and not configmod.HOOK_NAME_RE.fullmatch(name):
            raise error("VALIDATION", f"invalid hook name '{name}': "
                                      f"must match {configmod.HOOK_NAME_RE.pattern}")
        extras = undeclared_keys(HookCreate, box)
        for key in extras:
            if key in _LEGACY_HOOK_KEYS:
                raise error("PROTOCOL", _LEGACY_HOOK_KEYS[key])
        if extras:
            raise error("PROTOCOL", f"unknown field '{extras[0]}'")
        argv = list(cmd or [])
        hook_type = "cmd" if type is None else type
        flag = bool(fire_on_untrusted)
        timeout = 60 if timeout_secs is None else timeout_secs
        check_hook_fields(event, argv, hook_type, flag, timeout)
        hook = configmod.Hook(event=event, cmd=tuple(argv), name=name or None,
                              fire_on_untrusted=flag, timeout_secs=timeout, type=hook_type)
        caller = self.caller

        def work() -> dict:
            with self.daemon.store.mailbox_lock(mailbox), self.daemon.config_lock:
                new = create_hook(self.daemon.config_path, mailbox, hook,
                                  self.daemon.data_dir_override)
                self._swap_later(new)
            hook_log.info("hook created verb=HOOK-CREATE mailbox=%s hook_name=%s caller_uid=%d",
                          mailbox, hook.effective_name, caller.uid)
            return {"name": hook.effective_name}

        return self._in_thread(work)

    def do_hook_delete(self, box, name: str, mailbox: str | None):
        config = self.daemon.config
        caller = self.caller
        try:
            owner_mailbox = find_hook(config, name, caller, mailbox)
        except ApiError as exc:
            foreign = config.find_hook(name) if exc.code == "ENOENT" else None
            if foreign is not None:  # someone else's: the operator's log says so, the caller not
                caller.authorize("HOOK-DELETE", foreign[0].name, foreign[0])
            raise
        # The decision's log line; find_hook looked only at hooks the caller may delete.
        caller.authorize("HOOK-DELETE", owner_mailbox, config.mailboxes[owner_mailbox])

        def work() -> dict:
            with self.daemon.store.mailbox_lock(owner_mailbox), self.daemon.config_lock:
                new = delete_hook(self.daemon.config_path, name, owner_mailbox,
                                  self.daemon.data_dir_override)
                self._swap_later(new)
            hook_log.info("hook deleted verb=HOOK-DELETE mailbox=%s hook_name=%s caller_uid=%d",
                          owner_mailbox, name, caller.uid)
            return {}

        return self._in_thread(work)

    def do_hook_list(self, box):
        return {"rows": hook_rows(self.daemon.config, self.caller)}

    # -- WATCH: events pushed to the client over this connection ----------------

    def do_watch(self, box, mailboxes: list[str] | None):
        """Watch the named mailboxes (none named: every one the caller may read).

        Authorized as listing is; a name the caller may not read is missing,
        exactly like one nobody has. A second WATCH replaces the first.
        """
        config = self.daemon.config
        names = frozenset(mailboxes) if mailboxes else None
        for name in sorted(names or ()):
            target = config.mailboxes.get(name)
            if target is None or not self.caller.authorize("WATCH", name, target):
                raise mailbox_not_found(name)
        if self._watcher is not None:
            self.daemon.watch.remove(self._watcher)
        self._watcher = Watcher(self.caller, names, self._send_event)
        self.daemon.watch.add(self._watcher)
        watched = sorted(name for name, mailbox in config.mailboxes.items()
                         if (names is None or name in names) and may_read(self.caller, mailbox))
        log.info("watch started caller_uid=%d mailboxes=%s", self.caller.uid,
                 quoted(",".join(watched) if names is not None else "*"))
        return {"mailboxes": watched}

    def _send_event(self, event: MailEvent) -> None:
        """One WATCH-EVENT; a client this far behind is dropped rather than buffered for."""
        if self.transport is None or self._dropped:
            return
        if len(self._unanswered) >= MAX_UNANSWERED:
            self._drop(f"watch client uid {self.caller.uid} left {MAX_UNANSWERED} events "
                       "unanswered")
            return
        self._event_tags += 1
        tag = b"e%x" % self._event_tags
        self._unanswered.add(tag)
        try:
            self.boxSender.sendBox(amp.AmpBox(request_box(WatchEvent, event.fields(), tag)))
        except (amp.ProtocolSwitched, ConnectionLost):
            self._unanswered.discard(tag)

    def _event_answered(self, tag: bytes) -> None:
        if tag not in self._unanswered:
            self._drop("answer to no WATCH-EVENT")
            return
        self._unanswered.discard(tag)


_HANDLERS: dict[type[ApiCommand], Callable[..., Any]] = {
    Send: ApiProtocol.do_send,
    MarkRead: ApiProtocol.do_mark_read,
    MarkUnread: ApiProtocol.do_mark_unread,
    MailboxCreate: ApiProtocol.do_mailbox_create,
    MailboxDelete: ApiProtocol.do_mailbox_delete,
    MailboxList: ApiProtocol.do_mailbox_list,
    HookCreate: ApiProtocol.do_hook_create,
    HookDelete: ApiProtocol.do_hook_delete,
    HookList: ApiProtocol.do_hook_list,
    Version: ApiProtocol.do_version,
    Watch: ApiProtocol.do_watch,
}


def failure_exc_info(failure: Failure):
    return (failure.type, failure.value, failure.getTracebackObject())


class ApiFactory(protocol.Factory):
    """Builds one ``ApiProtocol`` per accepted connection on the daemon's socket."""

    def __init__(self, daemon: Any, timeout: float | None = None) -> None:
        self.daemon = daemon
        self.timeout = api_timeout() if timeout is None else timeout
        self.limits = ConnectionLimits()

    def admit(self, uid: int) -> str | None:
        """Count a connection from ``uid`` against the live config's caps, or say why not."""
        config = self.daemon.config
        cap = socket_connection_cap(config.socket_max_connections, file_limit())
        return self.limits.admit(uid, config.socket_max_connections_per_user, cap,
                                 self.daemon.reactor.seconds())

    def release(self, uid: int) -> None:
        self.limits.release(uid)

    def buildProtocol(self, addr) -> ApiProtocol:  # noqa: N802 (Twisted's name)
        proto = ApiProtocol(self.daemon, self.timeout)
        proto.factory = self
        return proto
