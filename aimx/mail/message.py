"""Raw RFC 5322 bytes → :class:`ParsedMessage` (header fields, body, attachments, thread id).

Real-world mail is broken in every way imaginable, and a message the parser rejects is a
message the sender retries for days, so this module is deliberately forgiving:

* Only empty or whitespace-only input raises :class:`MessageParseError`. Anything else is a
  message: input without a header block becomes a message with no headers whose body is the
  text, a MIME tree the stdlib parser cannot build (absurd nesting) falls back to a
  headers-only parse with the raw body as text, and a last-resort guard turns any unexpected
  exception into ``MessageParseError`` so nothing else ever escapes.
* The stdlib parser runs with a compat32-based policy whose header access returns plain text
  (raw 8-bit bytes read as lossy UTF-8) instead of structured objects; header decoding
  (RFC 2047 words, RFC 2231 parameters, charsets) is done here, where every failure has a
  fallback. Unknown or non-text charsets decode as lossy UTF-8; ``us-ascii`` and unlabelled
  text are read as UTF-8 (a superset) so mislabelled 8-bit mail keeps its characters.
* Header *fields* use the last occurrence of a repeated header (spec 20 §5). The MIME
  structure (Content-Type, boundary) follows the stdlib parser, which uses the first.
* A ``Date`` without a zone (or ``-0000``) is taken as UTC; a missing or unparseable one
  becomes the receive time.

HTML-only mail is converted with ``inscriptis`` (already a dependency): it lays out block
elements, lists and tables as readable text, drops ``head``/``script``/``style`` and keeps
link targets as Markdown links (``[text](url)``), which is what an agent reading the file
needs. Its input is capped at 2 MiB; a truncated conversion ends with
:data:`HTML_TRUNCATED_MARKER`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime
import email.feedparser
import email.parser
import email.policy
import email.utils
import functools
import hashlib
import quopri
import re
import secrets
from collections.abc import Callable, Iterator
from email.message import Message
from typing import Protocol

import attrs

from aimx.logs import logger

log = logger("aimx::message")

PARSE_ERROR_TEXT = "Failed to parse email"
NO_SUBJECT = "(no subject)"
HTML_LIMIT_BYTES = 2 * 1024 * 1024
HTML_TRUNCATED_MARKER = "\n\n[...HTML body truncated at 2 MB for rendering...]"
DEFAULT_ATTACHMENT_TYPE = "application/octet-stream"


class MessageParseError(ValueError):
    """The input is not an email at all (empty or whitespace only)."""

    def __init__(self, message: str = PARSE_ERROR_TEXT) -> None:
        super().__init__(message)


class SpooledBytes(Protocol):
    """Bytes kept in a scratch file (``aimx.storage.spool.SpoolFile``)."""

    def __len__(self) -> int: ...

    def write(self, data: bytes | memoryview) -> None: ...

    def chunks(self, start: int = 0, end: int | None = None,
               size: int = ...) -> Iterator[bytes]: ...

    def read_at(self, offset: int, length: int) -> bytes: ...


@attrs.frozen
class Attachment:
    """One saved MIME leaf; ``filename`` is as the message names it (not sanitised)."""

    filename: str
    content_type: str
    #: The decoded content: bytes, or for a message parsed from a spool file
    #: (:func:`parse_spooled`) a spooled file of them (``len()`` gives the size).
    data: bytes | SpooledBytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")


@attrs.frozen
class ParsedMessage:
    """What ingest needs from a message; optional fields are ``None`` when absent."""

    message_id: str
    from_: str
    to: str
    cc: str | None
    reply_to: str | None
    subject: str
    date: str
    in_reply_to: str | None
    references: str | None
    list_id: str | None
    auto_submitted: str | None
    thread_id: str
    body: str = attrs.field(repr=False)
    attachments: tuple[Attachment, ...]
    from_addresses: tuple[str, ...]
    size_bytes: int
    precedence: str | None = None  # not stored; the loop guard reads it

    def header_fields(self) -> dict[str, object]:
        """The frontmatter keys this message decides, named as in the file (spec 20 §7.2)."""
        return {
            "message_id": self.message_id,
            "thread_id": self.thread_id,
            "from": self.from_,
            "to": self.to,
            "cc": self.cc,
            "reply_to": self.reply_to,
            "subject": self.subject,
            "date": self.date,
            "size_bytes": self.size_bytes,
            "in_reply_to": self.in_reply_to,
            "references": self.references,
            "list_id": self.list_id,
            "auto_submitted": self.auto_submitted,
        }


# --------------------------------------------------------------------------- timestamps


def rfc3339_utc(when: datetime.datetime) -> str:
    """The one UTC timestamp form aimx writes: ``2025-01-01T12:00:03.512345Z``.

    Used for ``received_at``, ``read_at`` and ``delivered_at``; microseconds keep repeated
    marks within one second ordered. A naive datetime is taken as UTC.
    """
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    when = when.astimezone(datetime.UTC)
    return (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}T"
        f"{when.hour:02d}:{when.minute:02d}:{when.second:02d}.{when.microsecond:06d}Z"
    )


def _sender_date(value: str) -> str | None:
    """A Date header in the sender's own offset, RFC 3339 without fractions; None if bad."""
    when: datetime.datetime | None = None
    try:
        parts = email.utils.parsedate_tz(value)
        if parts is not None:
            offset = parts[9] or 0
            zone = datetime.timezone(datetime.timedelta(seconds=offset))
            when = datetime.datetime(*parts[:6], tzinfo=zone)
    except (ValueError, TypeError, OverflowError, IndexError):
        when = None
    if when is None:
        try:  # some broken senders write ISO 8601 in Date:
            when = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        if when.tzinfo is None:
            return None
    offset_delta = when.utcoffset() or datetime.timedelta(0)
    minutes = int(offset_delta.total_seconds()) // 60
    if minutes == 0:
        zone_text = "Z"
    else:
        sign = "+" if minutes > 0 else "-"
        zone_text = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}T"
        f"{when.hour:02d}:{when.minute:02d}:{when.second:02d}{zone_text}"
    )


