"""The data directory: layout, naming, atomic durable writes, locks, dedup, listing, read state.

Everything here blocks (disk I/O, ``fsync``, ``flock``), so the daemon calls
it from threads; ``aimx ingest`` calls it directly. Readers (MCP, listing,
hooks) only ever see complete files: every write goes to a dot-prefixed temp
name first and is renamed into place, and every reader skips dot-names.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import io
import json
import os
import re
import secrets
import stat
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from aimx.config import owner_ids
from aimx.fsutil import fsync_dir
from aimx.logs import kv, logger
from aimx.mail import frontmatter
from aimx.mail.message import rfc3339_utc
from aimx.storage import safefs

if TYPE_CHECKING:  # imported when an index is first opened: the daemon may never list
    import sqlite3

log = logger("aimx::storage")

FOLDERS = ("inbox", "sent")
README_NAME = "README.md"
README_MARKER = "<!-- aimx-readme-version: 1 -->"
README_TEMPLATE = Path(__file__).parents[1] / "data" / "README.md.tmpl"

SLUG_MAX_CHARS = 20
ATTACHMENT_NAME_MAX_BYTES = 200
DEDUP_WINDOW = datetime.timedelta(hours=24)
DEDUP_CAP = 100_000
FRONTMATTER_SCAN_LIMIT = 1024 * 1024
#: The largest email file aimx reads whole (MARK-READ, hook stdin). A stored email
#: comes from at most a 25 MiB message or a SEND of two 25 MiB bodies, plus its
#: frontmatter; anything bigger was not written by aimx and is refused, not loaded.
EMAIL_FILE_LIMIT = 64 * 1024 * 1024

# Test seam: sleep this many seconds between writing a temp file and renaming it,
# so a test can kill the writer at the one moment a crash is most interesting.
PAUSE_ENV = "AIMX_TEST_PAUSE_BEFORE_RENAME"

_TEMP_NAME = re.compile(r"^\..+\.tmp\.[0-9a-f]+$")
_READ_TRUE_LINE = re.compile(r"^\s*read\s*=\s*true\s*(#.*)?$")
_DELIMITER = "+++"


class StorageError(Exception):
    """A storage failure with a daemon error code (``NOTFOUND``, ``IO``) and a reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@attrs.frozen
class StoredEmail:
    """Where an email landed; ``fields`` is the frontmatter as written (with ``id``)."""

    id: str
    path: Path
    fields: dict[str, Any] = attrs.field(factory=dict, eq=False)


# ---------------------------------------------------------------------------
# Pure naming helpers


def slugify(subject: str | None) -> str:
    """The filename slug of a subject: lower-case, alphanumerics and single dashes, 20 chars."""
    text = unicodedata.normalize("NFC", subject or "").lower()
    text = "".join(ch if ch.isalnum() else "-" for ch in text)
    text = re.sub(r"-{2,}", "-", text).strip("-")
    text = text[:SLUG_MAX_CHARS].rstrip("-")
    return text or "no-subject"


def stem_prefix(when: datetime.datetime) -> str:
    """``YYYY-MM-DD-HHMMSS`` in UTC; naive datetimes are taken as UTC."""
    if when.tzinfo is not None:
        when = when.astimezone(datetime.UTC)
    return when.strftime("%Y-%m-%d-%H%M%S")


def _is_unsafe_char(ch: str) -> bool:
    code = ord(ch)
    return (
        ch in "/\\"
        or code < 0x20
        or 0x7F <= code <= 0x9F
        or 0x200B <= code <= 0x200F
        or 0x202A <= code <= 0x202E
        or 0x2066 <= code <= 0x2069
        or code == 0xFEFF
        or 0xD800 <= code <= 0xDFFF  # lone surrogates from undecodable header bytes
    )


def _trim_name(text: str, *, start: bool = True) -> str:
    """Strip whitespace, dots, dashes and underscores from the end (and the start)."""
    if start:
        text = re.sub(r"^[\s._-]+", "", text)
    return re.sub(r"[\s._-]+$", "", text)


def sanitize_attachment_name(name: str | None, index: int) -> str:
    """A safe on-disk name for an attachment: no path parts, no controls or bidi tricks.

    Steps of spec 20 §5.3: last ``/`` component, NFC, unsafe characters to
    ``_`` (one per run), trim, cap at 200 UTF-8 bytes, ``attachment-<index>``
    when nothing is left.
    """
    text = (name or "").rsplit("/", 1)[-1]
    text = unicodedata.normalize("NFC", text)
    out: list[str] = []
    in_run = False
    for ch in text:
        if _is_unsafe_char(ch):
            if not in_run:
                out.append("_")
            in_run = True
        else:
            out.append(ch)
            in_run = False
    text = _trim_name("".join(out))
    encoded = text.encode("utf-8")
    if len(encoded) > ATTACHMENT_NAME_MAX_BYTES:
        text = encoded[:ATTACHMENT_NAME_MAX_BYTES].decode("utf-8", errors="ignore")
        text = _trim_name(text, start=False)
    return text or f"attachment-{index}"


def _with_counter(name: str, counter: int) -> str:
    base, dot, ext = name.rpartition(".")
    if dot and base:
        return f"{base}-{counter}.{ext}"
    return f"{name}-{counter}"


def unique_attachment_names(names: Iterable[str], reserved: Iterable[str] = ()) -> list[str]:
    """Make names unique within one bundle: ``notes.txt``, ``notes-1.txt``, ``notes-2.txt``.

    ``reserved`` names (the bundle's own ``<stem>.md``) are never handed out.
    """
    taken = set(reserved)
    result = []
    for name in names:
        candidate, counter = name, 0
        while candidate in taken:
            counter += 1
            candidate = _with_counter(name, counter)
        taken.add(candidate)
        result.append(candidate)
    return result


def check_email_id(email_id: str) -> bool:
    """Whether an id can name an email: not empty, no ``..``, ``/``, ``\\`` or NUL."""
    return bool(email_id) and not any(bad in email_id for bad in ("..", "/", "\\", "\0"))


# ---------------------------------------------------------------------------
# Layout, ownership and low-level durable writes


def mailbox_dir(data_dir: str | os.PathLike[str], folder: str, mailbox: str) -> Path:
    """``<data>/<folder>/<mailbox>``; ``folder`` is ``inbox`` or ``sent``."""
    if folder not in FOLDERS:
        raise ValueError(f"unknown folder {folder!r}")
    return Path(data_dir) / folder / mailbox


