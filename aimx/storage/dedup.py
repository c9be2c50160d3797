"""Message-ID dedup: a message delivered twice to one mailbox within 24 h is stored once.

Two parts. ``DedupIndex`` keeps each process's view in memory, rebuilt from the
files' frontmatter the first time a mailbox is written after start-up.
``MessageIdClaims`` is the part every writing process shares (the daemon's SMTP
workers, ``aimx ingest``): one small marker file per (mailbox, Message-ID) under
``<data>/.locks/<mailbox>.ids/``. Holding an ``flock`` on the marker is the
claim "this Message-ID is being stored"; its content, written once the email is
durable, is the time it was stored. The kernel drops the lock of a process
that dies, so a crash never leaves a Message-ID claimed.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import time
from pathlib import Path

from aimx.logs import kv, logger
from aimx.storage.emailfiles import email_entries_at, mailbox_or_none, read_entry_fields
from aimx.storage.layout import ensure_data_dir, make_dir

log = logger("aimx::storage")


DEDUP_WINDOW = datetime.timedelta(hours=24)
DEDUP_CAP = 100_000


def _parse_instant(value: object) -> datetime.datetime | None:
    if isinstance(value, datetime.datetime):
        instant = value
    elif isinstance(value, str) and value:
        try:
            instant = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=datetime.UTC)
    return instant


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class DedupIndex:
    """Message-IDs stored in one mailbox during the last 24 h, each expiring on its own."""

    def __init__(self) -> None:
        self._received: dict[str, datetime.datetime] = {}

    def __len__(self) -> int:
        return len(self._received)

    def _prune(self, now: datetime.datetime) -> None:
        cutoff = now - DEDUP_WINDOW
        for key in [k for k, at in self._received.items() if at <= cutoff]:
            del self._received[key]

    def is_duplicate(self, message_id: str, now: datetime.datetime | None = None) -> bool:
        if not message_id:
            return False
        received = self._received.get(message_id)
        if received is None:
            return False
        now = now or _utcnow()
        if now - received >= DEDUP_WINDOW:
            del self._received[message_id]
            return False
        return True

    def record(
        self, message_id: str, received_at: datetime.datetime, now: datetime.datetime | None = None
    ) -> None:
        if not message_id:
            return
        now = now or _utcnow()
        if now - received_at >= DEDUP_WINDOW:
            return
        if message_id not in self._received and len(self._received) >= DEDUP_CAP:
            self._prune(now)
            if len(self._received) >= DEDUP_CAP:
                log.warning("dedup index full (%d entries); not recording %s",
                            DEDUP_CAP, kv(message_id))
                return
        self._received[message_id] = received_at

    def forget(self, message_id: str) -> None:
        """Undo a ``record`` whose write turned out not to be durable."""
        self._received.pop(message_id, None)

    @classmethod
    def scan(cls, directory: Path, now: datetime.datetime | None = None) -> DedupIndex:
        """Rebuild from the files on disk (the frontmatter of each ``.md``)."""
        now = now or _utcnow()
        index = cls()
        oldest_day = (now - DEDUP_WINDOW).strftime("%Y-%m-%d")
        with mailbox_or_none(directory) as mailbox_fd:
            found = [] if mailbox_fd is None else [
                read_entry_fields(mailbox_fd, relative)
                for email_id, relative in email_entries_at(mailbox_fd)
                if email_id[:10] >= oldest_day]
        for fields in found:
            if fields is None:
                continue
            received = _parse_instant(fields.get("received_at"))
            message_id = fields.get("message_id")
            if received is None or not isinstance(message_id, str):
                continue
            index.record(message_id, received, now)
        return index


PRUNE_EVERY_SECS = 3600.0


class MessageIdClaims:
    """Markers of the Message-IDs stored (or being stored) in each mailbox, across processes.

    Blocking. Open and claim a marker under the mailbox lock (``prune`` runs
    under it too, so it never unlinks a marker between its open and its
    claim); everything else may happen outside it.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self._last_prune: dict[str, float] = {}
        self._dirs: dict[str, Path] = {}

    def _dir(self, mailbox: str) -> Path:
        directory = self._dirs.get(mailbox)
        if directory is None:
            directory = self._dirs[mailbox] = self.data_dir / ".locks" / f"{mailbox}.ids"
        return directory

    def open(self, mailbox: str, message_id: str) -> int:
        """The marker's descriptor, creating it (and its directory) when missing."""
        directory = self._dir(mailbox)
        name = hashlib.sha256(message_id.encode("utf-8", "surrogateescape")).hexdigest()[:40]
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(os.path.join(directory, name), flags, 0o600)
        except FileNotFoundError:
            ensure_data_dir(self.data_dir)
            make_dir(directory.parent, 0o700)
            make_dir(directory, 0o700)
            return os.open(directory / name, flags, 0o600)

    @staticmethod
    def try_claim(fd: int) -> bool:
        """Take the claim; False when another delivery (any process, any thread) holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    @staticmethod
    def wait_for_holder(fd: int) -> None:
        """Block until whoever holds the claim lets go (stored, failed or died)."""
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_UN)

    @staticmethod
    def stored_at(fd: int) -> datetime.datetime | None:
        """When the Message-ID was stored, as the marker says; None if it never was."""
        return _parse_instant(os.pread(fd, 64, 0).decode("ascii", "replace").strip())

    @staticmethod
    def mark_stored(fd: int, received_at: datetime.datetime) -> None:
        """Record a durable store (no fsync: after a crash the start-up scan of the files
        rebuilds what matters, and a lost marker can only cause a second copy)."""
        data = received_at.astimezone(datetime.UTC).isoformat().encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    @staticmethod
    def release(fd: int) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def prune(self, mailbox: str, now: float | None = None) -> int:
        """Drop unclaimed markers older than the window, at most hourly per mailbox
        (call under the mailbox lock); returns how many went."""
        now = time.time() if now is None else now
        if now - self._last_prune.get(mailbox, 0.0) < PRUNE_EVERY_SECS:
            return 0
        self._last_prune[mailbox] = now
        cutoff = now - DEDUP_WINDOW.total_seconds()
        removed = 0
        try:
            entries = list(os.scandir(self._dir(mailbox)))
        except OSError:
            return 0
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if self.try_claim(fd):
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                pass
            finally:
                self.release(fd)
        return removed