# --------------------------------------------------------------------------- charsets

# Labels Python does not know, or where the real-world meaning is a superset.
_CHARSET_ALIASES = {
    "us-ascii": "utf-8",
    "ascii": "utf-8",
    "unknown-8bit": "utf-8",
    "x-unknown": "utf-8",
    "unknown": "utf-8",
    "default": "utf-8",
    "iso-8859-1": "windows-1252",
    "latin1": "windows-1252",
    "latin-1": "windows-1252",
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-8-e": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-6-e": "iso-8859-6",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "euc-kr": "cp949",
    "ks_c_5601-1987": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "x-sjis": "cp932",
    "windows-874": "cp874",
    "x-user-defined": "windows-1252",
}


@functools.lru_cache(maxsize=256)
def _codec_name(charset: str | None) -> str:
    """A Python text codec for a MIME charset label; UTF-8 when unknown or unusable."""
    if not charset:
        return "utf-8"
    label = charset.strip().strip("\"'").split("*", 1)[0].strip().lower()
    label = _CHARSET_ALIASES.get(label, label)
    try:
        codecs.lookup(label)
        b"".decode(label)  # rejects bytes-to-bytes codecs such as base64 or zlib
    except Exception:
        return "utf-8"
    return label


def _decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode text bytes lossily; never raises."""
    try:
        return data.decode(_codec_name(charset), "replace")
    except Exception:  # codecs that refuse the "replace" handler (idna, ...)
        return data.decode("utf-8", "replace")


_SURROGATES = re.compile("[\ud800-\udfff]")


def _as_text(value: object) -> str:
    """Header text from the parser: raw 8-bit bytes (surrogate-escaped) read as lossy UTF-8."""
    text = value if isinstance(value, str) else str(value)
    if _SURROGATES.search(text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        text = _SURROGATES.sub("\ufffd", text)
    return text


class _TextHeaderPolicy(email.policy.Compat32):
    """compat32 with header access returning plain text instead of ``Header`` objects."""

    def header_fetch_parse(self, name: str, value: str) -> str:  # type: ignore[override]
        return _as_text(value)


_POLICY = _TextHeaderPolicy()


# --------------------------------------------------------------------------- headers

_FOLD = re.compile(r"\r?\n(?=[ \t])")
_LINE_BREAKS = str.maketrans({"\r": None, "\n": None, "\x00": None})
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*?)\?=")


def _unfold(value: str) -> str:
    return _FOLD.sub("", value)


def _single_line(value: str) -> str:
    """Values end up in single-line TOML strings and hook environments."""
    return value.translate(_LINE_BREAKS)


def _b64decode_lenient(data: bytes | str) -> bytes:
    """Base64 that tolerates junk characters, missing padding and a dangling character.

    ASCII text is decoded directly (one copy fewer on a 25 MB attachment)."""
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        pass
    if isinstance(data, str):
        data = data.encode("ascii", "ignore")
    cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    if len(cleaned) % 4 == 1:
        cleaned = cleaned[:-1]
    cleaned += b"=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned)
    except (binascii.Error, ValueError):
        return b""


def decode_rfc2047(value: str) -> str:
    """Decode RFC 2047 encoded words; adjacent words of one charset are joined as bytes first,
    so a multi-byte character split across words survives."""
    if "=?" not in value:
        return value
    # Each chunk is literal text (charset None) or the byte pieces of consecutive words in
    # one charset, joined once at the end (no quadratic concatenation on huge headers).
    chunks: list[tuple[str | None, list]] = []
    position = 0
    for match in _ENCODED_WORD.finditer(value):
        between = value[position:match.start()]
        follows_word = position > 0
        if between and not (follows_word and between.isspace()):
            chunks.append((None, [between]))
        charset, encoding, encoded = match.groups()
        raw = encoded.encode("ascii", "replace")
        if encoding in "bB":
            data = _b64decode_lenient(raw)
        else:
            data = binascii.a2b_qp(raw, header=True)
        charset_key = charset.split("*", 1)[0].lower()
        if chunks and chunks[-1][0] == charset_key:
            chunks[-1][1].append(data)
        else:
            chunks.append((charset_key, [data]))
        position = match.end()
    if position < len(value):
        chunks.append((None, [value[position:]]))
    return "".join(
        "".join(pieces) if charset is None else _decode_bytes(b"".join(pieces), charset)
        for charset, pieces in chunks
    )


def _last_headers(msg: Message) -> dict[str, str]:
    """Header name (lower case) → unfolded text of its last occurrence."""
    headers: dict[str, str] = {}
    for name, value in msg.raw_items():
        headers[str(name).strip().lower()] = _unfold(_as_text(value))
    return headers


_ADDRESS_CACHE_MAX_LEN = 1000  # longer header values are parsed each time, never kept


def _addresses(value: str | None) -> list[tuple[str, str]]:
    """(display name, address) pairs with an address, display names decoded."""
    if not value:
        return []
    if len(value) <= _ADDRESS_CACHE_MAX_LEN:
        return list(_address_pairs(value))
    return list(_parse_addresses(value))


@functools.lru_cache(maxsize=512)
def _address_pairs(value: str) -> tuple[tuple[str, str], ...]:
    """``_parse_addresses``, kept per header value: a steady sender's From and To
    repeat, and the parse (``getaddresses``, RFC 2047) depends on the text alone."""
    return _parse_addresses(value)


def _parse_addresses(value: str) -> tuple[tuple[str, str], ...]:
    try:
        pairs = email.utils.getaddresses([value])
    except Exception:
        pairs = []
    found = []
    for name, address in pairs:
        address = _single_line(address).strip()
        if address:
            found.append((_single_line(decode_rfc2047(name)).strip(), address))
    if not found and "@" in value:  # a parser refusal, not an empty group like "list:;"
        bracketed = re.search(r"<([^<>]+)>", value)
        fallback = bracketed.group(1) if bracketed else value
        fallback = _single_line(fallback).strip()
        if fallback:
            found.append(("", fallback))
    return tuple(found)


def _render_address(name: str, address: str) -> str:
    return f"{name} <{address}>" if name else address


def _joined_addresses(value: str | None) -> str | None:
    rendered = [_render_address(name, address) for name, address in _addresses(value)]
    return ", ".join(rendered) or None


def _trimmed(value: str | None) -> str | None:
    if value is None:
        return None
    return _single_line(value).strip() or None


# --------------------------------------------------------------------------- message ids


def _first_id(raw: str | None) -> str:
    """The first ``<…>`` group of a header value, or the whole trimmed value without ``<``."""
    if not raw:
        return ""
    value = _single_line(_unfold(raw)).strip()
    start = value.find("<")
    if start < 0:
        return value
    end = value.find(">", start)
    return value[start:] if end < 0 else value[start:end + 1]


def _strip_brackets(value: str) -> str:
    if len(value) >= 2 and value[0] == "<" and value[-1] == ">":
        return value[1:-1]
    return value


def compute_thread_id(
    in_reply_to_raw: str | None, references_raw: str | None, message_id_raw: str | None,
    *, lone_root: str | Callable[[], str] = "",
) -> str:
    """Spec 20 §8 / D3: sha256 of the first id of In-Reply-To, else of References, else the
    message's own id (one pair of brackets stripped); the first 16 hex digits.

    ``lone_root`` stands in when the message names no id at all, so such messages
    do not all share the thread of the empty string; a callable is only called then.
    """
    root = _first_id(in_reply_to_raw) or _first_id(references_raw) or _first_id(message_id_raw)
    root = _strip_brackets(root) or (lone_root() if callable(lone_root) else lone_root)
    try:
        data = root.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = root.encode("utf-8", "replace")
    return hashlib.sha256(data).hexdigest()[:16]


def _lone_root(raw: bytes, received: datetime.datetime) -> str:
    """The thread root of a message without Message-ID, In-Reply-To and References: its
    own bytes and the moment it arrived, so even two identical ones get threads of their
    own (the same message delivered to several recipients at once keeps one)."""
    return f"{hashlib.sha256(raw).hexdigest()}@{received.isoformat()}"


def _reference_chain(raw: str | None) -> str | None:
    """Every id of References in order, each bracketed, space-separated."""
    if not raw:
        return None
    value = _single_line(_unfold(raw))
    ids = [group[1:-1].strip() for group in re.findall(r"<[^<>]*>", value)]
    if not ids and "<" not in value:
        ids = value.split()
    ids = [item for item in ids if item]
    return " ".join(f"<{item}>" for item in ids) or None


# --------------------------------------------------------------------------- MIME tree

_PRIMARY, _OTHER_ALTERNATIVE = "primary", "other-alternative"
_CTE_RE = re.compile(r"[a-z0-9-]+")
_MEDIA_TYPE_RE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")


def _param(part: Message, name: str, header: str) -> str | None:
    """A Content-* parameter, RFC 2231 and (non-standard but common) RFC 2047 decoded."""
    value = part.get_param(name, None, header=header)
    if value is None:
        return None
    if isinstance(value, tuple):
        charset, _language, text = value
        try:
            data = text.encode("latin-1", "surrogateescape")
        except UnicodeEncodeError:
            data = None
        value = _decode_bytes(data, charset or "utf-8") if data is not None else text
    return decode_rfc2047(_as_text(value))


def _filename(part: Message) -> str:
    for header, name in (("content-disposition", "filename"), ("content-type", "name")):
        try:
            value = _param(part, name, header)
        except Exception:
            value = None
        if value:
            return value
    return ""


def _is_attachment_disposition(part: Message) -> bool:
    disposition = part.get("content-disposition")
    if not disposition:
        return False
    return disposition.split(";", 1)[0].strip().lower() == "attachment"


def _declared_type(part: Message) -> str:
    """The Content-Type as written (lower-case type/subtype), or octet-stream if absent/bad."""
    raw = part.get("content-type")
    if raw is None:
        implied = part.get_content_type()
        return implied if implied == "message/rfc822" else DEFAULT_ATTACHMENT_TYPE
    media = raw.split(";", 1)[0].strip().lower()
    return media if _MEDIA_TYPE_RE.fullmatch(media) else DEFAULT_ATTACHMENT_TYPE


def _transfer_encoding(part: Message) -> str:
    raw = (part.get("content-transfer-encoding") or "").strip().lower()
    match = _CTE_RE.match(raw)
    return match.group(0) if match else ""


def _decoded_payload(part: Message) -> bytes:
    """The part's content with its transfer encoding undone; never re-encodes charsets."""
    encoding = _transfer_encoding(part)
    if encoding == "base64":
        try:
            payload = part.get_payload()
        except Exception:
            payload = None
        if isinstance(payload, str):
            return _b64decode_lenient(payload)
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        return b""
    stdlib_encoding = str(part.get("content-transfer-encoding", "")).lower()
    if encoding == "quoted-printable" and stdlib_encoding != "quoted-printable":
        data = quopri.decodestring(data)
    return data


