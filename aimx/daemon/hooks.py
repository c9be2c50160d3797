"""Run ``on_receive`` and ``after_send`` hooks as the mailbox owner.

Mail is an event: once a message is stored (after the SMTP 250) or a send
has resolved (after the SEND reply), the mailbox's hooks run with the email
file on stdin. Hooks are observers only: nothing they do, and nothing that
goes wrong while running them, changes storage, the SMTP reply or the SEND
result, so every failure here is logged and swallowed.

How a hook runs (spec 40 §8, decisions D20 and D23):

* through ``reactor.spawnProcess`` and a small exec trampoline
  (``aimx/daemon/hooktrampoline.py``) that makes it a session leader and, when the
  daemon is root, takes on the owner's uid, gid and supplementary groups;
* or, when the daemon is root under systemd, inside a transient
  ``systemd-run`` unit with filesystem protection and a memory cap;
* with a clean environment, cwd ``/``, the ``.md`` bytes on stdin and
  bounded stdout/stderr tails; on timeout the whole process group gets
  SIGTERM, then SIGKILL 5 s later.

Scheduling: the hooks of one email run in config order, one at a time;
different emails run concurrently, at most ``max_running`` hook processes
at once across the daemon. ``on_receive`` fires at most once per
(mailbox, Message-ID) in 24 h, remembered on disk (``hookjournal``) so a
restart or a concurrent ``aimx ingest`` does not fire again.

Loop guard (``aimx.mail.loopguard``): automatic mail wakes only hooks with
``fire_on_automatic``, and ``on_receive`` fires at most ``hook_rate_limit``
times per (mailbox, sender) within ``hook_rate_window_secs``, counted in
memory by this runner. Every suppression is logged with its reason.
"""

from __future__ import annotations

import datetime
import grp
import json
import os
import pwd
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.internet import defer, error, protocol, threads
from twisted.internet.process import ProcessReader
from twisted.python import failure

from aimx.config import AFTER_SEND, ON_RECEIVE
from aimx.daemon.hookjournal import FiredLog, PendingHooks, receive_skip_reason
from aimx.logs import logger
from aimx.mail.loopguard import FiringCap
from aimx.mail.trust import sender_address

log = logger("aimx::hook")

SEND_STATUSES = ("delivered", "failed", "deferred")

TAIL_BYTES = 65_536
KILL_GRACE_SECS = 5.0
SYSTEMD_BACKSTOP_SECS = 10.0
# After SIGKILL and closing our pipe ends, how long to wait for the reap
# before giving up on a process (it can only be stuck in the kernel).
REAP_GIVE_UP_SECS = 2.0
SLOW_MS = 5_000
# Fixed: the daemon's own PATH may name directories under root's home.
HOOK_PATH = "/usr/local/bin:/usr/bin:/bin"
TRAMPOLINE = Path(__file__).with_name("hooktrampoline.py")
REPORT_FD = 3  # the trampoline's "exec never happened" channel

SANDBOX_SYSTEMD = "systemd-run"
SANDBOX_SETUID = "setuid"
SANDBOX_NONE = "-"


# --------------------------------------------------------------------------
# Data


@attrs.frozen
class AfterSendInfo:
    """What ``after_send`` hooks learn about a send that reached delivery."""

    from_header: str
    to_header: str
    subject: str
    filepath: str  # sent copy; "" when nothing was persisted (deferred)
    email_id: str  # stem of filepath, or ""
    message_id: str  # as sent, with angle brackets
    status: str = attrs.field(validator=attrs.validators.in_(SEND_STATUSES))


@attrs.frozen
class Owner:
    """The passwd facts a hook run needs, resolved at fire time."""

    name: str
    uid: int
    gid: int
    home: str
    group: str  # primary group name (numeric text if it has no name)


