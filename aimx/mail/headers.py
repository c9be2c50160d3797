"""Header values of a received message: dates, charsets, text, addresses, Message-IDs.

Pure functions the parser (``aimx.mail.message``) builds its fields with. Like
the parser they never raise on bad input: a header that cannot be decoded is
read as lossy text, a bad date becomes ``None``, an address list that does not
parse is kept as written.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime
import email.policy
import email.utils
import functools
import hashlib
import re
from collections.abc import Callable
from email.message import Message

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


def sender_date(value: str) -> str | None:
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


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode text bytes lossily; never raises."""
    try:
        return data.decode(_codec_name(charset), "replace")
    except Exception:  # codecs that refuse the "replace" handler (idna, ...)
        return data.decode("utf-8", "replace")


_SURROGATES = re.compile("[\ud800-\udfff]")


def as_text(value: object) -> str:
    """Header text from the parser: raw 8-bit bytes (surrogate-escaped) read as lossy UTF-8."""
    text = value if isinstance(value, str) else str(value)
    if _SURROGATES.search(text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        text = _SURROGATES.sub("\ufffd", text)
    return text


class _TextHeaderPolicy(email.policy.Compat32):
    """compat32 with header access returning plain text instead of ``Header`` objects."""

    def header_fetch_parse(self, name: str, value: str) -> str:  # type: ignore[override]
        return as_text(value)


TEXT_POLICY = _TextHeaderPolicy()


# --------------------------------------------------------------------------- headers

_FOLD = re.compile(r"\r?\n(?=[ \t])")
_LINE_BREAKS = str.maketrans({"\r": None, "\n": None, "\x00": None})
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*?)\?=")


def _unfold(value: str) -> str:
    return _FOLD.sub("", value)


def single_line(value: str) -> str:
    """Values end up in single-line TOML strings and hook environments."""
    return value.translate(_LINE_BREAKS)


def b64decode_lenient(data: bytes | str) -> bytes:
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
            data = b64decode_lenient(raw)
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
        "".join(pieces) if charset is None else decode_bytes(b"".join(pieces), charset)
        for charset, pieces in chunks
    )


def last_headers(msg: Message) -> dict[str, str]:
    """Header name (lower case) → unfolded text of its last occurrence."""
    headers: dict[str, str] = {}
    for name, value in msg.raw_items():
        headers[str(name).strip().lower()] = _unfold(as_text(value))
    return headers


_ADDRESS_CACHE_MAX_LEN = 1000  # longer header values are parsed each time, never kept


def address_list(value: str | None) -> list[tuple[str, str]]:
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
        address = single_line(address).strip()
        if address:
            found.append((single_line(decode_rfc2047(name)).strip(), address))
    if not found and "@" in value:  # a parser refusal, not an empty group like "list:;"
        bracketed = re.search(r"<([^<>]+)>", value)
        fallback = bracketed.group(1) if bracketed else value
        fallback = single_line(fallback).strip()
        if fallback:
            found.append(("", fallback))
    return tuple(found)


def render_address(name: str, address: str) -> str:
    return f"{name} <{address}>" if name else address


def joined_addresses(value: str | None) -> str | None:
    rendered = [render_address(name, address) for name, address in address_list(value)]
    return ", ".join(rendered) or None


def trimmed(value: str | None) -> str | None:
    if value is None:
        return None
    return single_line(value).strip() or None


# --------------------------------------------------------------------------- message ids


def first_id(raw: str | None) -> str:
    """The first ``<…>`` group of a header value, or the whole trimmed value without ``<``."""
    if not raw:
        return ""
    value = single_line(_unfold(raw)).strip()
    start = value.find("<")
    if start < 0:
        return value
    end = value.find(">", start)
    return value[start:] if end < 0 else value[start:end + 1]


def strip_brackets(value: str) -> str:
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
    root = first_id(in_reply_to_raw) or first_id(references_raw) or first_id(message_id_raw)
    root = strip_brackets(root) or (lone_root() if callable(lone_root) else lone_root)
    try:
        data = root.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = root.encode("utf-8", "replace")
    return hashlib.sha256(data).hexdigest()[:16]


def lone_thread_root(raw: bytes, received: datetime.datetime) -> str:
    """The thread root of a message without Message-ID, In-Reply-To and References: its
    own bytes and the moment it arrived, so even two identical ones get threads of their
    own (the same message delivered to several recipients at once keeps one)."""
    return f"{hashlib.sha256(raw).hexdigest()}@{received.isoformat()}"


def reference_chain(raw: str | None) -> str | None:
    """Every id of References in order, each bracketed, space-separated."""
    if not raw:
        return None
    value = single_line(_unfold(raw))
    ids = [group[1:-1].strip() for group in re.findall(r"<[^<>]*>", value)]
    if not ids and "<" not in value:
        ids = value.split()
    ids = [item for item in ids if item]
    return " ".join(f"<{item}>" for item in ids) or None


