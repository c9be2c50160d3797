"""Daemon side of SEND: checks, signature, rendering, MIME assembly, DKIM, sent copy.

Everything here is blocking but quick and touches no network, so the daemon runs
it in a worker thread and hands the result to delivery. The checks run in the
order of spec 30 §2.3 because agents branch on the first error code they get.
The client's message is trusted for nothing: the sender is re-derived from
``From:`` and checked against the caller's uid.
"""

from __future__ import annotations

import datetime
import email
import email.message
import email.policy
import email.utils
import hashlib
import json
import re
import uuid
from collections import Counter
from collections.abc import Iterable
from email import errors as email_errors
from pathlib import Path
from typing import Any

import attrs

from aimx import config as configmod
from aimx.logs import kv, logger
from aimx.mail import message, sendoptions
from aimx.mail.addressing import mailbox_problem
from aimx.mail.compose import (
    CRLF,
    LINE_LIMIT,
    MUTUALLY_EXCLUSIVE,
    HeaderTooLong,
    addresses,
    attachment_headers,
    base64_lines,
    encode_address_list,
    encode_unstructured,
    fold_header,
    new_boundary,
    normalize_crlf,
    recipient_problem,
)
from aimx.mail.headers import rfc3339_utc
from aimx.mail.render import MARKDOWN_CAP, render_markdown
from aimx.smtp import emailauth

log = logger("aimx::send")

HEADER_BLOCK_CAP = 65_536
MAX_LINE = 998
DROP_MARKER = b"----- AIMX TEST DROP -----\n"

BODY_TOO_LARGE_REASON = (
    "markdown body exceeds 5 MiB; use --html-body for pre-rendered large documents "
    "or --attachment for sending the document as a file"
)

# Replaced by the daemon's own MIME headers.
_MIME_HEADERS = frozenset({"content-type", "content-transfer-encoding", "mime-version"})
_ADDRESS_HEADERS = frozenset({"from", "to", "cc", "bcc", "reply-to", "sender"})
#: Fields RFC 5322 §3.6 allows at most once. A second copy is how a message carries two
#: identities: the daemon checks one From, a receiver may display (and DKIM may cover) the other.
SINGLETON_HEADERS = ("From", "Sender", "Reply-To", "To", "Cc", "Bcc", "Subject", "Date",
                     "Message-ID", "In-Reply-To", "References")