def _part_text(part: Message) -> str:
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    return _decode_bytes(_decoded_payload(part), charset)


def _serialized(part: Message, linesep: str) -> bytes:
    """An embedded message (message/rfc822, delivery-status, ...) as one file's bytes."""
    payload = part.get_payload()
    inner = payload[0] if isinstance(payload, list) and len(payload) == 1 else None
    target = inner if isinstance(inner, Message) else part
    policy = _POLICY.clone(linesep=linesep, max_line_length=None)  # never refold headers
    try:
        if target is part:  # several blocks (delivery-status): the blocks, not our own headers
            return linesep.encode().join(
                block.as_bytes(policy=policy) for block in payload if isinstance(block, Message)
            )
        return target.as_bytes(policy=policy)
    except Exception:
        try:
            return str(target).encode("utf-8", "surrogateescape")
        except Exception:
            return b""


def _is_plain_body_leaf(part: Message) -> bool:
    return (
        not part.is_multipart()
        and part.get_content_type() == "text/plain"
        and not _is_attachment_disposition(part)
        and not _filename(part)
    )


def _is_html_body_leaf(part: Message) -> bool:
    return (
        not part.is_multipart()
        and part.get_content_type() == "text/html"
        and not _is_attachment_disposition(part)
        and not _filename(part)
    )


