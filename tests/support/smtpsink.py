"""A real SMTP server for delivery tests, run in a subprocess.

Usage::

    with SmtpSink("127.0.0.2", 25, mode="accept") as sink:
        ...  # deliver to 127.0.0.2:25
        sink.messages()  # raw bytes of each stored message, CRLF kept, dots unstuffed
        sink.events()    # what happened, one dict per event, in order

Modes (``mode``):

- ``accept``: stores every message and answers ``250``; offers a real
  STARTTLS (self-signed certificate) unless ``tls=False``.
- ``reject``: ``550`` at RCPT (``reply_at="rcpt"``) or after the data (``"data"``).
- ``defer``: ``451`` at the same places.
- ``break-tls``: advertises STARTTLS, answers ``220`` and then sends bytes
  that are not TLS and hangs up, so the client's handshake fails; sessions
  that never ask for STARTTLS are accepted and stored.
- ``silent``: accepts the TCP connection and never says a word.
- ``trickle``: sends an endless greeting, one continuation line every 0.2 s.
- ``refuse-helo``: refuses EHLO with ``502`` and HELO with ``550``.

The server is asyncio (no Twisted) so that it shares nothing with the client
code under test. Events are appended to ``events.jsonl`` as they happen, so a
test can read them while the sink runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.locks import HostLock
from tests.support.ports import ReservedPort

MODES = ("accept", "reject", "defer", "break-tls", "silent", "trickle", "refuse-helo")

REJECT_RCPT = "550 5.1.1 <{rcpt}>: Recipient address rejected: no such user at the test sink"
REJECT_DATA = "550 5.7.1 Message content rejected by the test sink"
DEFER_RCPT = "451 4.7.1 <{rcpt}>: greylisted by the test sink, try again later"
DEFER_DATA = "451 4.3.0 Test sink cannot store the message right now"


# -- the server (subprocess side) ----------------------------------------------------------


class _Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.mode: str = args.mode
        self.reply_at: str = args.reply_at
        self.hostname: str = args.hostname
        self.dir = Path(args.dir)
        self.tls: ssl.SSLContext | None = None
        if args.cert and args.key:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(args.cert, args.key)
        self.sessions = 0
        self.stored = 0

    def event(self, session: int, kind: str, **fields: Any) -> None:
        record = {"session": session, "event": kind, "time": time.time(), **fields}
        with open(self.dir / "events.jsonl", "a") as out:
            out.write(json.dumps(record) + "\n")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        session = self.sessions
        peer = writer.get_extra_info("peername")
        self.event(session, "connect", peer=list(peer) if peer else None)
        try:
            if self.mode == "silent":
                await reader.read()  # until the client gives up
            elif self.mode == "trickle":
                while not reader.at_eof():
                    writer.write(f"220-{self.hostname} still warming up\r\n".encode())
                    await writer.drain()
                    await asyncio.sleep(0.2)
            else:
                await self.converse(session, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            self.event(session, "error", error=repr(exc))
        finally:
            self.event(session, "close")
            writer.close()

    async def converse(self, session: int, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        async def reply(*lines: str) -> None:
            text = "".join(f"{line[:3]}{'-' if i < len(lines) - 1 else ' '}{line[4:]}\r\n"
                           for i, line in enumerate(lines))
            writer.write(text.encode())
            await writer.drain()

        tls_active = False
        mail_from: str | None = None
        rcpts: list[str] = []
        await reply(f"220 {self.hostname} ESMTP test sink")
        while True:
            raw = await reader.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            self.event(session, "command", line=line, tls=tls_active)
            if self.mode == "refuse-helo" and verb in ("EHLO", "HELO"):
                await reply("502 5.5.1 EHLO not accepted here" if verb == "EHLO"
                            else "550 5.7.1 HELO not accepted here")
            elif verb == "EHLO":
                lines = [f"250 {self.hostname} greets {arg}", "250 PIPELINING",
                         "250 8BITMIME", "250 SIZE 52428800"]
                offer_tls = (self.tls is not None or self.mode == "break-tls") and not tls_active
                if offer_tls:
                    lines.append("250 STARTTLS")
                lines.append("250 ENHANCEDSTATUSCODES")
                await reply(*lines)
            elif verb == "HELO":
                await reply(f"250 {self.hostname}")
            elif verb == "STARTTLS":
                self.event(session, "starttls")
                if self.mode == "break-tls":
                    await reply("220 2.0.0 Ready to start TLS")
                    writer.write(b"this is not a TLS server hello\r\n")
                    await writer.drain()
                    return
                if self.tls is None or tls_active:
                    await reply("502 5.5.1 STARTTLS not available")
                    continue
                await reply("220 2.0.0 Ready to start TLS")
                await writer.start_tls(self.tls)
                tls_active = True
                mail_from, rcpts = None, []
                self.event(session, "tls-up")
            elif verb == "MAIL":
                mail_from = _path(arg)
                rcpts = []
                await reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpt = _path(arg)
                if mail_from is None:
                    await reply("503 5.5.1 MAIL first")
                elif self.reply_at == "rcpt" and self.mode == "reject":
                    await reply(REJECT_RCPT.format(rcpt=rcpt))
                elif self.reply_at == "rcpt" and self.mode == "defer":
                    await reply(DEFER_RCPT.format(rcpt=rcpt))
                else:
                    rcpts.append(rcpt)
                    await reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if not rcpts:
                    await reply("503 5.5.1 RCPT first")
                    continue
                await reply("354 End data with <CR><LF>.<CR><LF>")
                data = await _read_data(reader)
                if self.mode == "reject":
                    await reply(REJECT_DATA)
                elif self.mode == "defer":
                    await reply(DEFER_DATA)
                else:
                    self.stored += 1
                    name = f"msg-{self.stored:04d}.eml"
                    tmp = self.dir / f".{name}.tmp"
                    tmp.write_bytes(data)
                    os.replace(tmp, self.dir / name)
                    self.event(session, "stored", file=name, mail_from=mail_from,
                               rcpts=rcpts, tls=tls_active)
                    await reply(f"250 2.0.0 Ok: queued as {self.stored}")
                mail_from, rcpts = None, []
            elif verb == "RSET":
                mail_from, rcpts = None, []
                await reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                await reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                await reply("221 2.0.0 Bye")
                return
            else:
                await reply("502 5.5.2 Command not recognized")


def _path(arg: str) -> str:
    """The address inside ``FROM:<...>`` / ``TO:<...>`` (parameters ignored)."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if rest.startswith("<") and ">" in rest:
        return rest[1:rest.index(">")]
    return rest.split(" ", 1)[0]