_OWNER_TTL = 5.0
_owner_cache: dict[str, tuple[float, tuple[int, int] | None]] = {}


def _owner_ids(owner: str | None) -> tuple[int, int] | None:
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


def _is_root() -> bool:
    return os.geteuid() == 0


def _apply_owner(fd: int, ids: tuple[int, int] | None, mode: int, label: str) -> None:
    """fchown (root only) then fchmod; failures are warnings because the mail matters more."""
    if ids is not None and _is_root():
        try:
            os.fchown(fd, *ids)
        except OSError as exc:
            log.warning("chown failed path=%s uid=%d error=%s", kv(label), ids[0], kv(exc))
    try:
        os.fchmod(fd, mode)
    except OSError as exc:
        log.warning("chmod failed path=%s mode=%o error=%s", kv(label), mode, kv(exc))


def _warn_unknown_owner(owner: str | None, ids: tuple[int, int] | None) -> None:
    if ids is None and _is_root():
        log.warning("owner %s does not resolve; files stay owned by root", kv(owner or ""))


def _make_dir(path: Path, mode: int) -> bool:
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
        _make_dir(data, 0o755)
    return data


def open_mailbox_dir(directory: str | os.PathLike[str]) -> int:
    """A descriptor of a mailbox dir, opened from its root-owned parent without following links.

    Everything aimx does inside a mailbox goes through this descriptor (see
    ``aimx.storage.safefs``): the owner may rearrange the dir's entries at will, but
    never the dir itself, whose entry lives in root's ``inbox/`` or ``sent/``.
    """
    path = Path(directory)
    return safefs.open_dir_beneath(path.parent, path.name)