def _descendants(part: Message) -> Iterator[Message]:
    """Parts below a multipart, not entering embedded messages."""
    stack = [part]
    while stack:
        current = stack.pop()
        yield current
        if current.get_content_maintype() == "multipart" and current.is_multipart():
            payload = current.get_payload()
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))


def _choose_alternative(children: list[Message]) -> int:
    """Index of the alternative that supplies the body: text/plain wins in any position."""
    for index, child in enumerate(children):
        if _is_plain_body_leaf(child):
            return index
    for index, child in enumerate(children):
        if child.is_multipart() and child.get_content_maintype() == "multipart":
            if any(_is_plain_body_leaf(p) for p in _descendants(child)):
                return index
    for index in range(len(children) - 1, -1, -1):
        if any(_is_html_body_leaf(p) for p in _descendants(children[index])):
            return index
    return len(children) - 1


def _classify(part: Message, context: str) -> str:
    """'text', 'html', 'attach' or 'drop' for a leaf part."""
    maintype = part.get_content_maintype()
    subtype = part.get_content_subtype()
    if maintype == "multipart":  # no usable boundary: the parser kept the content as text
        subtype, maintype = "plain", "text"
    if maintype == "text" and not _is_attachment_disposition(part) and not _filename(part):
        if subtype in ("plain", "html"):
            if context == _OTHER_ALTERNATIVE:
                return "drop"
            return "text" if subtype == "plain" else "html"
    return "attach"


