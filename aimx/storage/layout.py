"""The data directory: folders, mailbox dirs and their owners, the README.

``<data>/<inbox|sent>/<mailbox>/`` holds one mailbox's emails. Mailbox dirs are
the owner's, mode 0700; the dirs above them are root's, so everything inside a
mailbox is reached through a descriptor opened from a parent the owner cannot
change. Blocking.
"""

from __future__ import annotations

import functools
import os
import stat
import time
from pathlib import Path

from aimx.config import owner_ids
from aimx.fsutil import fsync_dir
from aimx.logs import kv, logger
from aimx.storage import safefs
from aimx.storage.atomic import apply_owner, is_root, publish_file

log = logger("aimx::storage")


FOLDERS = ("inbox", "sent")
README_NAME = "README.md"
LOCK_DIR = ".locks"  # root-only: mailbox locks and Message-ID dedup state
README_MARKER = "<!-- aimx-readme-version: 1 -->"
README_TEMPLATE = Path(__file__).parents[1] / "data" / "README.md.tmpl"


class StorageError(Exception):
    """A storage failure with a daemon error code (``NOTFOUND``, ``IO``) and a reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def mailbox_dir(data_dir: str | os.PathLike[str], folder: str, mailbox: str) -> Path:
    """``<data>/<folder>/<mailbox>``; ``folder`` is ``inbox`` or ``sent``."""
    if folder not in FOLDERS:
        raise ValueError(f"unknown folder {folder!r}")
    if isinstance(data_dir, str | Path):
        return _mailbox_dir(data_dir, folder, mailbox)
    return Path(data_dir) / folder / mailbox


@functools.lru_cache(maxsize=1024)
def _mailbox_dir(data_dir: str | Path, folder: str, mailbox: str) -> Path:
    """The path of a mailbox dir, built once per (data dir, folder, mailbox): every
    delivery asks for it several times, and a ``Path`` never changes."""
    return Path(data_dir) / folder / mailbox


_OWNER_TTL = 5.0
_owner_cache: dict[str, tuple[float, tuple[int, int] | None]] = {}


def mailbox_owner_ids(owner: str | None) -> tuple[int, int] | None:
    """(uid, primary gid) of a mailbox owner; ``None`` when absent or unknown.

    Remembered for a few seconds: a user database lookup per message is a
    measurable cost under load, and account changes are rare.
    """
    if not owner:
        return None
    now = time.monotonic()
    cached = _owner_cache.get(owner)
    if cached is not None and cached[0] > now:
        return cached[1]
    ids = owner_ids(owner)
    if ids is not None:  # an unknown owner is asked again: it may be created any moment
        _owner_cache[owner] = (now + _OWNER_TTL, ids)
    return ids


def warn_unknown_owner(owner: str | None, ids: tuple[int, int] | None) -> None:
    if ids is None and is_root():
        log.warning("owner %s does not resolve; files stay owned by root", kv(owner or ""))


def make_dir(path: Path, mode: int) -> bool:
    """mkdir with an explicit mode (umask-proof) and a durable parent entry; False if it existed."""
    try:
        path.mkdir()
    except FileExistsError:
        return False
    os.chmod(path, mode)
    fsync_dir(path.parent)
    return True


def ensure_data_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Create the data dir if needed, 0755: the daemon's umask 077 would lock owners out."""
    data = Path(data_dir)
    if not data.is_dir():
        data.parent.mkdir(parents=True, exist_ok=True)
        make_dir(data, 0o755)
    return data


def open_lock_dir_file(data_dir: Path, name: str, flags: int = os.O_RDWR) -> int:
    """Open (creating, 0600) ``<data>/.locks/<name>``, making the root-only dir when missing.

    Never follows a symlink and never leaks into a child process.
    """
    path = f"{data_dir}/{LOCK_DIR}/{name}"
    flags |= os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        ensure_data_dir(data_dir)
        make_dir(data_dir / LOCK_DIR, 0o700)
        return os.open(path, flags, 0o600)


def open_mailbox_dir(directory: str | os.PathLike[str]) -> int:
    """A descriptor of a mailbox dir, opened from its root-owned parent without following links.

    Everything aimx does inside a mailbox goes through this descriptor (see
    ``aimx.storage.safefs``): the owner may rearrange the dir's entries at will, but
    never the dir itself, whose entry lives in root's ``inbox/`` or ``sent/``.
    """
    path = Path(directory)
    return safefs.open_dir_beneath(path.parent, path.name)


def mailbox_dir_fd(data_dir: str | os.PathLike[str], folder: str, mailbox: str,
                ids: tuple[int, int] | None, *, repair: bool = False) -> int:
    """The mailbox dir's descriptor, created if missing; owner and 0700 set when they differ
    (or always, with ``repair``), through the descriptor."""
    path = mailbox_dir(data_dir, folder, mailbox)
    try:
        fd = open_mailbox_dir(path)
        created = False
    except FileNotFoundError:
        data = ensure_data_dir(data_dir)
        make_dir(data / folder, 0o755)
        with safefs.closing_fd(safefs.open_trusted_dir(data / folder)) as folder_fd:
            try:
                os.mkdir(mailbox, 0o700, dir_fd=folder_fd)
                created = True
            except FileExistsError:
                created = False
            fd = safefs.open_dir_at(folder_fd, mailbox)
            if created:
                safefs.fsync_fd(folder_fd)
    try:
        st = os.fstat(fd)
        if (repair or created or stat.S_IMODE(st.st_mode) != 0o700
                or (ids is not None and is_root() and (st.st_uid, st.st_gid) != ids)):
            apply_owner(fd, ids, 0o700, str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_mailbox_dir(
    data_dir: str | os.PathLike[str], folder: str, mailbox: str, ids: tuple[int, int] | None
) -> Path:
    """Create ``<folder>/`` (0755) and the mailbox dir if missing; (re-)apply owner and 0700."""
    os.close(mailbox_dir_fd(data_dir, folder, mailbox, ids, repair=True))
    return mailbox_dir(data_dir, folder, mailbox)


def readme_text() -> str:
    return README_TEMPLATE.read_text(encoding="utf-8")


def write_readme(data_dir: str | os.PathLike[str], force: bool = False) -> bool:
    """(Re)write ``<data>/README.md`` when missing, empty or stale; returns whether written.

    Stale means its first line, trimmed, is not the current version marker.
    A current README is left alone (same mtime) so agents' watchers stay quiet.
    """
    path = Path(data_dir) / README_NAME
    if not force:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                first = handle.readline().strip()
        except FileNotFoundError:
            first = ""
        if first == README_MARKER:
            return False
    text = readme_text()
    ensure_data_dir(data_dir)
    with safefs.closing_fd(safefs.open_trusted_dir(data_dir)) as dir_fd:
        publish_file(dir_fd, README_NAME, text.encode("utf-8"), None,
                     label=str(Path(data_dir) / README_NAME), mode=0o644)
    return True
