"""The ingest pipeline: raw message bytes to a stored email, in two blocking steps.

``analyse`` does the per-message work (parse, DKIM/SPF/DMARC) once, however
many recipients the message has; ``deliver`` does the per-recipient work
(route, trust, dedup, durable write). ``ingest_message`` runs both for one
message and all its recipients: the daemon in a worker thread, ``aimx ingest``
directly. Hooks are the caller's business, after it returns.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import attrs

from aimx.config import Config
from aimx.logs import kv, logger
from aimx.mail import loopguard, trust
from aimx.mail.authresults import AuthResults
from aimx.mail.headers import rfc3339_utc
from aimx.mail.message import MessageParseError, ParsedMessage, parse_message, parse_spooled
from aimx.smtp import dnsresolve, emailauth
from aimx.storage.layout import StorageError
from aimx.storage.mailstore import MailStore
from aimx.storage.spool import SpoolFile

log = logger("aimx::ingest")

# Test seam (spec 30 §1.7): deliveries to this address fail as if the disk did.
FAIL_FOR_ENV = "AIMX_TEST_INGEST_FAIL_FOR"

PARSE_FAILED = "Failed to parse email"
#: How far into a spooled message its header block is looked for; a message whose
#: header block is longer is analysed in memory.
HEADER_SCAN_BYTES = 1024 * 1024


class IngestError(Exception):
    """A message could not be stored; the text is one line, fit for ``Error: <msg>``."""


class NoRoute(IngestError):
    """No mailbox takes the recipient (no exact name, no catchall)."""


@attrs.frozen
class Analysis:
    """Everything about one message that does not depend on the recipient.

    ``raw`` is the message's bytes, or the spool file it was analysed from.
    """

    raw: bytes | SpoolFile
    parsed: ParsedMessage
    auth: AuthResults
    peer_ip: str | None
    received_at: datetime.datetime
    size_bytes: int
    mail_from: str | None = None  # envelope sender; "" is MAIL FROM:<>, None no envelope

    def release(self) -> None:
        """Free the spool files of attachments decoded from a spooled message."""
        for attachment in self.parsed.attachments:
            if isinstance(attachment.data, SpoolFile):
                attachment.data.close()


@attrs.frozen
class IngestResult:
    """One recipient's outcome; ``fields`` is the frontmatter as written (for hooks)."""

    status: Literal["stored", "duplicate"]
    mailbox: str
    email_id: str | None  # None for a duplicate
    path: Path | None  # the .md; None for a duplicate
    fields: dict[str, Any]


Authenticator = Callable[..., AuthResults]


def _default_authenticate(config: Config, raw: bytes, parsed: ParsedMessage, *, peer_ip: str | None,
                          mail_from: str | None, helo: str | None,
                          **spooled: Any) -> AuthResults:
    """DKIM, SPF and DMARC through the configured resolvers; all ``none`` if impossible.

    The resolver is the process-wide one for this resolver list, so answers are
    reused across messages within their TTL.
    """
    try:
        resolver = dnsresolve.shared_resolver(config.dns_resolvers)
    except dnsresolve.ResolverConfigError as exc:
        log.warning("no DNS resolver, authentication skipped: %s", kv(exc))
        resolver = None  # authenticate() then records none for all three
    return emailauth.authenticate(raw, parsed, peer_ip=peer_ip, mail_from=mail_from,
                                  helo=helo, resolver=resolver, **spooled)


def is_real_peer(peer_ip: str | None) -> bool:
    """Whether ``peer_ip`` names a real SMTP peer (not absent, not ``0.0.0.0`` / ``::``)."""
    if not peer_ip:
        return False
    try:
        return not ipaddress.ip_address(peer_ip).is_unspecified
    except ValueError:
        return False