def _leaves(root: Message) -> Iterator[tuple[str, Message]]:
    """(kind, part) for every leaf in document order, without recursion."""
    stack: list[tuple[Message, str]] = [(root, _PRIMARY)]
    while stack:
        part, context = stack.pop()
        maintype = part.get_content_maintype()
        if part.is_multipart():
            payload = [p for p in part.get_payload() if isinstance(p, Message)]
            if maintype != "multipart":  # message/rfc822, delivery-status: one file
                yield "attach", part
                continue
            if context == _PRIMARY and part.get_content_subtype() == "alternative" and payload:
                chosen = _choose_alternative(payload)
                contexts = [_PRIMARY if i == chosen else _OTHER_ALTERNATIVE
                            for i in range(len(payload))]
            else:
                contexts = [context] * len(payload)
            stack.extend(reversed(list(zip(payload, contexts, strict=True))))
            continue
        yield _classify(part, context), part


def _attachment(part: Message, linesep: str,
                streamed: dict[int, SpooledBytes] | None = None) -> Attachment:
    data: bytes | SpooledBytes
    if streamed is not None and id(part) in streamed:
        data = streamed[id(part)]
    elif part.is_multipart():
        data = _serialized(part, linesep)
    else:
        data = _decoded_payload(part)
    return Attachment(filename=_filename(part), content_type=_declared_type(part), data=data)


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _join_texts(texts: list[str]) -> str:
    if len(texts) == 1:
        return texts[0]
    kept = [text.rstrip("\n") for text in texts if text.strip()]
    return "\n\n".join(kept) + ("\n" if kept else "")


def html_to_text(html: str) -> str:
    """Readable text from HTML with links kept as ``[text](url)``; never raises."""
    html = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", html)
    try:
        # Imported on first use: lxml and inscriptis are slow to import and most callers of
        # this module (the CLI) never convert HTML.
        from inscriptis.html_engine import Inscriptis
        from inscriptis.model.config import ParserConfig
        from lxml.html import document_fromstring

        if not html.strip():
            return ""
        tree = document_fromstring(html)
        for element in list(tree.iter("template")):
            element.drop_tree()
        return Inscriptis(tree, ParserConfig(display_links=True)).get_text()
    except Exception as exc:
        log.warning("HTML conversion failed, stripping tags instead: %s", exc)
        import html as html_lib

        text = re.sub(r"(?is)<(script|style|head|template)\b.*?</\1\s*>", "", html)
        text = re.sub(r"(?i)<br\s*/?>|</p\s*>", "\n", text)
        text = re.sub(r"(?s)<!--.*?-->|<[^>]*>", "", text)
        return html_lib.unescape(text)