@attrs.frozen
class HookOutcome:
    """How one hook run ended; the Deferreds of the fire methods yield lists of these."""

    hook_name: str
    event: str
    mailbox: str
    owner: str
    sandbox: str  # systemd-run | setuid | -
    exit_code: int  # exit status, or -1 on signal death / never exec'd
    timed_out: bool  # SIGTERM was sent
    duration_ms: int
    stdout_tail: bytes = b""
    stderr_tail: bytes = b""
    error_kind: str | None = None  # user-not-found | spawn-failed | io-failed
    error: str | None = None


@attrs.frozen
class _Job:
    """One hook of one fire, with everything decided on the reactor thread."""

    hook_name: str
    event: str
    mailbox: str
    owner: str
    cmd: tuple[str, ...]
    timeout_secs: int
    aimx_env: Mapping[str, str]
    stdin_path: str
    log_id: str


class _HookLike(Protocol):
    event: str
    cmd: Sequence[str]
    fire_on_untrusted: bool
    fire_on_automatic: bool
    timeout_secs: int

    @property
    def effective_name(self) -> str: ...


# --------------------------------------------------------------------------
# Pure helpers


def utc_now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def bare_message_id(value: str) -> str:
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        return value[1:-1]
    return value


def on_receive_env(hook_name: str, mailbox: str, filepath: str, email_id: str,
                   fields: Mapping[str, Any]) -> dict[str, str]:
    """The ``AIMX_*`` variables of an ``on_receive`` run (spec 40 §8.3)."""
    date = str(fields.get("date") or "") or str(fields.get("received_at") or "")
    return {
        "AIMX_HOOK_NAME": hook_name,
        "AIMX_EVENT": ON_RECEIVE,
        "AIMX_MAILBOX": mailbox,
        "AIMX_FROM": str(fields.get("from") or ""),
        "AIMX_TO": str(fields.get("to") or ""),
        "AIMX_SUBJECT": str(fields.get("subject") or "") or "(no subject)",
        "AIMX_FILEPATH": filepath,
        "AIMX_MESSAGE_ID": bare_message_id(str(fields.get("message_id") or "")),
        "AIMX_ID": email_id,
        "AIMX_DATE": date or utc_now_rfc3339(),
    }


def after_send_env(hook_name: str, mailbox: str, info: AfterSendInfo,
                   now: str | None = None) -> dict[str, str]:
    """The ``AIMX_*`` variables of an ``after_send`` run (spec 40 §8.3)."""
    return {
        "AIMX_HOOK_NAME": hook_name,
        "AIMX_EVENT": AFTER_SEND,
        "AIMX_MAILBOX": mailbox,
        "AIMX_FROM": info.from_header,
        "AIMX_TO": info.to_header,
        "AIMX_SUBJECT": info.subject,
        "AIMX_FILEPATH": info.filepath,
        "AIMX_MESSAGE_ID": info.message_id,
        "AIMX_ID": info.email_id,
        "AIMX_DATE": now or utc_now_rfc3339(),
        "AIMX_SEND_STATUS": info.status,
    }


def process_env(aimx_env: Mapping[str, str], owner: Owner) -> dict[str, str]:
    """The complete environment of a hook: the ``AIMX_*`` values, a fixed ``PATH`` and
    the owner's identity; nothing of the daemon's leaks in (D23)."""
    env = dict(aimx_env)
    env.update(PATH=HOOK_PATH, HOME=owner.home, USER=owner.name, LOGNAME=owner.name)
    return env


def log_id_field(email_id: str, message_id: str) -> str:
    if email_id:
        return f"email_id={email_id}"
    if message_id:
        return f"message_id={message_id}"
    return "email_id="


def _utf8_tail(data: bytes) -> str:
    """Decode a byte slice that may start inside a UTF-8 sequence."""
    start = 0
    while start < len(data) and start < 3 and 0x80 <= data[start] <= 0xBF:
        start += 1
    return data[start:].decode("utf-8", "replace")


