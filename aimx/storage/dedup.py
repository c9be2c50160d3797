"""Message-ID dedup: a message delivered twice to one mailbox within 24 h is stored once.

Everything is keyed by ``message_id_key``, a hex SHA-256 prefix of the
Message-ID. Three parts:

- ``DedupIndex``: each process's view in memory, rebuilt from the emails'
  frontmatter the first time a mailbox is written after start-up, then kept
  current from the stored log.
- ``StoredLog``: ``<data>/.locks/<mailbox>.stored``, shared by every writing
  process (the daemon's SMTP workers, ``aimx ingest``): a line
  ``<key> <unix seconds>`` appended once an email is durable. Each process
  reads it on from where it stopped, under the mailbox lock, so it learns what
  the others stored. Past a size bound it is rewritten (at most hourly) with
  the last 24 h only.
- Claims: ``<data>/.locks/<mailbox>.claims`` is an empty file; "this
  Message-ID is being stored" is an open-file-description write lock
  (``F_OFD_SETLK``) on the one byte at ``claim_offset(key)``. Each delivery
  locks through its own descriptor, so a claim keeps out other threads as well
  as other processes, and the kernel drops the claims of a process that dies.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import shutil
import struct
import time
from pathlib import Path

from aimx.fsutil import write_all
from aimx.logs import kv, logger
from aimx.storage.emailfiles import email_entries_at, mailbox_or_none, read_entry_fields
from aimx.storage.layout import LOCK_DIR, open_lock_dir_file

log = logger("aimx::storage")


DEDUP_WINDOW = datetime.timedelta(hours=24)
DEDUP_CAP = 100_000


def message_id_key(message_id: str) -> str:
    """What dedup knows a Message-ID by: 128 bits of its SHA-256, in hex."""
    return hashlib.sha256(message_id.encode("utf-8", "surrogateescape")).hexdigest()[:32]


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
        self._received: dict[str, datetime.datetime] = {}  # by ``message_id_key``

    def __len__(self) -> int:
        return len(self._received)

    def _prune(self, now: datetime.datetime) -> None:
        cutoff = now - DEDUP_WINDOW
        for key in [k for k, at in self._received.items() if at <= cutoff]:
            del self._received[key]

    def is_duplicate(self, message_id: str, now: datetime.datetime | None = None) -> bool:
        return bool(message_id) and self.is_duplicate_key(message_id_key(message_id), now)

    def is_duplicate_key(self, key: str, now: datetime.datetime | None = None) -> bool:
        received = self._received.get(key)
        if received is None:
            return False
        now = now or _utcnow()
        if now - received >= DEDUP_WINDOW:
            del self._received[key]
            return False
        return True

    def record(
        self, message_id: str, received_at: datetime.datetime, now: datetime.datetime | None = None
    ) -> None:
        if message_id:
            self.record_key(message_id_key(message_id), received_at, now)

    def record_key(
        self, key: str, received_at: datetime.datetime, now: datetime.datetime | None = None
    ) -> None:
        now = now or _utcnow()
        if now - received_at >= DEDUP_WINDOW:
            return
        if key not in self._received and len(self._received) >= DEDUP_CAP:
            self._prune(now)
            if len(self._received) >= DEDUP_CAP:
                log.warning("dedup index full (%d entries); not recording Message-ID key %s",
                            DEDUP_CAP, kv(key))
                return
        self._received[key] = received_at

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



# -- claims ----------------------------------------------------------------------

# ``struct flock`` on 64-bit Linux (x86_64, aarch64): l_type and l_whence (short),
# padding, l_start and l_len (off_t), l_pid (int, 0 for OFD locks), padding.
_FLOCK = struct.Struct("=hh4xqqi4x")


def claim_offset(key: str) -> int:
    """The byte of the claims file whose lock claims ``key``: 62 bits of it, so that
    start + length always fits in a signed ``off_t``."""
    return int(key[:16], 16) >> 2


def _ofd_lock(fd: int, command: int, lock_type: int, start: int, length: int) -> bool:
    """One ``fcntl`` OFD lock request; False when a non-blocking one meets a holder."""
    try:
        fcntl.fcntl(fd, command, _FLOCK.pack(lock_type, os.SEEK_SET, start, length, 0))
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held elsewhere
        if command != fcntl.F_OFD_SETLK:
            raise
        return False
    return True


def try_claim(claims_fd: int, key: str) -> bool:
    """Claim ``key``; False when another delivery (any process, any thread) holds it."""
    return _ofd_lock(claims_fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, claim_offset(key), 1)


def wait_for_claim(claims_fd: int, key: str) -> None:
    """Block until whoever holds ``key``'s claim lets go (stored, failed or died)."""
    offset = claim_offset(key)
    _ofd_lock(claims_fd, fcntl.F_OFD_SETLKW, fcntl.F_WRLCK, offset, 1)
    _ofd_lock(claims_fd, fcntl.F_OFD_SETLKW, fcntl.F_UNLCK, offset, 1)


