"""Atomic durable writes: a temp name, fsync, rename into place, fsync the directory.

Readers only ever see complete files: every write goes to a dot-prefixed temp
name first and is renamed into place, and every reader skips dot-names. A crash
leaves at most temp files and staging dirs, which ``cleanup_temp_files`` removes
at start-up. Files are created through directory descriptors (``safefs``) and,
as root, handed to the mailbox owner. Blocking.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from aimx.logs import kv, logger
from aimx.storage import safefs

log = logger("aimx::storage")


# Test seam: sleep this many seconds between writing a temp file and renaming it,
# so a test can kill the writer at the one moment a crash is most interesting.
PAUSE_ENV = "AIMX_TEST_PAUSE_BEFORE_RENAME"

_TEMP_NAME = re.compile(r"^\..+\.tmp\.[0-9a-f]+$")


def is_root() -> bool:
    return os.geteuid() == 0


def apply_owner(fd: int, ids: tuple[int, int] | None, mode: int, label: str) -> None:
    """fchown (root only) then fchmod; failures are warnings because the mail matters more."""
    if ids is not None and is_root():
        try:
            os.fchown(fd, *ids)
        except OSError as exc:
            log.warning("chown failed path=%s uid=%d error=%s", kv(label), ids[0], kv(exc))
    try:
        os.fchmod(fd, mode)
    except OSError as exc:
        log.warning("chmod failed path=%s mode=%o error=%s", kv(label), mode, kv(exc))


def temp_name(final_name: str) -> str:
    return f".{final_name}.tmp.{secrets.token_hex(6)}"


def pause_before_rename() -> None:
    value = os.environ.get(PAUSE_ENV)
    if value:
        time.sleep(float(value))


def write_file(dir_fd: int, name: str, data: bytes, ids: tuple[int, int] | None,
                label: str, mode: int = 0o600) -> os.stat_result:
    """Create ``name`` in ``dir_fd`` exclusively (owned, ``mode``), write everything, fsync."""
    return safefs.create_file_at(dir_fd, name, data, mode=mode,
                                 prepare=lambda fd: apply_owner(fd, ids, mode, label))


def remove_quietly(dir_fd: int, name: str, label: str) -> None:
    try:
        safefs.remove_at(dir_fd, name)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove temp path=%s error=%s", kv(label), kv(exc))


def publish_file(dir_fd: int, name: str, data: bytes, ids: tuple[int, int] | None, *,
                 label: str, mode: int = 0o600) -> None:
    """Atomically place ``data`` at ``name`` in the directory ``dir_fd``: temp, fsync, rename,
    fsync the dir. ``label`` names the file in log lines.

    The rename replaces an existing file, so callers reserve ``name`` under
    the mailbox lock first (or mean to replace, as the read-state rewrite does).
    """
    temp = temp_name(name)
    try:
        write_file(dir_fd, temp, data, ids, label, mode)
        pause_before_rename()
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        remove_quietly(dir_fd, temp, label)
        raise
    safefs.fsync_fd(dir_fd)


def stage_bundle(
    dir_fd: int,
    stem: str,
    markdown: bytes,
    files: Sequence[tuple[str, bytes]],
    ids: tuple[int, int] | None,
    label: str,
) -> tuple[str, os.stat_result]:
    """Build a complete bundle in a dot-named staging dir of ``dir_fd`` (every file and the
    dir fsync'd); returns the staging dir's name and ``fstat``.

    The files are created through the staging dir's own descriptor, checked to
    be the dir this call made: whatever the owner renames or plants under the
    staging name meanwhile, nothing is written anywhere else.
    """
    staging = temp_name(stem)
    try:
        os.mkdir(staging, 0o700, dir_fd=dir_fd)
        with safefs.closing_fd(safefs.open_dir_at(dir_fd, staging)) as staging_fd:
            made = os.fstat(staging_fd)
            if made.st_uid != os.geteuid():
                raise safefs.UnsafeFileError(errno.EPERM, f"staging dir {label} was replaced")
            apply_owner(staging_fd, ids, 0o700, label)
            for name, data in files:
                write_file(staging_fd, name, data, ids, label)
            write_file(staging_fd, f"{stem}.md", markdown, ids, label)
            safefs.fsync_fd(staging_fd)
    except BaseException:
        remove_quietly(dir_fd, staging, label)
        raise
    return staging, made


def cleanup_temp_files(data_dir: str | os.PathLike[str]) -> int:
    """Remove temp files and staging dirs a crash left behind; returns how many.

    Called at daemon start, before anything writes. Looks in the data dir,
    every mailbox dir and every bundle dir, each through its descriptor; never
    follows symlinks.
    """
    data = Path(data_dir)
    removed = 0

    def sweep(dir_fd: int, label: str, depth: int) -> None:
        nonlocal removed
        try:
            entries = list(os.scandir(dir_fd))
        except OSError:
            return
        for entry in entries:
            where = f"{label}/{entry.name}"
            if _TEMP_NAME.match(entry.name):
                remove_quietly(dir_fd, entry.name, where)
                removed += 1
            elif depth > 0 and not entry.name.startswith(".") and entry.is_dir(
                follow_symlinks=False
            ):
                try:
                    child = safefs.open_dir_at(dir_fd, entry.name)
                except OSError:
                    continue
                with safefs.closing_fd(child):
                    sweep(child, where, depth - 1)

    # The data dir itself, mailbox dirs then bundle dirs, hook bookkeeping (pending
    # markers are written via a temp) and the spool of large messages.
    for relative, depth in ((".", 0), ("inbox", 2), ("sent", 2), (".aimx", 1), (".spool", 0)):
        try:
            fd = safefs.open_trusted_dir(data / relative)
        except OSError:
            continue
        with safefs.closing_fd(fd):
            sweep(fd, str(data / relative), depth)
    if removed:
        log.info("removed %d stale temp file(s) under %s", removed, kv(str(data)))
    return removed