def render_stderr_tail(data: bytes, *, quoted: bool = True) -> str:
    """A stderr tail as one log-safe token (spec 40 §8.7).

    Lossy UTF-8, JSON-string escaped (so newlines stay on one log line);
    past 1 KiB only the first 512 characters and the last 504 bytes remain,
    joined by ``...``. ``quoted=False`` drops the surrounding quotes.
    """
    if len(data) > 1024:
        head = data.decode("utf-8", "replace")[:512]
        body = _json_inner(head) + "..." + _json_inner(_utf8_tail(data[-504:]))
    else:
        body = _json_inner(data.decode("utf-8", "replace"))
    return f'"{body}"' if quoted else body


def _json_inner(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def systemd_run_argv(systemd_run: str, cmd: Sequence[str], *, owner: Owner,
                     timeout_secs: int, env: Mapping[str, str]) -> list[str]:
    """The ``systemd-run`` wrapper of spec 40 §8.4.

    Beyond the reference: ``--gid`` names the owner's real primary group
    (not a group assumed to share the user's name), and the owner's home
    and ``/tmp`` stay writable so ordinary log-to-file recipes work under
    ``ProtectSystem=strict``.
    """
    argv = [systemd_run, "--quiet", "--pipe", "--wait", "--collect"]
    if owner.name != "root":
        argv += [f"--uid={owner.name}", f"--gid={owner.group}"]
    argv += [
        "--property=ProtectSystem=strict",
        "--property=PrivateDevices=yes",
        "--property=NoNewPrivileges=yes",
        "--property=MemoryMax=256M",
        f"--property=RuntimeMaxSec={timeout_secs}",
        f"--property=ReadWritePaths={owner.home} /tmp",
    ]
    argv += [f"--setenv={key}={value}" for key, value in env.items()]
    argv += ["--", *cmd]
    return argv


def trampoline_argv(cmd: Sequence[str], owner: Owner | None,
                    env: Mapping[str, str] | None = None) -> list[str]:
    """Interpreter + trampoline + the hook's argv; ``owner`` set means switch identity.

    The interpreter adds ``LC_CTYPE`` to its environment when started in the
    C locale; unless ``env`` sets it, the trampoline removes it again.
    """
    python = sys.executable or "/usr/bin/python3"
    argv = [python, "-I", "-S", "-B", str(TRAMPOLINE)]
    if "LC_CTYPE" not in (env or {}):
        argv.append("--unset=LC_CTYPE")
    if owner is None:
        argv.append("keep")
    else:
        argv += ["switch", owner.name, str(owner.uid), str(owner.gid)]
    return [*argv, "--", *cmd]


def choose_sandbox(requested: str = "auto") -> str:
    """``systemd-run`` for a root daemon on a systemd host, unless forced off; else ``setuid``."""
    if requested in (SANDBOX_SYSTEMD, SANDBOX_SETUID):
        return requested
    if requested != "auto":
        raise ValueError(f"unknown hook sandbox {requested!r}")
    if (os.geteuid() == 0 and os.path.isdir("/run/systemd/system")
            and shutil.which("systemd-run") and not os.environ.get("AIMX_SANDBOX_FORCE_FALLBACK")):
        return SANDBOX_SYSTEMD
    return SANDBOX_SETUID


# --------------------------------------------------------------------------
# Blocking helpers (run in the reactor's thread pool)


def lookup_owner(name: str) -> Owner | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    return Owner(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, group)


@attrs.define
class _Stdin:
    """The stored email that every hook of one fire reads on stdin.

    Opened once, checked and without following any link (``open_stored_email``),
    right before the fire's first hook process starts; each hook then gets the bytes
    read from that descriptor. Hooks run as the mailbox owner, who may replace the
    file's path with anything: that changes nothing for a later hook of the fire, as
    the path is never opened again. Blocking methods: call them off the reactor thread.
    """

    path: str
    folder: str
    mailbox: str
    fd: int | None = None
    opened: bool = False

    def open(self) -> str | None:
        """Open the file; returns a warning when it cannot be (the hooks then get nothing)."""
        from aimx.storage.emailfiles import open_stored_email

        self.opened = True
        if not self.path:
            return None
        try:
            self.fd = open_stored_email(self.path, self.folder, self.mailbox)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"hook stdin: read {self.path} failed: {exc}; piping empty payload"
        return None

    def read(self) -> tuple[bytes, str | None]:
        """The bytes to pipe to a hook, and a warning when reading failed."""
        from aimx.storage.emailfiles import read_stored_email

        if self.fd is None:
            return b"", None
        try:
            return read_stored_email(self.fd), None
        except OSError as exc:
            return b"", f"hook stdin: read {self.path} failed: {exc}; piping empty payload"

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------
# One hook process


class _HookProcess(protocol.ProcessProtocol):
    """Feeds stdin, keeps output tails, enforces the timeout, reports when done.

    ``done`` fires once the child is reaped and our pipe ends are closed:
    normally at EOF, at the latest at the kill deadline (timeout + 5 s), when
    the group is SIGKILLed and the pipes are closed from our side, so a
    grandchild that escaped the group while holding them cannot wedge us.
    """

    def __init__(self, reactor: Any, stdin: bytes, term_after: float) -> None:
        self._reactor = reactor
        self._stdin = stdin
        self._term_after = term_after
        self.done: defer.Deferred[_HookProcess] = defer.Deferred()
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.report = bytearray()
        self.exit_code: int | None = None
        self.timed_out = False
        self.pid: int | None = None
        self._calls: list[Any] = []

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self._calls.append(self._reactor.callLater(self._term_after, self._terminate))
        if self._stdin:
            self.transport.write(self._stdin)
        self._stdin = b""
        self.transport.closeStdin()  # EOF after the payload; EPIPE just ends the pipe

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            _keep_tail(self.stdout, data)
        elif childFD == 2:
            _keep_tail(self.stderr, data)
        elif childFD == REPORT_FD and len(self.report) < 4096:
            self.report += data[:4096]

    def processExited(self, reason: failure.Failure) -> None:
        value = reason.value
        if isinstance(value, error.ProcessDone):
            self.exit_code = 0
        elif isinstance(value, error.ProcessTerminated) and value.exitCode is not None:
            self.exit_code = value.exitCode
        else:
            self.exit_code = -1

    def processEnded(self, reason: failure.Failure) -> None:
        if self.exit_code is None:
            self.processExited(reason)
        self._finish()

    def _finish(self) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        if not self.done.called:
            self.done.callback(self)

    def _terminate(self) -> None:
        self.timed_out = True
        self._signal_group(signal.SIGTERM)
        self._calls.append(self._reactor.callLater(KILL_GRACE_SECS, self._kill))

    def _kill(self) -> None:
        self._signal_group(signal.SIGKILL)
        _close_pipes(self.transport)
        self._calls.append(self._reactor.callLater(REAP_GIVE_UP_SECS, self._give_up))

    def _give_up(self) -> None:
        if self.exit_code is None:
            self.exit_code = -1
        self._finish()

    def _signal_group(self, signum: int) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signum)
            return
        except ProcessLookupError:
            pass
        except OSError as exc:
            log.warning(f"hook pgid={self.pid} signal {signum} failed: {exc}")
            return
        # No such group: the child has not reached setsid yet, or everything
        # is gone. Signal the child itself only while it is still unreaped,
        # so a recycled pid is never hit.
        if self.exit_code is None:
            try:
                os.kill(self.pid, signum)
            except OSError:
                pass