def try_claim_all(claims_fd: int) -> bool:
    """Lock the whole claims file: True only while no delivery anywhere holds a claim."""
    return _ofd_lock(claims_fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, 0, 0)


def release_claims(claims_fd: int) -> None:
    """Drop every claim taken through ``claims_fd``."""
    _ofd_lock(claims_fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, 0, 0)


def close_claims(claims_fd: int) -> None:
    """Drop the claims, then the descriptor (closing alone would not drop them while a
    child forked meanwhile still shares the descriptor, until it execs)."""
    try:
        release_claims(claims_fd)
    finally:
        os.close(claims_fd)


# -- the stored log --------------------------------------------------------------


def _parse_log(data: bytes) -> list[tuple[str, int]]:
    """``(key, unix seconds)`` of each well-formed line; anything else is skipped."""
    entries = []
    for line in data.split(b"\n"):
        key, _, seconds = line.partition(b" ")
        if len(key) != 32:
            continue
        try:
            entries.append((key.decode("ascii"), int(seconds)))
        except ValueError:
            continue
    return entries


class StoredLog:
    """One mailbox's stored log as this process reads and appends it.

    ``read_new`` and ``compact`` run under the mailbox lock. ``append`` runs
    outside it, by a delivery that holds its claim: compaction waits until no
    claim is held (``try_claim_all``), so it never replaces the file under an
    append. Call every method under the mailbox's thread lock.
    """

    def __init__(self, data_dir: Path, mailbox: str) -> None:
        self.data_dir = data_dir
        self.name = f"{mailbox}.stored"
        self.path = str(data_dir / LOCK_DIR / self.name)
        self.size = 0  # of the file as last seen
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._offset = 0  # read up to here (always the end of a line)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = self._inode = None
        self._offset = self.size = 0

    def _adopt(self, fd: int, offset: int) -> None:
        self.close()
        held = os.fstat(fd)
        self._fd, self._inode = fd, (held.st_dev, held.st_ino)
        self._offset, self.size = offset, held.st_size

    def read_new(self) -> list[tuple[str, int]]:
        """The entries appended since the last call, all of them if the file was replaced."""
        try:
            on_disk = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            self.close()
            return []
        if (on_disk.st_dev, on_disk.st_ino) != self._inode:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                self.close()
                return []
            self._adopt(fd, 0)
        else:
            self.size = on_disk.st_size
            if self.size < self._offset:  # cut short by hand: read it again
                self._offset = 0
        if self.size <= self._offset:
            return []
        assert self._fd is not None
        data = os.pread(self._fd, self.size - self._offset, self._offset)
        complete = data.rfind(b"\n") + 1  # a line still being appended waits for next time
        self._offset += complete
        return _parse_log(data[:complete])

    def append(self, key: str, seconds: int) -> None:
        """Record a durable store (no fsync: a lost line can only cause a second copy)."""
        if self._fd is None:
            self._adopt(open_lock_dir_file(self.data_dir, self.name, os.O_RDWR | os.O_APPEND),
                        0)
        assert self._fd is not None
        line = f"{key} {seconds}\n".encode("ascii")
        os.write(self._fd, line)
        end = os.lseek(self._fd, 0, os.SEEK_CUR)
        if end - len(line) == self._offset:  # nothing unread before it: no need to read it back
            self._offset = end

    def compact(self, keep_after: int) -> int:
        """Replace the file with its entries newer than ``keep_after`` (call right after
        ``read_new``, holding the mailbox lock and every claim); returns how many went."""
        if self._fd is None:
            return 0
        entries = _parse_log(os.pread(self._fd, self.size, 0))
        kept = b"".join(f"{key} {seconds}\n".encode("ascii")
                        for key, seconds in entries if seconds > keep_after)
        temp = f"{self.name}.new"
        fd = open_lock_dir_file(self.data_dir, temp, os.O_RDWR | os.O_APPEND | os.O_TRUNC)
        try:
            write_all(fd, kept)
            os.rename(self.data_dir / LOCK_DIR / temp, self.path)
        except BaseException:
            os.close(fd)
            raise
        self._adopt(fd, len(kept))
        return len(entries) - kept.count(b"\n")


