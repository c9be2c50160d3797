"""Client-side message composition for ``aimx send`` and the MCP server.

The client builds an unsigned RFC 5322 message from what the agent gave it and
reads attachment files as the calling user (the daemon never opens a path on a
user's behalf). The daemon re-checks everything, renders Markdown and signs; the
client's job is a well-formed message: encoded non-ASCII headers, folded long
headers, one valid recipient, no header injection, threading headers for replies.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import mimetypes
import re
import uuid
from collections.abc import Mapping, Sequence
from email.header import Header
from pathlib import Path

from aimx.mail import sendoptions
from aimx.mail.addressing import header_address, mailbox_problem

CRLF = "\r\n"
FOLD_WIDTH = 78  # RFC 5322 §2.1.1: lines SHOULD stay within 78 characters
LINE_LIMIT = 998  # and MUST stay within 998

MUTUALLY_EXCLUSIVE = "AIMX/1 SEND: --text-only and --html-body are mutually exclusive"
"""The canonical text for a send that asks for both ``text_only`` and ``html_body``."""


class ComposeError(Exception):
    """The message cannot be composed; ``str(error)`` is the text shown to the user."""


def check_header_value(name: str, value: str) -> None:
    """Refuse a header value that would end the header early (header injection)."""
    if "\r" in value or "\n" in value:
        raise ComposeError(f"Header '{name}' contains CRLF characters. Possible header injection")


class HeaderTooLong(ComposeError):
    """A header holds a word that no folding can fit in a 998-character line."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Header '{name}' has a word longer than {LINE_LIMIT} characters, "
                         "which cannot be folded into a valid line; shorten it")
        self.name = name


_FOLD_TOKEN = re.compile(r"[ \t]*[^ \t]+|[ \t]+$")


def fold_header(field: str) -> str:
    """An ASCII header field (``Name: value``, possibly folded already) as wire lines.

    Lines are broken before whitespace only, so unfolding (dropping each CRLF)
    gives the value back exactly; they stay within 78 characters where the words
    allow. A field already folded within 78 is kept as it is. Raises
    ``HeaderTooLong`` when a word cannot fit in 998.
    """
    lines = field.split(CRLF)
    if all(len(line) <= FOLD_WIDTH for line in lines):
        return field
    tokens = _FOLD_TOKEN.findall("".join(lines))
    folded = [tokens[0] + (tokens[1] if len(tokens) > 1 else "")]
    for token in tokens[2:]:
        if len(folded[-1]) + len(token) <= FOLD_WIDTH or not token.strip():
            folded[-1] += token
        else:
            folded.append(token)
    if any(len(line) > LINE_LIMIT for line in folded):
        raise HeaderTooLong(field.split(":", 1)[0])
    return CRLF.join(folded)


def recipient_problem(value: str) -> tuple[str, str] | None:
    """(the address as written, why it is invalid) for a ``To:`` value naming one
    address, or ``None`` when it can be sent to."""
    address = header_address(value)
    problem = mailbox_problem(address)
    return None if problem is None else (address, problem)


def normalize_crlf(text: str) -> str:
    """Every line ending (CRLF, LF, lone CR) as CRLF, the wire form."""
    return re.sub(r"\r\n|\r|\n", CRLF, text)


def encode_unstructured(name: str, value: str) -> str:
    """A header value as it goes on the wire: RFC 2047 encoded words when not ASCII."""
    if value.isascii():
        return value
    return Header(value, "utf-8", header_name=name).encode(linesep=CRLF)


_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')


def _display_phrase(display: str) -> str:
    """An ASCII display name as an RFC 5322 phrase, quoted when it holds specials."""
    if _SPECIALS.search(display) is None:
        return display
    return '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_address_list(value: str) -> str:
    """An address header with non-ASCII display names RFC 2047 encoded.

    Addresses themselves are left as written: a non-ASCII mailbox needs
    SMTPUTF8, not encoded words, which are not allowed there.
    """
    if value.isascii():
        return value
    pairs = email.utils.getaddresses([value])
    if not pairs or not all(address for _, address in pairs):
        return encode_unstructured("To", value)
    rendered = []
    for display, address in pairs:
        if not display:
            rendered.append(address)
        elif display.isascii():
            rendered.append(f"{_display_phrase(display)} <{address}>")
        else:
            rendered.append(f"{Header(display, 'utf-8').encode(linesep=CRLF)} <{address}>")
    return ", ".join(rendered)


