"""Hostile SMTP clients: scripted abuse of a listening server, with counts and verdicts.

Each scenario opens real TCP connections, does something a broken or
malicious client does (huge lines, NUL bytes, bare CR/LF, SMTP smuggling,
pipelining floods, slow-loris trickles, connection floods, commands after
QUIT, binary noise) and checks what the server answers. A scenario never
raises for a misbehaving server: it returns an ``AbuseReport`` whose
``problems`` list says what went wrong, so the same code serves the test
suite and a manual run against a deployed server::

    python -m tests.support.smtpabuse 127.0.0.1 25 example.com alice

Every scenario is bounded in connections, bytes and time. After each one,
``probe`` checks the server still completes a normal transaction.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import attrs

from tests.support.daemon import SmtpWire

LONG_LINE = 10_000
BANNER_TIMEOUT = 15.0


@attrs.define
class AbuseReport:
    """What one scenario did and what went wrong (an empty ``problems`` is a pass)."""

    name: str
    connections: int = 0
    commands: int = 0
    bytes_sent: int = 0
    replies: Counter[str] = attrs.Factory(Counter)
    problems: list[str] = attrs.Factory(list)
    marker: str = ""  # a token put in every message that should be stored, if any
    stored_expected: int = 0

    def expect(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)

    def summary(self) -> str:
        codes = " ".join(f"{code}x{n}" for code, n in sorted(self.replies.items()))
        return (f"{self.name}: connections={self.connections} commands={self.commands} "
                f"bytes={self.bytes_sent} replies[{codes}] problems={len(self.problems)}")


class Wire(SmtpWire):
    """A raw SMTP connection that counts what it sends and receives into a report."""

    def __init__(self, report: AbuseReport, host: str, port: int, *,
                 source: str | None = None, timeout: float = 20.0,
                 read_banner: bool = True) -> None:
        self.report = report
        report.connections += 1
        super().__init__(port, host, source=source, timeout=timeout, read_banner=read_banner)

    def send(self, data: bytes, commands: int = 0) -> None:
        super().send(data)
        self.report.bytes_sent += len(data)
        self.report.commands += commands

    def cmd(self, line: str | bytes) -> str:
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n", commands=1)
        return self.reply()

    def reply(self, timeout: float | None = None) -> str:
        """The next complete reply (continuation lines joined by LF), counted by code."""
        text = super().reply(timeout)
        self.report.replies[text[:3]] += 1
        return text


@attrs.frozen
class Target:
    """Where to abuse, and one deliverable recipient for whole transactions."""

    host: str
    port: int
    domain: str
    mailbox: str

    @property
    def rcpt(self) -> str:
        return f"{self.mailbox}@{self.domain}"

    def wire(self, report: AbuseReport, **kwargs: object) -> Wire:
        return Wire(report, self.host, self.port, **kwargs)  # type: ignore[arg-type]


def message(target: Target, marker: str, body: str = "hello\r\n") -> bytes:
    """A small, valid message (CRLF, dot-stuffing left to the caller) carrying ``marker``."""
    return (f"From: abuse@example.org\r\nTo: {target.rcpt}\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}.{uuid.uuid4().hex}@example.org>\r\n"
            f"Date: Mon, 02 Jun 2025 12:00:00 +0000\r\n\r\n{body}").encode()


def _transaction(wire: Wire, target: Target, data: bytes) -> str:
    """MAIL, RCPT, DATA and ``data`` then the terminator; the final reply (or the failure)."""
    for line, want in (("MAIL FROM:<abuse@example.org>", "250"),
                       (f"RCPT TO:<{target.rcpt}>", "250"), ("DATA", "354")):
        answer = wire.cmd(line)
        if not answer.startswith(want):
            return answer
    wire.send(data + b"\r\n.\r\n", commands=1)
    return wire.reply()


def _ehlo(wire: Wire, report: AbuseReport) -> None:
    report.expect(wire.banner.startswith("220 "), f"banner was {wire.banner!r}")
    answer = wire.cmd("EHLO abuse.example.org")
    report.expect(answer.startswith("250"), f"EHLO answered {answer!r}")


def _in_sync(wire: Wire, report: AbuseReport, after: str) -> None:
    """The session still answers a plain NOOP with exactly one 250 after ``after``."""
    try:
        answer = wire.cmd("NOOP")
    except OSError as exc:
        report.problems.append(f"after {after}: connection lost ({exc})")
        return
    report.expect(answer == "250 2.0.0 OK", f"after {after}: NOOP answered {answer!r}")


# -- scenarios -------------------------------------------------------------------------


def long_lines(target: Target, rounds: int = 10) -> AbuseReport:
    """10,000-character command lines and a 10,000-character DATA line.

    A command line over 512 octets is answered with one 5xx and the session
    stays in step; a DATA line over 998 octets refuses that message only,
    after its terminator, and the next message on the connection is stored.
    """
    report = AbuseReport("long lines", marker=f"longline-{uuid.uuid4().hex[:8]}")
    with target.wire(report) as wire:
        _ehlo(wire, report)
        for n in range(rounds):
            payload = "X" * LONG_LINE if n % 2 else "MAIL FROM:<" + "a" * LONG_LINE + "@x.org>"
            answer = wire.cmd(payload)
            report.expect(answer.startswith("500"), f"long command answered {answer!r}")
            _in_sync(wire, report, "a long command line")
        big = message(target, "long-data-line", body="Y" * LONG_LINE + "\r\nend\r\n")
        answer = _transaction(wire, target, big)
        report.expect(answer[:1] == "5", f"10,000-octet DATA line answered {answer!r}")
        _in_sync(wire, report, "a long DATA line")
        answer = _transaction(wire, target, message(target, report.marker))
        report.expect(answer.startswith("250"), f"normal message after it answered {answer!r}")
        report.stored_expected += 1
        wire.cmd("QUIT")
    return report


def nul_bytes(target: Target) -> AbuseReport:
    """NUL inside commands and inside DATA: refused, never stored, session in step."""
    report = AbuseReport("NUL bytes")
    with target.wire(report) as wire:
        _ehlo(wire, report)
        for line in (b"NO\0OP", b"\0", b"MAIL FROM:<a\0b@example.org>", b"RSET\0\0\0"):
            answer = wire.cmd(line)
            report.expect(answer[:1] in "25", f"{line!r} answered {answer!r}")
            wire.cmd("RSET")
        answer = _transaction(wire, target, message(target, "nul-in-data", body="a\0b\r\n"))
        report.expect(answer.startswith("550"), f"NUL in DATA answered {answer!r}")
        _in_sync(wire, report, "NUL in DATA")
        wire.cmd("QUIT")
    return report


# Ways of hiding a second transaction inside one DATA (SMTP smuggling): none of
# these end the message, so the "smuggled" MAIL FROM must never be obeyed.
SMUGGLING_TERMINATORS = (b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
                         b"\r\n\x00.\r\n")


def bare_cr_lf(target: Target) -> AbuseReport:
    """Bare LF and CR in DATA, and every smuggling terminator variant.

    Each DATA gets exactly one reply after the real CRLF.CRLF; a bare LF or
    NUL is refused with 550; no smuggled transaction is ever answered or
    stored (its sender ``smuggled@evil.example`` must not appear on disk).
    A bare CR in a command line gets 501 and nothing of the line is obeyed.
    """
    report = AbuseReport("bare CR/LF and smuggling", marker=f"barecr-{uuid.uuid4().hex[:8]}")
    with target.wire(report) as wire:
        _ehlo(wire, report)
        answer = _transaction(wire, target, message(target, "bare-lf", body="one\ntwo\r\n"))
        report.expect(answer.startswith("550"), f"bare LF in DATA answered {answer!r}")
        answer = _transaction(wire, target, message(target, report.marker,
                                                    body="one\rtwo\r\n"))
        report.expect(answer[:1] in "25", f"bare CR in DATA answered {answer!r}")
        if answer.startswith("250"):
            report.stored_expected += 1
        for terminator in SMUGGLING_TERMINATORS:
            smuggled = (b"MAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<"
                        + target.rcpt.encode() + b">\r\nDATA\r\nFrom: smuggled@evil.example"
                        b"\r\nSubject: smuggled\r\n\r\nowned")
            data = message(target, "smuggle-carrier") + b"before" + terminator + smuggled
            answer = _transaction(wire, target, data)
            report.expect(answer[:1] in "25",
                          f"smuggling via {terminator!r} answered {answer!r}")
            extra = wire.drain(timeout=0.5)
            report.expect(extra == b"",
                          f"smuggling via {terminator!r}: extra replies {extra[:120]!r}")
            _in_sync(wire, report, f"smuggling via {terminator!r}")
        for line, code in ((b"NOOP\r\r\n", "501"), (b"\rNOOP\r\n", "501"),
                           (b"RSET\rDATA\r\n", "501"), (b"RSET\n", "250")):
            wire.send(line, commands=1)
            answer = wire.reply()
            report.expect(answer[:3] == code, f"{line!r} answered {answer!r}")
        _in_sync(wire, report, "bare CR in commands")
        wire.cmd("QUIT")
    return report


def pipelining_flood(target: Target, noops: int = 5000, transactions: int = 30) -> AbuseReport:
    """One write of thousands of commands, then whole transactions pipelined blindly.

    Every command gets exactly one reply, in order; every pipelined message
    (sent without waiting for 354) is stored.
    """
    report = AbuseReport("pipelining flood", marker=f"flood-{uuid.uuid4().hex[:8]}")
    with target.wire(report, timeout=60.0) as wire:
        _ehlo(wire, report)
        wire.send(b"NOOP\r\nRSET\r\n" * (noops // 2), commands=noops)
        answers = [wire.reply() for _ in range(noops)]
        report.expect(all(a == "250 2.0.0 OK" for a in answers),
                      f"flood replies: {Counter(answers).most_common(3)}")
        batch = b""
        for n in range(transactions):
            batch += (b"MAIL FROM:<abuse@example.org>\r\nRCPT TO:<" + target.rcpt.encode()
                      + b">\r\nDATA\r\n" + message(target, f"{report.marker} n{n}")
                      + b"\r\n.\r\n")
        wire.send(batch, commands=4 * transactions)
        expected = ["250", "250", "354", "250"] * transactions
        got = [wire.reply()[:3] for _ in expected]
        report.expect(got == expected, f"pipelined transactions answered {Counter(got)}")
        report.stored_expected += got.count("250") - 2 * transactions
        _in_sync(wire, report, "the flood")
        wire.cmd("QUIT")
    return report


def slow_loris(target: Target, sessions: int = 12, seconds: float = 4.0,
               source: str = "127.0.0.1") -> AbuseReport:
    """Sessions that trickle one byte at a time while a normal client is served.

    Trickling sessions hold only their own slots: a normal client on another
    connection gets its banner and its 250 within a few seconds throughout.
    """
    report = AbuseReport("slow-loris", marker=f"loris-{uuid.uuid4().hex[:8]}")
    stop = threading.Event()
    opened: list[Wire] = []
    lock = threading.Lock()

    def trickle() -> None:
        try:
            wire = Wire(report, target.host, target.port, source=source, timeout=30)
        except OSError as exc:
            with lock:
                report.problems.append(f"slow-loris connect failed: {exc}")
            return
        with lock:
            opened.append(wire)
        payload = b"EHLO slow.example.org\r\nMAIL FROM:<slow@example.org>\r\n" * 50
        for byte in payload:
            if stop.wait(0.2):
                break
            try:
                wire.sock.sendall(bytes([byte]))
            except OSError:
                break
            with lock:
                report.bytes_sent += 1

    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(sessions)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    served = 0
    while time.monotonic() - started < seconds:
        t0 = time.monotonic()
        try:
            with target.wire(report, source=source, timeout=10) as wire:
                _ehlo(wire, report)
                answer = _transaction(wire, target, message(target, report.marker))
                report.expect(answer.startswith("250"), f"normal client got {answer!r}")
                served += answer.startswith("250")
                wire.cmd("QUIT")
        except OSError as exc:
            report.problems.append(f"normal client failed during slow-loris: {exc}")
        report.expect(time.monotonic() - t0 < 5, "a normal transaction took over 5 s")
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(10)
    for wire in opened:
        wire.close()
    report.stored_expected = served
    report.expect(served >= 2, f"only {served} normal transactions during slow-loris")
    return report


def connection_flood(target: Target, count: int = 200, source: str = "127.0.0.1",
                     per_ip: int = 20) -> AbuseReport:
    """``count`` parallel connections from one address.

    Exactly ``per_ip`` get a banner (when nothing else from that address is
    connected); every other one gets ``421`` and is closed; once they are
    gone a new connection is served at once.
    """
    report = AbuseReport("connection flood")
    socks: list[socket.socket] = []
    banners: list[str] = []
    lock = threading.Lock()

    def connect() -> None:
        try:
            sock = socket.create_connection((target.host, target.port), timeout=20,
                                            source_address=(source, 0))
        except OSError as exc:
            with lock:
                report.problems.append(f"connect failed: {exc}")
            return
        with lock:
            socks.append(sock)
            report.connections += 1

    threads = [threading.Thread(target=connect) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for sock in socks:
        sock.settimeout(BANNER_TIMEOUT)
        try:
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(512)
                if not chunk:
                    break
                data += chunk
            banners.append(data.decode("utf-8", "replace").strip()[:3] or "EOF")
        except OSError as exc:
            banners.append(f"error:{exc.__class__.__name__}")
    codes = Counter(banners)
    report.replies.update(codes)
    report.expect(codes["220"] == per_ip, f"{codes['220']} banners for {count} connections "
                                          f"from one address (cap {per_ip}): {dict(codes)}")
    report.expect(codes["421"] == count - per_ip, f"refusals: {dict(codes)}")
    for sock in socks:
        sock.close()
    time.sleep(0.5)
    try:
        with target.wire(report, source=source, timeout=10) as wire:
            report.expect(wire.banner.startswith("220"), f"after the flood: {wire.banner!r}")
            wire.cmd("QUIT")
    except OSError as exc:
        report.problems.append(f"no connection after the flood: {exc}")
    return report


def after_quit(target: Target) -> AbuseReport:
    """Commands pipelined behind QUIT are never answered or obeyed."""
    report = AbuseReport("commands after QUIT", marker=f"afterquit-{uuid.uuid4().hex[:8]}")
    with target.wire(report) as wire:
        tail = (b"MAIL FROM:<late@example.org>\r\nRCPT TO:<" + target.rcpt.encode()
                + b">\r\nDATA\r\n" + message(target, report.marker) + b"\r\n.\r\nNOOP\r\n")
        wire.send(b"EHLO abuse.example.org\r\nQUIT\r\n" + tail, commands=7)
        report.expect(wire.reply().startswith("250"), "EHLO before QUIT not answered")
        answer = wire.reply()
        report.expect(answer.startswith("221"), f"QUIT answered {answer!r}")
        rest = wire.drain(timeout=3)
        report.expect(rest == b"", f"replies after QUIT: {rest[:200]!r}")
    with target.wire(report) as wire:
        _ehlo(wire, report)
        wire.cmd("QUIT")
        try:
            wire.send(b"NOOP\r\nMAIL FROM:<late@example.org>\r\n", commands=2)
        except OSError:
            pass  # already closed: as good as silence
        rest = wire.drain(timeout=2)
        report.expect(rest == b"", f"replies to commands sent after 221: {rest[:200]!r}")
    return report


def binary_noise(target: Target, size: int = 65_536, seed: int = 1) -> AbuseReport:
    """Random bytes instead of SMTP: a bounded number of 5xx, then 421 and close."""
    import random

    rng = random.Random(seed)
    report = AbuseReport("binary noise")
    with target.wire(report) as wire:
        noise = rng.randbytes(size)
        try:
            wire.send(noise)
        except OSError:
            pass  # the server hung up mid-write after too many errors: fine
        data = wire.drain(timeout=3)
        lines = [line for line in data.split(b"\r\n") if line]
        report.replies.update(line[:3].decode("ascii", "replace") for line in lines)
        report.expect(all(line[:1] in b"45" for line in lines),
                      f"noise got non-error replies: {lines[:3]}")
        report.expect(len(lines) <= 21, f"{len(lines)} replies to noise: no error cap?")
    return report


def probe(target: Target, marker: str) -> str:
    """A normal transaction on a fresh connection; its final reply ("" when it failed)."""
    report = AbuseReport("probe")
    try:
        with target.wire(report, timeout=20) as wire:
            wire.cmd("EHLO probe.example.org")
            answer = _transaction(wire, target, message(target, marker))
            wire.cmd("QUIT")
            return answer
    except OSError:
        return ""


SCENARIOS: dict[str, Callable[[Target], AbuseReport]] = {
    "long_lines": long_lines,
    "nul_bytes": nul_bytes,
    "bare_cr_lf": bare_cr_lf,
    "pipelining_flood": pipelining_flood,
    "slow_loris": slow_loris,
    "connection_flood": connection_flood,
    "after_quit": after_quit,
    "binary_noise": binary_noise,
}


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m tests.support.smtpabuse HOST PORT DOMAIN MAILBOX",
              file=sys.stderr)
        return 2
    target = Target(argv[0], int(argv[1]), argv[2], argv[3])
    failed = 0
    for run in SCENARIOS.values():
        report = run(target)
        print(report.summary())
        for problem in report.problems:
            print(f"  problem: {problem}")
        failed += bool(report.problems)
        answer = probe(target, "abuse-probe")
        print(f"  probe after it: {answer or 'FAILED'}")
        failed += not answer.startswith("250")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