async def _read_data(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        raw = await reader.readline()
        if not raw:
            raise asyncio.IncompleteReadError(b"".join(chunks), None)
        if raw in (b".\r\n", b".\n"):
            return b"".join(chunks)
        if raw.startswith(b".."):
            raw = raw[1:]
        chunks.append(raw)


async def _serve(args: argparse.Namespace) -> None:
    server = _Server(args)
    # reuse_address: the port may be a ReservedPort of the test (LoopbackHosts).
    listener = await asyncio.start_server(server.handle, args.host, args.port,
                                          limit=4 * 1024 * 1024, reuse_address=True)
    port = listener.sockets[0].getsockname()[1]
    print(port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with listener:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--mode", choices=MODES, default="accept")
    parser.add_argument("--reply-at", choices=("rcpt", "data"), default="rcpt")
    parser.add_argument("--hostname", default="sink.test")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    asyncio.run(_serve(parser.parse_args(argv)))


# -- the handle (test side) ----------------------------------------------------------------


class SmtpSink:
    """An SMTP server subprocess listening on ``host:port`` (``port=0``: any free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, mode: str = "accept",
                 reply_at: str = "rcpt", tls: bool = True, hostname: str = "sink.test") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown sink mode {mode!r}")
        self.host = host
        self.requested_port = port
        self.port = 0
        self.mode = mode
        self.reply_at = reply_at
        self.tls = tls
        self.hostname = hostname
        self._tmp = tempfile.TemporaryDirectory(prefix="aimx-sink-")
        self.dir = Path(self._tmp.name)
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> SmtpSink:
        cmd = [sys.executable, "-m", "tests.support.smtpsink", "--host", self.host,
               "--port", str(self.requested_port), "--dir", str(self.dir),
               "--mode", self.mode, "--reply-at", self.reply_at, "--hostname", self.hostname]
        if self.tls and self.mode == "accept":
            from tests.support.daemon import self_signed_cert

            cert, key = self_signed_cert(self.hostname)
            (self.dir / "cert.pem").write_bytes(cert)
            (self.dir / "key.pem").write_bytes(key)
            cmd += ["--cert", str(self.dir / "cert.pem"), "--key", str(self.dir / "key.pem")]
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=str(root))
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip():
            self.proc.wait(5)
            raise RuntimeError(f"SMTP sink did not start on {self.host}:{self.requested_port}")
        self.port = int(line)
        return self

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        path = self.dir / "events.jsonl"
        if not path.exists():
            return []
        found = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [e for e in found if kind is None or e["event"] == kind]

    def messages(self) -> list[bytes]:
        return [path.read_bytes() for path in sorted(self.dir.glob("msg-*.eml"))]

    def wait_for(self, kind: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until ``count`` events of ``kind`` happened; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(kind)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"sink saw {len(found)} {kind!r} events, wanted {count}: "
                                     f"{self.events()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None
        self._tmp.cleanup()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LoopbackHosts:
    """A few loopback addresses (``127.25.<n>.2``, ``.3``, ...) on one common port, to
    stand in for several MX hosts. ``port=25`` needs root; ``port=0`` picks a free high
    port. The block ``127.25.<n>`` is this object's alone (a host lock) and the port
    is reserved on each address until ``close()``; a ``sink()`` listens there.
    Raises ``RuntimeError`` when no free block is found."""

    def __init__(self, count: int = 3, port: int = 0) -> None:
        for block in range(1, 251):
            lock = HostLock(f"loopback-127.25.{block}")
            if not lock.acquire(blocking=False):
                continue
            addresses = [f"127.25.{block}.{i}" for i in range(2, 2 + count)]
            reserved: list[ReservedPort] = []
            try:
                for address in addresses:
                    reserved.append(ReservedPort(address, port or
                                                 (reserved[0].port if reserved else 0)))
            except OSError:
                for held in reserved:
                    held.close()
                lock.release()
                continue
            self._lock, self._reserved = lock, reserved
            self.port = reserved[0].port
            self.addresses = addresses
            return
        raise RuntimeError(f"no {count} free loopback addresses for port {port}")

    def sink(self, index: int, mode: str = "accept", **kwargs: Any) -> SmtpSink:
        return SmtpSink(self.addresses[index], self.port, mode=mode, **kwargs)

    def close(self) -> None:
        for held in self._reserved:
            held.close()
        self._lock.release()

    def __enter__(self) -> LoopbackHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def loopback_hosts_or_skip(count: int, port: int = 0) -> Iterator[LoopbackHosts]:
    """``LoopbackHosts`` for a fixture: the test is skipped, not failed, when no
    block of addresses is free."""
    import pytest  # here: this module also runs as a script, without pytest

    try:
        hosts = LoopbackHosts(count, port=port)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    with hosts:
        yield hosts


if __name__ == "__main__":
    main()
