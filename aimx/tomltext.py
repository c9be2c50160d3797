"""Where each statement of a TOML text sits, line by line, without parsing values.

Used to edit TOML files as text (``config.toml`` tables, the read state in an email's
frontmatter): a document model would re-attach comments to the wrong table or need
private APIs to place a key, while a line map lets an edit touch only the lines it means
to and leave every other byte alone. Pure functions, no I/O.
"""

from __future__ import annotations

import tomllib
from typing import Any

import attrs


@attrs.frozen
class TomlLine:
    """One physical line of a TOML document and what it is at statement level.

    ``kind`` is ``blank``, ``comment``, ``header`` (``[t]`` or ``[[t]]``),
    ``key`` (a ``key = value`` statement) or ``cont`` (inside a multi-line
    string or array). ``path`` is the header's or key's dotted path when it
    could be read. ``start``/``end`` are offsets; ``end`` includes the newline.
    """

    start: int
    end: int
    kind: str
    path: tuple[str, ...] | None = None
    is_array: bool = False


def _key_path(text: str) -> tuple[str, ...] | None:
    """Read a (possibly dotted, possibly quoted) TOML key exactly as TOML does."""
    try:
        node: Any = tomllib.loads(f"{text} = 0")
    except tomllib.TOMLDecodeError:
        return None
    path: list[str] = []
    while isinstance(node, dict) and len(node) == 1:
        key, node = next(iter(node.items()))
        path.append(key)
    return tuple(path) if node == 0 and path else None


def _skip_string(text: str, pos: int, end: int, quote: str) -> int:
    """Index just past a one-line string opening at ``pos`` (or ``end`` if unterminated)."""
    pos += 1
    while pos < end and text[pos] not in (quote, "\n"):
        pos += 2 if quote == '"' and text[pos] == "\\" else 1
    return min(pos + 1, end)


def _scan_value(text: str, pos: int, end: int, state: list[Any]) -> None:
    """Advance the multi-line state (``[open_delimiter, bracket_depth]``) over one line."""
    while pos < end:
        delimiter = state[0]
        if delimiter is not None:
            if delimiter == '"""' and text[pos] == "\\":
                pos += 2
                continue
            if text.startswith(delimiter, pos):
                pos += 3
                extra = 0  # up to two quotes may sit right before the closing delimiter
                while extra < 2 and pos < end and text[pos] == delimiter[0]:
                    pos += 1
                    extra += 1
                state[0] = None
                continue
            pos += 1
            continue
        char = text[pos]
        if char == "#":
            return
        if char in "\"'":
            if text.startswith(char * 3, pos):
                state[0] = char * 3
                pos += 3
            else:
                pos = _skip_string(text, pos, end, char)
            continue
        if char in "[{":
            state[1] += 1
        elif char in "]}":
            state[1] = max(0, state[1] - 1)
        pos += 1


def _header_inner(text: str, start: int, end: int) -> str | None:
    """The key text between the brackets of a header line starting at ``start``."""
    pos = start
    while pos < end and text[pos] not in "]\n":
        pos = _skip_string(text, pos, end, text[pos]) if text[pos] in "\"'" else pos + 1
    return text[start:pos] if pos < end and text[pos] == "]" else None


def _key_text_end(text: str, start: int, end: int) -> int:
    pos = start
    while pos < end and text[pos] not in "=\n":
        pos = _skip_string(text, pos, end, text[pos]) if text[pos] in "\"'" else pos + 1
    return pos


def toml_lines(text: str) -> list[TomlLine]:
    """Classify every line of ``text`` without parsing values.

    Tolerant of invalid TOML (it never raises), so the legacy-schema scan can
    run before the syntax check, and exact enough on valid TOML for configedit
    to cut and insert whole tables without touching their neighbours.
    """
    lines: list[TomlLine] = []
    state: list[Any] = [None, 0]
    pos = 0
    while pos < len(text):
        newline = text.find("\n", pos)
        end = len(text) if newline < 0 else newline + 1
        if state[0] is not None or state[1] > 0:
            lines.append(TomlLine(pos, end, "cont"))
            _scan_value(text, pos, end, state)
            pos = end
            continue
        body = pos
        while body < end and text[body] in " \t":
            body += 1
        first = text[body] if body < end else "\n"
        if first in "\r\n":
            lines.append(TomlLine(pos, end, "blank"))
        elif first == "#":
            lines.append(TomlLine(pos, end, "comment"))
        elif first == "[":
            is_array = text.startswith("[[", body)
            inner = _header_inner(text, body + (2 if is_array else 1), end)
            path = _key_path(inner) if inner is not None else None
            lines.append(TomlLine(pos, end, "header", path, is_array))
        else:
            key_end = _key_text_end(text, body, end)
            lines.append(TomlLine(pos, end, "key", _key_path(text[body:key_end])))
            _scan_value(text, key_end, end, state)
        pos = end
    return lines


def line_of(text: str, path: tuple[str | int, ...]) -> int | None:
    """The 1-based line where ``path`` (or the first thing inside it) is defined.

    For error messages that point at a table or key. A trailing integer picks
    one table of an array of tables (``("mailboxes", "a", "hooks", 1)`` is the
    second ``[[mailboxes.a.hooks]]``); when the array is written inline the
    line of the array itself is given. ``None`` when nothing matches.
    """
    if path and isinstance(path[-1], int):
        prefix, index = path[:-1], path[-1]
        seen = 0
        for number, line in enumerate(toml_lines(text), 1):
            if line.kind == "header" and line.is_array and line.path == prefix:
                if seen == index:
                    return number
                seen += 1
        return line_of(text, prefix)
    table: tuple[str, ...] = ()
    for number, line in enumerate(toml_lines(text), 1):
        if line.path is None or line.kind not in ("header", "key"):
            continue
        if line.kind == "header":
            table = line.path
            defined = table
        else:
            defined = table + line.path
        if defined[:len(path)] == path:
            return number
    return None
