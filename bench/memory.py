"""Memory: idle RSS, and peak RSS while ingesting one 25 MB message and 20 at once.

RSS is summed over every aimx process (the service and any process it started),
so the numbers stay comparable whether the service runs one process or several.
The peak of each process is its ``VmHWM``; their sum bounds the peak of the whole.
"""

from __future__ import annotations

import base64
import email.utils
import os
import time

import attrs
import dkim

from bench import loadgen
from bench.targets import RCPT, AimxTarget, rss_kib

BIG_MESSAGE_BYTES = 25 * 1000 * 1000
CONCURRENT = 20


@attrs.frozen
class MemoryResult:
    idle_kib: int  # just started, nothing received yet (all processes)
    warm_kib: int  # after one small message (the lazy imports of the ingest path)
    before_big_kib: int
    peak_kib: int  # summed VmHWM after one 25 MB message
    after_big_kib: int
    message_bytes: int
    concurrent: int  # how many 25 MB messages were sent at once
    concurrent_stored: int  # ... and how many were stored
    concurrent_idle_kib: int  # the fresh service before them
    concurrent_peak_kib: int  # summed VmHWM after them
    processes: int  # the service's processes at idle (the daemon and its SMTP workers)

    @property
    def peak_ratio(self) -> float:
        return self.peak_kib * 1024 / self.message_bytes

    @property
    def growth_ratio(self) -> float:
        """Peak above the warm service, in message sizes (target ≤ 2)."""
        return (self.peak_kib - self.before_big_kib) * 1024 / self.message_bytes


def total_kib(target: AimxTarget, key: str = "VmRSS") -> int:
    """``key`` summed over the service's processes (the daemon and its SMTP workers)."""
    total = 0
    for pid in target.pids():
        try:
            total += rss_kib(pid, key)
        except OSError:
            continue
    return total


def big_message(key_pem: bytes, size: int = BIG_MESSAGE_BYTES, *, payload: bytes | None = None,
                tag: str = "") -> bytes:
    """A DKIM-signed message of about ``size`` bytes: a short text and one PDF-sized
    attachment in base64 (76-column lines), as mail of that size usually is."""
    payload = payload if payload is not None else os.urandom(int(size * 0.74))
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    head = (f"From: Bench Sender <{loadgen.MAIL_FROM}>\r\nTo: <{RCPT}>\r\n"
            f"Subject: The scanned contract\r\nDate: {email.utils.formatdate()}\r\n"
            f"Message-ID: <big.{time.time_ns()}{tag}@{loadgen.SENDER_DOMAIN}>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe contract is attached.\r\n"
            "--b1\r\nContent-Type: application/pdf; name=\"contract.pdf\"\r\n"
            "Content-Disposition: attachment; filename=\"contract.pdf\"\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode()
    message = head + encoded + b"--b1--\r\n"
    field = dkim.sign(message, loadgen.SELECTOR.encode(), loadgen.SENDER_DOMAIN.encode(),
                      key_pem, canonicalize=(b"relaxed", b"relaxed"),
                      include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return field + message


def _one(dns_address: str, payload: bytes, small: bytes) -> tuple[int, ...]:
    target = AimxTarget(dns_address)
    target.start()
    try:
        time.sleep(2.0)
        idle = total_kib(target)
        processes = len(target.pids())
        loadgen.run_load(target.host, target.port, [small], sessions=1, seconds=10, rcpt=RCPT,
                         size=len(small))
        time.sleep(1.0)
        warm = total_kib(target)
        before = total_kib(target, "VmHWM")
        result = loadgen.run_load(target.host, target.port, [payload], sessions=1, seconds=60,
                                  rcpt=RCPT, size=len(payload))
        if result.messages != 1:
            raise RuntimeError(f"the 25 MB message was not accepted: {result.first_failure}")
        peak = total_kib(target, "VmHWM")
        time.sleep(1.0)
        after = total_kib(target)
        return idle, warm, max(before, warm), peak, after, processes
    finally:
        target.stop()


def stored_emails(target: AimxTarget) -> int:
    """Emails in the bench mailbox, flat ones and bundles (a 25 MB message is a bundle)."""
    try:
        return sum(1 for entry in os.scandir(target.inbox) if not entry.name.startswith("."))
    except FileNotFoundError:
        return 0


def _many(dns_address: str, payloads: list[bytes]) -> tuple[int, int, int]:
    target = AimxTarget(dns_address)
    target.start()
    try:
        time.sleep(2.0)
        idle = total_kib(target)
        result = loadgen.run_load(target.host, target.port, payloads, sessions=len(payloads),
                                  seconds=300, rcpt=RCPT, size=max(map(len, payloads)))
        if result.failures:
            print(f"  {result.failures} of the concurrent messages failed: "
                  f"{result.first_failure}", flush=True)
        return idle, total_kib(target, "VmHWM"), stored_emails(target)
    finally:
        target.stop()


def measure(dns_address: str, key_pem: bytes, small: bytes) -> MemoryResult:
    """``small`` is one wire payload from the bench pool (warms the ingest path)."""
    content = os.urandom(int(BIG_MESSAGE_BYTES * 0.74))
    size = len(big_message(key_pem, payload=content))
    payloads = [loadgen.wire_payload(big_message(key_pem, payload=content, tag=f".{n}"))
                for n in range(CONCURRENT)]
    idle, warm, before, peak, after, processes = _one(dns_address, payloads[0], small)
    many_idle, many_peak, stored = _many(dns_address, payloads)
    return MemoryResult(idle, warm, before, peak, after, size, CONCURRENT, stored,
                        many_idle, many_peak, processes)
