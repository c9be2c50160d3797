"""Per-mailbox locks that hold across threads and processes.

A thread lock per mailbox plus ``flock`` on ``<data>/.locks/<mailbox>.lock``,
so the daemon's threads and a CLI ``aimx ingest`` exclude each other. Blocking.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

from aimx.storage.layout import LOCK_DIR, open_lock_dir_file


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


class MailboxLocks:
    """The locks of one data dir's mailboxes; ``hold`` is re-entrant within a thread.

    Each mailbox's lock file is opened once and its descriptor kept. That is
    safe although an ``flock`` belongs to the open file description, which all
    threads share: ``hold`` takes and drops the ``flock`` only while holding
    the mailbox's thread lock, so threads are kept apart by that lock and
    processes by the ``flock``.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self._lock_dir = str(self.data_dir / LOCK_DIR)
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._depth: dict[str, int] = {}
        self._lock_fds: dict[str, int] = {}
        self._lock_inodes: dict[str, tuple[int, int]] = {}
        weakref.finalize(self, _close_all, self._lock_fds)

    def thread_lock(self, mailbox: str) -> threading.RLock:
        """The in-process part alone: for short decisions that need no other process out."""
        with self._guard:
            lock = self._locks.get(mailbox)
            if lock is None:
                lock = self._locks[mailbox] = threading.RLock()
            return lock

    def _lock_file(self, mailbox: str) -> None:
        """``flock`` the mailbox's lock file through the kept descriptor (call under the
        thread lock), reopening it if the file on disk is no longer the one held open
        (removed by hand): a lock on a file no other process can open excludes no one."""
        name = f"{mailbox}.lock"
        path = f"{self._lock_dir}/{name}"
        while True:
            fd = self._lock_fds.get(mailbox)
            if fd is None:
                fd = self._lock_fds[mailbox] = open_lock_dir_file(self.data_dir, name)
                held = os.fstat(fd)
                self._lock_inodes[mailbox] = (held.st_dev, held.st_ino)
            fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                on_disk = os.stat(path, follow_symlinks=False)
                if (on_disk.st_dev, on_disk.st_ino) == self._lock_inodes[mailbox]:
                    return
            del self._lock_fds[mailbox]
            os.close(fd)

    @contextlib.contextmanager
    def hold(self, mailbox: str) -> Iterator[None]:
        """Exclusive access to one mailbox, across threads and processes; re-entrant."""
        lock = self.thread_lock(mailbox)
        with lock:
            depth = self._depth.get(mailbox, 0)
            if depth == 0:
                self._lock_file(mailbox)
            self._depth[mailbox] = depth + 1
            try:
                yield
            finally:
                self._depth[mailbox] -= 1
                if self._depth[mailbox] == 0:
                    fcntl.flock(self._lock_fds[mailbox], fcntl.LOCK_UN)
