"""The email file format: ``+++`` / TOML frontmatter / ``+++`` / blank line / body.

Writing is done by hand rather than through a TOML library: the output must be
deterministic (fixed key order, one string style) and every string must be a single-line
basic string with escapes (decision D2), so no line of the frontmatter can ever read
``+++`` whatever a sender puts in a header. Reading accepts any valid TOML between the
first two lines equal to ``+++``, so files written by other tools still load. Read-state
edits change only the ``read`` / ``read_at`` lines of the text.
"""

from __future__ import annotations

import datetime
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from aimx.tomltext import toml_lines

DELIMITER = "+++"

INBOUND_KEYS: tuple[str, ...] = (
    "id", "message_id", "thread_id",
    "from", "to", "cc", "reply_to", "delivered_to",
    "subject", "date", "received_at", "received_from_ip", "size_bytes",
    "in_reply_to", "references", "list_id", "auto_submitted",
    "dkim", "spf", "dmarc", "trusted",
    "mailbox", "read", "read_at", "labels",
    # Beyond the spec's order, so readers that know only the spec's keys are unaffected.
    "trust_reason", "automatic",
)  # then [[attachments]]

SENT_KEYS: tuple[str, ...] = (
    "id", "message_id", "thread_id",
    "from", "to", "cc", "reply_to", "delivered_to",
    "subject", "date", "received_at", "received_from_ip", "size_bytes",
    "in_reply_to", "references", "list_id", "auto_submitted",
    "dkim", "spf", "dmarc", "trusted",
    "mailbox", "read", "labels",
    "outbound", "outbound_format", "delivery_status", "bcc", "delivered_at", "delivery_details",
)  # then [[attachments]]

ATTACHMENT_KEYS: tuple[str, ...] = ("filename", "content_type", "size", "path")

# Keys written even when empty; every other known key is left out when None or empty.
REQUIRED_KEYS = frozenset({
    "id", "message_id", "thread_id", "from", "to", "delivered_to", "subject", "date",
    "size_bytes", "dkim", "spf", "dmarc", "trusted", "mailbox", "read",
    "outbound", "outbound_format", "delivery_status",
})

class FrontmatterError(ValueError):
    """The file has no ``+++`` block, or its TOML does not parse."""


# --------------------------------------------------------------------------- writing

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# Control characters (C0, DEL, C1), the Unicode line/paragraph separators (which many tools,
# Python's splitlines among them, treat as line breaks), quotes, backslashes, lone surrogates.
_NEEDS_ESCAPE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\"\\\\\ud800-\udfff]")
_SHORT_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r",
                  '"': '\\"', "\\": "\\\\"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group(0)
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    if "\ud800" <= char <= "\udfff":  # a lone surrogate cannot be written as UTF-8
        return "\\uFFFD"
    return f"\\u{ord(char):04X}"


def toml_string(value: str) -> str:
    """A single-line TOML basic string; control characters, quotes, backslashes escaped."""
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, value) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}"
                          for k, v in value.items() if v is not None)
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to frontmatter")


def _is_empty(value: object) -> bool:
    return value is None or (isinstance(value, str | list | tuple) and len(value) == 0)


def render_email(fields: Mapping[str, object], body: str) -> bytes:
    """The whole ``.md`` file: frontmatter in schema order, then a blank line and the body.

    Sent copies (``fields["outbound"]`` true) use :data:`SENT_KEYS`, everything else
    :data:`INBOUND_KEYS`. Optional keys that are None or empty are left out; keys the schema
    does not know are written after the known ones; ``attachments`` (a list of dicts) comes
    last as ``[[attachments]]`` tables.
    """
    order = SENT_KEYS if fields.get("outbound") else INBOUND_KEYS
    lines: list[str] = [DELIMITER]
    known = set(order)
    for key in order:
        if key not in fields:
            continue
        value = fields[key]
        if value is None or (key not in REQUIRED_KEYS and _is_empty(value)):
            continue
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in fields.items():
        if key in known or key == "attachments" or value is None:
            continue
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for attachment in fields.get("attachments") or ():
        lines.append("")
        lines.append("[[attachments]]")
        for key in ATTACHMENT_KEYS:
            if attachment.get(key) is not None:
                lines.append(f"{key} = {_toml_value(attachment[key])}")
        for key, value in attachment.items():
            if key not in ATTACHMENT_KEYS and value is not None:
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    lines.append(DELIMITER)
    lines.append("")
    text = "\n".join(lines) + "\n" + body
    if not body.endswith("\n"):
        text += "\n"
    return text.encode("utf-8", "replace")


# --------------------------------------------------------------------------- reading

_DELIMITER_LINE = re.compile(rb"^\+\+\+\r?(?:\n|\Z)", re.MULTILINE)
_DELIMITER_LINE_COMPLETE = re.compile(rb"^\+\+\+\r?\n", re.MULTILINE)
_BOM = b"\xef\xbb\xbf"


def _delimiters(data: bytes, complete_lines_only: bool = False) -> tuple[int, int, int] | None:
    """(toml start, toml end, remainder start) from the first two ``+++`` lines, or None."""
    pattern = _DELIMITER_LINE_COMPLETE if complete_lines_only else _DELIMITER_LINE
    start = len(_BOM) if data.startswith(_BOM) else 0
    opening = pattern.search(data, start)
    if opening is None:
        return None
    closing = pattern.search(data, opening.end())
    if closing is None:
        return None
    return opening.end(), closing.start(), closing.end()


