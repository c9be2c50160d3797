"""Memory: idle daemon RSS, and peak RSS while ingesting one 25 MB message."""

from __future__ import annotations

import base64
import email.utils
import os
import time

import attrs
import dkim

from bench import loadgen
from bench.targets import RCPT, AimxTarget, rss_kib, wait_stored

BIG_MESSAGE_BYTES = 25 * 1000 * 1000


@attrs.frozen
class MemoryResult:
    idle_kib: int  # just started, nothing received yet
    warm_kib: int  # after one small message (the lazy imports of the ingest path)
    before_big_kib: int
    peak_kib: int  # VmHWM after the 25 MB message
    after_big_kib: int
    message_bytes: int

    @property
    def peak_ratio(self) -> float:
        return self.peak_kib * 1024 / self.message_bytes

    @property
    def growth_ratio(self) -> float:
        return (self.peak_kib - self.before_big_kib) * 1024 / self.message_bytes


def big_message(key_pem: bytes, size: int = BIG_MESSAGE_BYTES) -> bytes:
    """A DKIM-signed message of about ``size`` bytes: a short text and one PDF-sized
    attachment in base64 (76-column lines), as mail of that size usually is."""
    payload = os.urandom(int(size * 0.74))
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    head = (f"From: Bench Sender <{loadgen.MAIL_FROM}>\r\nTo: <{RCPT}>\r\n"
            f"Subject: The scanned contract\r\nDate: {email.utils.formatdate()}\r\n"
            f"Message-ID: <big.{time.time_ns()}@{loadgen.SENDER_DOMAIN}>\r\n"
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


def measure(dns_address: str, key_pem: bytes, small: bytes) -> MemoryResult:
    """``small`` is one wire payload from the bench pool (warms the ingest path)."""
    raw = big_message(key_pem)
    payload = loadgen.wire_payload(raw)
    target = AimxTarget(dns_address)
    target.start()
    try:
        pid = target.pids()[0]
        time.sleep(2.0)
        idle = rss_kib(pid)
        loadgen.run_load(target.host, target.port, [small], sessions=1, seconds=10, rcpt=RCPT,
                         size=len(small))
        time.sleep(1.0)
        warm = rss_kib(pid)
        before = rss_kib(pid, "VmHWM")
        result = loadgen.run_load(target.host, target.port, [payload], sessions=1, seconds=60,
                                  rcpt=RCPT, size=len(payload))
        if result.messages != 1:
            raise RuntimeError(f"the 25 MB message was not accepted: {result.first_failure}")
        wait_stored(target, 2)
        peak = rss_kib(pid, "VmHWM")
        time.sleep(1.0)
        after = rss_kib(pid)
        return MemoryResult(idle, warm, max(before, warm), peak, after, len(raw))
    finally:
        target.stop()