_SEPARATOR = re.compile(r"(?:^|\r?\n)(\r?\n)")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class SendError(Exception):
    """A refused or failed send: ``code`` is the SEND error code, ``reason`` the exact text."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@attrs.frozen
class SentAttachment:
    """What the sent copy lists for each attached file."""

    filename: str
    content_type: str
    size: int


@attrs.frozen
class PreparedSend:
    """A validated, rendered and signed message, ready for delivery and the sent copy."""

    mailbox: configmod.Mailbox
    envelope_from: str
    envelope_to: str
    signed: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    message_id: str  # as in the header, with brackets
    from_: str  # decoded header values, for hooks (AIMX_FROM / AIMX_TO / AIMX_SUBJECT)
    to: str
    subject: str
    outbound_format: str  # "markdown" | "text" | "html"
    body: str = attrs.field(repr=False)  # what the agent wrote, signature included, LF
    attachments: tuple[SentAttachment, ...] = ()
    header_fields: dict[str, Any] = attrs.field(factory=dict, repr=False)


@attrs.frozen
class _Header:
    name: str
    raw: str  # the header's lines as received, CRLF-joined, without the final CRLF

    @property
    def value(self) -> str:
        """The unfolded value, trimmed."""
        return _LINE_BREAK.sub("", self.raw.split(":", 1)[1]).strip()


@attrs.frozen
class _Part:
    headers: tuple[str, ...]
    body: str  # wire text, CRLF line endings


# --- the request ---------------------------------------------------------------------------


def _split_request(text: str) -> tuple[str, str | None]:
    """(header block, body); the body is None when no blank line ends the headers."""
    found = _SEPARATOR.search(text)
    if found is None:
        return text, None
    return text[:found.start()], text[found.end():]


def _parse_headers(block: str) -> tuple[list[_Header], list[str]]:
    """Logical header fields (continuations joined) and any lines that are not headers."""
    fields: list[list[str]] = []
    junk: list[str] = []
    for line in _LINE_BREAK.split(block) if block else []:
        if line[:1] in (" ", "\t") and fields:
            fields[-1].append(line)
        elif ":" in line and line.split(":", 1)[0].strip() and " " not in line.split(":", 1)[0]:
            fields.append([line])
        elif line:
            junk.append(line)
    headers = [_Header(lines[0].split(":", 1)[0].strip(), CRLF.join(lines)) for lines in fields]
    return headers, junk


def _first(headers: Iterable[_Header], name: str) -> _Header | None:
    wanted = name.lower()
    return next((header for header in headers if header.name.lower() == wanted), None)


def extract_address(value: str) -> str | None:
    """The first bare address of a header value (display names and brackets removed)."""
    found = addresses(value)
    if found:
        candidate = found[0]
    else:  # the plain rule of spec 30 §2.4, for values the address parser gives up on
        candidate = value.split(",", 1)[0]
        if "<" in candidate:
            candidate = candidate.rsplit("<", 1)[1].split(">", 1)[0]
        candidate = candidate.strip()
    return candidate if candidate and "@" in candidate else None


def _refuse_duplicates(headers: Iterable[_Header]) -> None:
    """MALFORMED when a field of ``SINGLETON_HEADERS`` appears more than once."""
    counts = Counter(header.name.lower() for header in headers)
    for name in SINGLETON_HEADERS:
        seen = counts[name.lower()]
        if seen > 1:
            raise SendError("MALFORMED", f"duplicate header: {name} appears {seen} times "
                                         "(a message may have only one)")


def single_mailbox(name: str, value: str) -> str:
    """The one address of a From:/Sender: value, refused unless it is exactly one mailbox.

    Two parsers must agree: ``getaddresses`` (what picks the sender) and the
    RFC 5322 parser of ``email.headerregistry`` (closer to what receivers do),
    so a value one of them reads as a different or second address is refused.
    """
    try:
        parsed = email.policy.default.header_factory(name, value)
        groups, defects = parsed.groups, parsed.defects
    except Exception:  # noqa: BLE001 - any parser failure means no usable address
        raise SendError("MALFORMED",
                        f"could not extract sender address from {name}: {value}") from None
    if any(group.display_name is not None for group in groups):
        raise SendError("MALFORMED", f"{name}: must be a single mailbox, not a group: {value}")
    listed = addresses(value)
    strict = [mailbox.addr_spec for group in groups for mailbox in group.addresses]
    count = max(len(listed), len(strict))
    if count > 1:
        raise SendError("MALFORMED",
                        f"{name}: must name exactly one mailbox, not {count}: {value}")
    if (count == 0 or any(isinstance(defect, email_errors.InvalidHeaderDefect)
                          for defect in defects)
            or len(listed) != 1 or len(strict) != 1 or "@" not in listed[0]
            or listed[0].lower() != strict[0].lower()):
        raise SendError("MALFORMED", f"could not extract sender address from {name}: {value}")
    return listed[0]


def resolve_sender_mailbox(config: configmod.Config, sender: str) -> configmod.Mailbox | None:
    """The concrete mailbox allowed to send as ``sender``; catch-alls never send.

    The registered address wins (any case); otherwise a mailbox named like the
    lower-cased local part, provided it is not a catch-all.
    """
    wanted = sender.lower()
    for mailbox in config.mailboxes.values():
        if "*" not in mailbox.address and mailbox.address.lower() == wanted:
            return mailbox
    named = config.mailboxes.get(sender.rsplit("@", 1)[0].lower())
    if named is not None and "*" not in named.address:
        return named
    return None


def _authorized(mailbox: configmod.Mailbox, caller_uid: int) -> bool:
    if caller_uid == 0:
        return True
    ids = configmod.owner_ids(mailbox.owner)
    return ids is not None and ids[0] == caller_uid


def _decode_text(data: bytes, charset: str | None) -> str:
    try:
        return data.decode(charset or "utf-8", "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def _client_parts(request: bytes, headers: list[_Header],
                  body_text: str) -> tuple[str, list[tuple[str, str, bytes]]]:
    """The agent's text and the attached files (name, type, data) of the client message."""
    content_type = _first(headers, "Content-Type")
    encoding = _first(headers, "Content-Transfer-Encoding")
    multipart = content_type is not None and content_type.value.lower().startswith("multipart/")
    encoded = encoding is not None and encoding.value.lower() in ("base64", "quoted-printable")
    if not (multipart or encoded):
        return body_text, []
    msg = email.message_from_bytes(request, policy=email.policy.default)
    if not msg.is_multipart():
        return _decode_text(msg.get_payload(decode=True) or b"", msg.get_content_charset()), []
    parts = list(msg.iter_parts())
    text = ""
    if parts:
        first = parts[0]
        while first.is_multipart() and list(first.iter_parts()):
            first = next(iter(first.iter_parts()))
        text = _decode_text(first.get_payload(decode=True) or b"", first.get_content_charset())
    files = []
    for part in parts[1:]:
        declared = part.get("Content-Type") is not None
        kind = part.get_content_type() if declared else "application/octet-stream"
        name = part.get_filename() or part.get_param("name")
        filename = email.utils.collapse_rfc2231_value(name) if name else "attachment"
        files.append((str(filename), kind, part.get_payload(decode=True) or b""))
    return text, files


