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
  (RFC 2047 words, RFC 2231 parameters, charsets) is done here and in
  :mod:`aimx.mail.headers`, where every failure has a fallback. Unknown or non-text charsets
  decode as lossy UTF-8; ``us-ascii`` and unlabelled text are read as UTF-8 (a superset) so
  mislabelled 8-bit mail keeps its characters.
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

import binascii
import datetime
import email.feedparser
import email.parser
import email.policy
import email.utils
import hashlib
import quopri
import re
import secrets
from collections.abc import Callable, Iterator
from email.message import Message
from typing import Protocol

import attrs

from aimx.logs import logger
from aimx.mail.headers import (
    TEXT_POLICY,
    address_list,
    as_text,
    b64decode_lenient,
    compute_thread_id,
    decode_bytes,
    decode_rfc2047,
    first_id,
    joined_addresses,
    last_headers,
    lone_thread_root,
    reference_chain,
    render_address,
    rfc3339_utc,
    sender_date,
    single_line,
    strip_brackets,
    trimmed,
)

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
        value = decode_bytes(data, charset or "utf-8") if data is not None else text
    return decode_rfc2047(as_text(value))


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
            return b64decode_lenient(payload)
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
    return decode_bytes(_decoded_payload(part), charset)


def _serialized(part: Message, linesep: str) -> bytes:
    """An embedded message (message/rfc822, delivery-status, ...) as one file's bytes."""
    payload = part.get_payload()
    inner = payload[0] if isinstance(payload, list) and len(payload) == 1 else None
    target = inner if isinstance(inner, Message) else part
    policy = TEXT_POLICY.clone(linesep=linesep, max_line_length=None)  # never refold headers
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
        texts.append(_normalise_newlines(html_to_text(decode_bytes(data, charset))))
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
        return _normalise_newlines(as_text(payload))
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
    parser = email.feedparser.BytesFeedParser(policy=TEXT_POLICY)
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
    parser = email.feedparser.BytesFeedParser(policy=TEXT_POLICY)
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
    return _parsed_message(msg, body, attachments, now, lambda: lone_thread_root(raw, now),
                           len(raw))


def _unstructured(raw: bytes, exc: Exception) -> tuple[Message, str, list[Attachment]]:
    log.warning("MIME structure unusable, keeping the raw body as text: %r", exc)
    msg = email.parser.BytesParser(policy=TEXT_POLICY).parsebytes(raw, headersonly=True)
    return msg, _raw_body_text(msg), []


def _parsed_message(msg: Message, body: str, attachments: list[Attachment],
                    now: datetime.datetime, lone_root: str | Callable[[], str],
                    size: int) -> ParsedMessage:
    headers = last_headers(msg)
    from_pairs = address_list(headers.get("from"))
    to_pairs = address_list(headers.get("to"))
    subject = single_line(decode_rfc2047(headers.get("subject", ""))).strip()
    date = sender_date(headers["date"]) if "date" in headers else None
    message_id_raw = headers.get("message-id")
    in_reply_to_raw = headers.get("in-reply-to")
    references_raw = headers.get("references")

    return ParsedMessage(
        message_id=strip_brackets(first_id(message_id_raw)),
        from_=render_address(*from_pairs[0]) if from_pairs else "",
        to=render_address(*to_pairs[0]) if to_pairs else "",
        cc=joined_addresses(headers.get("cc")),
        reply_to=joined_addresses(headers.get("reply-to")),
        subject=subject or NO_SUBJECT,
        date=date or rfc3339_utc(now),
        in_reply_to=strip_brackets(first_id(in_reply_to_raw)) or None,
        references=reference_chain(references_raw),
        list_id=trimmed(headers.get("list-id")),
        auto_submitted=trimmed(headers.get("auto-submitted")),
        thread_id=compute_thread_id(in_reply_to_raw, references_raw, message_id_raw,
                                    lone_root=lone_root),
        body=body,
        attachments=tuple(attachments),
        from_addresses=tuple(address for _name, address in from_pairs),
        size_bytes=size,
        precedence=trimmed(headers.get("precedence")),
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
    """Streaming base64 decoding with ``b64decode_lenient``'s result, for input of the
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
