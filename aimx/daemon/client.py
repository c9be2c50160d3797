"""Clients of the daemon socket, for the CLI and the MCP server.

``Client`` is blocking and needs no reactor: it speaks AMP's simple wire
format over a plain Unix socket, one connection per call, so it works from
ordinary synchronous code and from worker threads alike. ``call_deferred``
is the same call for code already running under a reactor.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aimx import paths
from aimx.daemon.protocol import (
    MAX_BOX_BYTES,
    REFUSED_TAG,
    ApiCommand,
    ApiError,
    Box,
    Watch,
    WatchEvent,
    error,
    parse_answer,
    parse_request,
    request_box,
)

# connect() errors that mean "no daemon is listening here" (spec 50 §1).
DOWN_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.EACCES})


class DaemonDown(Exception):
    """Nothing answers on the socket (missing, refused or not accessible)."""

    def __init__(self, socket_path: str | os.PathLike[str], err: OSError | None = None) -> None:
        super().__init__(str(socket_path))
        self.socket_path = str(socket_path)
        self.errno = err.errno if err is not None else None
        self.error = err


class ConnectFailed(Exception):
    """Connecting failed for a reason other than "daemon down"."""

    def __init__(self, socket_path: str | os.PathLike[str], err: BaseException) -> None:
        super().__init__(f"Failed to connect to aimx daemon at {socket_path}: {err}")
        self.socket_path = str(socket_path)
        self.error = err


class MalformedReply(Exception):
    """The daemon's reply could not be understood (or never came)."""

    def __init__(self, why: str) -> None:
        super().__init__(f"Malformed response from aimx daemon: {why}")
        self.why = why


_tags = itertools.count(1)
_tag_lock = threading.Lock()


def _next_tag() -> bytes:
    with _tag_lock:
        return b"%x" % next(_tags)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining:
        data = sock.recv(min(remaining, 1 << 20))
        if not data:
            raise MalformedReply("connection closed before a complete reply")
        chunks.append(data)
        remaining -= len(data)
    return b"".join(chunks)


def read_box(sock: socket.socket, limit: int = MAX_BOX_BYTES) -> dict[bytes, bytes]:
    """Read one AMP box: length-prefixed key/value pairs ended by an empty key."""
    box: dict[bytes, bytes] = {}
    total = 0
    while True:
        (key_len,) = struct.unpack("!H", _recv_exact(sock, 2))
        if key_len == 0:
            return box
        if key_len > 0xFF:
            raise MalformedReply(f"key length {key_len} exceeds 255")
        key = _recv_exact(sock, key_len)
        (value_len,) = struct.unpack("!H", _recv_exact(sock, 2))
        box[key] = _recv_exact(sock, value_len)
        total += 4 + key_len + value_len
        if total > limit:
            raise MalformedReply("reply exceeds the box size limit")


def interpret_reply(command: type[ApiCommand], box: dict[bytes, bytes]) -> dict[str, Any]:
    """The response fields of an answer box, or the ``ApiError`` of an error box."""
    if b"_error" in box:
        code = box.get(b"_error_code", b"").decode("utf-8", "replace")
        reason = box.get(b"_error_description", b"").decode("utf-8", "replace")
        if not code:
            raise MalformedReply("error reply without a code")
        raise error(code, reason)
    if b"_answer" not in box:
        raise MalformedReply("reply is neither an answer nor an error")
    try:
        return parse_answer(command, box)
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise MalformedReply(f"bad {command.verb()} answer: {exc!r}") from None