def _html_body(parts: list[Message]) -> str:
    budget = HTML_LIMIT_BYTES
    truncated = False
    texts = []
    for part in parts:
        if budget <= 0:
            truncated = True
            break
        data = _decoded_payload(part)
        if len(data) > budget:
            data = data[:budget]
            truncated = True
        budget -= len(data)
        try:
            charset = part.get_content_charset()
        except Exception:
            charset = None
        texts.append(_normalise_newlines(html_to_text(_decode_bytes(data, charset))))
    body = _join_texts(texts) if texts else ""
    if truncated:
        body = body.rstrip("\n") + HTML_TRUNCATED_MARKER
    return body


def _body_and_attachments(msg: Message, linesep: str,
                          streamed: dict[int, SpooledBytes] | None = None,
                          ) -> tuple[str, list[Attachment]]:
    leaves = list(_leaves(msg))
    has_text = any(kind == "text" for kind, _ in leaves)
    texts: list[str] = []
    html_parts: list[Message] = []
    attachments: list[Attachment] = []
    for kind, part in leaves:
        if kind == "text":
            texts.append(_normalise_newlines(_part_text(part)))
        elif kind == "html" and not has_text:
            html_parts.append(part)
        elif kind == "attach" or kind == "html":  # stray HTML beside a text body: keep it
            attachments.append(_attachment(part, linesep, streamed))
    if texts:
        return _join_texts(texts), attachments
    return _html_body(html_parts), attachments


def _raw_body_text(msg: Message) -> str:
    try:
        payload = msg.get_payload()
    except Exception:
        return ""
    if isinstance(payload, str):
        return _normalise_newlines(_as_text(payload))
    return ""


# --------------------------------------------------------------------------- entry point


def parse_message(raw: bytes, now: datetime.datetime) -> ParsedMessage:
    """Parse one raw message; ``now`` (naive = UTC) stands in for a missing/bad Date.

    Raises :class:`MessageParseError` for empty or whitespace-only input, and never any
    other exception.
    """
    if not raw or not raw.strip():
        raise MessageParseError()
    try:
        return _parse(raw, now)
    except MessageParseError:
        raise
    except Exception as exc:  # last resort: ingest must get a clean error, not a traceback
        log.warning("message could not be parsed: %r", exc)
        raise MessageParseError() from exc


_FEED_CHUNK = 1 << 16


_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


def _single_part_parse(raw: bytes) -> Message | None:
    """The common case without the stdlib's line-by-line body loop, or None.

    For a message that is not ``multipart/*`` or ``message/*``, the stdlib parser
    only collects the body lines and joins them back into the payload, one
    Python iteration per line (over a thousand for 100 KB). Here the header
    block alone goes through the parser and the payload is set to the rest of
    the input, decoded as the parser decodes it. Whenever the header block is
    not clean (a defect, text after it) this returns None and the caller parses
    the whole message the ordinary way.
    """
    blank = _BLANK_LINE.search(raw)
    if blank is None:
        return None
    parser = email.feedparser.BytesFeedParser(policy=_POLICY)
    parser.feed(raw[:blank.end()])
    msg = parser.close()
    if msg.defects or msg.get_payload() or msg.get_content_maintype() in ("multipart",
                                                                           "message"):
        return None
    msg.set_payload(raw[blank.end():].decode("ascii", "surrogateescape"))
    return msg


def _feed_parse(raw: bytes) -> Message:
    """Parse in chunks: the stdlib parser then never holds a decoded copy of the whole input
    beside its own line buffers (a 25 MB message costs one copy less)."""
    single = _single_part_parse(raw)
    if single is not None:
        return single
    parser = email.feedparser.BytesFeedParser(policy=_POLICY)
    view = memoryview(raw)
    for start in range(0, len(view), _FEED_CHUNK):
        parser.feed(bytes(view[start:start + _FEED_CHUNK]))
    return parser.close()


def _parse(raw: bytes, now: datetime.datetime) -> ParsedMessage:
    linesep = "\r\n" if b"\r\n" in raw[:65536] else "\n"
    try:
        msg = _feed_parse(raw)
        body, attachments = _body_and_attachments(msg, linesep)
    except Exception as exc:  # RecursionError on absurd nesting, parser bugs
        msg, body, attachments = _unstructured(raw, exc)
    return _parsed_message(msg, body, attachments, now, lambda: _lone_root(raw, now), len(raw))


def _unstructured(raw: bytes, exc: Exception) -> tuple[Message, str, list[Attachment]]:
    log.warning("MIME structure unusable, keeping the raw body as text: %r", exc)
    msg = email.parser.BytesParser(policy=_POLICY).parsebytes(raw, headersonly=True)
    return msg, _raw_body_text(msg), []