# -- what the processes share ------------------------------------------------------

STORED_LOG_LIMIT = 1 << 20
COMPACT_EVERY_SECS = 3600.0


class SharedDedup:
    """The claims and stored logs of one data dir's mailboxes, as this process uses them.

    Call ``catch_up`` and ``compact_if_due`` under the mailbox lock, ``note_stored``
    under the mailbox's thread lock while holding the claim.
    """

    def __init__(self, data_dir: Path, stored_log_limit: int = STORED_LOG_LIMIT) -> None:
        self.data_dir = data_dir
        self.stored_log_limit = stored_log_limit
        self._logs: dict[str, StoredLog] = {}
        self._last_compaction: dict[str, float] = {}

    def _log(self, mailbox: str) -> StoredLog:
        stored_log = self._logs.get(mailbox)
        if stored_log is None:
            stored_log = self._logs[mailbox] = StoredLog(self.data_dir, mailbox)
        return stored_log

    def open_claims(self, mailbox: str) -> int:
        """A descriptor of the mailbox's claims file for one delivery's claims."""
        return open_lock_dir_file(self.data_dir, f"{mailbox}.claims")

    def catch_up(self, mailbox: str, index: DedupIndex,
                 now: datetime.datetime | None = None) -> None:
        """Feed ``index`` what the other processes (and threads) stored since last time."""
        entries = self._log(mailbox).read_new()
        if entries:
            now = now or _utcnow()
            for key, seconds in entries:
                index.record_key(key, datetime.datetime.fromtimestamp(seconds, datetime.UTC),
                                 now)

    def note_stored(self, mailbox: str, key: str, received_at: datetime.datetime) -> None:
        try:
            self._log(mailbox).append(key, int(received_at.timestamp()))
        except OSError as exc:
            log.warning("could not add to %s: %s; another process may store a later copy",
                        kv(self._log(mailbox).path), exc)

    def compact_if_due(self, mailbox: str, claims_fd: int, now: float | None = None) -> None:
        """Rewrite the stored log without its expired entries once it outgrows the limit,
        at most hourly; put off while any delivery holds a claim. Also removes the
        per-Message-ID marker dir of earlier versions."""
        now = time.time() if now is None else now
        if now - self._last_compaction.get(mailbox, 0.0) < COMPACT_EVERY_SECS:
            return
        stored_log = self._log(mailbox)
        if stored_log.size > self.stored_log_limit:
            if not try_claim_all(claims_fd):
                return  # a store is in flight (it may be appending): try again next delivery
            try:
                dropped = stored_log.compact(int(now - DEDUP_WINDOW.total_seconds()))
            except OSError as exc:  # the log keeps growing; no delivery fails for it
                log.warning("could not compact %s: %s", kv(stored_log.path), exc)
            else:
                log.info("compacted %s: %d expired entries dropped", kv(stored_log.path),
                         dropped)
            finally:
                release_claims(claims_fd)
        self._last_compaction[mailbox] = now
        old_markers = self.data_dir / LOCK_DIR / f"{mailbox}.ids"
        if os.path.lexists(old_markers):
            shutil.rmtree(old_markers, ignore_errors=True)
