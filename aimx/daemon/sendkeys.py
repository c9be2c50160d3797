"""The idempotency-key store of SEND: what each (owner uid, key) already did, for 24 h.

One SQLite file, ``<data>/.aimx/send-keys.sqlite``, root's own (dir 0700, file
0600), written with ``synchronous=FULL`` so an answered outcome survives a
crash or restart. A row is claimed (``sending``) before the message leaves the
host and completed (``sent`` or ``failed``) once delivery has answered; outcomes
that leave nothing behind (refusals, temporary failures) drop the row so the
key may be used again. Rows older than the window are pruned lazily.

The database is opened through a descriptor of its directory, after checking
that directory is root's and nobody else may write it, so no path a user
controls is ever followed. Blocking: call everything off the reactor thread.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import attrs

WINDOW_SECS = 24 * 3600
PRUNE_EVERY_SECS = 3600
DB_NAME = "send-keys.sqlite"

SENDING = "sending"  # claimed; the outcome is not known yet
SENT = "sent"
FAILED = "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS send_keys (
    uid INTEGER NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    message_id TEXT NOT NULL DEFAULT '',
    code TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    PRIMARY KEY (uid, key)
)
"""


@attrs.frozen
class KeyRecord:
    """What an earlier send with one key did."""

    fingerprint: str
    state: str  # SENDING | SENT | FAILED
    message_id: str
    code: str  # the error code of a FAILED send
    reason: str
    created: float


class UnsafeStateDir(OSError):
    """The state directory is not root's own: the store refuses to use it."""


def _private_dir_fd(path: Path) -> int:
    """Open (creating it 0700 if needed) a directory only this process's user controls."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise UnsafeStateDir(f"{path} must belong to uid {os.geteuid()} and be writable by "
                             "nobody else")
    return fd


class SendKeyStore:
    """The store of one daemon. Thread-safe: one connection behind a lock."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._dir_fd: int | None = None
        self._last_prune = 0.0

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        dir_fd = _private_dir_fd(self.state_dir)
        try:
            try:
                info = os.stat(DB_NAME, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                made = os.open(DB_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
                os.close(made)
            else:
                if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                    raise UnsafeStateDir(f"{self.state_dir / DB_NAME} is not a regular file "
                                         f"owned by uid {os.geteuid()}")
            # Through the directory descriptor: whatever happens to the path later,
            # the database and its journal stay in the directory that was checked.
            db = sqlite3.connect(f"/proc/self/fd/{dir_fd}/{DB_NAME}", check_same_thread=False,
                                 isolation_level=None)
            db.execute("PRAGMA synchronous=FULL")
            db.execute(_SCHEMA)
        except BaseException:
            os.close(dir_fd)
            raise
        self._db, self._dir_fd = db, dir_fd
        return db

    def lookup(self, uid: int, key: str, now: float | None = None) -> KeyRecord | None:
        """The record of ``key`` for ``uid`` within the window, if any."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._connect().execute(
                "SELECT fingerprint, state, message_id, code, reason, created FROM send_keys "
                "WHERE uid = ? AND key = ? AND created > ?",
                (uid, key, now - WINDOW_SECS)).fetchone()
        return KeyRecord(*row) if row is not None else None

    def claim(self, uid: int, key: str, fingerprint: str, now: float | None = None) -> None:
        """Record that a send with ``key`` is about to leave (replacing an expired row)."""
        now = time.time() if now is None else now
        with self._lock:
            db = self._connect()
            if now - self._last_prune >= PRUNE_EVERY_SECS:
                db.execute("DELETE FROM send_keys WHERE created <= ?", (now - WINDOW_SECS,))
                self._last_prune = now
            db.execute("INSERT OR REPLACE INTO send_keys (uid, key, fingerprint, state, created) "
                       "VALUES (?, ?, ?, ?, ?)", (uid, key, fingerprint, SENDING, now))

    def complete(self, uid: int, key: str, state: str, *, message_id: str = "",
                 code: str = "", reason: str = "") -> None:
        """Record the definitive outcome of a claimed send (``SENT`` or ``FAILED``)."""
        with self._lock:
            self._connect().execute(
                "UPDATE send_keys SET state = ?, message_id = ?, code = ?, reason = ? "
                "WHERE uid = ? AND key = ?", (state, message_id, code, reason, uid, key))

    def release(self, uid: int, key: str) -> None:
        """Forget a claim whose send left nothing behind, so the key may be used again."""
        with self._lock:
            self._connect().execute("DELETE FROM send_keys WHERE uid = ? AND key = ?",
                                    (uid, key))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None