def _keep_tail(buffer: bytearray, data: bytes) -> None:
    buffer += data
    if len(buffer) > TAIL_BYTES:
        del buffer[: len(buffer) - TAIL_BYTES]


def _close_pipes(transport: Any) -> None:
    """Close our ends of every child pipe now, whatever still holds theirs."""
    pipes = getattr(transport, "pipes", None) or {}
    for pipe in list(pipes.values()):
        if isinstance(pipe, ProcessReader) and pipe.disconnecting:
            continue  # already closing: its connectionLost is scheduled
        try:
            pipe.stopReading()
            pipe.stopWriting()
            pipe.connectionLost(failure.Failure(error.ConnectionDone()))
        except Exception:
            log.exception("closing a hook pipe failed")


# --------------------------------------------------------------------------
# The runner


class HookRunner:
    """Fires a mailbox's hooks; one per daemon (or per ``aimx ingest`` run).

    ``state_dir`` holds the 24 h fired-once markers. ``max_running`` bounds
    hook processes alive at once across all emails; the rest queue.
    ``sandbox`` is ``auto`` (systemd-run when root on a systemd host and
    ``AIMX_SANDBOX_FORCE_FALLBACK`` is unset), ``systemd-run`` or ``setuid``.
    """

    def __init__(self, reactor: Any, *, state_dir: Path, max_running: int = 16,
                 sandbox: str = "auto") -> None:
        self._reactor = reactor
        self.fired = FiredLog(Path(state_dir))
        self.pending = PendingHooks(Path(state_dir))
        self.sandbox = choose_sandbox(sandbox)
        self.max_running = max_running
        self._slots = defer.DeferredSemaphore(max_running)
        self._systemd_run = shutil.which("systemd-run") or "systemd-run"
        self._in_flight: set[defer.Deferred[Any]] = set()
        self._idle_waiters: list[defer.Deferred[None]] = []
        #: Pids of the hook processes alive now, so SEND can tell mail sent from a hook.
        self.running_pids: set[int] = set()
        self._cap = FiringCap()
        self._removals: set[defer.Deferred[Any]] = set()  # pending markers being removed

    # -- public API ---------------------------------------------------------

    def fire_on_receive(self, config: Any, mailbox_name: str,
                        result: Any) -> defer.Deferred[list[HookOutcome]]:
        """Fire ``on_receive`` hooks for a stored email; never fails.

        The Deferred fires with the outcomes once this email's hooks are all
        done; the SMTP path ignores it, ``aimx ingest`` waits on it.
        """
        try:
            return self._track(self._start_on_receive(config, mailbox_name, result))
        except Exception:
            log.exception(f"on_receive hooks for mailbox={mailbox_name} failed to start")
            return defer.succeed([])

    def replay_pending(self, config: Any, origin: str | None = None) -> defer.Deferred[int]:
        """Fire the hooks of emails a crash stored but never fired; fires with their count.

        ``origin`` limits the replay to the emails one (dead) SMTP worker journalled.
        It waits for the marker removals of hooks already started, so an email
        whose hooks fired from a report is never replayed as well.
        """

        def load() -> list[Any]:
            from aimx.mail import frontmatter

            results = []
            for mailbox, path in self.pending.entries(origin):
                try:
                    results.append(read_stored_result(mailbox, path))
                except (OSError, frontmatter.FrontmatterError) as exc:
                    log.warning(f"pending hooks for {path} dropped: {exc}")
                    self.pending.remove(path)
            return results

        def fire(results: list[Any]) -> int:
            for result in results:
                log.info(f"replaying on_receive hooks after a restart mailbox={result.mailbox} "
                         f"email_id={result.email_id}")
                self.fire_on_receive(config, result.mailbox, result)
            return len(results)

        settled = defer.DeferredList(list(self._removals), consumeErrors=True)
        d = settled.addCallback(lambda _: self._in_thread(load))
        d.addCallback(fire)
        d.addErrback(lambda f: (log.error(f"hook replay failed: {f.getTraceback()}"), 0)[1])
        return d

    def fire_after_send(self, config: Any, mailbox_name: str,
                        info: AfterSendInfo) -> defer.Deferred[list[HookOutcome]]:
        """Fire ``after_send`` hooks once a send resolved; never fails."""
        try:
            return self._track(self._start_after_send(config, mailbox_name, info))
        except Exception:
            log.exception(f"after_send hooks for mailbox={mailbox_name} failed to start")
            return defer.succeed([])

    @property
    def in_flight(self) -> int:
        """Fires (emails or sends) whose hooks have not all finished."""
        return len(self._in_flight)

    def wait_idle(self) -> defer.Deferred[None]:
        """Fires when no fire is in flight (for shutdown and tests)."""
        if not self._in_flight:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    # -- planning (reactor thread, no I/O) -----------------------------------

    def _hooks(self, config: Any, mailbox_name: str, event: str) -> tuple[Any, list[_HookLike]]:
        mailbox = config.mailboxes.get(mailbox_name)
        if mailbox is None:
            log.info(f"No hooks found for event={event} mailbox={mailbox_name}")
            return None, []
        all_hooks = list(mailbox.hooks)
        if all_hooks and mailbox.is_catchall(config.domain):
            log.warning(
                f"catchall mailbox '{mailbox_name}' has {len(all_hooks)} configured hook(s) "
                "but catchall hooks are forbidden; refusing to fire")
            return mailbox, []
        hooks = [hook for hook in all_hooks if hook.event == event]
        if not hooks:
            log.info(f"No hooks found for event={event} mailbox={mailbox_name}")
        return mailbox, hooks

    def _start_on_receive(self, config: Any, mailbox_name: str,
                          result: Any) -> defer.Deferred[list[HookOutcome]]:
        if getattr(result, "status", "stored") != "stored":
            return defer.succeed([])  # a duplicate stores nothing and fires nothing
        mailbox, hooks = self._hooks(config, mailbox_name, ON_RECEIVE)
        fields = result.fields
        eligible = []
        for hook in hooks:
            skip = receive_skip_reason(hook, fields)
            if skip is None:
                eligible.append(hook)
            else:
                log.info(f"hook_name={hook.effective_name} event={ON_RECEIVE} "
                         f"mailbox={mailbox_name} skipped: {skip}")
        if not eligible:
            return defer.succeed([])
        filepath = str(result.path or "")
        email_id = str(result.email_id or "")
        message_id = bare_message_id(str(fields.get("message_id") or ""))
        jobs = [
            _Job(hook_name=hook.effective_name, event=ON_RECEIVE, mailbox=mailbox_name,
                 owner=mailbox.owner, cmd=tuple(hook.cmd), timeout_secs=int(hook.timeout_secs),
                 aimx_env=on_receive_env(hook.effective_name, mailbox_name, filepath,
                                         email_id, fields),
                 stdin_path=filepath, log_id=log_id_field(email_id, message_id))
            for hook in eligible
        ]
        if filepath:
            # Decided from here on: a crash replay must not fire this email again.
            removal = self._in_thread(self.pending.remove, filepath)
            self._removals.add(removal)
            removal.addErrback(lambda f: log.warning(f"hook pending marker for {filepath}: "
                                                     f"{f.getErrorMessage()}"))
            removal.addBoth(lambda _: self._removals.discard(removal))
        limit, window = config.hook_rate(mailbox)
        sender = sender_address(str(fields.get("from") or ""))

        def run_within_cap() -> Any:
            if self._cap.admit((mailbox_name, sender), limit, window, self._reactor.seconds()):
                return self._run_in_order(jobs)
            log.warning(f"event={ON_RECEIVE} mailbox={mailbox_name} sender={sender or '-'} "
                        f"{log_id_field(email_id, message_id)} skipped: hook rate limit "
                        f"reached ({limit} firings per {window}s from this sender)")
            return []

        if not message_id:
            return defer.maybeDeferred(run_within_cap)
        claimed = self._in_thread(self.fired.claim, mailbox_name, message_id)

        def unrecorded(reason: failure.Failure) -> bool:
            # Missing a wake-up is worse than a rare second one (ingest
            # already refuses to store the same Message-ID twice in 24 h).
            log.warning(f"hook fired-once record for mailbox={mailbox_name} "
                        f"message_id={message_id} failed: {reason.getErrorMessage()}; "
                        "firing anyway")
            return True

        def decide(first_time: bool) -> Any:
            if first_time:
                return run_within_cap()
            log.info(f"event={ON_RECEIVE} mailbox={mailbox_name} message_id={message_id} "
                     "skipped: hooks already fired for this Message-ID within 24h")
            return []

        return claimed.addErrback(unrecorded).addCallback(decide)

    def _start_after_send(self, config: Any, mailbox_name: str,
                          info: AfterSendInfo) -> defer.Deferred[list[HookOutcome]]:
        mailbox, hooks = self._hooks(config, mailbox_name, AFTER_SEND)
        if not hooks:
            return defer.succeed([])
        now = utc_now_rfc3339()
        jobs = [
            _Job(hook_name=hook.effective_name, event=AFTER_SEND, mailbox=mailbox_name,
                 owner=mailbox.owner, cmd=tuple(hook.cmd), timeout_secs=int(hook.timeout_secs),
                 aimx_env=after_send_env(hook.effective_name, mailbox_name, info, now),
                 stdin_path=info.filepath, log_id=log_id_field(info.email_id, info.message_id))
            for hook in hooks
        ]
        return self._run_in_order(jobs)

    # -- execution --------------------------------------------------------------

    @defer.inlineCallbacks
    def _run_in_order(self, jobs: list[_Job]) -> Any:
        outcomes: list[HookOutcome] = []
        first = jobs[0]
        stdin = _Stdin(first.stdin_path, "inbox" if first.event == ON_RECEIVE else "sent",
                       first.mailbox)
        try:
            for job in jobs:
                try:
                    outcome = yield self._slots.run(self._run_job, job, stdin)
                except Exception:
                    log.exception(f"hook_name={job.hook_name} runner error")
                    continue
                outcomes.append(outcome)
        finally:
            stdin.close()
        return outcomes

    def _in_thread(self, func: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                         func, *args)

    @defer.inlineCallbacks
    def _run_job(self, job: _Job, stdin: _Stdin) -> Any:
        started = time.monotonic()
        log.info(f"firing hook_name={job.hook_name} event={job.event} "
                 f"mailbox={job.mailbox} owner={job.owner}")
        owner = yield self._in_thread(lookup_owner, job.owner)
        if owner is None:
            return self._finished(job, started, sandbox=SANDBOX_NONE, exit_code=-1,
                                  error_kind="user-not-found",
                                  error=f"user '{job.owner}' not found on this host")
        if not stdin.opened:
            warning = yield self._in_thread(stdin.open)
            if warning:
                log.warning(warning)
        payload, warning = yield self._in_thread(stdin.read)
        if warning:
            log.warning(warning)
        env = process_env(job.aimx_env, owner)
        root = os.geteuid() == 0
        if self.sandbox == SANDBOX_SYSTEMD:
            cmd = systemd_run_argv(self._systemd_run, job.cmd, owner=owner,
                                   timeout_secs=job.timeout_secs, env=env)
            argv = trampoline_argv(cmd, None, env)
            term_after = job.timeout_secs + SYSTEMD_BACKSTOP_SECS
        else:
            argv = trampoline_argv(job.cmd, owner if root else None, env)
            term_after = float(job.timeout_secs)
        proc = _HookProcess(self._reactor, payload, term_after)
        del payload
        try:
            self._reactor.spawnProcess(proc, argv[0], argv, env=env,
                                       childFDs={0: "w", 1: "r", 2: "r", REPORT_FD: "r"})
        except Exception as exc:
            return self._finished(job, started, sandbox=self.sandbox, exit_code=-1,
                                  error_kind="spawn-failed", error=str(exc))
        pid = proc.pid
        if pid is not None:
            self.running_pids.add(pid)
        try:
            yield proc.done
        finally:
            self.running_pids.discard(pid)
        exit_code = proc.exit_code if proc.exit_code is not None else -1
        timed_out = proc.timed_out
        if self.sandbox == SANDBOX_SYSTEMD and not timed_out and exit_code != 0:
            # RuntimeMaxSec stops the unit before our backstop: a failure at
            # the time limit is that timeout.
            timed_out = time.monotonic() - started >= job.timeout_secs
        if proc.report:
            return self._finished(job, started, sandbox=self.sandbox, exit_code=-1,
                                  timed_out=timed_out, stdout=bytes(proc.stdout),
                                  stderr=bytes(proc.stderr), error_kind="spawn-failed",
                                  error=proc.report.decode("utf-8", "replace").strip())
        return self._finished(job, started, sandbox=self.sandbox, exit_code=exit_code,
                              timed_out=timed_out, stdout=bytes(proc.stdout),
                              stderr=bytes(proc.stderr))

    def _finished(self, job: _Job, started: float, *, sandbox: str, exit_code: int,
                  timed_out: bool = False, stdout: bytes = b"", stderr: bytes = b"",
                  error_kind: str | None = None, error: str | None = None) -> HookOutcome:
        duration_ms = int((time.monotonic() - started) * 1000)
        outcome = HookOutcome(job.hook_name, job.event, job.mailbox, job.owner, sandbox,
                              exit_code, timed_out, duration_ms, stdout, stderr,
                              error_kind, error)
        log.info(f"hook_name={job.hook_name} event={job.event} mailbox={job.mailbox} "
                 f"owner={job.owner} sandbox={sandbox} {job.log_id} exit_code={exit_code} "
                 f"duration_ms={duration_ms} timed_out={'true' if timed_out else 'false'} "
                 f"stderr_tail={render_stderr_tail(stderr)}")
        if error_kind:
            log.warning(f"hook_name={job.hook_name} exec error ({error_kind}): {error}")
        elif timed_out:
            log.warning(f"hook_name={job.hook_name} timed out after {job.timeout_secs * 1000}ms")
        else:
            if exit_code != 0:
                log.warning(f"hook_name={job.hook_name} exited with code {exit_code}: "
                            f"{render_stderr_tail(stderr.strip(), quoted=False)}")
            if duration_ms > SLOW_MS:
                log.warning(f"hook_name={job.hook_name} slow: duration_ms={duration_ms} (>5s)")
        return outcome

    # -- bookkeeping ----------------------------------------------------------

    def _track(self, d: defer.Deferred[list[HookOutcome]]) -> defer.Deferred[list[HookOutcome]]:
        def swallow(reason: failure.Failure) -> list[HookOutcome]:
            log.error(f"hook runner error: {reason.getErrorMessage()}")
            log.debug(reason.getTraceback())
            return []

        d.addErrback(swallow)
        if d.called:
            return d
        self._in_flight.add(d)

        def untrack(outcomes: list[HookOutcome]) -> list[HookOutcome]:
            self._in_flight.discard(d)
            if not self._in_flight:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return outcomes

        d.addBoth(untrack)
        return d