def analyse(
    config: Config,
    raw: bytes | SpoolFile,
    *,
    peer_ip: str | None = None,
    mail_from: str | None = None,
    helo: str | None = None,
    now: datetime.datetime | None = None,
    authenticate: Authenticator | None = None,
    new_file: Callable[[], SpoolFile] | None = None,
) -> Analysis:
    """Parse and authenticate a message once (blocking: DNS).

    ``raw`` is the message, or a spool file holding it: that is read with bounded
    memory (attachments decoded into spool files from ``new_file``, which the
    caller frees with ``Analysis.release``), for the same result. ``authenticate``
    replaces the DKIM/SPF/DMARC step; it is called as
    ``authenticate(config, raw, parsed, peer_ip=, mail_from=, helo=)``.
    """
    received_at = now or datetime.datetime.now(datetime.UTC)
    peer = peer_ip if is_real_peer(peer_ip) else None
    body_start = (emailauth.header_block_end(raw.read_at(0, HEADER_SCAN_BYTES))
                  if isinstance(raw, SpoolFile) else None)
    if isinstance(raw, SpoolFile) and (body_start is None or new_file is None
                                       or authenticate is not None):
        raw = b"".join(raw.chunks())  # unusual: the in-memory path, as for small mail
    try:
        if isinstance(raw, SpoolFile):
            assert new_file is not None and body_start is not None
            parsed = parse_spooled(raw, received_at, new_file)
        else:
            parsed = parse_message(raw, received_at)
    except MessageParseError as exc:
        raise IngestError(PARSE_FAILED) from exc
    if isinstance(raw, SpoolFile):
        assert new_file is not None and body_start is not None
        source = raw
        body = emailauth.SpooledBody(lambda: source.chunks(body_start), new_file)
        auth = _default_authenticate(config, raw.read_at(0, body_start), parsed,
                                     peer_ip=peer, mail_from=mail_from, helo=helo, body=body,
                                     whole=lambda: b"".join(source.chunks()))
    else:
        step = authenticate or _default_authenticate
        auth = step(config, raw, parsed, peer_ip=peer, mail_from=mail_from, helo=helo)
    return Analysis(raw=raw, parsed=parsed, auth=auth, peer_ip=peer_ip,
                    received_at=received_at, size_bytes=len(raw), mail_from=mail_from)


def build_fields(analysis: Analysis, mailbox: str, rcpt: str,
                 verdict: trust.Verdict) -> dict[str, Any]:
    """The inbound frontmatter (spec 20 §7.2) without ``id`` and ``attachments``.

    Optional keys are left out when empty; ``render_email`` fixes the order.
    """
    parsed = analysis.parsed
    fields: dict[str, Any] = {
        "message_id": parsed.message_id or "",
        "thread_id": parsed.thread_id,
        "from": parsed.from_ or "",
        "to": parsed.to or "",
    }
    for key, value in (("cc", parsed.cc), ("reply_to", parsed.reply_to)):
        if value:
            fields[key] = value
    fields["delivered_to"] = rcpt
    fields["subject"] = parsed.subject
    fields["date"] = parsed.date
    fields["received_at"] = rfc3339_utc(analysis.received_at)
    if is_real_peer(analysis.peer_ip):
        fields["received_from_ip"] = analysis.peer_ip
    fields["size_bytes"] = analysis.size_bytes
    for key, value in (("in_reply_to", parsed.in_reply_to), ("references", parsed.references),
                       ("list_id", parsed.list_id), ("auto_submitted", parsed.auto_submitted)):
        if value:
            fields[key] = value
    fields["dkim"] = analysis.auth.dkim
    fields["spf"] = analysis.auth.spf
    fields["dmarc"] = analysis.auth.dmarc
    fields["trusted"] = verdict.trusted
    fields["mailbox"] = mailbox
    fields["read"] = False
    fields.update(loop_guard_fields(analysis, verdict))
    return fields


def loop_guard_fields(analysis: Analysis, verdict: trust.Verdict) -> dict[str, str]:
    """The keys beyond the spec's: why the message is (not) trusted, and whether it
    is automatic mail (which wakes no hook unless the hook opts in)."""
    parsed = analysis.parsed
    fields = {"trust_reason": verdict.reason}
    automatic = loopguard.automatic_reason(
        auto_submitted=parsed.auto_submitted, precedence=parsed.precedence,
        list_id=parsed.list_id, mail_from=analysis.mail_from)
    if automatic:
        fields["automatic"] = automatic
    return fields


