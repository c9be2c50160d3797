"""Hostile clients of the daemon's Unix socket: random AMP boxes, oversize values,
half-written boxes, garbage and connection storms.

Like ``tests.support.smtpabuse``, each scenario returns an ``AbuseReport``
(from that module) instead of raising, so it also runs by hand against a
live daemon::

    python -m tests.support.ampabuse /run/aimx/aimx.sock

The promise checked everywhere: every request that carries an ``_ask``
gets exactly one answer or one error whose code is one of the API's codes
(never AMP's own ``UNKNOWN``/``UNHANDLED``), a broken connection only ever
hurts itself, and afterwards a plain ``VERSION`` is answered at once.
"""

from __future__ import annotations

import random
import socket
import struct
import sys
import threading
import time

from aimx.daemon.client import MalformedReply, read_box
from aimx.daemon.protocol import ERROR_CODES, MAX_BOX_BYTES
from tests.support.smtpabuse import AbuseReport

VERBS = (b"SEND", b"MARK-READ", b"MARK-UNREAD", b"MAILBOX-CREATE", b"MAILBOX-DELETE",
         b"MAILBOX-LIST", b"HOOK-CREATE", b"HOOK-DELETE", b"HOOK-LIST", b"VERSION")
BOGUS_VERBS = (b"", b"send", b"SEND ", b"RM -RF", b"\x00", b"\xff\xfe", b"A" * 255,
               b"_command", b"MAILBOX-*", b"UNKNOWN")
KEYS = (b"mailbox", b"id", b"name", b"owner", b"force", b"body", b"body.2", b"body.3",
        b"text_only", b"html_body", b"event", b"cmd", b"fire_on_untrusted", b"type",
        b"timeout_secs", b"_answer", b"_error", b"extra", b"\x00", b"k" * 255)
# No value names a real mailbox: a lucky MAILBOX-DELETE force=True must not wipe one.
VALUES = (b"", b"\x00", b"mallory", b"catchall", b"../../etc/passwd", b"/etc/shadow",
          b"True", b"False", b"1", b"-1", b"99999999999999999999999", b"\xff\xfe\xfd",
          b"a" * 300, b"on_receive", b"after_send", b"\x00\x06/bin/sh", b"{}", b"[",
          b"From: x@test.local\r\nTo: y@test.local\r\n\r\nhi", b"2025-01-01-000000-x",
          b"\r\n.\r\n", "\u202e\u00e9".encode())


def _pair(key: bytes, value: bytes) -> bytes:
    return struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value