def read_stored_result(mailbox: str, path: str) -> Any:
    """An inbound email read back from its file, as the result hooks fire with (blocking).

    Raises ``OSError`` or ``FrontmatterError`` when it cannot be read.
    """
    from aimx.mail import frontmatter
    from aimx.smtp.ingest import IngestResult
    from aimx.storage.emailfiles import open_stored_email, read_stored_email

    fd = open_stored_email(path, "inbox", mailbox)
    try:
        data = read_stored_email(fd)
    finally:
        os.close(fd)
    fields, _body = frontmatter.read_email(data)
    return IngestResult(status="stored", mailbox=mailbox, email_id=Path(path).stem,
                        path=Path(path), fields=fields)


def run_on_receive_blocking(config: Any, mailbox_name: str, result: Any, *,
                            state_dir: Path) -> list[HookOutcome]:
    """Fire ``on_receive`` hooks and wait for them, for a process without a reactor.

    For ``aimx ingest``, which runs hooks before it returns (spec 20 §4.1).
    Runs the global reactor until the hooks are done, so it works once per
    process. Never raises for a hook's failure.
    """
    from twisted.internet import reactor

    outcomes: list[HookOutcome] = []

    def start() -> None:
        runner = HookRunner(reactor, state_dir=Path(state_dir))
        d = runner.fire_on_receive(config, mailbox_name, result)
        d.addCallback(outcomes.extend)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    return outcomes
