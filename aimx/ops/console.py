"""The operator's terminal for ``aimx setup`` and ``aimx portcheck``: prompts, lines, errors.

Everything those commands show or ask goes through a ``Console``, so tests
drive them with plain text streams. ``SetupError`` carries the message either
command ends with (``Error: <text>``, exit 1).
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

import attrs

from aimx import term


class SetupError(Exception):
    """Setup cannot go on; the text is shown as ``Error: <text>`` (exit 1)."""


def noninteractive() -> bool:
    return os.environ.get("AIMX_NONINTERACTIVE", "").strip().lower() in ("1", "true", "yes")


@attrs.define
class Console:
    """Where the wizard talks and listens. End of input counts as "take the default"."""

    stdin: TextIO = attrs.field(factory=lambda: sys.stdin)
    out: TextIO = attrs.field(factory=lambda: sys.stdout)
    err: TextIO = attrs.field(factory=lambda: sys.stderr)
    interactive: bool = attrs.field(factory=lambda: not noninteractive())

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        print(term.style(text, "yellow"), file=self.err, flush=True)

    def problem(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def ask(self, prompt: str) -> str | None:
        """Show ``prompt`` and read one line; ``None`` at end of input."""
        self.out.write(prompt)
        self.out.flush()
        line = self.stdin.readline()
        if not line:
            self.out.write("\n")
            return None
        return line.rstrip("\r\n")

    def confirm(self, question: str, default: bool = True) -> bool:
        suffix = "[Y/n]" if default else "[y/N]"
        answer = self.ask(f"{question} {suffix} ")
        if answer is None or not answer.strip():
            return default
        return answer.strip().lower() in ("y", "yes")
