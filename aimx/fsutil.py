"""Durable file replacement, the one way aimx writes small files it must not lose.

Every config rewrite, key, certificate, unit file and bookkeeping marker goes
through ``write_atomic``: a dot-named temp file beside the target, created with
the final mode (a private key is never readable by others, not even for an
instant), fsync'd, renamed over the target, then the directory fsync'd. A crash
leaves the old file or the new one, never a mix. Mail files have their own
publish path in ``aimx.storage.atomic`` (bundles, name reservation under a lock).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may take less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(directory: os.PathLike[str] | str) -> None:
    """Make a rename or create inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: os.PathLike[str] | str, data: bytes, mode: int, *,
                 owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data`` (file ``mode``, optional ``(uid, gid)``) durably.

    The temp file is ``.<name>.tmp.<pid>`` in the same directory and is removed
    on any failure; ``OSError`` propagates so callers can word the message.
    """
    target = Path(path)
    temp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)  # left by an earlier process that had our pid and crashed
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode & 0o600)
    try:
        try:
            if owner is not None and tuple(owner) != (os.fstat(fd).st_uid, os.fstat(fd).st_gid):
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # after chown (which clears set-id bits); umask-proof
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_dir(target.parent)
