"""The Twisted baseline: bare ``twisted.mail.smtp`` ESMTP, one process, no authentication.

What the same stack as aimx gives before any of aimx's work: ESMTP accepts
only the bench domain, each message is parsed with the standard library
(``email`` with the modern policy: sender, subject, plain-text body) and stored
as one file with the durability aimx promises (file written and fsync'd, then
the directory fsync'd, then the 250). Parse and store run in the reactor's
thread pool, as a Twisted program that must not block its reactor does, so
sessions overlap their disk waits. No DKIM, SPF, DMARC, trust or index.

Run as ``python -m bench.baseline_twisted --port P --dir D --domain example``.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import os
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.mail import smtp
from zope.interface import implementer


def store(directory: Path, lines: list[bytes]) -> None:
    """Parse the message and write it durably (file fsync, then directory fsync)."""
    message = email.message_from_bytes(b"\r\n".join(lines) + b"\r\n",
                                       policy=email.policy.default)
    part = message.get_body(preferencelist=("plain", "html"))
    body = part.get_content() if part is not None else ""
    text = (f"from: {message['from']}\nsubject: {message['subject']}\n"
            f"message-id: {message['message-id']}\n\n{body}")
    fd = os.open(directory / f"{uuid.uuid4().hex}.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                 0o600)
    try:
        os.write(fd, text.encode("utf-8", "replace"))
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@implementer(smtp.IMessage)
class StoredMessage:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted's interface)
        self.lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:  # noqa: N802
        lines, self.lines = self.lines, []
        return threads.deferToThread(store, self.directory, lines)

    def connectionLost(self) -> None:  # noqa: N802
        self.lines = []


@implementer(smtp.IMessageDelivery)
class LocalDelivery:
    def __init__(self, directory: Path, domain: str) -> None:
        self.directory = directory
        self.domain = domain.lower().encode()

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:  # noqa: N802
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:  # noqa: N802
        return origin

    def validateTo(self, user: smtp.User) -> Any:  # noqa: N802
        if user.dest.domain.lower() != self.domain:
            raise smtp.SMTPBadRcpt(user)
        return lambda: StoredMessage(self.directory)


class StoreFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP

    def __init__(self, delivery: LocalDelivery) -> None:
        super().__init__()
        self.delivery = delivery
        self.domain = b"baseline.bench"

    def buildProtocol(self, addr: Any) -> smtp.ESMTP:  # noqa: N802
        protocol = super().buildProtocol(addr)
        protocol.delivery = self.delivery
        return protocol


def main() -> None:
    parser = argparse.ArgumentParser(description="bare Twisted ESMTP baseline store")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--domain", required=True)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    reactor.listenTCP(args.port, StoreFactory(LocalDelivery(args.dir, args.domain)),
                      backlog=128, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