# --- signature and text encodings ---------------------------------------------------------


def with_signature(body: str, signature: str) -> str:
    """The body with the signature appended after a blank line; ``""`` means no signature."""
    if not signature:
        return body
    return body.rstrip("\r\n") + "\n\n" + _LINE_BREAK.sub("\n", signature)


_QP_ESCAPE = re.compile(r"[^\x20-\x3c\x3e-\x7e]")
_NOT_7BIT = re.compile(r"[^\t\r\n\x20-\x7e]")


def _qp_char(match: re.Match[str]) -> str:
    return "".join(f"={byte:02X}" for byte in match.group(0).encode("utf-8"))


def quoted_printable(text: str) -> str:
    """Quoted-printable (RFC 2045) of CRLF text: lines at most 76 characters, soft breaks
    never split an ``=XX``, whitespace at a line end encoded so no relay can strip it."""
    out: list[str] = []
    for line in text.split(CRLF):
        encoded = _QP_ESCAPE.sub(_qp_char, line)
        if encoded.endswith(" "):
            encoded = encoded[:-1] + "=20"
        while len(encoded) > 76:
            cut = 75
            if encoded[cut - 1] == "=":
                cut -= 1
            elif encoded[cut - 2] == "=":
                cut -= 2
            out.append(encoded[:cut] + "=")
            encoded = encoded[cut:]
        out.append(encoded)
    return CRLF.join(out)


def _text_part(subtype: str, content: str) -> _Part:
    """A UTF-8 text part: 7bit when plain ASCII with short lines, else quoted-printable."""
    wire = normalize_crlf(content)
    if _NOT_7BIT.search(wire) is None and all(len(line) <= MAX_LINE
                                              for line in wire.split(CRLF)):
        encoding, body = "7bit", wire
    else:
        encoding, body = "quoted-printable", quoted_printable(wire)
    return _Part((f"Content-Type: text/{subtype}; charset=utf-8",
                  f"Content-Transfer-Encoding: {encoding}"), body)


def _multipart(subtype: str, parts: list[_Part]) -> _Part:
    boundary = new_boundary()
    chunks = [f"--{boundary}{CRLF}" + CRLF.join(part.headers) + CRLF + CRLF + part.body + CRLF
              for part in parts]
    return _Part((fold_header(f'Content-Type: multipart/{subtype}; boundary="{boundary}"'),),
                 "".join(chunks) + f"--{boundary}--{CRLF}")


def _attachment_part(filename: str, content_type: str, data: bytes) -> _Part:
    return _Part(tuple(attachment_headers(filename, content_type)),
                 base64_lines(data).removesuffix(CRLF))


def _wire_header(header: _Header) -> str:
    """A client header for the wire: RFC 2047 encoded when not ASCII, and folded."""
    if header.raw.isascii():
        field = header.raw
    elif header.name.lower() in _ADDRESS_HEADERS:
        field = f"{header.name}: {encode_address_list(header.value)}"
    else:
        field = f"{header.name}: {encode_unstructured(header.name, header.value)}"
    try:
        return fold_header(field)
    except HeaderTooLong:
        raise SendError("MALFORMED", f"header '{header.name}' has a word longer than "
                                     f"{LINE_LIMIT} characters and cannot be folded") from None


def _check_recipient(to_value: str, recipient: str) -> None:
    """The recipient must be a valid mailbox, both as written in To: and as extracted."""
    for invalid in (recipient_problem(to_value), recipient_problem(recipient)):
        if invalid is not None:
            raise SendError("MALFORMED",
                            f"invalid recipient address '{invalid[0]}': {invalid[1]}")


