"""The daemon side of SEND: prepare, deliver, keep a sent copy, answer, then run hooks.

Order matters to the agent on the other end of the socket: it gets its answer
as soon as the transport result is known and the sent copy is on disk, and
``after_send`` hooks start only after that answer went out (D20), so no hook
can make an agent wait.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.python.failure import Failure

from aimx.daemon import hookcallers, outbound, sendkeys
from aimx.daemon.protocol import ApiError, error
from aimx.logs import kv, logger
from aimx.smtp import delivery
from aimx.smtp.delivery import DEFERRED, DELIVERED, FAILED, DeliveryOutcome

log = logger("aimx::send")

MAIL_DROP_DETAIL = "written to the test mail drop"


def _in_thread(reactor: Any, func: Callable[..., Any], *args: Any, **kwargs: Any
               ) -> defer.Deferred[Any]:
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), func, *args, **kwargs)


def _transport(daemon: Any, config: Any, prepared: outbound.PreparedSend
               ) -> defer.Deferred[DeliveryOutcome]:
    """Hand the signed message over: to the test mail drop when set, else to its MX."""
    if daemon.mail_drop:
        d = _in_thread(daemon.reactor, outbound.mail_drop, daemon.mail_drop, prepared.signed)

        def dropped(_: Any) -> DeliveryOutcome:
            return DeliveryOutcome(DELIVERED, MAIL_DROP_DETAIL)

        def drop_failed(failure: Failure) -> DeliveryOutcome:
            failure.trap(outbound.SendError)
            return DeliveryOutcome(DEFERRED, failure.value.reason)

        return d.addCallbacks(dropped, drop_failed)
    return delivery.deliver(
        daemon.reactor, sender=prepared.envelope_from, recipient=prepared.envelope_to,
        message=prepared.signed, helo_domain=config.domain, resolvers=config.dns_resolvers,
        enable_ipv6=config.enable_ipv6, bind_address=daemon.bind_address)


def _store_copy(store: Any, prepared: outbound.PreparedSend, outcome: DeliveryOutcome) -> Any:
    """Write the sent copy (blocking); returns the ``StoredEmail``."""
    now = datetime.datetime.now(datetime.UTC)
    details = outcome.detail if outcome.status == FAILED else None
    fields = outbound.sent_copy_fields(prepared, outcome.status, details, now=now)
    return store.publish_sent(prepared.mailbox.name, prepared.mailbox.owner, fields,
                              prepared.body, now)


def _fire_hooks(daemon: Any, config: Any, prepared: outbound.PreparedSend,
                outcome: DeliveryOutcome, copy: Any) -> None:
    runner = getattr(daemon, "hooks", None)
    if runner is None:
        return
    from aimx.daemon.hooks import AfterSendInfo

    info = AfterSendInfo(
        from_header=prepared.from_, to_header=prepared.to, subject=prepared.subject,
        filepath=str(copy.path) if copy is not None else "",
        email_id=copy.id if copy is not None else "",
        message_id=prepared.message_id, status=outcome.status)
    runner.fire_after_send(config, prepared.mailbox.name, info)


def _from_hook_run(daemon: Any, caller_pid: int | None) -> defer.Deferred[bool]:
    """Whether the caller runs inside one of our hook runs (``/proc`` read in a thread)."""
    runner = getattr(daemon, "hooks", None)
    pids = frozenset(getattr(runner, "running_pids", ()) or ())
    if not pids or not caller_pid:
        return defer.succeed(False)
    return _in_thread(daemon.reactor, hookcallers.inside_hook_run, caller_pid, pids)


@defer.inlineCallbacks
def _send(daemon: Any, body: bytes, text_only: bool, html_body: bytes | None,
          caller_uid: int, caller_pid: int | None,
          before_transport: Callable[[], defer.Deferred[Any]] | None = None) -> Any:
    reactor = daemon.reactor
    config = daemon.config  # one snapshot for the whole send
    started = time.monotonic()
    from_hook = yield _from_hook_run(daemon, caller_pid)
    try:
        prepared = yield _in_thread(
            reactor, outbound.prepare_send, config, body, text_only=text_only,
            html_body=html_body, caller_uid=caller_uid, key_pem=daemon.dkim_key_pem,
            from_hook_run=from_hook, selector=daemon.dkim_selector)
    except outbound.SendError as exc:
        log.info("send refused: uid=%s code=%s reason=%s", caller_uid, exc.code, kv(exc.reason))
        raise error(exc.code, exc.reason) from None

    if before_transport is not None:
        yield before_transport()
    outcome = yield _transport(daemon, config, prepared)
    copy = None
    if outcome.status in (DELIVERED, FAILED):
        try:
            copy = yield _in_thread(reactor, _store_copy, daemon.store, prepared, outcome)
        except Exception as exc:  # noqa: BLE001 (the mail went out; only the copy is lost)
            log.error("sent copy for %s in mailbox %s not written: %s",
                      kv(prepared.message_id), kv(prepared.mailbox.name), exc)
        else:
            daemon.watch.sent_stored(daemon.config, prepared.mailbox.name, copy)
    log.info("send: mailbox=%s uid=%s from=%s to=%s message_id=%s format=%s status=%s "
             "copy=%s duration_ms=%d hook_run=%s detail=%s",
             kv(prepared.mailbox.name), caller_uid, kv(prepared.envelope_from),
             kv(prepared.envelope_to), kv(prepared.message_id), prepared.outbound_format,
             outcome.status, kv(copy.path if copy is not None else "-"),
             int((time.monotonic() - started) * 1000), "yes" if from_hook else "no",
             kv(outcome.detail))
    # callLater(0): the reply is written when this Deferred fires, the hooks start after.
    reactor.callLater(0, _fire_hooks, daemon, config, prepared, outcome, copy)
    if outcome.status == DELIVERED:
        return prepared.message_id
    raise error("DELIVERY" if outcome.status == FAILED else "TEMP", outcome.detail)


# -- idempotent sends ---------------------------------------------------------------------


KEY_CONFLICT = "ECONFLICT"


@attrs.define
class _InFlight:
    """A keyed send under way: later requests with its key wait for its outcome."""

    fingerprint: str
    waiters: list[defer.Deferred[Any]] = attrs.field(factory=list)


def _conflict(key: str, record: sendkeys.KeyRecord | None = None) -> Any:
    if record is not None and record.state == sendkeys.SENDING:
        return error(KEY_CONFLICT, f"idempotency key '{key}': an earlier send with this key was "
                                   "interrupted by a daemon restart and its outcome is unknown; "
                                   "check the sent folder, and use a new key to send again")
    return error(KEY_CONFLICT, f"idempotency key '{key}' was already used within 24 hours "
                               "for a different message; use a new key for a new message")


def _replay(record: sendkeys.KeyRecord) -> str:
    """The first outcome again: its Message-ID, or its refusal raised."""
    if record.state == sendkeys.SENT:
        return record.message_id
    raise error(record.code, record.reason)


@defer.inlineCallbacks
def _send_once(daemon: Any, key: str, body: bytes, text_only: bool, html_body: bytes | None,
               caller_uid: int, caller_pid: int | None) -> Any:
    """A SEND with an idempotency key: at most one message per (uid, key) in 24 h."""
    reactor = daemon.reactor
    store = daemon.send_keys
    fingerprint = yield _in_thread(reactor, outbound.request_fingerprint, body,
                                   text_only=text_only, html_body=html_body)
    slot = (caller_uid, key)
    running = daemon.sends_in_flight.get(slot)
    if running is not None:  # the same key is being sent right now: share its outcome
        if running.fingerprint != fingerprint:
            raise _conflict(key)
        waiter: defer.Deferred[Any] = defer.Deferred()
        running.waiters.append(waiter)
        log.info("send with idempotency key %s (uid=%s) waits for the same send in flight",
                 kv(key), caller_uid)
        result = yield waiter
        return result
    running = _InFlight(fingerprint)
    daemon.sends_in_flight[slot] = running
    result: Any
    try:
        result = yield _keyed_send(daemon, store, key, fingerprint, body, text_only, html_body,
                                   caller_uid, caller_pid)
    except Exception:  # noqa: BLE001 - handed to the waiters as it is, then raised
        result = Failure()
    finally:
        del daemon.sends_in_flight[slot]
    for waiter in running.waiters:
        waiter.callback(result)
    if isinstance(result, Failure):
        result.raiseException()
    return result


@defer.inlineCallbacks
def _keyed_send(daemon: Any, store: sendkeys.SendKeyStore, key: str, fingerprint: str,
                body: bytes, text_only: bool, html_body: bytes | None, caller_uid: int,
                caller_pid: int | None) -> Any:
    reactor = daemon.reactor
    record = yield _store_call(reactor, store.lookup, caller_uid, key)
    if record is not None:
        if record.fingerprint != fingerprint or record.state == sendkeys.SENDING:
            log.info("send refused: uid=%s idempotency key %s conflicts (state=%s)",
                     caller_uid, kv(key), record.state)
            raise _conflict(key, record)
        log.info("send replayed: uid=%s idempotency key %s state=%s message_id=%s",
                 caller_uid, kv(key), record.state, kv(record.message_id or "-"))
        return _replay(record)

    claimed = False

    def claim() -> defer.Deferred[Any]:
        nonlocal claimed
        claimed = True
        return _store_call(reactor, store.claim, caller_uid, key, fingerprint)

    try:
        message_id = yield _send(daemon, body, text_only, html_body, caller_uid, caller_pid,
                                 before_transport=claim)
    except ApiError as exc:
        if claimed:
            if exc.code == "DELIVERY":  # refused for good: a retry gets the same answer
                yield _record(reactor, store.complete, caller_uid, key, sendkeys.FAILED,
                              code=exc.code, reason=exc.reason)
            else:  # nothing left the host, or only for now: the key may be used again
                yield _record(reactor, store.release, caller_uid, key)
        raise
    yield _record(reactor, store.complete, caller_uid, key, sendkeys.SENT,
                  message_id=message_id)
    return message_id


def _store_call(reactor: Any, func: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    """Ask the key store before sending; when it cannot answer, nothing is sent (TEMP)."""
    d = _in_thread(reactor, func, *args)

    def failed(failure: Failure) -> None:
        log.error("idempotency key store: %s failed: %s", func.__name__,
                  failure.getErrorMessage())
        raise error("TEMP", "the idempotency key store is not available (see the daemon "
                            "log); nothing was sent")

    return d.addErrback(failed)


def _record(reactor: Any, func: Callable[..., Any], *args: Any, **kwargs: Any
            ) -> defer.Deferred[Any]:
    """Write to the key store; a failure is logged, never turned into the send's answer."""
    d = _in_thread(reactor, func, *args, **kwargs)

    def failed(failure: Failure) -> None:
        log.error("idempotency key store: %s failed: %s", func.__name__,
                  failure.getErrorMessage())

    return d.addErrback(failed)


def send(daemon: Any, body: bytes, text_only: bool, html_body: bytes | None,
         caller_uid: int, *, caller_pid: int | None = None,
         idempotency_key: str | None = None) -> defer.Deferred[str]:
    """Handle one SEND for ``caller_uid``: fires with the Message-ID (with brackets) once
    delivered, or fails with ``ApiError`` (the check's code, ``DELIVERY`` or ``TEMP``;
    ``ECONFLICT`` for a reused idempotency key)."""
    if idempotency_key is None:
        return _send(daemon, body, text_only, html_body, caller_uid, caller_pid)
    return _send_once(daemon, idempotency_key, body, text_only, html_body, caller_uid,
                      caller_pid)
