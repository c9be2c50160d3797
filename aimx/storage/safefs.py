"""File access for a root process working inside directories that other users own.

A mailbox dir belongs to its owner, who may rename, replace or symlink any
entry in it at any moment. A root process that opens ``<mailbox>/<id>/<id>.md``
by path follows whatever the owner planted there, so nothing here resolves a
path through such a directory. Instead:

* a *trusted* directory (the data dir, ``inbox/``, ``sent/``: root's own, not
  writable by anyone else) is opened by path, and checked to be root's when
  running as root;
* every name below it is opened relative to its parent's descriptor with
  ``O_NOFOLLOW`` (``O_DIRECTORY`` for directories), so a symlink anywhere in
  the walk fails with ``ELOOP`` instead of being followed;
* a file is read only after ``fstat`` on its descriptor says it is a regular
  file with one link, owned by an expected user, no larger than the limit, and
  the read itself stops at the limit;
* writes, renames and removals name the entry relative to a directory
  descriptor, so they land in the directory that was opened, wherever its owner
  has moved it since.

Every function blocks (disk I/O); call them off the reactor thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Collection, Iterator

from aimx.fsutil import write_all

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted under a file's name must not hang the opener;
# O_NOCTTY: nor may a terminal become our controlling one.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_READ_CHUNK = 1024 * 1024


class UnsafeFileError(OSError):
    """A path or file aimx refuses to touch: not what its own writes would have left there."""


def _parts(relpath: str) -> list[str]:
    """The components of a relative path; anything that could climb or is empty is refused."""
    parts = relpath.split("/")
    if not relpath or any(part in ("", ".", "..") or "\0" in part for part in parts):
        raise UnsafeFileError(errno.EINVAL, f"not a plain relative path: {relpath!r}")
    return parts


def open_trusted_dir(path: str | os.PathLike[str]) -> int:
    """Open a directory only root may change (data dir, ``inbox/``, ``sent/``) by path.

    As root, a directory that someone else owns or may write is refused: a
    walk from it would not be safe.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if os.geteuid() == 0:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o022:
            os.close(fd)
            raise UnsafeFileError(errno.EPERM, f"{os.fspath(path)} may be changed by users "
                                               "other than root; refusing to work below it")
    return fd


def open_dir_at(dir_fd: int, relpath: str) -> int:
    """Open the directory ``relpath`` below ``dir_fd``, following no symlink on the way."""
    fd = dir_fd
    try:
        for part in _parts(relpath):
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = child
    except BaseException:
        if fd != dir_fd:
            os.close(fd)
        raise
    return fd


def open_file_at(dir_fd: int, relpath: str, flags: int = FILE_FLAGS) -> int:
    """Open ``relpath`` below ``dir_fd`` with ``flags``, following no symlink on the way."""
    head, _, name = relpath.rpartition("/")
    _parts(name)
    parent = open_dir_at(dir_fd, head) if head else dir_fd
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    finally:
        if parent != dir_fd:
            os.close(parent)


def open_dir_beneath(root: str | os.PathLike[str], relpath: str) -> int:
    """Open ``root/relpath``: ``root`` trusted (see :func:`open_trusted_dir`), the rest walked."""
    root_fd = open_trusted_dir(root)
    try:
        return open_dir_at(root_fd, relpath)
    finally:
        os.close(root_fd)


@contextlib.contextmanager
def closing_fd(fd: int) -> Iterator[int]:
    """Close ``fd`` when the block ends."""
    try:
        yield fd
    finally:
        os.close(fd)


def check_regular(fd: int, *, owners: Collection[int], limit: int | None,
                  label: str = "") -> os.stat_result:
    """The ``fstat`` of ``fd`` if it is a file aimx could have written; else ``UnsafeFileError``.

    A regular file (not a device, FIFO or directory), with exactly one link (a
    hard link to a file elsewhere is not the owner's to hand over), owned by
    one of ``owners``, and no larger than ``limit`` bytes when one is given.
    """
    st = os.fstat(fd)
    what = label or "file"
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(errno.EINVAL, f"{what} is not a regular file")
    if st.st_nlink != 1:
        raise UnsafeFileError(errno.EMLINK, f"{what} has {st.st_nlink} links")
    if st.st_uid not in owners:
        raise UnsafeFileError(errno.EPERM, f"{what} is owned by uid {st.st_uid}")
    if limit is not None and st.st_size > limit:
        raise UnsafeFileError(errno.EFBIG, f"{what} is {st.st_size} bytes, over {limit}")
    return st


def read_bounded(fd: int, limit: int, *, offset: int = 0) -> bytes:
    """Everything from ``offset`` to the end of ``fd``, refusing (``EFBIG``) past ``limit`` bytes.

    Reads with ``pread``, so the descriptor's position is never used or moved
    (several readers may share one descriptor).
    """
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.pread(fd, min(_READ_CHUNK, limit + 1 - total), offset + total)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise UnsafeFileError(errno.EFBIG, f"file grew past {limit} bytes while read")


def owners_of(dir_fd: int) -> frozenset[int]:
    """Who may own files in the directory ``dir_fd``: this process and the directory's owner."""
    return frozenset((os.geteuid(), os.fstat(dir_fd).st_uid))


def create_file_at(dir_fd: int, name: str, data: bytes, *, mode: int = 0o600,
                   prepare: Callable[[int], None] | None = None) -> os.stat_result:
    """Create ``name`` in ``dir_fd`` exclusively (never through a link), write and fsync it.

    ``prepare(fd)``, when given, runs before the first byte is written and sets
    the owner and ``mode`` itself; otherwise ``mode`` is set here. The file is
    removed again if anything fails. Returns its ``fstat`` (see :func:`is_entry`).
    """
    _parts(name)
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode & 0o600, dir_fd=dir_fd)
    try:
        if prepare is not None:
            prepare(fd)
        else:
            os.fchmod(fd, mode)  # umask-proof
        copy_to = getattr(data, "copy_to", None)
        if copy_to is not None:  # a spooled file (``spool.SpoolFile``): copied in the kernel
            copy_to(fd)
        else:
            write_all(fd, data)
        os.fsync(fd)
        return os.fstat(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)


def remove_at(dir_fd: int, name: str) -> None:
    """Remove the entry ``name`` of ``dir_fd``; a directory with all it holds, never via a link."""
    _parts(name)
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # descriptor-based: refuses to follow links
    else:
        os.unlink(name, dir_fd=dir_fd)


def lexists_at(dir_fd: int, name: str) -> bool:
    """Whether ``dir_fd`` has an entry ``name`` (of any type, a dangling link too)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def is_entry(dir_fd: int, name: str, made: os.stat_result) -> bool:
    """Whether ``name`` in ``dir_fd`` is still the file or dir ``made`` describes (not a
    link or anything else put in its place)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (made.st_dev, made.st_ino)


def fsync_fd(fd: int) -> None:
    """Make the creates and renames in the directory ``fd`` durable."""
    os.fsync(fd)