def _check_options(headers: list[_Header], domain: str) -> None:
    """The headers an agent may choose beyond the parties: Message-ID, Reply-To and
    Auto-Submitted are checked here because the daemon signs them for ``domain``."""
    given_id = _first([h for h in headers if h.value], "Message-ID")
    if given_id is not None:
        problem = sendoptions.message_id_problem(given_id.value, domain)
        if problem is None and not given_id.value.startswith("<"):
            problem = "it must be enclosed in angle brackets: <unique-part@domain>"
        if problem is not None:
            raise SendError("MALFORMED", f"invalid Message-ID '{given_id.value}': {problem}")
    reply_to = _first(headers, "Reply-To")
    if reply_to is not None:
        listed = addresses(reply_to.value)
        if len(listed) != 1:
            raise SendError("MALFORMED",
                            f"Reply-To: must name exactly one address: {reply_to.value}")
        problem = mailbox_problem(listed[0])
        if problem is not None:
            raise SendError("MALFORMED", f"invalid Reply-To address '{listed[0]}': {problem}")
    auto = _first(headers, "Auto-Submitted")
    if auto is not None:
        problem = sendoptions.auto_submitted_problem(auto.value)
        if problem is not None:
            raise SendError("MALFORMED", f"invalid Auto-Submitted value '{auto.value}': "
                                         f"{problem}")


def _mark_hook_reply(headers: list[_Header]) -> list[_Header]:
    """A message sent from inside a hook run is automatic (RFC 3834): it keeps an
    automatic Auto-Submitted value its client chose, anything else becomes
    ``auto-replied``, so the next server's loop guard sees it."""
    current = _first(headers, "Auto-Submitted")
    if current is not None and current.value.split(";", 1)[0].strip().lower() \
            != sendoptions.AUTO_NO:
        return headers
    kept = [header for header in headers if header.name.lower() != "auto-submitted"]
    value = sendoptions.AUTO_REPLIED
    return [*kept, _Header("Auto-Submitted", f"Auto-Submitted: {value}")]


#: Left out of an idempotent send's fingerprint: a client makes fresh ones for each attempt.
_PER_ATTEMPT_HEADERS = frozenset({"date", "message-id"})


def request_fingerprint(request_body: bytes, *, text_only: bool,
                        html_body: bytes | None) -> str:
    """A hash of what a SEND asks for, the same for every retry of one message.

    Date, Message-ID and the MIME framing (boundaries, transfer encodings) differ
    between two compositions of the same message, so the fingerprint covers the
    other headers as unfolded values, the decoded text, each attachment's name,
    type and content, and the format options.
    """
    digest = hashlib.sha256()
    try:
        text = request_body.decode("utf-8")
        header_block, body_text = _split_request(text)
        headers, _ = _parse_headers(header_block)
        agent_text, files = _client_parts(request_body, headers, body_text or "")
    except Exception:  # noqa: BLE001 - unparseable requests are compared byte for byte
        digest.update(b"raw\0" + request_body)
    else:
        described = {
            "headers": [[h.name.lower(), h.value] for h in headers
                        if h.name.lower() not in _MIME_HEADERS | _PER_ATTEMPT_HEADERS],
            "text": _LINE_BREAK.sub("\n", agent_text),
            "files": [[name, kind, hashlib.sha256(data).hexdigest()]
                      for name, kind, data in files],
        }
        digest.update(json.dumps(described, ensure_ascii=False, sort_keys=True).encode())
    digest.update(b"\0text_only" if text_only else b"\0")
    if html_body is not None:
        digest.update(b"\0html\0" + _LINE_BREAK.sub("\n", html_body.decode(
            "utf-8", "replace")).encode())
    return digest.hexdigest()


# --- the pipeline --------------------------------------------------------------------------