def _parsed_message(msg: Message, body: str, attachments: list[Attachment],
                    now: datetime.datetime, lone_root: str | Callable[[], str],
                    size: int) -> ParsedMessage:
    headers = _last_headers(msg)
    from_pairs = _addresses(headers.get("from"))
    to_pairs = _addresses(headers.get("to"))
    subject = _single_line(decode_rfc2047(headers.get("subject", ""))).strip()
    date = _sender_date(headers["date"]) if "date" in headers else None
    message_id_raw = headers.get("message-id")
    in_reply_to_raw = headers.get("in-reply-to")
    references_raw = headers.get("references")

    return ParsedMessage(
        message_id=_strip_brackets(_first_id(message_id_raw)),
        from_=_render_address(*from_pairs[0]) if from_pairs else "",
        to=_render_address(*to_pairs[0]) if to_pairs else "",
        cc=_joined_addresses(headers.get("cc")),
        reply_to=_joined_addresses(headers.get("reply-to")),
        subject=subject or NO_SUBJECT,
        date=date or rfc3339_utc(now),
        in_reply_to=_strip_brackets(_first_id(in_reply_to_raw)) or None,
        references=_reference_chain(references_raw),
        list_id=_trimmed(headers.get("list-id")),
        auto_submitted=_trimmed(headers.get("auto-submitted")),
        thread_id=compute_thread_id(in_reply_to_raw, references_raw, message_id_raw,
                                    lone_root=lone_root),
        body=body,
        attachments=tuple(attachments),
        from_addresses=tuple(address for _name, address in from_pairs),
        size_bytes=size,
        precedence=_trimmed(headers.get("precedence")),
    )


# --------------------------------------------------------------------------- spooled input
#
# A large message is parsed from its spool file with bounded memory and the same result
# as ``parse_message`` on its bytes. The stdlib parser runs on a *skeleton*: the message
# with every run of base64-looking lines (letters, digits, "+", "/", "=", CRLF) replaced
# by one placeholder line of the same kind. Such a line is never a header, a boundary or
# a blank line, so the parser builds exactly the same tree; only payloads hold
# placeholders. A base64 attachment is then decoded from the file straight into a spool
# file of its own; every other payload that holds a placeholder gets its real text back.

#: Runs shorter than this many lines stay in the skeleton (not worth a placeholder).
_MIN_RUN_LINES = 16
_ELIDABLE_RUN = re.compile(
    rb"^(?:[A-Za-z0-9+/=]{1,998}\r\n){%d,}" % _MIN_RUN_LINES, re.MULTILINE)