class Client:
    """A blocking socket client: ``Client().call(MailboxList)`` → ``{"rows": [...]}``.

    Raises ``ApiError`` for daemon errors, ``DaemonDown`` / ``ConnectFailed``
    when connecting fails and ``MalformedReply`` for replies it cannot read.
    ``timeout`` bounds each socket operation; the default waits as long as the
    daemon works (a SEND may take minutes).
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None,
                 timeout: float | None = None) -> None:
        self.socket_path = Path(socket_path) if socket_path else paths.socket_path()
        self.timeout = timeout

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            if exc.errno in DOWN_ERRNOS:
                raise DaemonDown(self.socket_path, exc) from None
            raise ConnectFailed(self.socket_path, exc) from None
        return sock

    def call(self, command: type[ApiCommand], **arguments: Any) -> dict[str, Any]:
        with self.connect() as sock:
            return self._ask(sock, command, arguments)

    def _ask(self, sock: socket.socket, command: type[ApiCommand],
             arguments: dict[str, Any]) -> dict[str, Any]:
        """Send one request on ``sock`` and read its answer."""
        tag = _next_tag()
        request = request_box(command, arguments, tag).serialize()
        try:
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a refused connection: its error box is waiting to be read
            reply = read_box(sock)
        except TimeoutError:
            raise MalformedReply("timed out waiting for the daemon") from None
        except OSError as exc:
            raise MalformedReply(f"connection failed: {exc}") from None
        if reply.get(b"_error") == REFUSED_TAG:
            return interpret_reply(command, reply)  # raises the refusal's ApiError
        if reply.get(b"_answer", reply.get(b"_error")) != tag:
            raise MalformedReply("reply does not answer the request")
        return interpret_reply(command, reply)

    def watch(self, mailboxes: list[str] | None = None) -> WatchStream:
        """Open a WATCH on ``mailboxes`` (``None``: all the caller may read).

        Raises like ``call`` when the daemon refuses (an unreadable mailbox is
        ``ENOENT``); otherwise the stream yields events until it is closed.
        """
        sock = self.connect()
        try:
            reply = self._ask(sock, Watch, {"mailboxes": mailboxes or None})
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)  # events come whenever mail does
        return WatchStream(sock, list(reply.get("mailboxes") or []))


class WatchEnded(Exception):
    """The daemon closed a watch (it stopped or restarted, or the client fell behind)."""


class WatchStream:
    """An open WATCH connection: iterate for events (dicts of ``WatchEvent``'s fields).

    Each event is answered as soon as it is read, which is what keeps the
    daemon sending; ``close`` may be called from another thread to end a
    blocked iteration, which then raises ``WatchEnded``.
    """

    def __init__(self, sock: socket.socket, mailboxes: list[str]) -> None:
        self.sock = sock
        self.mailboxes = mailboxes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            while True:
                yield self._next_event()
        finally:
            self.sock.close()

    def _next_event(self) -> dict[str, Any]:
        try:
            box = read_box(self.sock)
        except (MalformedReply, OSError) as exc:
            raise WatchEnded(str(exc)) from None
        if box.get(b"_command") != WatchEvent.commandName or b"_ask" not in box:
            raise WatchEnded("the daemon sent something other than a WATCH-EVENT")
        try:
            event = parse_request(WatchEvent, box)
        except ApiError as exc:
            raise WatchEnded(f"unreadable WATCH-EVENT: {exc.reason}") from None
        try:
            self.sock.sendall(Box({b"_answer": box[b"_ask"]}).serialize())
        except OSError as exc:
            raise WatchEnded(str(exc)) from None
        return event

    def close(self) -> None:
        """End the watch from any thread: a blocked iteration wakes and raises ``WatchEnded``.

        The iteration closes the socket itself, so no other thread's descriptor
        can take its number while it still reads.
        """
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def call_deferred(reactor, command: type[ApiCommand], socket_path=None, **arguments: Any):
    """``Client.call`` for reactor code: a Deferred firing the response dict.

    Errors arrive as the same ``ApiError`` (or ``DaemonDown``/``ConnectFailed``).
    """
    from twisted.internet import threads

    client = Client(socket_path)
    # The blocking call in a worker thread: the same wire code and the same error mapping,
    # and the reactor thread never waits on the socket.
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), client.call, command,
                                     **arguments)
