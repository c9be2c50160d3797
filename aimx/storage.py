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
import os
import re
import secrets
import shutil
import stat
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from aimx import frontmatter
from aimx.config import owner_ids
from aimx.logs import kv, logger
from aimx.message import rfc3339_utc

log = logger("aimx::storage")

FOLDERS = ("inbox", "sent")
README_NAME = "README.md"
README_MARKER = "<!-- aimx-readme-version: 1 -->"
README_TEMPLATE = Path(__file__).parent / "data" / "README.md.tmpl"

SLUG_MAX_CHARS = 20
ATTACHMENT_NAME_MAX_BYTES = 200
DEDUP_WINDOW = datetime.timedelta(hours=24)
DEDUP_CAP = 100_000
DEDUP_SCAN_BYTES = 16 * 1024
FRONTMATTER_SCAN_LIMIT = 1024 * 1024

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


def _owner_ids(owner: str | None) -> tuple[int, int] | None:
    """(uid, primary gid) of a mailbox owner; ``None`` when absent or unknown."""
    return owner_ids(owner) if owner else None


def _is_root() -> bool:
    return os.geteuid() == 0


def _apply_owner(path: Path | int, ids: tuple[int, int] | None, mode: int, label: str) -> None:
    """chown (root only) then chmod; failures are warnings because the mail matters more."""
    if ids is not None and _is_root():
        try:
            if isinstance(path, int):
                os.fchown(path, *ids)
            else:
                os.chown(path, *ids, follow_symlinks=False)
        except OSError as exc:
            log.warning("chown failed path=%s uid=%d error=%s", kv(label), ids[0], kv(exc))
    try:
        if isinstance(path, int):
            os.fchmod(path, mode)
        else:
            os.chmod(path, mode)
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
    _fsync_dir(path.parent)
    return True


def ensure_data_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Create the data dir if needed, 0755: the daemon's umask 077 would lock owners out."""
    data = Path(data_dir)
    if not data.is_dir():
        data.parent.mkdir(parents=True, exist_ok=True)
        _make_dir(data, 0o755)
    return data


def ensure_mailbox_dir(
    data_dir: str | os.PathLike[str], folder: str, mailbox: str, ids: tuple[int, int] | None
) -> Path:
    """Create ``<folder>/`` (0755) and the mailbox dir if missing; (re-)apply owner and 0700."""
    data = ensure_data_dir(data_dir)
    _make_dir(data / folder, 0o755)
    path = mailbox_dir(data, folder, mailbox)
    _make_dir(path, 0o700)
    _apply_owner(path, ids, 0o700, str(path))
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(final_name: str) -> str:
    return f".{final_name}.tmp.{secrets.token_hex(6)}"


def _pause_before_rename() -> None:
    value = os.environ.get(PAUSE_ENV)
    if value:
        time.sleep(float(value))