_BASE64_JUNK = bytes(sorted(set(range(256)) - set(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")))


@attrs.define
class _Skeleton:
    text: bytes
    ranges: list[tuple[int, int]]  # file span of each placeholder, its final CRLF included
    token: re.Pattern[str]  # a placeholder in a payload; group 2 absent when the CRLF was cut
    lone_root_hash: str


def _skeleton(source: SpooledBytes) -> _Skeleton:
    """One pass over the file: the skeleton, the placeholders' spans and the file's sha256."""
    prefix = f"AIMXSPOOL{secrets.token_hex(8)}N"
    pieces: list[bytes] = []
    ranges: list[tuple[int, int]] = []
    digest = hashlib.sha256()
    carry = b""
    start = 0  # file offset of ``carry``
    for chunk in source.chunks():
        digest.update(chunk)
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        block, carry = data[:cut], data[cut:]
        position = 0
        for run in _ELIDABLE_RUN.finditer(block):
            pieces.append(block[position:run.start()])
            pieces.append(f"{prefix}{len(ranges)}\r\n".encode("ascii"))
            ranges.append((start + run.start(), start + run.end()))
            position = run.end()
        pieces.append(block[position:])
        start += cut
    pieces.append(carry)
    token = re.compile(re.escape(prefix) + r"(\d+)(\r\n)?")
    return _Skeleton(b"".join(pieces), ranges, token, digest.hexdigest())


def _payload_bytes(text: str, skeleton: _Skeleton, source: SpooledBytes) -> Iterator[bytes]:
    """The real bytes of a skeleton payload, piece by piece."""
    position = 0
    for match in skeleton.token.finditer(text):
        if match.start() > position:
            yield text[position:match.start()].encode("ascii", "surrogateescape")
        begin, end = skeleton.ranges[int(match.group(1))]
        yield from source.chunks(begin, end if match.group(2) else end - 2)
        position = match.end()
    if position < len(text):
        yield text[position:].encode("ascii", "surrogateescape")


class _Base64ToFile:
    """Streaming base64 decoding with ``_b64decode_lenient``'s result, for input of the
    ordinary shape: junk ignored, padding only at the very end. Anything else makes
    ``finish`` return False and the caller decodes the whole payload the old way."""

    def __init__(self, out: SpooledBytes) -> None:
        self.out = out
        self.carry = b""
        self.pads = 0
        self.ordinary = True

    def feed(self, data: bytes) -> None:
        clean = data.translate(None, _BASE64_JUNK)
        if not clean or not self.ordinary:
            return
        if self.pads:
            self.ordinary = clean.count(b"=") == len(clean)
            self.pads += len(clean)
            return
        equals = clean.find(b"=")
        if equals >= 0:
            tail = clean[equals:]
            if tail.count(b"=") != len(tail):
                self.ordinary = False
                return
            self.pads, clean = len(tail), clean[:equals]
        buffer = self.carry + clean
        whole = len(buffer) - len(buffer) % 4
        if whole:
            self.out.write(binascii.a2b_base64(buffer[:whole]))
        self.carry = buffer[whole:]

    def finish(self) -> bool:
        if not self.ordinary or (len(self.carry), self.pads) not in ((0, 0), (2, 2), (3, 1)):
            return False
        if self.carry:
            self.out.write(binascii.a2b_base64(self.carry + b"=" * self.pads))
        return True


def _stream_attachments(msg: Message, skeleton: _Skeleton, source: SpooledBytes,
                        new_file: Callable[[], SpooledBytes]) -> dict[int, SpooledBytes]:
    """Decode every base64 attachment that holds placeholders into a spool file of its own
    (keyed by ``id(part)``); one of unusual shape is left for the in-memory decoder."""
    leaves = list(_leaves(msg))
    has_text = any(kind == "text" for kind, _ in leaves)
    streamed: dict[int, SpooledBytes] = {}
    for kind, part in leaves:
        if not (kind == "attach" or (kind == "html" and has_text)) or part.is_multipart():
            continue
        payload = part.get_payload()
        if (_transfer_encoding(part) != "base64" or not isinstance(payload, str)
                or not skeleton.token.search(payload)):
            continue
        out = new_file()
        decoder = _Base64ToFile(out)
        for piece in _payload_bytes(payload, skeleton, source):
            decoder.feed(piece)
        if decoder.finish():
            streamed[id(part)] = out
        else:
            _close(out)
    return streamed


def _restore_payloads(msg: Message, skeleton: _Skeleton, source: SpooledBytes,
                      streamed: dict[int, SpooledBytes]) -> None:
    """Put the real text back wherever a placeholder is left (text bodies, embedded
    messages, unusual attachments, preambles and epilogues)."""

    def restored(text: str) -> str:
        data = b"".join(_payload_bytes(text, skeleton, source))
        return data.decode("ascii", "surrogateescape")

    for part in msg.walk():
        for attribute in ("preamble", "epilogue"):
            value = getattr(part, attribute, None)
            if isinstance(value, str) and skeleton.token.search(value):
                setattr(part, attribute, restored(value))
        if id(part) in streamed:
            continue
        payload = part.get_payload()
        if isinstance(payload, str) and skeleton.token.search(payload):
            part.set_payload(restored(payload))


def _close(data: object) -> None:
    close = getattr(data, "close", None)
    if close is not None:
        close()


def parse_spooled(source: SpooledBytes, now: datetime.datetime,
                  new_file: Callable[[], SpooledBytes]) -> ParsedMessage:
    """:func:`parse_message` for a message in a spool file, with bounded memory.

    Base64 attachments come back as spool files made by ``new_file`` (the caller
    closes them); the result is otherwise the one ``parse_message`` gives for the
    file's bytes. Raises :class:`MessageParseError` like it.
    """
    if not any(chunk.strip() for chunk in source.chunks()):
        raise MessageParseError()
    streamed: dict[int, SpooledBytes] = {}
    try:
        skeleton = _skeleton(source)
        linesep = "\r\n" if b"\r\n" in source.read_at(0, 65536) else "\n"
        msg = _feed_parse(skeleton.text)
        streamed = _stream_attachments(msg, skeleton, source, new_file)
        _restore_payloads(msg, skeleton, source, streamed)
        body, attachments = _body_and_attachments(msg, linesep, streamed)
        return _parsed_message(msg, body, attachments, now,
                               f"{skeleton.lone_root_hash}@{now.isoformat()}", len(source))
    except Exception as exc:  # absurd nesting, a parser bug: the in-memory path decides
        log.info("parsing the spooled message in memory: %r", exc)
        for data in streamed.values():
            _close(data)
        return parse_message(b"".join(source.chunks()), now)
