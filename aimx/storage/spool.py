"""Root-only scratch files for mail too large to hold in memory.

A message being received, an attachment being decoded and a DKIM body being
canonicalised each go to a file in ``<data>/.spool/`` (the daemon's own 0700
directory, never one a user can write). A file is created exclusively without
following links and unlinked at once: only its descriptor keeps it, so it
vanishes when closed, whether the transaction ends, the client drops or the
process dies. A crash between create and unlink leaves a temp-named file that
the start-up sweep (``atomic.cleanup_temp_files``) removes.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from aimx.fsutil import write_all
from aimx.storage import safefs

SPOOL_DIR = ".spool"
READ_CHUNK = 1 << 20
#: A message is held in memory up to this size, beyond it in a spool file.
SPOOL_THRESHOLD = 256 * 1024


def open_spool_dir(data_dir: str | os.PathLike[str]) -> int:
    """A descriptor of ``<data>/.spool``, made 0700 and this process's if missing.

    Refuses a link, or a directory owned by anyone else; tightens its mode.
    """
    data_fd = safefs.open_trusted_dir(data_dir)
    with safefs.closing_fd(data_fd):
        with contextlib.suppress(FileExistsError):
            os.mkdir(SPOOL_DIR, 0o700, dir_fd=data_fd)
        fd = safefs.open_dir_at(data_fd, SPOOL_DIR)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise safefs.UnsafeFileError(errno.EPERM, f"{Path(data_dir) / SPOOL_DIR} is not ours")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.fchmod(fd, 0o700)
    return fd


class SpoolFile:
    """An anonymous scratch file: append, then read back, copy or map; ``close`` frees it.

    ``len()`` is the bytes written. Not thread-safe: one owner at a time.
    """

    def __init__(self, spool_fd: int) -> None:
        name = f".msg.tmp.{secrets.token_hex(8)}"
        self.fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600, dir_fd=spool_fd)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=spool_fd)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"<SpoolFile {self.size} bytes>"

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            self.size += written
            view = view[written:]

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer only at the end)."""
        return os.pread(self.fd, max(0, min(length, self.size - offset)), offset)

    def chunks(self, start: int = 0, end: int | None = None,
               size: int = READ_CHUNK) -> Iterator[bytes]:
        """The bytes of ``[start, end)`` in pieces of at most ``size``."""
        stop = self.size if end is None else min(end, self.size)
        position = start
        while position < stop:
            piece = os.pread(self.fd, min(size, stop - position), position)
            if not piece:
                return
            position += len(piece)
            yield piece

    def copy_to(self, fd: int) -> None:
        """Append the whole content to ``fd`` in the kernel (no copy through this process)."""
        offset = 0
        while offset < self.size:
            try:
                sent = os.copy_file_range(self.fd, fd, self.size - offset, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                sent = 0
            if sent == 0:  # not supported here: plain reads and writes
                for piece in self.chunks(offset):
                    write_all(fd, piece)
                return
            offset += sent

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Spool:
    """The spool directory of one data dir; makes :class:`SpoolFile` s (from any thread)."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def new_file(self) -> SpoolFile:
        with self._lock:
            if self._fd is None:
                self._fd = open_spool_dir(self.data_dir)
            try:
                return SpoolFile(self._fd)
            except FileNotFoundError:  # the directory was removed under us: make it again
                os.close(self._fd)
                self._fd = None
                self._fd = open_spool_dir(self.data_dir)
                return SpoolFile(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_message(stream: BinaryIO, new_file: Callable[[], SpoolFile]) -> bytes | SpoolFile:
    """All of ``stream``: as bytes up to ``SPOOL_THRESHOLD``, beyond it in a spool file
    from ``new_file`` (the caller's to close), so a large message never sits in memory.

    Spooling only saves memory: when no spool file can be made or written (the
    data dir is not this process's, the disk is full, a file size limit), the
    message is read into memory as a whole, as it would be without a spool.
    """
    kept: list[bytes] = []
    size = 0
    while piece := stream.read(READ_CHUNK):
        kept.append(piece)
        size += len(piece)
        if size > SPOOL_THRESHOLD:
            break
    else:
        return b"".join(kept)
    pieces = itertools.chain(kept, iter(lambda: stream.read(READ_CHUNK), b""))
    try:
        spool = new_file()
    except OSError:
        return b"".join(pieces)
    for piece in pieces:
        written = spool.size
        try:
            spool.write(piece)
        except OSError:
            earlier = b"".join(spool.chunks(0, written))
            spool.close()
            return b"".join([earlier, piece, *pieces])
    return spool