def _write_file(path: Path, data: bytes, ids: tuple[int, int] | None) -> None:
    """Create ``path`` exclusively (0600, owned), write everything and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _apply_owner(fd, ids, 0o600, str(path))
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove temp path=%s error=%s", kv(str(path)), kv(exc))


def publish_file(directory: Path, name: str, data: bytes, ids: tuple[int, int] | None) -> Path:
    """Atomically place ``data`` at ``directory/name``: temp, fsync, rename, fsync the dir.

    The rename replaces an existing file, so callers reserve ``name`` under
    the mailbox lock first (or mean to replace, as the read-state rewrite does).
    """
    temp = directory / _temp_name(name)
    final = directory / name
    try:
        _write_file(temp, data, ids)
        _pause_before_rename()
        os.rename(temp, final)
    except BaseException:
        _remove_quietly(temp)
        raise
    _fsync_dir(directory)
    return final


def _publish_bundle(
    directory: Path,
    stem: str,
    markdown: bytes,
    files: Sequence[tuple[str, bytes]],
    ids: tuple[int, int] | None,
) -> Path:
    """Build the bundle in a dot-named staging dir, then rename it into place as a whole.

    A crash leaves either the complete bundle or an invisible staging dir
    that :func:`cleanup_temp_files` removes; never a bundle missing parts.
    """
    staging = directory / _temp_name(stem)
    final = directory / stem
    try:
        staging.mkdir(mode=0o700)
        _apply_owner(staging, ids, 0o700, str(staging))
        for name, data in files:
            _write_file(staging / name, data, ids)
        _write_file(staging / f"{stem}.md", markdown, ids)
        _fsync_dir(staging)
        _pause_before_rename()
        if os.path.lexists(final):  # reserved under the lock; an outsider raced us
            raise FileExistsError(errno.EEXIST, "bundle name taken", str(final))
        os.rename(staging, final)
    except BaseException:
        _remove_quietly(staging)
        raise
    _fsync_dir(directory)
    return final / f"{stem}.md"


def _allocate_stem(directory: Path, base: str) -> str:
    """First free of ``base``, ``base-2``, ``base-3``... (neither ``<stem>.md`` nor ``<stem>``).

    Both names are required free for flat and bundle emails alike, so a flat
    email and a bundle can never share an id.
    """
    counter = 1
    while True:
        stem = base if counter == 1 else f"{base}-{counter}"
        if not os.path.lexists(directory / f"{stem}.md") and not os.path.lexists(directory / stem):
            return stem
        counter += 1


def cleanup_temp_files(data_dir: str | os.PathLike[str]) -> int:
    """Remove temp files and staging dirs a crash left behind; returns how many.

    Called at daemon start, before anything writes. Looks in the data dir,
    every mailbox dir and every bundle dir; never follows symlinks.
    """
    data = Path(data_dir)
    removed = 0

    def sweep(directory: Path, depth: int) -> None:
        nonlocal removed
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            if _TEMP_NAME.match(entry.name):
                _remove_quietly(Path(entry.path))
                removed += 1
            elif depth > 0 and not entry.name.startswith(".") and entry.is_dir(
                follow_symlinks=False
            ):
                sweep(Path(entry.path), depth - 1)

    sweep(data, 0)
    for folder in FOLDERS:
        sweep(data / folder, 2)  # mailbox dirs, then bundle dirs
    if removed:
        log.info("removed %d stale temp file(s) under %s", removed, kv(str(data)))
    return removed


# ---------------------------------------------------------------------------
# Strict lookup and cheap listing


def resolve_email_path(directory: str | os.PathLike[str], email_id: str) -> Path | None:
    """The ``.md`` of an email, or ``None``; symlinks and escapes never resolve.

    ``<id>.md`` must be a regular file; if that name exists as anything else the
    lookup fails without trying the bundle. Otherwise ``<id>/<id>.md`` inside a
    real directory. The result must lie inside the canonical mailbox dir.
    """
    if not check_email_id(email_id):
        return None
    try:
        canonical = Path(os.path.realpath(directory))
    except OSError:
        return None
    flat = canonical / f"{email_id}.md"
    try:
        st = os.lstat(flat)
    except FileNotFoundError:
        st = None
    except OSError:
        return None
    if st is not None:
        candidate = flat if stat.S_ISREG(st.st_mode) else None
    else:
        bundle = canonical / email_id
        try:
            if not stat.S_ISDIR(os.lstat(bundle).st_mode):
                return None
            inner = bundle / f"{email_id}.md"
            if not stat.S_ISREG(os.lstat(inner).st_mode):
                return None
        except OSError:
            return None
        candidate = inner
    if candidate is None:
        return None
    real = Path(os.path.realpath(candidate))
    if canonical not in real.parents:
        return None
    return candidate


def _email_entries(directory: Path) -> Iterator[tuple[str, Path]]:
    """(id, .md path) of every email entry: regular ``*.md`` or a bundle dir ``<d>/<d>.md``."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        try:
            if entry.is_symlink():
                continue
            if entry.is_file(follow_symlinks=False):
                if name.endswith(".md") and len(name) > 3:
                    yield name[:-3], Path(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                inner = Path(entry.path) / f"{name}.md"
                if stat.S_ISREG(os.lstat(inner).st_mode):
                    yield name, inner
        except OSError:
            continue


def list_email_ids(directory: str | os.PathLike[str]) -> list[str]:
    """Email ids in a mailbox dir, newest first (ids start with their UTC timestamp)."""
    return sorted((eid for eid, _ in _email_entries(Path(directory))), reverse=True)


def _frontmatter_lines(path: Path) -> Iterator[str]:
    """Lines between the first two ``+++`` lines, read lazily so bodies are never loaded.

    Gives up after 1 MiB: no aimx file has a frontmatter that large.
    """
    budget = FRONTMATTER_SCAN_LIMIT
    with open(path, "rb") as handle:
        opened = False
        for raw in handle:
            budget -= len(raw)
            if budget < 0:
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if line == _DELIMITER:
                if opened:
                    return
                opened = True
                continue
            if opened:
                yield line


def is_read(path: Path) -> bool:
    """Whether the frontmatter has a ``read = true`` line; unreadable files count unread."""
    try:
        return any(_READ_TRUE_LINE.match(line) for line in _frontmatter_lines(path))
    except OSError:
        return False


def count_emails(directory: str | os.PathLike[str]) -> tuple[int, int]:
    """(total, unread) for MAILBOX-LIST; a missing dir counts as empty."""
    total = unread = 0
    for _, path in _email_entries(Path(directory)):
        total += 1
        if not is_read(path):
            unread += 1
    return total, unread


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

    @classmethod
    def scan(cls, directory: Path, now: datetime.datetime | None = None) -> DedupIndex:
        """Rebuild from the files on disk (first 16 KiB of each ``.md``)."""
        now = now or _utcnow()
        index = cls()
        oldest_day = (now - DEDUP_WINDOW).strftime("%Y-%m-%d")
        for email_id, path in _email_entries(directory):
            if email_id[:10] < oldest_day:
                continue
            try:
                fields = frontmatter.read_header_fields(path, max_bytes=DEDUP_SCAN_BYTES)
            except (OSError, frontmatter.FrontmatterError):
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

    # -- locking ----------------------------------------------------------

    def _thread_lock(self, mailbox: str) -> threading.RLock:
        with self._guard:
            lock = self._locks.get(mailbox)
            if lock is None:
                lock = self._locks[mailbox] = threading.RLock()
            return lock

    def _open_lock_file(self, mailbox: str) -> int:
        lock_dir = self.data_dir / ".locks"
        if not lock_dir.is_dir():
            ensure_data_dir(self.data_dir)
            _make_dir(lock_dir, 0o700)
        return os.open(lock_dir / f"{mailbox}.lock",
                       os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

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
        ``content_type`` and ``data``.
        """
        ids = _owner_ids(owner)
        _warn_unknown_owner(owner, ids)
        with self.mailbox_lock(mailbox):
            directory = ensure_mailbox_dir(self.data_dir, "inbox", mailbox, ids)
            base = f"{stem_prefix(when)}-{slugify(fields.get('subject'))}"
            stem = _allocate_stem(directory, base)
            record = {"id": stem, **{k: v for k, v in fields.items() if k != "id"}}
            if not attachments:
                record.pop("attachments", None)
                data = frontmatter.render_email(record, body)
                path = publish_file(directory, f"{stem}.md", data, ids)
                return StoredEmail(stem, path, record)
            names = unique_attachment_names(
                (sanitize_attachment_name(a.filename, i) for i, a in enumerate(attachments)),
                reserved=(f"{stem}.md",),
            )
            files = [(name, bytes(a.data)) for name, a in zip(names, attachments, strict=True)]
            record["attachments"] = [
                {"filename": name, "content_type": _normalise_content_type(a.content_type),
                 "size": len(data), "path": name}
                for (name, data), a in zip(files, attachments, strict=True)
            ]
            markdown = frontmatter.render_email(record, body)
            path = _publish_bundle(directory, stem, markdown, files, ids)
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
        with self.mailbox_lock(mailbox):
            directory = ensure_mailbox_dir(self.data_dir, "sent", mailbox, ids)
            base = f"{stem_prefix(when)}-{slugify(fields.get('subject'))}"
            stem = _allocate_stem(directory, base)
            record = {"id": stem, **{k: v for k, v in fields.items() if k != "id"}}
            data = frontmatter.render_email(record, body)
            path = publish_file(directory, f"{stem}.md", data, ids)
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
        with self.mailbox_lock(mailbox):
            directory = mailbox_dir(self.data_dir, "inbox", mailbox)
            path = resolve_email_path(directory, email_id)
            if path is None:
                raise StorageError("NOTFOUND", f"email '{email_id}' not found in inbox/{mailbox}")
            try:
                original = path.read_bytes()
            except OSError as exc:
                raise StorageError("IO", f"failed to read {path}: {exc}") from exc
            try:
                updated = frontmatter.set_read_state(original, read, rfc3339_utc(now or _utcnow()))
            except frontmatter.FrontmatterError as exc:
                if exc.__cause__ is None:  # no +++ block at all
                    raise StorageError("IO", f"malformed frontmatter in {path}") from exc
                raise StorageError(
                    "IO", f"failed to parse frontmatter in {path}: {exc.__cause__}") from exc
            try:
                publish_file(path.parent, path.name, updated, ids)
            except OSError as exc:
                raise StorageError("IO", f"failed to write {path}: {exc}") from exc
            return path

    # -- reads --------------------------------------------------------------

    def list_emails(self, folder: str, mailbox: str) -> list[str]:
        return list_email_ids(mailbox_dir(self.data_dir, folder, mailbox))

    def count(self, folder: str, mailbox: str) -> tuple[int, int]:
        return count_emails(mailbox_dir(self.data_dir, folder, mailbox))


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
    written = publish_file(Path(data_dir), README_NAME, text.encode("utf-8"), None)
    os.chmod(written, 0o644)
    return True
