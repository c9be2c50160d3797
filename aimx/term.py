"""Terminal output rules shared by every command: colour decision and marks.

One decision, taken from stdout, governs both streams (spec: CLICOLOR_FORCE
beats NO_COLOR beats CLICOLOR=0 beats "is stdout a TTY"). With colour off no
escape byte is ever written and marks fall back to ASCII.
"""

from __future__ import annotations

import os
import sys
import unicodedata

_RESET = "\x1b[0m"
_STYLES = {
    "green": "\x1b[32m",
    "red": "\x1b[1;31m",
    "yellow": "\x1b[33m",
    "bold": "\x1b[1m",
    "dim": "\x1b[2m",
    "copper": "\x1b[38;2;185;83;28m",
}

_MARKS = {
    # name: (colour on, colour off, style)
    "ok": ("✓", "[OK]", "green"),
    "fail": ("✗", "[FAIL]", "red"),
    "warn": ("⚠", "[WARN]", "yellow"),
    "prompt": ("→", "[>]", "copper"),
}


def color_enabled() -> bool:
    force = os.environ.get("CLICOLOR_FORCE")
    if force is not None and force != "0":
        return True
    if "NO_COLOR" in os.environ:
        return False
    if os.environ.get("CLICOLOR") == "0":
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def style(text: str, name: str) -> str:
    if not color_enabled():
        return text
    return f"{_STYLES[name]}{text}{_RESET}"


def mark(name: str) -> str:
    glyph, ascii_mark, colour = _MARKS[name]
    if not color_enabled():
        return ascii_mark
    return style(glyph, colour)


def visible_width(text: str) -> int:
    """Columns a string takes on screen, ignoring escape sequences."""
    width = 0
    in_escape = False
    for ch in text:
        if in_escape:
            if ch.isalpha():
                in_escape = False
            continue
        if ch == "\x1b":
            in_escape = True
            continue
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in "WF" else 1
    return width


def pad(text: str, width: int) -> str:
    """Left-align ``text`` in ``width`` visible columns."""
    return text + " " * max(0, width - visible_width(text))


def error(message: str) -> None:
    """Print ``Error: <message>`` on stderr (bold red when coloured)."""
    print(style(f"Error: {message}", "red"), file=sys.stderr)


def warn(message: str) -> None:
    print(style(message, "yellow"), file=sys.stderr)


def hint(message: str, stream=None) -> None:
    print(style(message, "dim"), file=stream or sys.stderr)