def _mailbox_fd(data_dir: str | os.PathLike[str], folder: str, mailbox: str,
                ids: tuple[int, int] | None, *, repair: bool = False) -> int:
    """The mailbox dir's descriptor, created if missing; owner and 0700 set when they differ
    (or always, with ``repair``), through the descriptor."""
    path = mailbox_dir(data_dir, folder, mailbox)
    try:
        fd = open_mailbox_dir(path)
        created = False
    except FileNotFoundError:
        data = ensure_data_dir(data_dir)
        _make_dir(data / folder, 0o755)
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
                or (ids is not None and _is_root() and (st.st_uid, st.st_gid) != ids)):
            _apply_owner(fd, ids, 0o700, str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_mailbox_dir(
    data_dir: str | os.PathLike[str], folder: str, mailbox: str, ids: tuple[int, int] | None
) -> Path:
    """Create ``<folder>/`` (0755) and the mailbox dir if missing; (re-)apply owner and 0700."""
    os.close(_mailbox_fd(data_dir, folder, mailbox, ids, repair=True))
    return mailbox_dir(data_dir, folder, mailbox)


def _temp_name(final_name: str) -> str:
    return f".{final_name}.tmp.{secrets.token_hex(6)}"


def _pause_before_rename() -> None:
    value = os.environ.get(PAUSE_ENV)
    if value:
        time.sleep(float(value))


def _write_file(dir_fd: int, name: str, data: bytes, ids: tuple[int, int] | None,
                label: str, mode: int = 0o600) -> os.stat_result:
    """Create ``name`` in ``dir_fd`` exclusively (owned, ``mode``), write everything, fsync."""
    return safefs.create_file_at(dir_fd, name, data, mode=mode,
                                 prepare=lambda fd: _apply_owner(fd, ids, mode, label))


def _remove_quietly(dir_fd: int, name: str, label: str) -> None:
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
    temp = _temp_name(name)
    try:
        _write_file(dir_fd, temp, data, ids, label, mode)
        _pause_before_rename()
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _remove_quietly(dir_fd, temp, label)
        raise
    safefs.fsync_fd(dir_fd)


def _stage_bundle(
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
    staging = _temp_name(stem)
    try:
        os.mkdir(staging, 0o700, dir_fd=dir_fd)
        with safefs.closing_fd(safefs.open_dir_at(dir_fd, staging)) as staging_fd:
            made = os.fstat(staging_fd)
            if made.st_uid != os.geteuid():
                raise safefs.UnsafeFileError(errno.EPERM, f"staging dir {label} was replaced")
            _apply_owner(staging_fd, ids, 0o700, label)
            for name, data in files:
                _write_file(staging_fd, name, data, ids, label)
            _write_file(staging_fd, f"{stem}.md", markdown, ids, label)
            safefs.fsync_fd(staging_fd)
    except BaseException:
        _remove_quietly(dir_fd, staging, label)
        raise
    return staging, made


def _name_taken(dir_fd: int, stem: str) -> bool:
    """Whether ``<stem>.md`` or ``<stem>`` exists (flat and bundle never share an id)."""
    return safefs.lexists_at(dir_fd, stem + ".md") or safefs.lexists_at(dir_fd, stem)


def _allocate_stem(dir_fd: int, base: str) -> str:
    """First free of ``base``, ``base-2``, ``base-3``... (neither ``<stem>.md`` nor ``<stem>``).

    Both names are required free for flat and bundle emails alike, so a flat
    email and a bundle can never share an id.
    """
    return _free_stem(dir_fd, base, frozenset())[0]


def _free_stem(dir_fd: int, base: str, reserved: Set[str], start: int = 1) -> tuple[str, int]:
    """Like :func:`_allocate_stem`, also skipping names ``reserved`` by writes in flight.

    Probing begins at counter ``start`` (a hint from the previous allocation
    with the same base), so a burst of same-subject mail within one second
    costs one probe each instead of one per earlier message. Returns the stem
    and its counter.
    """
    counter = start
    while True:
        stem = base if counter == 1 else f"{base}-{counter}"
        if stem not in reserved and not _name_taken(dir_fd, stem):
            return stem, counter
        counter += 1


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
                _remove_quietly(dir_fd, entry.name, where)
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

    # The data dir itself, mailbox dirs then bundle dirs, and hook bookkeeping
    # (pending markers are written via a temp).
    for relative, depth in ((".", 0), ("inbox", 2), ("sent", 2), (".aimx", 1)):
        try:
            fd = safefs.open_trusted_dir(data / relative)
        except OSError:
            continue
        with safefs.closing_fd(fd):
            sweep(fd, str(data / relative), depth)
    if removed:
        log.info("removed %d stale temp file(s) under %s", removed, kv(str(data)))
    return removed


# ---------------------------------------------------------------------------
# Strict lookup and cheap listing


def _locate(mailbox_fd: int, email_id: str) -> str | None:
    """Where email ``email_id`` is inside the mailbox dir ``mailbox_fd``, without following links.

    ``<id>.md`` must be a regular file; if that name exists as anything else the
    lookup fails without trying the bundle. Otherwise ``<id>/<id>.md`` inside a
    real directory. Returns the path relative to the mailbox dir, or None.
    """
    if not check_email_id(email_id):
        return None
    flat = f"{email_id}.md"
    try:
        st = os.stat(flat, dir_fd=mailbox_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    except OSError:
        return None
    if st is not None:
        return flat if stat.S_ISREG(st.st_mode) else None
    try:
        with safefs.closing_fd(safefs.open_dir_at(mailbox_fd, email_id)) as bundle_fd:
            st = os.stat(flat, dir_fd=bundle_fd, follow_symlinks=False)
    except OSError:
        return None
    return f"{email_id}/{flat}" if stat.S_ISREG(st.st_mode) else None


def resolve_email_path(directory: str | os.PathLike[str], email_id: str) -> Path | None:
    """The ``.md`` of an email, or ``None``; symlinks and escapes never resolve.

    See :func:`_locate` for the rules; the result is the path below ``directory``.
    """
    if not check_email_id(email_id):
        return None
    try:
        with safefs.closing_fd(open_mailbox_dir(directory)) as mailbox_fd:
            relative = _locate(mailbox_fd, email_id)
    except OSError:
        return None
    return Path(directory) / relative if relative is not None else None


def open_stored_email(path: str | os.PathLike[str], folder: str, mailbox: str) -> int:
    """A checked read descriptor of the email file ``path`` of ``<folder>/<mailbox>``.

    When ``path`` lies in a dir named ``<folder>/<mailbox>`` (flat or in a bundle) it
    is walked from that dir's root-owned parent without following links; any other
    path (a file outside the data layout) is opened in its parent dir, which must be
    root's. The file must pass ``safefs.check_regular`` with the email file limit.
    Raises ``OSError``.
    """
    email = Path(path)
    for directory in (email.parent, email.parent.parent):
        if directory.name == mailbox and directory.parent.name == folder:
            with safefs.closing_fd(open_mailbox_dir(directory)) as mailbox_fd:
                relative = str(email.relative_to(directory))
                return _open_email(mailbox_fd, relative, EMAIL_FILE_LIMIT, str(email))[0]
    with safefs.closing_fd(safefs.open_trusted_dir(email.parent)) as parent_fd:
        return _open_email(parent_fd, email.name, EMAIL_FILE_LIMIT, str(email))[0]


def read_stored_email(fd: int) -> bytes:
    """The whole content of a descriptor from :func:`open_stored_email`, bounded by the limit."""
    return safefs.read_bounded(fd, EMAIL_FILE_LIMIT)


@contextlib.contextmanager
def _mailbox_or_none(directory: str | os.PathLike[str]) -> Iterator[int | None]:
    """The mailbox dir's descriptor for reading, or None when it cannot be opened (missing)."""
    try:
        fd = open_mailbox_dir(directory)
    except OSError:
        yield None
        return
    with safefs.closing_fd(fd):
        yield fd


def _email_entries_at(mailbox_fd: int | None) -> Iterator[tuple[str, str]]:
    """(id, path relative to the mailbox) of every email entry: regular ``*.md`` or a bundle
    dir ``<d>/<d>.md``."""
    if mailbox_fd is None:
        return
    for entry in list(os.scandir(mailbox_fd)):
        name = entry.name
        if name.startswith("."):
            continue
        try:
            if entry.is_symlink():
                continue
            if entry.is_file(follow_symlinks=False):
                if name.endswith(".md") and len(name) > 3:
                    yield name[:-3], name
            elif entry.is_dir(follow_symlinks=False):
                with safefs.closing_fd(safefs.open_dir_at(mailbox_fd, name)) as bundle_fd:
                    st = os.stat(f"{name}.md", dir_fd=bundle_fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    yield name, f"{name}/{name}.md"
        except OSError:
            continue


def _email_entries(directory: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """(id, .md path) of every email entry of a mailbox dir."""
    with _mailbox_or_none(directory) as mailbox_fd:
        return [(email_id, Path(directory) / relative)
                for email_id, relative in _email_entries_at(mailbox_fd)]


def list_email_ids(directory: str | os.PathLike[str]) -> list[str]:
    """Email ids in a mailbox dir, newest first (ids start with their UTC timestamp)."""
    return sorted((eid for eid, _ in _email_entries(directory)), reverse=True)


def _open_email(mailbox_fd: int, relative: str, limit: int | None,
                label: str) -> tuple[int, os.stat_result]:
    """A checked read descriptor of an email file (see ``safefs.check_regular``) and its stat.

    The file may belong to this process or to the mailbox dir's owner only.
    """
    fd = safefs.open_file_at(mailbox_fd, relative)
    try:
        st = safefs.check_regular(fd, owners=safefs.owners_of(mailbox_fd), limit=limit,
                                  label=label)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _frontmatter_head(fd: int) -> bytes:
    """The start of a file holding its whole frontmatter: 16 KiB, more (to 1 MiB) when needed."""
    head = os.pread(fd, _HEAD_BYTES, 0)
    if len(head) == _HEAD_BYTES and not _has_frontmatter(head):
        head += os.pread(fd, FRONTMATTER_SCAN_LIMIT - _HEAD_BYTES, _HEAD_BYTES)
    return head


def _has_frontmatter(head: bytes) -> bool:
    opening = _CLOSING.search(head)
    return opening is not None and _CLOSING.search(head, opening.end()) is not None


def _has_read_line(head: bytes) -> bool:
    """Whether the frontmatter in ``head`` has a ``read = true`` line."""
    return any(_READ_TRUE_LINE.match(line) for line in _frontmatter_text_lines(head))


def scan_counts(directory: str | os.PathLike[str]) -> tuple[int, int]:
    """(total, unread) by opening every email: the reference the index must agree with.

    A file that cannot be read (or is not one aimx would read) counts unread.
    """
    total = unread = 0
    with _mailbox_or_none(directory) as mailbox_fd:
        for _, relative in _email_entries_at(mailbox_fd):
            total += 1
            if not _read_entry(mailbox_fd, relative)[1]:
                unread += 1
    return total, unread


def count_emails(directory: str | os.PathLike[str]) -> tuple[int, int]:
    """(total, unread) for MAILBOX-LIST; a missing dir counts as empty.

    Answered from the mailbox's index when ``directory`` is a mailbox dir of a
    data dir (``<data>/<inbox|sent>/<name>``), so the cost does not grow with
    the mailbox; otherwise (or when the index cannot be used) by a full scan.
    """
    index = MailboxIndex.for_mailbox_dir(directory)
    if index is None:
        return scan_counts(directory)
    return index.counts()


# ---------------------------------------------------------------------------
# The per-mailbox index
#
# A listing of a big mailbox should cost what its page costs, not one file read
# per email. Each mailbox dir has an index, a small SQLite file under
# ``<data>/.index/<folder>/<mailbox>.sqlite`` (outside the mailbox dir, so
# writing it never changes the dir it describes), holding one row per email:
# id, path, the file's (inode, mtime, size) when its row was made, whether it has
# a ``read = true`` line, and the summary fields a listing shows.
#
# It can never disagree with the files, because nothing is taken on trust:
# - which emails exist: the index records the mailbox dir's (device, inode,
#   mtime) with the time it was checked. Any create, rename or unlink in the dir
#   changes its mtime; if the recorded state differs from the dir's, or was
#   recorded so soon after the mtime that a change within the same timestamp
#   tick could hide behind it ("racy", as git calls it), the names are
#   re-scanned (one directory listing, no file reads) and the difference
#   applied: new emails are read, vanished ones dropped;
# - what an email says: every row handed out is checked against a fresh
#   ``stat`` of its file (inode, mtime, size); a row that no longer matches is
#   read again. aimx rewrites files only by rename (new inode) and updates the
#   row itself when it marks mail read.
# The one thing a listing does not re-check is the read flag behind the unread
# count of rows it does not hand out: a file edited in place by another program
# (same name, same directory) keeps its old flag in the count until its row is
# next handed out or the index rebuilt.
#
# Only processes that may write the index (root: the daemon, ``aimx ingest``)
# update it; the owner's processes (``aimx mcp``) read it and fall back to
# scanning whatever they cannot trust. The file is the owner's (0600) in
# root-owned directories (0711), so an owner can read its own index and no
# one else's. A corrupt or foreign file is rebuilt; it is only ever a cache.

INDEX_DIR = ".index"
INDEX_VERSION = 1
#: The frontmatter keys a listing row or a listing filter needs.
SUMMARY_KEYS = ("from", "to", "subject", "date", "received_at", "read", "delivery_status")
_RACY_NS = 1_000_000_000  # a dir state checked within 1 s of its mtime is re-verified
_RACY_COARSE_NS = 2_000_000_000  # file systems with whole-second timestamps

_INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS emails (
    id TEXT PRIMARY KEY, path TEXT NOT NULL, ino INTEGER, mtime_ns INTEGER,
    size INTEGER, read_line INTEGER NOT NULL, summary TEXT
) WITHOUT ROWID;
"""


def _json_default(value: object) -> object:
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return {"$t": type(value).__name__, "v": value.isoformat()}
    raise TypeError(f"cannot index {type(value).__name__}")


def _json_hook(obj: dict[str, Any]) -> object:
    kind = obj.get("$t")
    if kind is not None and set(obj) == {"$t", "v"}:
        parse = {"datetime": datetime.datetime, "date": datetime.date,
                 "time": datetime.time}.get(kind)
        if parse is not None:
            return parse.fromisoformat(obj["v"])
    return obj


def summarize(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The listing fields of a frontmatter (absent keys as None)."""
    return {key: fields.get(key) for key in SUMMARY_KEYS}


@attrs.frozen
class IndexedEmail:
    """One email as a listing sees it; ``summary`` is None when the file vanished or
    its frontmatter does not parse (a listing drops such entries)."""

    id: str
    path: str
    summary: dict[str, Any] | None


def _file_facts(mailbox_fd: int | None, relative: str | None) -> tuple[int, int, int] | None:
    """(inode, mtime, size) of an email file, or None when it is gone or not one to read."""
    if mailbox_fd is None or relative is None:
        return None
    try:
        fd, st = _open_email(mailbox_fd, relative, None, relative)
    except OSError:
        return None
    os.close(fd)
    return st.st_ino, st.st_mtime_ns, st.st_size


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


_HEAD_BYTES = 16 * 1024
_CLOSING = re.compile(rb"^\+\+\+\r?\n", re.MULTILINE)


def _read_entry(mailbox_fd: int | None, relative: str | None
                ) -> tuple[tuple[int, int, int] | None, bool, dict[str, Any] | None]:
    """(file facts, has a read line, summary) straight from the file.

    One read of the first 16 KiB serves both the ``read = true`` line check and
    the frontmatter parse when the frontmatter fits (every aimx file); larger
    frontmatters are read on to 1 MiB.
    """
    if mailbox_fd is None or relative is None:
        return None, False, None
    try:
        fd, st = _open_email(mailbox_fd, relative, None, relative)
        with safefs.closing_fd(fd):
            head = _frontmatter_head(fd)
    except OSError:
        return None, False, None
    facts = (st.st_ino, st.st_mtime_ns, st.st_size)
    try:
        summary: dict[str, Any] | None = summarize(frontmatter.read_header_fields(head))
    except (frontmatter.FrontmatterError, ValueError):
        summary = None
    return facts, _has_read_line(head), summary


def _read_entry_fields(mailbox_fd: int, relative: str) -> dict[str, Any] | None:
    """The whole frontmatter of an email file, or None when it cannot be read or parsed."""
    try:
        fd, _st = _open_email(mailbox_fd, relative, None, relative)
        with safefs.closing_fd(fd):
            head = _frontmatter_head(fd)
        return frontmatter.read_header_fields(head)
    except (OSError, frontmatter.FrontmatterError):
        return None


def _frontmatter_text_lines(data: bytes) -> Iterator[str]:
    """The lines between the first two ``+++`` lines of ``data``, decoded leniently."""
    opened = False
    for raw in io.BytesIO(data):  # split exactly as iterating the file does
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if line == _DELIMITER:
            if opened:
                return
            opened = True
            continue
        if opened:
            yield line


class MailboxIndex:
    """The index of one mailbox dir (see the notes above); methods block (disk).

    Thread-safe. Build with ``for_mailbox_dir``; every public method answers
    exactly what a scan of the files would, whether or not the index could be
    used.
    """

    def __init__(self, directory: str | os.PathLike[str], index_path: str | os.PathLike[str],
                 *, owner: tuple[int, int] | None = None) -> None:
        self.directory = str(directory)
        self.index_path = str(index_path)
        self.owner = owner
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._opened_ino: int | None = None
        self._writable = os.geteuid() == 0

    @classmethod
    def for_mailbox_dir(cls, directory: str | os.PathLike[str]) -> MailboxIndex | None:
        """The index of ``<data>/<inbox|sent>/<name>``, or None for any other path."""
        path = Path(directory)
        if path.parent.name not in FOLDERS or not path.name or path.name.startswith("."):
            return None
        index_path = path.parent.parent / INDEX_DIR / path.parent.name / f"{path.name}.sqlite"
        key = str(index_path)
        with _indexes_lock:
            index = _indexes.get(key)
            if index is None or index.directory != str(path):
                index = _indexes[key] = cls(path, index_path)
            return index

    # -- the SQLite file ---------------------------------------------------------

    def _open(self) -> sqlite3.Connection | None:
        """The connection, opening (and, for a writer, creating) the file; None if unusable."""
        import sqlite3

        if self._conn is not None:
            if self._writable or self._opened_ino == _inode(self.index_path):
                return self._conn
            self._discard()  # a writer replaced the file: read the new one
        try:
            if self._writable:
                self._prepare_dirs()
                conn = sqlite3.connect(self.index_path, isolation_level=None,
                                       check_same_thread=False)
            elif os.path.exists(self.index_path):
                conn = sqlite3.connect(f"file:{self.index_path}?mode=ro", uri=True,
                                       isolation_level=None, check_same_thread=False)
            else:
                return None
            conn.execute("PRAGMA trusted_schema = OFF")
            if self._writable:
                conn.execute("PRAGMA journal_mode = DELETE")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(_INDEX_SCHEMA)
                self._own_file()
            version = self._meta(conn).get("version")
            if version not in (None, INDEX_VERSION):
                if not self._writable:
                    conn.close()
                    return None
                conn.executescript("DELETE FROM emails; DELETE FROM meta;")
        except (sqlite3.Error, OSError) as exc:
            log.info("mailbox index unusable path=%s error=%s", kv(self.index_path), kv(exc))
            self._discard()
            return None
        self._conn = conn
        self._opened_ino = _inode(self.index_path)
        return conn

    def _prepare_dirs(self) -> None:
        folder_dir = os.path.dirname(self.index_path)
        index_dir = os.path.dirname(folder_dir)
        for path in (index_dir, folder_dir):
            try:
                os.mkdir(path, 0o711)
                os.chmod(path, 0o711)
            except FileExistsError:
                pass

    def _own_file(self) -> None:
        """The owner of the mailbox dir may read its own index; nobody else may."""
        try:
            st = os.stat(self.directory)
        except OSError:
            return
        try:
            os.chown(self.index_path, st.st_uid, st.st_gid)
            os.chmod(self.index_path, 0o600)
        except OSError as exc:
            log.warning("cannot set owner of %s: %s", kv(self.index_path), kv(exc))

    def _discard(self) -> None:
        """Forget the connection; a writer also deletes a file it cannot use."""
        import sqlite3

        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        if self._writable:
            for suffix in ("", "-journal"):
                with contextlib.suppress(OSError):
                    os.unlink(self.index_path + suffix)

    @staticmethod
    def _meta(conn: sqlite3.Connection) -> dict[str, Any]:
        return dict(conn.execute("SELECT key, value FROM meta"))

    # -- freshness -----------------------------------------------------------------

    def _dir_state(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.directory)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino, st.st_mtime_ns

    @staticmethod
    def _trusted(meta: Mapping[str, Any], state: tuple[int, int, int] | None) -> bool:
        if state is None:
            return meta.get("missing") == 1
        dev, ino, mtime_ns = state
        if (meta.get("dev"), meta.get("ino"), meta.get("mtime_ns")) != (dev, ino, mtime_ns):
            return False
        racy = _RACY_COARSE_NS if mtime_ns % 1_000_000_000 == 0 else _RACY_NS
        return int(meta.get("checked_ns") or 0) - mtime_ns > racy

    def _relative(self, path: str) -> str | None:
        """A row's path relative to the mailbox dir (None for a path outside it)."""
        prefix = self.directory.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else None

    def _synced(self, conn: sqlite3.Connection, mailbox_fd: int | None) -> bool:
        """Bring the rows in line with the dir's names (writer); False if it cannot be."""
        state = self._dir_state()
        if self._trusted(self._meta(conn), state):
            return True
        if not self._writable or (mailbox_fd is None and state is not None):
            return False  # (a dir that exists but could not be opened is not empty)
        checked_ns = time.time_ns()
        entries = dict(_email_entries_at(mailbox_fd))
        disk = {email_id: str(Path(self.directory) / relative)
                for email_id, relative in entries.items()}
        rows = dict(conn.execute("SELECT id, path FROM emails"))
        gone = [(email_id,) for email_id, path in rows.items() if disk.get(email_id) != path]
        added = [(email_id, path) for email_id, path in disk.items()
                 if rows.get(email_id) != path]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("DELETE FROM emails WHERE id = ?", gone)
            for email_id, path in added:
                self._put(conn, email_id, path, *_read_entry(mailbox_fd, entries[email_id]))
            if state is not None and self._dir_state() == state:
                dev, ino, mtime_ns = state
                values = {"dev": dev, "ino": ino, "mtime_ns": mtime_ns,
                          "checked_ns": checked_ns, "missing": 0, "version": INDEX_VERSION}
            elif state is None:
                values = {"missing": 1, "version": INDEX_VERSION}
            else:
                values = {"mtime_ns": -1}  # changed while scanning: scan again next time
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             values.items())
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return True

    @staticmethod
    def _put(conn: sqlite3.Connection, email_id: str, path: str,
             facts: tuple[int, int, int] | None, read_line: bool,
             summary: Mapping[str, Any] | None) -> None:
        ino, mtime_ns, size = facts or (None, None, None)
        text = json.dumps(summary, default=_json_default) if summary is not None else None
        conn.execute("INSERT OR REPLACE INTO emails VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (email_id, path, ino, mtime_ns, size, int(read_line), text))

    def _run(self, work: Any, fallback: Any) -> Any:
        """``work(conn, mailbox_fd)`` on a synced index, else ``fallback(mailbox_fd)`` (a plain
        scan); ``mailbox_fd`` is the mailbox dir's descriptor, None when it is missing."""
        import sqlite3

        with _mailbox_or_none(self.directory) as mailbox_fd:
            with self._lock:
                conn = self._open()
                if conn is not None:
                    try:
                        if self._synced(conn, mailbox_fd):
                            return work(conn, mailbox_fd)
                    except sqlite3.Error as exc:
                        log.info("mailbox index unusable path=%s error=%s",
                                 kv(self.index_path), kv(exc))
                        self._discard()
            return fallback(mailbox_fd)

    # -- answers ------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(total, unread): every email, and those without a ``read = true`` line."""

        def from_index(conn: sqlite3.Connection, _mailbox_fd: int | None) -> tuple[int, int]:
            total, unread = conn.execute(
                "SELECT count(*), coalesce(sum(read_line = 0), 0) FROM emails").fetchone()
            return int(total), int(unread)

        return self._run(from_index, lambda _mailbox_fd: scan_counts(self.directory))

    def page(self, offset: int, limit: int) -> list[IndexedEmail]:
        """Emails ``offset`` to ``offset + limit`` in newest-first id order."""
        if limit <= 0:
            return []

        def from_index(conn: sqlite3.Connection, mailbox_fd: int | None) -> list[IndexedEmail]:
            rows = conn.execute("SELECT * FROM emails ORDER BY id DESC LIMIT ? OFFSET ?",
                                (limit, max(0, offset))).fetchall()
            return [self._checked(conn, row, mailbox_fd) for row in rows]

        def by_scan(mailbox_fd: int | None) -> list[IndexedEmail]:
            ids = sorted(_email_entries_at(mailbox_fd), reverse=True)
            return [_from_file(self.directory, mailbox_fd, email_id, relative)
                    for email_id, relative in ids[max(0, offset):max(0, offset) + limit]]

        return self._run(from_index, by_scan)

    def entries(self, keep: Callable[[str], bool] | None = None,
                batch: int = 200) -> Iterator[IndexedEmail]:
        """Every email, newest first, fetched lazily (for filtered listings that stop early).

        ``keep(id)``, when given, drops emails by id alone before any file is
        looked at (e.g. ids older than a ``since`` filter).
        """
        after: str | None = None

        def from_index(conn: sqlite3.Connection,
                       mailbox_fd: int | None) -> tuple[list[IndexedEmail], str | None]:
            if after is None:
                rows = conn.execute("SELECT * FROM emails ORDER BY id DESC LIMIT ?",
                                    (batch,)).fetchall()
            else:
                rows = conn.execute("SELECT * FROM emails WHERE id < ? ORDER BY id DESC "
                                    "LIMIT ?", (after, batch)).fetchall()
            last = rows[-1][0] if len(rows) == batch else None
            return [self._checked(conn, row, mailbox_fd) for row in rows
                    if keep is None or keep(row[0])], last

        while True:
            chunk = self._run(from_index, lambda _mailbox_fd: None)
            if chunk is None:  # the index cannot be used (now): the rest by scanning
                def rest(email_id: str, after: str | None = after) -> bool:
                    return ((after is None or email_id < after)
                            and (keep is None or keep(email_id)))

                yield from _scan_listing(self.directory, rest)
                return
            found, after = chunk
            yield from found
            if after is None:
                return

    def _checked(self, conn: sqlite3.Connection, row: tuple[Any, ...],
                 mailbox_fd: int | None) -> IndexedEmail:
        """A row, re-read from its file if the file is not the one the row was made from."""
        email_id, path, ino, mtime_ns, size, _read_line, text = row
        relative = self._relative(path)
        facts = _file_facts(mailbox_fd, relative)
        if facts is not None and facts == (ino, mtime_ns, size):
            summary = json.loads(text, object_hook=_json_hook) if text is not None else None
            return IndexedEmail(email_id, path, summary)
        facts, read_line, summary = _read_entry(mailbox_fd, relative)
        if self._writable and facts is not None:
            self._put(conn, email_id, path, facts, read_line, summary)
        return IndexedEmail(email_id, path, summary if facts is not None else None)

    def note_rewritten(self, email_id: str, path: str | os.PathLike[str]) -> None:
        """Refresh one row after aimx rewrote the file (mark read/unread); writer only."""
        if not self._writable:
            return
        import sqlite3

        with self._lock:
            conn = self._open()
            if conn is None:
                return
            with _mailbox_or_none(self.directory) as mailbox_fd:
                entry = _read_entry(mailbox_fd, self._relative(str(path)))
            try:
                self._put(conn, email_id, str(path), *entry)
            except sqlite3.Error:
                self._discard()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_indexes: dict[str, MailboxIndex] = {}
_indexes_lock = threading.Lock()


def list_page(directory: str | os.PathLike[str], offset: int, limit: int) -> list[IndexedEmail]:
    """One page of a mailbox listing, newest first, through the index when there is one."""
    index = MailboxIndex.for_mailbox_dir(directory)
    if index is None:
        with _mailbox_or_none(directory) as mailbox_fd:
            ids = sorted(_email_entries_at(mailbox_fd), reverse=True)
            return [_from_file(str(directory), mailbox_fd, email_id, relative)
                    for email_id, relative in ids[max(0, offset):max(0, offset) + limit]]
    return index.page(offset, limit)


def iter_listing(directory: str | os.PathLike[str],
                 keep: Callable[[str], bool] | None = None) -> Iterator[IndexedEmail]:
    """Every email of a mailbox, newest first, lazily (filtered listings stop early);
    ``keep(id)`` drops emails by id before their files are looked at."""
    index = MailboxIndex.for_mailbox_dir(directory)
    if index is None:
        yield from _scan_listing(str(directory), keep)
        return
    yield from index.entries(keep)


def _from_file(directory: str, mailbox_fd: int | None, email_id: str,
               relative: str) -> IndexedEmail:
    _facts, _read_line, summary = _read_entry(mailbox_fd, relative)
    return IndexedEmail(email_id, str(Path(directory) / relative),
                        summary if _facts is not None else None)


def _scan_listing(directory: str, keep: Callable[[str], bool] | None) -> Iterator[IndexedEmail]:
    """Every email kept by ``keep(id)``, newest first, read from the files (no index)."""
    with _mailbox_or_none(directory) as mailbox_fd:
        for email_id, relative in sorted(_email_entries_at(mailbox_fd), reverse=True):
            if keep is None or keep(email_id):
                yield _from_file(directory, mailbox_fd, email_id, relative)


# ---------------------------------------------------------------------------
# Message-ID dedup


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
        with _mailbox_or_none(directory) as mailbox_fd:
            found = [] if mailbox_fd is None else [
                _read_entry_fields(mailbox_fd, relative)
                for email_id, relative in _email_entries_at(mailbox_fd)
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


# ---------------------------------------------------------------------------
# The store


def _normalise_content_type(value: str | None) -> str:
    value = (value or "").split(";", 1)[0].strip().lower()
    return value or "application/octet-stream"


class MailStore:
    """The data dir as the daemon and ``aimx ingest`` use it.

    Holds one lock per mailbox (a thread lock plus ``flock`` on
    ``<data>/.locks/<mailbox>.lock``, so a CLI ingest and the daemon exclude
    each other) and the lazily built dedup indices. Lock order: the mailbox
    lock first, then the config lock; never across DNS or hooks.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._depth: dict[str, int] = {}
        self._lock_fds: dict[str, int] = {}
        self._dedup: dict[str, DedupIndex] = {}
        # Writes in flight (guarded by the mailbox's thread lock): stems chosen but not
        # yet renamed into place, and Message-IDs being stored (a second delivery of the
        # same id waits for the first, then counts as its duplicate).
        self._reserved: dict[tuple[str, str], set[str]] = {}
        self._in_flight: dict[tuple[str, str], threading.Event] = {}
        self._stem_hints: dict[tuple[str, str], tuple[str, int]] = {}

    # -- locking ----------------------------------------------------------

    def _thread_lock(self, mailbox: str) -> threading.RLock:
        with self._guard:
            lock = self._locks.get(mailbox)
            if lock is None:
                lock = self._locks[mailbox] = threading.RLock()
            return lock

    def _open_lock_file(self, mailbox: str) -> int:
        lock_dir = self.data_dir / ".locks"
        path = os.path.join(lock_dir, f"{mailbox}.lock")
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:
            ensure_data_dir(self.data_dir)
            _make_dir(lock_dir, 0o700)
            return os.open(path, flags, 0o600)

    @contextlib.contextmanager
    def mailbox_lock(self, mailbox: str) -> Iterator[None]:
        """Exclusive access to one mailbox, across threads and processes; re-entrant."""
        lock = self._thread_lock(mailbox)
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

    # -- dedup --------------------------------------------------------------

    def _index(self, mailbox: str, now: datetime.datetime | None) -> DedupIndex:
        index = self._dedup.get(mailbox)
        if index is None:
            index = DedupIndex.scan(mailbox_dir(self.data_dir, "inbox", mailbox), now)
            self._dedup[mailbox] = index
        return index

    def is_duplicate(
        self, mailbox: str, message_id: str, now: datetime.datetime | None = None
    ) -> bool:
        """Whether ``message_id`` was stored here in the last 24 h (call under the lock)."""
        if not message_id:
            return False
        return self._index(mailbox, now).is_duplicate(message_id, now)

    def record(
        self,
        mailbox: str,
        message_id: str,
        received_at: datetime.datetime,
        now: datetime.datetime | None = None,
    ) -> None:
        """Remember a stored Message-ID (call under the lock, after the publish)."""
        self._index(mailbox, now).record(message_id, received_at, now)

    # -- writes -------------------------------------------------------------

    def publish_inbound(
        self,
        mailbox: str,
        owner: str | None,
        fields: Mapping[str, Any],
        body: str,
        attachments: Sequence[Any],
        when: datetime.datetime,
    ) -> StoredEmail:
        """Store one inbound email, flat or as a bundle, durably and atomically.

        ``fields`` is the frontmatter without ``id`` and ``attachments``; both
        are added here. ``attachments`` have ``filename`` (unsanitised),
        ``content_type`` and ``data``. No Message-ID dedup: see ``deliver_inbound``.
        """
        ids = _owner_ids(owner)
        _warn_unknown_owner(owner, ids)
        return self._publish_inbound(mailbox, ids, fields, body, attachments, when, None)

    def deliver_inbound(
        self,
        mailbox: str,
        owner: str | None,
        fields: Mapping[str, Any],
        body: str,
        attachments: Sequence[Any],
        when: datetime.datetime,
    ) -> StoredEmail | None:
        """Store one inbound email unless its ``message_id`` was stored here within 24 h.

        Returns ``None`` for such a duplicate. The mailbox lock is held only for
        the decisions (dedup check and name reservation; then the last name
        check, the rename and the dedup record), never across the writes and
        fsyncs, so deliveries to one mailbox overlap their disk waits and the
        kernel commits their directory fsyncs together. A delivery of a
        Message-ID that is still being stored waits for that one, then counts as
        its duplicate (or stores, if the first failed). The dedup record is
        withdrawn if the final directory fsync fails, so a retry is not lost.
        """
        ids = _owner_ids(owner)
        _warn_unknown_owner(owner, ids)
        message_id = str(fields.get("message_id") or "")
        if not message_id:
            return self._publish_inbound(mailbox, ids, fields, body, attachments, when, None)
        key = (mailbox, message_id)
        lock = self._thread_lock(mailbox)
        while True:
            with lock:
                if self._index(mailbox, None).is_duplicate(message_id):
                    return None
                waiter = self._in_flight.get(key)
                if waiter is None:
                    self._in_flight[key] = threading.Event()
                    break
            waiter.wait()
        try:
            return self._publish_inbound(mailbox, ids, fields, body, attachments, when,
                                         (message_id, when))
        finally:
            with lock:
                self._in_flight.pop(key).set()

    def _publish_inbound(
        self,
        mailbox: str,
        ids: tuple[int, int] | None,
        fields: Mapping[str, Any],
        body: str,
        attachments: Sequence[Any],
        when: datetime.datetime,
        dedup: tuple[str, datetime.datetime] | None,
    ) -> StoredEmail:
        directory = mailbox_dir(self.data_dir, "inbox", mailbox)
        with safefs.closing_fd(_mailbox_fd(self.data_dir, "inbox", mailbox, ids)) as dir_fd:
            return self._publish_inbound_at(dir_fd, directory, mailbox, ids, fields, body,
                                            attachments, when, dedup)

    def _publish_inbound_at(
        self,
        dir_fd: int,
        directory: Path,
        mailbox: str,
        ids: tuple[int, int] | None,
        fields: Mapping[str, Any],
        body: str,
        attachments: Sequence[Any],
        when: datetime.datetime,
        dedup: tuple[str, datetime.datetime] | None,
    ) -> StoredEmail:
        base = f"{stem_prefix(when)}-{slugify(fields.get('subject'))}"
        lock = self._thread_lock(mailbox)
        reserved = self._reserved.setdefault(("inbox", mailbox), set())
        names = [sanitize_attachment_name(a.filename, i) for i, a in enumerate(attachments)]
        while True:
            with lock:
                hint_base, hint = self._stem_hints.get(("inbox", mailbox), ("", 1))
                stem, counter = _free_stem(dir_fd, base, reserved,
                                           hint if hint_base == base else 1)
                self._stem_hints[("inbox", mailbox)] = (base, counter)
                reserved.add(stem)
            source: str | None = None
            label = str(directory / stem)
            try:
                record = {"id": stem, **{k: v for k, v in fields.items() if k != "id"}}
                if not attachments:
                    record.pop("attachments", None)
                    final = f"{stem}.md"
                    path = directory / final
                    source = _temp_name(final)
                    made = _write_file(dir_fd, source, frontmatter.render_email(record, body),
                                       ids, str(path))
                else:
                    unique = unique_attachment_names(names, reserved=(f"{stem}.md",))
                    files = [(name, bytes(a.data))
                             for name, a in zip(unique, attachments, strict=True)]
                    record["attachments"] = [
                        {"filename": name, "content_type": _normalise_content_type(a.content_type),
                         "size": len(data), "path": name}
                        for (name, data), a in zip(files, attachments, strict=True)
                    ]
                    markdown = frontmatter.render_email(record, body)
                    source, made = _stage_bundle(dir_fd, stem, markdown, files, ids, label)
                    final = stem
                    path = directory / stem / f"{stem}.md"
                _pause_before_rename()
                with self.mailbox_lock(mailbox):
                    # Reserved in this process; another process (``aimx ingest``) renames
                    # under the same flock, so this check is final.
                    taken = _name_taken(dir_fd, stem)
                    if not taken:
                        if not safefs.is_entry(dir_fd, source, made):
                            raise safefs.UnsafeFileError(
                                errno.EPERM, f"{label}: the staged email was replaced")
                        os.rename(source, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                        source = None
                        if dedup is not None:
                            self._index(mailbox, None).record(dedup[0], dedup[1])
            except BaseException:
                if source is not None:
                    _remove_quietly(dir_fd, source, label)
                raise
            finally:
                with lock:
                    reserved.discard(stem)
            if taken:
                _remove_quietly(dir_fd, source, label)
                continue
            try:
                safefs.fsync_fd(dir_fd)
            except BaseException:
                if dedup is not None:
                    with lock:
                        self._index(mailbox, None).forget(dedup[0])
                raise
            return StoredEmail(stem, path, record)

    def publish_sent(
        self,
        mailbox: str,
        owner: str | None,
        fields: Mapping[str, Any],
        body: str,
        when: datetime.datetime,
    ) -> StoredEmail:
        """Store a sent copy (always flat) in ``sent/<mailbox>/``."""
        ids = _owner_ids(owner)
        _warn_unknown_owner(owner, ids)
        with self.mailbox_lock(mailbox), safefs.closing_fd(
                _mailbox_fd(self.data_dir, "sent", mailbox, ids, repair=True)) as dir_fd:
            base = f"{stem_prefix(when)}-{slugify(fields.get('subject'))}"
            stem = _allocate_stem(dir_fd, base)
            record = {"id": stem, **{k: v for k, v in fields.items() if k != "id"}}
            data = frontmatter.render_email(record, body)
            path = mailbox_dir(self.data_dir, "sent", mailbox) / f"{stem}.md"
            publish_file(dir_fd, f"{stem}.md", data, ids, label=str(path))
            return StoredEmail(stem, path, record)

    def set_read(
        self,
        mailbox: str,
        owner: str | None,
        email_id: str,
        read: bool,
        now: datetime.datetime | None = None,
    ) -> Path:
        """MARK-READ / MARK-UNREAD: flip ``read`` (and ``read_at``), keep everything else.

        Raises ``StorageError`` with ``NOTFOUND`` (bad id, no such email) or
        ``IO`` (bad frontmatter, write failure). Returns the rewritten path.
        """
        if not check_email_id(email_id):
            raise StorageError("NOTFOUND", f"email id '{email_id}' contains invalid characters")
        ids = _owner_ids(owner)
        directory = mailbox_dir(self.data_dir, "inbox", mailbox)
        with self.mailbox_lock(mailbox), _mailbox_or_none(directory) as mailbox_fd:
            relative = None if mailbox_fd is None else _locate(mailbox_fd, email_id)
            if relative is None:
                raise StorageError("NOTFOUND", f"email '{email_id}' not found in inbox/{mailbox}")
            path = directory / relative
            # The file is read, and its replacement renamed into place, through the
            # descriptor of the dir it was found in: swapping that dir (or any name on
            # the way) for a link moves neither the read nor the write elsewhere.
            bundle, _, name = relative.rpartition("/")
            try:
                parent_fd = safefs.open_dir_at(mailbox_fd, bundle) if bundle else os.dup(mailbox_fd)
            except OSError as exc:
                raise StorageError("IO", f"failed to read {path}: {exc}") from exc
            with safefs.closing_fd(parent_fd):
                try:
                    fd, _st = _open_email(parent_fd, name, EMAIL_FILE_LIMIT, str(path))
                    with safefs.closing_fd(fd):
                        original = safefs.read_bounded(fd, EMAIL_FILE_LIMIT)
                except OSError as exc:
                    raise StorageError("IO", f"failed to read {path}: {exc}") from exc
                try:
                    updated = frontmatter.set_read_state(original, read,
                                                         rfc3339_utc(now or _utcnow()))
                except frontmatter.FrontmatterError as exc:
                    if exc.__cause__ is None:  # no +++ block at all
                        raise StorageError("IO", f"malformed frontmatter in {path}") from exc
                    raise StorageError(
                        "IO", f"failed to parse frontmatter in {path}: {exc.__cause__}") from exc
                try:
                    publish_file(parent_fd, name, updated, ids, label=str(path))
                except OSError as exc:
                    raise StorageError("IO", f"failed to write {path}: {exc}") from exc
            index = MailboxIndex.for_mailbox_dir(directory)
            if index is not None:
                index.note_rewritten(email_id, path)
            return path

    # -- reads --------------------------------------------------------------

    def list_emails(self, folder: str, mailbox: str) -> list[str]:
        return list_email_ids(mailbox_dir(self.data_dir, folder, mailbox))

    def count(self, folder: str, mailbox: str) -> tuple[int, int]:
        return count_emails(mailbox_dir(self.data_dir, folder, mailbox))

    def list_page(self, folder: str, mailbox: str, offset: int, limit: int
                  ) -> list[IndexedEmail]:
        return list_page(mailbox_dir(self.data_dir, folder, mailbox), offset, limit)


# ---------------------------------------------------------------------------
# README


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