def _as_bytes(data: bytes | str) -> bytes:
    if not isinstance(data, str):
        return bytes(data)
    try:
        return data.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return data.encode("utf-8", "surrogatepass")


def split(data: bytes | str) -> tuple[str, str]:
    """(TOML text, everything after the closing ``+++`` line); the body follows the
    remainder's first (blank) line. Raises ``FrontmatterError("malformed frontmatter")``."""
    raw = _as_bytes(data)
    found = _delimiters(raw)
    if found is None:
        raise FrontmatterError("malformed frontmatter")
    toml_start, toml_end, rest_start = found
    return (raw[toml_start:toml_end].decode("utf-8", "replace"),
            raw[rest_start:].decode("utf-8", "replace"))


def _load(toml_text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as exc:
        raise FrontmatterError(f"failed to parse frontmatter: {exc}") from exc


def parse(data: bytes | str) -> dict[str, Any]:
    """The frontmatter as a dict (any valid TOML)."""
    return _load(split(data)[0])


def read_email(data: bytes | str) -> tuple[dict[str, Any], str]:
    """(frontmatter dict, body) with the blank separator line removed from the body."""
    toml_text, rest = split(data)
    if rest.startswith("\r\n"):
        rest = rest[2:]
    elif rest.startswith("\n"):
        rest = rest[1:]
    return _load(toml_text), rest


_READ_LIMIT = 1024 * 1024  # a frontmatter larger than this is not an aimx file


def read_header_fields(
    path_or_bytes: str | os.PathLike[str] | bytes, max_bytes: int = 16384
) -> dict[str, Any]:
    """The frontmatter of a file without reading its body.

    Reads ``max_bytes`` first and more only while the closing ``+++`` line has not been
    seen (many attachments), up to 1 MiB. Raises ``FrontmatterError`` (and ``OSError`` for
    files that cannot be read).
    """
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        head = bytes(path_or_bytes[:_READ_LIMIT])
        found = _delimiters(head)
    else:
        chunks: list[bytes] = []
        size = 0
        found = None
        with open(path_or_bytes, "rb") as handle:
            while size < _READ_LIMIT:
                chunk = handle.read(max_bytes if not chunks else max(max_bytes, size))
                at_eof = not chunk
                chunks.append(chunk)
                size += len(chunk)
                head = b"".join(chunks)
                found = _delimiters(head, complete_lines_only=not at_eof)
                if found is not None or at_eof:
                    break
    if found is None:
        raise FrontmatterError("malformed frontmatter")
    toml_start, toml_end, _rest = found
    return _load(head[toml_start:toml_end].decode("utf-8", "replace"))


# --------------------------------------------------------------------------- read state


def set_read_state(data: bytes, read: bool, now_text: str) -> bytes:
    """Set ``read``; MARK-READ writes ``read_at`` right after it, MARK-UNREAD removes it.

    The edit is made on the frontmatter's text, line by line (decision D6): only the
    ``read`` and ``read_at`` lines change, so every other byte of the file (other keys,
    unknown ones included, comments, the body) is kept as it was. The result is checked
    against the intended change of the parsed data before it is returned.
    """
    found = _delimiters(data)
    if found is None:
        raise FrontmatterError("malformed frontmatter")
    toml_start, toml_end, _rest = found
    try:
        toml_text = data[toml_start:toml_end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrontmatterError(f"failed to parse frontmatter: {exc}") from exc
    expected = _load(toml_text)
    expected["read"] = read
    if read:
        expected["read_at"] = now_text
    else:
        expected.pop("read_at", None)
    edited = _edit_read_lines(toml_text, read, now_text)
    if _load(edited) != expected:
        raise FrontmatterError("failed to parse frontmatter: cannot edit the read state "
                               "without changing other keys")
    return data[:toml_start] + edited.encode("utf-8") + data[toml_end:]


def _edit_read_lines(text: str, read: bool, now_text: str) -> str:
    """Rewrite the top-level ``read`` / ``read_at`` statements of ``text``.

    A statement's span includes the continuation lines of a multi-line value. ``read_at``
    goes on the line right after ``read``; a file without ``read`` gets both at the end
    of its top-level keys, before the first table.
    """
    newline = "\r\n" if "\r\n" in text else "\n"
    spans: dict[str, tuple[int, int]] = {}
    top_level_end = len(text)
    last_statement_end = 0
    current: str | None = None
    for line in toml_lines(text):
        if line.kind == "header":
            top_level_end = line.start
            break
        if line.kind == "cont":
            if current is not None:
                spans[current] = (spans[current][0], line.end)
            last_statement_end = line.end
            continue
        current = None
        if line.kind == "key":
            last_statement_end = line.end
            if line.path in (("read",), ("read_at",)):
                current = line.path[0]
                spans[current] = (line.start, line.end)

    read_line = f"read = {_toml_value(read)}{newline}"
    read_at_line = f"read_at = {toml_string(now_text)}{newline}" if read else ""
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), applied back to front
    if "read_at" in spans:
        edits.append((*spans["read_at"], ""))
    if "read" in spans:
        start, end = spans["read"]
        edits.append((start, end, read_line + read_at_line))
    else:
        at = last_statement_end if last_statement_end else top_level_end
        prefix = newline if at and not text[:at].endswith("\n") else ""
        edits.append((at, at, prefix + read_line + read_at_line))
    for start, end, replacement in sorted(edits, key=lambda edit: edit[0], reverse=True):
        text = text[:start] + replacement + text[end:]
    return text
