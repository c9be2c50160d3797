"""The one SMTP load generator every inbound target is measured with.

Messages are built and DKIM-signed before the clock starts (signing is the
expensive part, and a sending MTA has done it long before it connects), each
with its own Message-ID inside the signed header set, and kept as ready-to-send
DATA payloads (dot-stuffed, CRLF, terminated). During a run, N asyncio sessions
on raw sockets each loop ``MAIL``/``RCPT``/``DATA`` (pipelined, as real MTAs do)
then the payload, and time the gap between the last payload byte reaching the
kernel and the reply to it. The generator does a few syscalls per message, so on
a 2-core machine it stays a small fraction of one core (its CPU use is reported
with every run so that can be checked).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import attrs
import dkim

SENDER_DOMAIN = "sender.bench"
SELECTOR = "bench"
HELO = "mx.sender.bench"
MAIL_FROM = f"newsletter@{SENDER_DOMAIN}"

_WORDS = ("agent mailbox message queue report status invoice review deploy "
          "schedule meeting summary thread reply update server storage latency "
          "budget quarter project customer release notes action item follow up").split()


def _body(size: int, seed: int) -> bytes:
    """Plain-text paragraphs of about ``size`` bytes, lines well under 78 octets."""
    rng = random.Random(seed)
    lines: list[str] = [f"Hello, this is benchmark message number {seed}.", ""]
    total = sum(len(line) + 2 for line in lines)
    line: list[str] = []
    while total < size:
        word = rng.choice(_WORDS)
        if sum(len(w) + 1 for w in line) + len(word) > 70:
            text = " ".join(line)
            lines.append(text)
            total += len(text) + 2
            line = []
            if rng.random() < 0.15:
                lines.append("")
                total += 2
        line.append(word)
    return ("\r\n".join(lines) + "\r\n").encode()


def build_message(index: int, tag: str, size: int, rcpt: str, message_id: bool = True) -> bytes:
    """An unsigned plain-text message whose signed form is about ``size`` bytes."""
    headers = (
        f"From: Bench Sender <{MAIL_FROM}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: Report {index} for run {tag}: weekly status\r\n"
        f"Date: {email.utils.formatdate(localtime=False)}\r\n"
        + (f"Message-ID: <{tag}.{index}@{SENDER_DOMAIN}>\r\n" if message_id else "")
        + "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
    ).encode()
    signature_room = 560  # what a 2048-bit rsa-sha256 DKIM-Signature field adds
    return headers + _body(max(200, size - len(headers) - signature_room), index)


def wire_payload(message: bytes) -> bytes:
    """DATA as it goes on the wire: CRLF lines, leading dots doubled, ``.`` terminator."""
    lines = message.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(stuffed) + b"\r\n.\r\n"


_KEYS: dict[int, Any] = {}


def _openssl_rsa_sign(digest: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's RSASSA-PKCS1-v1_5 signing step done by OpenSSL instead of pure Python.

    Same algorithm and output; about 20 times faster, which keeps building the
    message pool short. Only the bench's own pre-signing uses it.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    key = _KEYS.get(private_key["modulus"])
    if key is None:
        public = rsa.RSAPublicNumbers(private_key["publicExponent"], private_key["modulus"])
        key = rsa.RSAPrivateNumbers(
            p=private_key["prime1"], q=private_key["prime2"], d=private_key["privateExponent"],
            dmp1=private_key["exponent1"], dmq1=private_key["exponent2"],
            iqmp=private_key["coefficient"], public_numbers=public).private_key()
        _KEYS[private_key["modulus"]] = key
    algorithm = hashes.SHA256() if digest.name.lower() == "sha256" else hashes.SHA1()
    return key.sign(digest.digest(), padding.PKCS1v15(), Prehashed(algorithm))


def signed_message(key_pem: bytes, index: int, tag: str, size: int, rcpt: str,
                   message_id: bool = True) -> bytes:
    """One DKIM-signed message (rsa-sha256, relaxed/relaxed), CRLF lines, not stuffed."""
    message = build_message(index, tag, size, rcpt, message_id)
    headers = [b"from", b"to", b"subject", b"date"] + ([b"message-id"] if message_id else [])
    field = dkim.sign(message, SELECTOR.encode(), SENDER_DOMAIN.encode(), key_pem,
                      canonicalize=(b"relaxed", b"relaxed"), include_headers=headers)
    return field + message


def _sign_range(args: tuple[bytes, str, int, int, int, str]) -> list[bytes]:
    key_pem, tag, size, start, stop, rcpt = args
    dkim.RSASSA_PKCS1_v1_5_sign = _openssl_rsa_sign  # this worker process only
    return [wire_payload(signed_message(key_pem, index, tag, size, rcpt))
            for index in range(start, stop)]


def signed_pool(key_pem: bytes, *, tag: str, size: int, count: int, rcpt: str,
                workers: int = 2) -> list[bytes]:
    """``count`` DKIM-signed wire payloads with Message-IDs ``<tag>.<n>@sender.bench``."""
    step = max(1, -(-count // (workers * 4)))
    jobs = [(key_pem, tag, size, start, min(count, start + step), rcpt)
            for start in range(0, count, step)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [payload for chunk in pool.map(_sign_range, jobs) for payload in chunk]


@attrs.define
class LoadResult:
    """One run: messages answered 250, failures, wall time and per-message latencies."""

    sessions: int
    size: int
    messages: int = 0
    failures: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = attrs.Factory(list)
    generator_cpu: float = 0.0  # CPU seconds the generator itself used
    first_failure: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, fraction: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
        return ordered[index]

    @property
    def p50(self) -> float:
        return self.percentile(0.50)

    @property
    def p99(self) -> float:
        return self.percentile(0.99)


class SmtpProtocolError(Exception):
    pass


async def _reply(reader: asyncio.StreamReader) -> str:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpProtocolError("connection closed by the server")
        lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
        if len(line) < 4 or line[3:4] != b"-":
            return "\n".join(lines)


async def _session(host: str, port: int, payloads: Iterator[bytes], deadline: float,
                   rcpt: str, result: LoadResult) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.transport.set_write_buffer_limits(high=0)  # drain() = every byte handed to the kernel
    envelope = f"MAIL FROM:<{MAIL_FROM}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
    try:
        banner = await _reply(reader)
        if not banner.startswith("220"):
            raise SmtpProtocolError(f"banner: {banner}")
        writer.write(f"EHLO {HELO}\r\n".encode())
        if not (await _reply(reader)).startswith("250"):
            raise SmtpProtocolError("EHLO refused")
        while time.monotonic() < deadline:
            payload = next(payloads, None)
            if payload is None:
                break
            writer.write(envelope)
            replies = [await _reply(reader) for _ in range(3)]
            if not replies[2].startswith("354"):
                result.failures += 1
                result.first_failure = result.first_failure or " / ".join(replies)
                writer.write(b"RSET\r\n")
                await _reply(reader)
                continue
            writer.write(payload)
            await writer.drain()
            started = time.perf_counter()
            reply = await _reply(reader)
            elapsed = (time.perf_counter() - started) * 1000
            if reply.startswith("250"):
                result.messages += 1
                result.latencies_ms.append(elapsed)
            else:
                result.failures += 1
                result.first_failure = result.first_failure or reply
        writer.write(b"QUIT\r\n")
        await writer.drain()
        await asyncio.wait_for(_reply(reader), 5)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _run(host: str, port: int, payloads: Sequence[bytes], sessions: int, seconds: float,
               rcpt: str, size: int) -> LoadResult:
    result = LoadResult(sessions=sessions, size=size)
    source = iter(payloads)
    cpu_before = os.times()
    started = time.monotonic()
    deadline = started + seconds
    outcomes = await asyncio.gather(
        *(_session(host, port, source, deadline, rcpt, result) for _ in range(sessions)),
        return_exceptions=True)
    result.seconds = time.monotonic() - started
    cpu_after = os.times()
    result.generator_cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system
                                                                 - cpu_before.system)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            result.failures += 1
            result.first_failure = result.first_failure or repr(outcome)
    return result


def run_load(host: str, port: int, payloads: Sequence[bytes], *, sessions: int,
             seconds: float, rcpt: str, size: int) -> LoadResult:
    """Send ``payloads`` over ``sessions`` concurrent sessions until they run out or
    ``seconds`` pass; every session finishes the message it is in."""
    return asyncio.run(_run(host, port, payloads, sessions, seconds, rcpt, size))


def warm_up(host: str, port: int, payloads: Sequence[bytes], rcpt: str) -> None:
    """A few messages on one session so imports, caches and first-write costs are paid."""
    run_load(host, port, payloads, sessions=1, seconds=5.0, rcpt=rcpt, size=0)
