"""Per-mailbox locks that hold across threads and processes.

A thread lock per mailbox plus ``flock`` on ``<data>/.locks/<mailbox>.lock``,
so the daemon's threads and a CLI ``aimx ingest`` exclude each other. Blocking.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from aimx.storage.layout import ensure_data_dir, make_dir


class MailboxLocks:
    """The locks of one data dir's mailboxes; ``hold`` is re-entrant within a thread."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self._lock_dir = self.data_dir / ".locks"
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._depth: dict[str, int] = {}
        self._lock_fds: dict[str, int] = {}

    def thread_lock(self, mailbox: str) -> threading.RLock:
        """The in-process part alone: for short decisions that need no other process out."""
        with self._guard:
            lock = self._locks.get(mailbox)
            if lock is None:
                lock = self._locks[mailbox] = threading.RLock()
            return lock

    def _open_lock_file(self, mailbox: str) -> int:
        lock_dir = self._lock_dir
        path = os.path.join(lock_dir, f"{mailbox}.lock")
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:
            ensure_data_dir(self.data_dir)
            make_dir(lock_dir, 0o700)
            return os.open(path, flags, 0o600)

    @contextlib.contextmanager
    def hold(self, mailbox: str) -> Iterator[None]:
        """Exclusive access to one mailbox, across threads and processes; re-entrant."""
        lock = self.thread_lock(mailbox)
        with lock:
            depth = self._depth.get(mailbox, 0)
            if depth == 0:
                fd = self._open_lock_file(mailbox)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fds[mailbox] = fd
            self._depth[mailbox] = depth + 1
            try:
                yield
            finally:
                self._depth[mailbox] -= 1
                if self._depth[mailbox] == 0:
                    fd = self._lock_fds.pop(mailbox)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
