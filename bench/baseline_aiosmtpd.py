"""The Python baseline: what a careful developer writes in an afternoon with aiosmtpd.

The handler accepts only the bench domain, parses each message with the standard
library (``email`` with the modern policy: sender, subject, plain-text body) and
stores one file per message with the same durability aimx promises: the file is
written, fsync'd, and the directory fsync'd before the 250. It runs the work
inside the handler, as the aiosmtpd documentation's examples do, so one
session's disk wait holds up the others. No authentication is done.

Run as ``python -m bench.baseline_aiosmtpd --port P --dir D --domain example``.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import os
import signal
import uuid
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP


class StoreHandler:
    def __init__(self, directory: Path, domain: str) -> None:
        self.directory = directory
        self.domain = domain.lower()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          rcpt_options: list[str]) -> str:
        if not address.lower().endswith("@" + self.domain):
            return "550 5.7.1 relay not permitted"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        message = email.message_from_bytes(envelope.original_content,
                                           policy=email.policy.default)
        part = message.get_body(preferencelist=("plain", "html"))
        body = part.get_content() if part is not None else ""
        text = (f"from: {message['from']}\nsubject: {message['subject']}\n"
                f"message-id: {message['message-id']}\n\n{body}")
        path = self.directory / f"{uuid.uuid4().hex}.txt"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, text.encode("utf-8", "replace"))
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return "250 OK"


async def serve(port: int, directory: Path, domain: str) -> None:
    loop = asyncio.get_running_loop()
    handler = StoreHandler(directory, domain)
    server = await loop.create_server(lambda: SMTP(handler, hostname="baseline.bench"),
                                      "127.0.0.1", port, backlog=128)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="aiosmtpd baseline store")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--domain", required=True)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.port, args.dir, args.domain))


if __name__ == "__main__":
    main()