def _check_parties(config: configmod.Config, headers: list[_Header],
                   caller_uid: int) -> tuple[str, configmod.Mailbox, str]:
    """Checks 1–7 of spec 30 §2.3 plus D18: (sender, sending mailbox, recipient).

    One sender identity: no singleton header twice, one mailbox in From:, and a
    Sender: (when given) naming that same mailbox.
    """
    _refuse_duplicates(headers)
    from_header = _first(headers, "From")
    if from_header is None:
        raise SendError("MALFORMED", "missing required header: From")
    sender = single_mailbox("From", from_header.value)
    sender_header = _first(headers, "Sender")
    if sender_header is not None:
        declared = single_mailbox("Sender", sender_header.value)
        if declared.lower() != sender.lower():
            raise SendError("MALFORMED",
                            f"Sender: must be the From: address {sender}, not {declared}")
    sender_domain = sender.rsplit("@", 1)[1]
    if sender_domain.lower() != config.domain.lower():
        raise SendError("DOMAIN", f"sender domain '{sender_domain}' does not match aimx domain "
                                  f"'{config.domain}'")
    mailbox = resolve_sender_mailbox(config, sender)
    if mailbox is not None and not _authorized(mailbox, caller_uid):
        # Someone else's mailbox answers exactly like a missing one; the log says which.
        log.warning("send refused: uid=%s is not the owner (%s) of mailbox %s (From: %s)",
                    caller_uid, kv(mailbox.owner), kv(mailbox.name), kv(sender))
        mailbox = None
    if mailbox is None:
        raise SendError("MAILBOX", f"no mailbox matches From: {sender} (run `aimx mailboxes "
                                   "create <name>` to register one; catchall is inbound-only)")
    to_header = _first(headers, "To")
    if to_header is None:
        raise SendError("MALFORMED", "missing required header: To")
    recipient = extract_address(to_header.value)
    if recipient is None:
        raise SendError("MALFORMED",
                        f"could not extract recipient address from To: {to_header.value}")
    listed = len(addresses(to_header.value))
    if listed > 1:
        raise SendError("MALFORMED",
                        f"a send has exactly one recipient; To: lists {listed} addresses")
    for name in ("Cc", "Bcc"):
        extra = _first(headers, name)
        if extra is not None and addresses(extra.value):
            raise SendError("MALFORMED",
                            f"a send has exactly one recipient; {name}: is not supported")
    _check_recipient(to_header.value, recipient)
    return sender, mailbox, recipient


def _content(source: str, *, text_only: bool, html_body: bytes | None,
             files: list[tuple[str, str, bytes]]) -> tuple[str, _Part]:
    """(outbound_format, top MIME part) per the table of spec 30 §2.6."""
    if html_body is not None:
        outbound_format = "html"
        main = _multipart("alternative", [
            _text_part("plain", source), _text_part("html", html_body.decode("utf-8", "replace"))])
    elif text_only:
        outbound_format = "text"
        main = _text_part("plain", source)
    else:
        outbound_format = "markdown"
        if len(source.encode("utf-8")) > MARKDOWN_CAP:
            raise SendError("BODY_TOO_LARGE", BODY_TOO_LARGE_REASON)
        main = _multipart("alternative", [_text_part("plain", source),
                                          _text_part("html", render_markdown(source))])
    if files:
        main = _multipart("mixed", [main] + [_attachment_part(*file) for file in files])
    return outbound_format, main


def _header_lines(headers: list[_Header], main: _Part, domain: str,
                  when: datetime.datetime) -> tuple[str, list[str]]:
    """(Message-ID as written, wire header lines): the client's headers minus its MIME
    headers, a Message-ID and Date when missing, then ours."""
    lines = [_wire_header(header) for header in headers
             if header.name.lower() not in _MIME_HEADERS
             and not (header.name.lower() == "message-id" and not header.value)]
    given = _first([h for h in headers if h.value], "Message-ID")
    if given is not None:
        message_id = given.value
    else:
        message_id = f"<{uuid.uuid4()}@{domain}>"
        lines.insert(0, f"Message-ID: {message_id}")
    if _first(headers, "Date") is None:
        lines.append("Date: " + email.utils.format_datetime(when.astimezone(datetime.UTC)))
    lines.append("MIME-Version: 1.0")
    lines.extend(main.headers)
    return message_id, lines


