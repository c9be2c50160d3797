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

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from aimx.daemon import outbound
from aimx.daemon.protocol import error
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


@defer.inlineCallbacks
def _send(daemon: Any, body: bytes, text_only: bool, html_body: bytes | None,
          caller_uid: int) -> Any:
    reactor = daemon.reactor
    config = daemon.config  # one snapshot for the whole send
    started = time.monotonic()
    try:
        prepared = yield _in_thread(
            reactor, outbound.prepare_send, config, body, text_only=text_only,
            html_body=html_body, caller_uid=caller_uid, key_pem=daemon.dkim_key_pem)
    except outbound.SendError as exc:
        log.info("send refused: uid=%s code=%s reason=%s", caller_uid, exc.code, kv(exc.reason))
        raise error(exc.code, exc.reason) from None

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
             "copy=%s duration_ms=%d detail=%s",
             kv(prepared.mailbox.name), caller_uid, kv(prepared.envelope_from),
             kv(prepared.envelope_to), kv(prepared.message_id), prepared.outbound_format,
             outcome.status, kv(copy.path if copy is not None else "-"),
             int((time.monotonic() - started) * 1000), kv(outcome.detail))
    # callLater(0): the reply is written when this Deferred fires, the hooks start after.
    reactor.callLater(0, _fire_hooks, daemon, config, prepared, outcome, copy)
    if outcome.status == DELIVERED:
        return prepared.message_id
    raise error("DELIVERY" if outcome.status == FAILED else "TEMP", outcome.detail)


def send(daemon: Any, body: bytes, text_only: bool, html_body: bytes | None,
         caller_uid: int) -> defer.Deferred[str]:
    """Handle one SEND for ``caller_uid``: fires with the Message-ID (with brackets) once
    delivered, or fails with ``ApiError`` (the check's code, ``DELIVERY`` or ``TEMP``)."""
    return _send(daemon, body, text_only, html_body, caller_uid)