def box_bytes(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A box on the wire, keys and values exactly as given (no validation)."""
    return b"".join(_pair(k, v) for k, v in pairs) + b"\x00\x00"


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    """Connect like the CLI does: a blocking connect (which waits while the daemon's
    accept queue is full), then ``timeout`` for every later operation."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    sock.settimeout(timeout)
    return sock


def version_answered(path: str, timeout: float = 5.0) -> bool:
    """A fresh connection gets a proper VERSION answer within ``timeout``."""
    try:
        with connect(path, timeout) as sock:
            sock.sendall(box_bytes([(b"_command", b"VERSION"), (b"_ask", b"v1")]))
            reply = read_box(sock)
    except (OSError, MalformedReply):
        return False
    return reply.get(b"_answer") == b"v1" and b"tag" in reply


def _check_reply(report: AbuseReport, reply: dict[bytes, bytes], tag: bytes,
                 what: str) -> None:
    if b"_answer" in reply:
        report.replies["answer"] += 1
        report.expect(reply[b"_answer"] == tag, f"{what}: answer for the wrong tag")
        return
    code = reply.get(b"_error_code", b"").decode("utf-8", "replace")
    report.replies[code or "?"] += 1
    report.expect(reply.get(b"_error") == tag, f"{what}: error for the wrong tag")
    report.expect(code in ERROR_CODES, f"{what}: error code {code!r} is not an API code "
                                       f"({reply.get(b'_error_description', b'')[:100]!r})")


def random_boxes(path: str, count: int = 400, seed: int = 7) -> AbuseReport:
    """Random verbs, keys and values on a few connections; every ask gets one API answer."""
    rng = random.Random(seed)
    report = AbuseReport("random AMP boxes")
    sock = connect(path)
    report.connections += 1
    try:
        for n in range(count):
            verb = rng.choice(VERBS) if rng.random() < 0.7 else rng.choice(BOGUS_VERBS)
            pairs = [(b"_command", verb)]
            for _ in range(rng.randrange(0, 6)):
                key = rng.choice(KEYS)
                if key in (b"_answer", b"_error") and rng.random() < 0.8:
                    continue
                pairs.append((key, rng.choice(VALUES)))
            tag = b"t%d" % n
            pairs.append((b"_ask", tag))
            rng.shuffle(pairs)
            data = box_bytes(pairs)
            what = f"box {n} {pairs!r}"[:300]
            try:
                sock.sendall(data)
                report.bytes_sent += len(data)
                report.commands += 1
                reply = read_box(sock)
            except (OSError, MalformedReply) as exc:
                # Keys repeated in one box or protocol-level keys may fairly end the
                # connection; what matters is that the daemon goes on serving.
                report.replies["dropped"] += 1
                sock.close()
                sock = connect(path)
                report.connections += 1
                report.expect(version_answered(path), f"after {what}: no VERSION ({exc})")
                continue
            _check_reply(report, reply, tag, what)
    finally:
        sock.close()
    report.expect(report.replies["dropped"] <= count // 4,
                  f"{report.replies['dropped']} of {count} random boxes dropped the connection")
    return report


def oversize(path: str) -> AbuseReport:
    """A box past the 52 MiB cap, a 300-byte key, a body over 25 MiB, a 64 KiB verb."""
    report = AbuseReport("oversize values")
    # 1. Far more than MAX_BOX_BYTES of values: the connection is dropped.
    value = b"v" * 0xFFFF
    keys = MAX_BOX_BYTES // len(value) + 16
    with connect(path, timeout=30) as sock:
        report.connections += 1
        sock.sendall(_pair(b"_command", b"SEND") + _pair(b"_ask", b"big"))
        dropped = False
        try:
            for n in range(keys):
                sock.sendall(_pair(b"body" if n == 0 else b"body.%d" % (n + 1), value))
                report.bytes_sent += len(value)
        except OSError:
            dropped = True
        if not dropped:
            try:
                sock.sendall(b"\x00\x00")
                reply = sock.recv(65536)
                dropped = reply == b""
            except OSError:
                dropped = True
        report.expect(dropped, "a box over the size cap was not dropped")
    report.expect(version_answered(path), "no VERSION after the oversize box")
    # 2. A key longer than AMP allows (255): a framing error for that connection only.
    with connect(path) as sock:
        report.connections += 1
        sock.sendall(struct.pack("!H", 300) + b"k" * 300 + _pair(b"x", b"y") + b"\x00\x00")
        try:
            sock.settimeout(5)
            data = sock.recv(65536)
            report.replies["long-key-dropped" if data == b"" else "long-key-answered"] += 1
        except OSError:
            report.replies["long-key-dropped"] += 1
    report.expect(version_answered(path), "no VERSION after a 300-byte key")
    # 3. A chunked body one byte over the 25 MiB cap: MALFORMED with the cap in the text.
    body = b"b" * (26_214_400 + 1)
    pieces = [body[i:i + 0xFFFF] for i in range(0, len(body), 0xFFFF)]
    pairs = [(b"_command", b"SEND"), (b"_ask", b"cap")]
    pairs += [(b"body" if i == 0 else b"body.%d" % (i + 1), p) for i, p in enumerate(pieces)]
    with connect(path, timeout=60) as sock:
        report.connections += 1
        sock.sendall(box_bytes(pairs))
        report.bytes_sent += len(body)
        reply = read_box(sock)
        _check_reply(report, reply, b"cap", "25 MiB + 1 body")
        report.expect(reply.get(b"_error_code") == b"MALFORMED"
                      and b"exceeds cap 26214400" in reply.get(b"_error_description", b""),
                      f"over-cap body answered {reply.get(b'_error_description', b'')[:120]!r}")
        sock.sendall(box_bytes([(b"_command", b"VERSION"), (b"_ask", b"after")]))
        report.expect(read_box(sock).get(b"_answer") == b"after",
                      "the connection is unusable after an over-cap body")
    # 4. A verb of 65,535 bytes.
    with connect(path) as sock:
        report.connections += 1
        sock.sendall(box_bytes([(b"_command", b"V" * 0xFFFF), (b"_ask", b"v")]))
        _check_reply(report, read_box(sock), b"v", "64 KiB verb")
    report.expect(version_answered(path), "no VERSION after oversize values")
    return report


def half_written(path: str, count: int = 50, stall_seconds: float = 0.0) -> AbuseReport:
    """Boxes cut off mid-key, mid-length and mid-value: closed at once, or left stalled.

    With ``stall_seconds`` the connections stay open that long (the daemon
    should drop them at its request timeout); meanwhile VERSION works.
    """
    rng = random.Random(count)
    report = AbuseReport("half-written boxes")
    whole = box_bytes([(b"_command", b"MARK-READ"), (b"mailbox", b"alice"),
                       (b"id", b"x" * 200), (b"_ask", b"h")])
    held: list[socket.socket] = []
    for _ in range(count):
        cut = rng.randrange(1, len(whole) - 1)
        sock = connect(path)
        report.connections += 1
        sock.sendall(whole[:cut])
        report.bytes_sent += cut
        if stall_seconds:
            held.append(sock)
        else:
            sock.close()
    report.expect(version_answered(path), "no VERSION while boxes are half-written")
    if held:
        deadline = time.monotonic() + stall_seconds
        while time.monotonic() < deadline and held:
            for sock in list(held):
                sock.settimeout(0.05)
                try:
                    if sock.recv(1) == b"":
                        held.remove(sock)
                        sock.close()
                        report.replies["dropped"] += 1
                except TimeoutError:
                    pass
                except OSError:
                    held.remove(sock)
                    sock.close()
                    report.replies["dropped"] += 1
        report.expect(not held, f"{len(held)} stalled connections still open after "
                                f"{stall_seconds:.0f}s")
        for sock in held:
            sock.close()
    return report


def connection_storm(path: str, sequential: int = 2000, concurrent: int = 300) -> AbuseReport:
    """Thousands of connect/close cycles, then hundreds held open at once."""
    report = AbuseReport("connection storm")
    for n in range(sequential):
        try:
            with connect(path, timeout=5) as sock:
                report.connections += 1
                if n % 4 == 0:
                    sock.sendall(b"\x00")
        except OSError as exc:
            report.problems.append(f"connect {n} failed: {exc}")
            break
    held = []
    errors = 0
    for _ in range(concurrent):
        try:
            held.append(connect(path, timeout=5))
            report.connections += 1
        except OSError:
            errors += 1
    report.expect(errors == 0, f"{errors} of {concurrent} concurrent connects failed")
    report.expect(version_answered(path), f"no VERSION with {len(held)} idle connections open")
    threads = [threading.Thread(target=version_answered, args=(path,)) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for sock in held:
        sock.close()
    report.expect(version_answered(path), "no VERSION after the storm")
    return report


def garbage(path: str, size: int = 1 << 20, seed: int = 3) -> AbuseReport:
    """A megabyte of random bytes: that connection dies, nothing else does."""
    rng = random.Random(seed)
    report = AbuseReport("socket garbage")
    with connect(path) as sock:
        report.connections += 1
        try:
            sock.sendall(rng.randbytes(size))
            report.bytes_sent += size
        except OSError:
            report.replies["dropped"] += 1
    report.expect(version_answered(path), "no VERSION after garbage")
    return report


SCENARIOS = {
    "random_boxes": random_boxes,
    "oversize": oversize,
    "half_written": half_written,
    "connection_storm": connection_storm,
    "garbage": garbage,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.support.ampabuse SOCKET_PATH", file=sys.stderr)
        return 2
    failed = 0
    for run in SCENARIOS.values():
        report = run(argv[0])
        print(report.summary())
        for problem in report.problems:
            print(f"  problem: {problem}")
        failed += bool(report.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