def prepare_send(config: configmod.Config, request_body: bytes, *, text_only: bool,
                 html_body: bytes | None, caller_uid: int, key_pem: bytes,
                 from_hook_run: bool = False, selector: str | None = None,
                 now: datetime.datetime | None = None) -> PreparedSend:
    """Check, render, assemble and sign one SEND request (spec 30 §2.3–2.9).

    Raises ``SendError`` with the code and exact reason of the first failed check;
    nothing is written and nothing leaves the host before this returns.
    ``from_hook_run``: the caller runs inside one of our hooks (``Auto-Submitted``).
    ``selector`` is the one ``key_pem`` is published under (default: the config's).
    """
    if text_only and html_body is not None:
        raise SendError("MALFORMED", MUTUALLY_EXCLUSIVE)
    when = now or datetime.datetime.now(datetime.UTC)
    try:
        text = request_body.decode("utf-8")
    except UnicodeDecodeError:
        text = ""  # a body that is not UTF-8 has no headers we can read
    header_block, body_text = _split_request(text)
    headers, junk = _parse_headers(header_block)
    sender, mailbox, recipient = _check_parties(config, headers, caller_uid)
    if body_text is None:
        raise SendError("MALFORMED",
                        "outbound request body has no header/body separator (expected blank line)")
    if len(header_block.encode("utf-8")) > HEADER_BLOCK_CAP:
        raise SendError("MALFORMED", "outbound request header block is too large")
    if junk:
        raise SendError("MALFORMED", f"outbound request has a malformed header line: {junk[0]}")
    _check_options(headers, config.domain)
    if from_hook_run:
        headers = _mark_hook_reply(headers)

    agent_text, files = _client_parts(request_body, headers, body_text)
    source = with_signature(_LINE_BREAK.sub("\n", agent_text), config.effective_signature)
    outbound_format, main = _content(source, text_only=text_only, html_body=html_body,
                                     files=files)
    message_id, lines = _header_lines(headers, main, config.domain, when)
    head = CRLF.join(lines) + CRLF
    body = main.body if main.body.endswith(CRLF) else main.body + CRLF
    try:
        signed = emailauth.sign((head + CRLF + body).encode("utf-8"), domain=config.domain,
                                selector=selector or config.dkim_selector, key_pem=key_pem)
    except emailauth.SigningError as err:
        raise SendError("SIGN", str(err)) from err

    # The sent copy describes the message the way ingest describes received mail.
    parsed = message.parse_message(head.encode("utf-8") + CRLF.encode(), when)
    return PreparedSend(
        mailbox=mailbox,
        envelope_from=sender,
        envelope_to=recipient,
        signed=signed,
        message_id=message_id,
        from_=parsed.from_,
        to=parsed.to,
        subject=parsed.subject,
        outbound_format=outbound_format,
        body=source,
        attachments=tuple(SentAttachment(name, kind, len(data)) for name, kind, data in files),
        header_fields=parsed.header_fields(),
    )


def sent_copy_fields(prepared: PreparedSend, status: str, details: str | None = None,
                     now: datetime.datetime | None = None) -> dict[str, Any]:
    """Frontmatter for the sent copy (D7): inbound shape plus the delivery outcome.

    ``status`` is ``delivered`` (``delivered_at`` = now) or ``failed`` (``details``
    kept as ``delivery_details``). The body to store is ``prepared.body``.
    """
    when = now or datetime.datetime.now(datetime.UTC)
    header = prepared.header_fields
    fields: dict[str, Any] = {
        "message_id": header["message_id"],
        "thread_id": header["thread_id"],
        "from": header["from"],
        "to": header["to"],
        "reply_to": header.get("reply_to"),
        "delivered_to": prepared.envelope_to,
        "subject": header["subject"],
        "date": header["date"],
        "size_bytes": len(prepared.signed),
        "in_reply_to": header.get("in_reply_to"),
        "references": header.get("references"),
        "list_id": header.get("list_id"),
        "auto_submitted": header.get("auto_submitted"),
        "dkim": "pass",
        "spf": "none",
        "dmarc": "none",
        "trusted": "none",
        "mailbox": prepared.mailbox.name,
        "read": False,
        "outbound": True,
        "outbound_format": prepared.outbound_format,
        "delivery_status": status,
    }
    if status == "delivered":
        fields["delivered_at"] = rfc3339_utc(when)
    elif details is not None:
        fields["delivery_details"] = details
    if prepared.attachments:
        fields["attachments"] = [attrs.asdict(item) for item in prepared.attachments]
    return {key: value for key, value in fields.items() if value is not None}


def mail_drop(path: str | Path, signed: bytes) -> None:
    """Test delivery (``AIMX_TEST_MAIL_DROP``): append the message to a file."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "ab") as drop:
            drop.write(DROP_MARKER + signed + b"\n")
    except OSError as err:
        raise SendError("TEMP", f"test mail drop {target}: {err.strerror or err}") from err