def deliver(
    config: Config, store: MailStore, analysis: Analysis, rcpt: str
) -> IngestResult:
    """Route, judge trust, then store one copy for ``rcpt`` (blocking: disk, fsync, flock).

    The store decides dedup and the name under the mailbox lock and writes
    outside it (``MailStore.deliver_inbound``); a duplicate Message-ID within
    24 h writes nothing and is a success.
    """
    mailbox = config.route(rcpt)
    if mailbox is None:
        raise NoRoute(f"no mailbox routes recipient {rcpt}")
    fail_for = os.environ.get(FAIL_FOR_ENV)
    if fail_for and fail_for.lower() == rcpt.lower():
        raise IngestError(f"forced ingest failure for {rcpt} ({FAIL_FOR_ENV})")
    parsed = analysis.parsed
    verdict = trust.evaluate(config, mailbox, parsed, analysis.auth)
    fields = build_fields(analysis, mailbox.name, rcpt, verdict)
    message_id = fields["message_id"]
    try:
        stored = store.deliver_inbound(mailbox.name, mailbox.owner, fields, parsed.body,
                                       parsed.attachments, analysis.received_at)
    except (OSError, StorageError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise IngestError(f"failed to store message in inbox/{mailbox.name}: {reason}") from exc
    if stored is None:
        log.info("duplicate message_id, skipping mailbox=%s message_id=%s",
                 kv(mailbox.name), kv(message_id))
        return IngestResult("duplicate", mailbox.name, None, None, fields)
    fields = stored.fields or {"id": stored.id, **fields}
    log.info("stored mailbox=%s id=%s message_id=%s size=%d dkim=%s spf=%s dmarc=%s trusted=%s "
             "trust_reason=%s automatic=%s", kv(mailbox.name), kv(stored.id), kv(message_id),
             analysis.size_bytes, fields["dkim"], fields["spf"], fields["dmarc"],
             verdict.trusted, verdict.reason, fields.get("automatic") or "-")
    return IngestResult("stored", mailbox.name, stored.id, stored.path, fields)


def ingest_message(config: Config, store: MailStore, raw: bytes | SpoolFile, *,
                   peer_ip: str | None, mail_from: str | None, helo: str | None,
                   rcpts: list[str], pending: Any = None,
                   new_file: Callable[[], SpoolFile] | None = None,
                   ) -> tuple[Analysis | None, list[IngestResult], list[tuple[str, str]]]:
    """Blocking: analyse ``raw`` once, then deliver it to each recipient in turn.

    ``raw`` is the message's bytes, or the spool file holding it (closed here,
    with every scratch file the analysis made; ``new_file`` makes those). With
    ``pending`` (the daemon's hook journal: ``wanted`` says whether an email has
    hooks to run, ``add`` records it), each such email is journalled before the
    reply, so a crash cannot lose its wake-up. Returns (analysis or None, stored
    results, (rcpt, reason) failures).
    """
    try:
        analysis = analyse(config, raw, peer_ip=peer_ip, mail_from=mail_from, helo=helo,
                           new_file=new_file)
    except IngestError as exc:
        return None, [], [(rcpt, str(exc)) for rcpt in rcpts]
    finally:
        if not isinstance(raw, bytes):
            raw.close()
    try:
        return (analysis, *_deliver_each(config, store, analysis, rcpts, pending))
    finally:
        analysis.release()


def _deliver_each(config: Config, store: MailStore, analysis: Analysis, rcpts: list[str],
                  pending: Any) -> tuple[list[IngestResult], list[tuple[str, str]]]:
    stored: list[IngestResult] = []
    failures: list[tuple[str, str]] = []
    for rcpt in rcpts:
        try:
            result = deliver(config, store, analysis, rcpt)
            stored.append(result)
            if pending is not None and result.status == "stored":
                _journal_hooks(pending, config, result)
        except IngestError as exc:
            failures.append((rcpt, str(exc)))
        except Exception as exc:  # an unexpected bug must not lose the other recipients
            log.exception("delivery to %s crashed", kv(rcpt))
            failures.append((rcpt, f"internal error: {exc}"))
    return stored, failures


def _journal_hooks(pending: Any, config: Config, result: IngestResult) -> None:
    if not pending.wanted(config, result.mailbox, result.fields):
        return
    try:
        pending.add(result.mailbox, str(result.path))
    except OSError as exc:  # the mail is stored; only a crash replay would miss it
        log.warning("could not journal hooks for %s: %s", kv(str(result.path)), exc)