def addresses(value: str) -> list[str]:
    """The bare addresses of an address header value, in order (quoted commas respected)."""
    return [address.strip() for _, address in email.utils.getaddresses([value])
            if address.strip()]


def bare_address(value: str) -> str | None:
    """The first address of a header value, without display name or brackets."""
    found = addresses(value)
    if not found or "@" not in found[0]:
        return None
    return found[0]


def _quoted_param(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r", "").replace("\n", " ") + '"'


def attachment_headers(filename: str, content_type: str) -> list[str]:
    """MIME part headers for a base64 attachment named ``filename``.

    ASCII names use quoted strings (``a"b.txt`` → ``filename="a\\"b.txt"``);
    other names use RFC 2231 (``filename*=utf-8''…``), which mail clients decode.
    """
    if filename.isascii():
        name_param = "name=" + _quoted_param(filename)
        file_param = "filename=" + _quoted_param(filename)
    else:
        encoded = email.utils.encode_rfc2231(filename.replace("\r", "").replace("\n", " "),
                                             "utf-8")
        name_param, file_param = "name*=" + encoded, "filename*=" + encoded
    return [
        f"Content-Type: {content_type}; {name_param}",
        f"Content-Disposition: attachment; {file_param}",
        "Content-Transfer-Encoding: base64",
    ]


def base64_lines(data: bytes) -> str:
    """Base64 in 76-character CRLF lines (RFC 2045)."""
    return base64.encodebytes(data).decode("ascii").replace("\n", CRLF)


def new_boundary() -> str:
    return "aimx-" + uuid.uuid4().hex


def guess_content_type(filename: str) -> str:
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


def _read_attachments(paths: Sequence[Path | str]) -> list[tuple[str, str, bytes]]:
    files = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ComposeError(f"Attachment file not found: {raw}")
        if not path.is_file():
            raise ComposeError(f"Attachment path is not a file: {raw}")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ComposeError(f"Failed to read attachment {raw}: {err.strerror}") from err
        files.append((path.name, guess_content_type(path.name), data))
    return files


def bracket_id(message_id: str) -> str:
    """``id@host`` → ``<id@host>`` (already bracketed ids unchanged)."""
    message_id = message_id.strip()
    if not message_id.startswith("<"):
        message_id = "<" + message_id
    if not message_id.endswith(">"):
        message_id += ">"
    return message_id


def _shown(value: str) -> str:
    """A value for an error message: control characters such as CR and LF escaped."""
    return value if value.isprintable() else repr(value)[1:-1]


def _strip_line_breaks(value: str) -> str:
    return value.replace("\r", "").replace("\n", "")


def compose_message(*, from_addr: str, to: str, subject: str, body: str,
                    reply_to: str | None = None, references: str | None = None,
                    attachments: Sequence[Path | str] = (),
                    message_id: str | None = None, reply_to_address: str | None = None,
                    auto_submitted: str | None = None,
                    now: datetime.datetime | None = None) -> bytes:
    """The unsigned message a client hands to the daemon's SEND.

    ``reply_to`` is the Message-ID being answered (it sets In-Reply-To, not a
    Reply-To header); ``references`` is only used together with it.
    ``reply_to_address`` is the Reply-To header; ``message_id`` replaces the
    generated Message-ID; ``auto_submitted`` is an RFC 3834 value.
    """
    files = _read_attachments(attachments)
    for name, value in (("From", from_addr), ("To", to), ("Subject", subject)):
        check_header_value(name, value)
    if reply_to_address is not None:
        problem = sendoptions.reply_to_address_problem(reply_to_address)
        if problem is not None:
            raise ComposeError(f"Invalid Reply-To address '{_shown(reply_to_address)}': "
                               f"{problem}")
    if auto_submitted is not None:
        problem = sendoptions.auto_submitted_problem(auto_submitted)
        if problem is not None:
            raise ComposeError(f"Invalid Auto-Submitted value '{_shown(auto_submitted)}': "
                               f"{problem}")
    recipients = addresses(to)
    if len(recipients) > 1:
        raise ComposeError(
            f"Only one recipient per message is supported; To has {len(recipients)} addresses")
    invalid = recipient_problem(to)
    if invalid is not None:
        raise ComposeError(f"Invalid recipient address '{invalid[0]}': {invalid[1]}")
    when = now or datetime.datetime.now(datetime.UTC)
    sender = bare_address(from_addr)
    id_domain = sender.split("@", 1)[1] if sender and sender.split("@", 1)[1] else "localhost"
    if message_id is not None:
        problem = sendoptions.message_id_problem(message_id, id_domain, explicit=True)
        if problem is not None:
            raise ComposeError(f"Invalid Message-ID '{_shown(message_id)}': {problem}")
        own_id = sendoptions.bracketed(message_id)
    else:
        own_id = f"<{uuid.uuid4()}@{id_domain}>"

    headers = [
        "From: " + encode_address_list(from_addr),
        "To: " + encode_address_list(to),
        "Subject: " + encode_unstructured("Subject", subject),
        "Date: " + email.utils.format_datetime(when.astimezone(datetime.UTC)),
        f"Message-ID: {own_id}",
    ]
    if reply_to_address is not None:
        headers.append("Reply-To: " + reply_to_address.strip())
    if auto_submitted is not None:
        headers.append("Auto-Submitted: " + auto_submitted.strip().lower())
    parent = _strip_line_breaks(reply_to or "").strip()
    if parent:
        parent = bracket_id(parent)
        chain = _strip_line_breaks(references or "").strip()
        headers += ["In-Reply-To: " + parent, "References: " + (chain or parent)]
    headers = [fold_header(header) for header in headers]
    headers.append("MIME-Version: 1.0")

    text = normalize_crlf(body)
    if not text.endswith(CRLF):
        text += CRLF
    text_headers = ["Content-Type: text/plain; charset=utf-8"]
    if not text.isascii():
        text_headers.append("Content-Transfer-Encoding: 8bit")
    if not files:
        return (CRLF.join(headers + text_headers) + CRLF + CRLF + text).encode("utf-8")

    boundary = new_boundary()
    headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
    parts = [CRLF.join(text_headers) + CRLF + CRLF + text]
    for filename, content_type, data in files:
        parts.append(CRLF.join(attachment_headers(filename, content_type)) + CRLF + CRLF
                     + base64_lines(data))
    body_text = "".join(f"--{boundary}{CRLF}{part}" for part in parts) + f"--{boundary}--{CRLF}"
    return (CRLF.join(headers) + CRLF + CRLF + body_text).encode("utf-8")


# --- replies ------------------------------------------------------------------------------

_REPLY_PREFIX = re.compile(r"^\s*re\s*:", re.IGNORECASE)
_MESSAGE_ID_TOKEN = re.compile(r"<[^<>]*>|[^\s<>]+")


def reply_subject(subject: str) -> str:
    """``Re: `` + subject, unless it already starts with Re: in any case."""
    if _REPLY_PREFIX.match(subject):
        return subject
    return "Re: " + subject


def reply_recipient(fields: Mapping[str, object]) -> str | None:
    """Where a reply goes: the stored Reply-To when present, else From (bare address)."""
    for key in ("reply_to", "from"):
        value = fields.get(key)
        if isinstance(value, str) and value.strip():
            found = bare_address(value)
            if found:
                return found
    return None


def reply_threading(message_id: str | None,
                    references: str | None) -> tuple[str | None, str | None]:
    """In-Reply-To and References for answering ``message_id``.

    The chain is the original's References (bracketed or bare ids) plus the
    original's own id: ``<a@x> <b@x>`` + ``c@x`` → ``<a@x> <b@x> <c@x>``. An
    original without a Message-ID gives no threading headers.
    """
    parent_raw = (message_id or "").strip()
    if not parent_raw or parent_raw == "<>":
        return None, None
    parent = bracket_id(parent_raw)
    chain = [bracket_id(token) for token in _MESSAGE_ID_TOKEN.findall(references or "")
             if token.strip("<>").strip()]
    if not chain or chain[-1] != parent:
        chain.append(parent)
    return parent, " ".join(chain)
