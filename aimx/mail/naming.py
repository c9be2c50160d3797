"""Names on disk: email ids from time and subject, safe attachment file names.

Pure functions (spec 20 §5): storage names what it writes with them, and the id
check guards every lookup by id.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from collections.abc import Iterable

SLUG_MAX_CHARS = 20
ATTACHMENT_NAME_MAX_BYTES = 200


# A run of characters that are not str.isalnum() (\W, and "_" which \w adds).
_NOT_ALNUM_RUN = re.compile(r"[\W_]+")


def slugify(subject: str | None) -> str:
    """The filename slug of a subject: lower-case, alphanumerics and single dashes, 20 chars."""
    text = unicodedata.normalize("NFC", subject or "").lower()
    text = _NOT_ALNUM_RUN.sub("-", text).strip("-")
    text = text[:SLUG_MAX_CHARS].rstrip("-")
    return text or "no-subject"


def stem_prefix(when: datetime.datetime) -> str:
    """``YYYY-MM-DD-HHMMSS`` in UTC; naive datetimes are taken as UTC."""
    if when.tzinfo is not None:
        when = when.astimezone(datetime.UTC)
    return when.strftime("%Y-%m-%d-%H%M%S")


def _is_unsafe_char(ch: str) -> bool:
    code = ord(ch)
    return (
        ch in "/\\"
        or code < 0x20
        or 0x7F <= code <= 0x9F
        or 0x200B <= code <= 0x200F
        or 0x202A <= code <= 0x202E
        or 0x2066 <= code <= 0x2069
        or code == 0xFEFF
        or 0xD800 <= code <= 0xDFFF  # lone surrogates from undecodable header bytes
    )


def _trim_name(text: str, *, start: bool = True) -> str:
    """Strip whitespace, dots, dashes and underscores from the end (and the start)."""
    if start:
        text = re.sub(r"^[\s._-]+", "", text)
    return re.sub(r"[\s._-]+$", "", text)


def sanitize_attachment_name(name: str | None, index: int) -> str:
    """A safe on-disk name for an attachment: no path parts, no controls or bidi tricks.

    Steps of spec 20 §5.3: last ``/`` component, NFC, unsafe characters to
    ``_`` (one per run), trim, cap at 200 UTF-8 bytes, ``attachment-<index>``
    when nothing is left.
    """
    text = (name or "").rsplit("/", 1)[-1]
    text = unicodedata.normalize("NFC", text)
    out: list[str] = []
    in_run = False
    for ch in text:
        if _is_unsafe_char(ch):
            if not in_run:
                out.append("_")
            in_run = True
        else:
            out.append(ch)
            in_run = False
    text = _trim_name("".join(out))
    encoded = text.encode("utf-8")
    if len(encoded) > ATTACHMENT_NAME_MAX_BYTES:
        text = encoded[:ATTACHMENT_NAME_MAX_BYTES].decode("utf-8", errors="ignore")
        text = _trim_name(text, start=False)
    return text or f"attachment-{index}"


def _with_counter(name: str, counter: int) -> str:
    base, dot, ext = name.rpartition(".")
    if dot and base:
        return f"{base}-{counter}.{ext}"
    return f"{name}-{counter}"


def unique_attachment_names(names: Iterable[str], reserved: Iterable[str] = ()) -> list[str]:
    """Make names unique within one bundle: ``notes.txt``, ``notes-1.txt``, ``notes-2.txt``.

    ``reserved`` names (the bundle's own ``<stem>.md``) are never handed out.
    """
    taken = set(reserved)
    result = []
    for name in names:
        candidate, counter = name, 0
        while candidate in taken:
            counter += 1
            candidate = _with_counter(name, counter)
        taken.add(candidate)
        result.append(candidate)
    return result


def check_email_id(email_id: str) -> bool:
    """Whether an id can name an email: not empty, no ``..``, ``/``, ``\\`` or NUL."""
    return bool(email_id) and not any(bad in email_id for bad in ("..", "/", "\\", "\0"))
