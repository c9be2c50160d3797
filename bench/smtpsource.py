"""Postfix's ``smtp-source``: an independent load generator (C, from the Postfix package).

It sends one pre-formatted file as every message's header and body (``-F``),
so every message is the same: the file is DKIM-signed once (rsa-sha256,
relaxed/relaxed, as ``bench.loadgen`` signs) and carries no Message-ID, since
aimx stores a Message-ID once per mailbox and would count the rest as
duplicates. ``smtp-source`` writes the file's lines with CRLF, doubles leading
dots and ends the body with one empty line, which relaxed body
canonicalization ignores, so the signature still verifies. It speaks HELO, one
command at a time (no pipelining) and reports no latencies: what it gives is
wall time for a fixed number of messages over N sessions.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import attrs

from bench import loadgen

SMTP_SOURCE = "/usr/sbin/smtp-source"


def message_file(key_pem: bytes, size: int, rcpt: str, path: Path) -> Path:
    """The signed message, written with LF line ends for ``smtp-source -F``."""
    message = loadgen.signed_message(key_pem, 0, f"src{int(time.time())}", size, rcpt,
                                     message_id=False)
    path.write_bytes(message.replace(b"\r\n", b"\n"))
    return path


@attrs.frozen
class SourceResult:
    messages: int
    seconds: float
    returncode: int
    output: str

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def run(host: str, port: int, message: Path, *, messages: int, sessions: int,
        rcpt: str) -> SourceResult:
    """``messages`` copies of ``message`` over ``sessions`` sessions, each kept open."""
    command = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-d",
               "-F", str(message), "-f", loadgen.MAIL_FROM, "-t", rcpt,
               "-M", loadgen.HELO, f"{host}:{port}"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    seconds = time.monotonic() - started
    return SourceResult(messages, seconds, done.returncode, (done.stdout + done.stderr).strip())
