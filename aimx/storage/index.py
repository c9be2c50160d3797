"""The per-mailbox listing index: counts and pages that do not read every file.

A listing of a big mailbox should cost what its page costs, not one file read
per email. Each mailbox dir has an index, a small SQLite file under
``<data>/.index/<folder>/<mailbox>.sqlite`` (outside the mailbox dir, so
writing it never changes the dir it describes), holding one row per email:
id, path, the file's (inode, mtime, size) when its row was made, whether it has
a ``read = true`` line, and the summary fields a listing shows.

It can never disagree with the files, because nothing is taken on trust:
- which emails exist: the index records the mailbox dir's (device, inode,
  mtime) with the time it was checked. Any create, rename or unlink in the dir
  changes its mtime; if the recorded state differs from the dir's, or was
  recorded so soon after the mtime that a change within the same timestamp
  tick could hide behind it ("racy", as git calls it), the names are
  re-scanned (one directory listing, no file reads) and the difference
  applied: new emails are read, vanished ones dropped (each re-scan logs one
  ``mailbox index re-scanned`` line saying what it read);
- what an email says: every row handed out is checked against a fresh
  ``stat`` of its file (inode, mtime, size); a row that no longer matches is
  read again. aimx rewrites files only by rename (new inode) and updates the
  row itself when it marks mail read.
The one thing a listing does not re-check is the read flag behind the unread
count of rows it does not hand out: a file edited in place by another program
(same name, same directory) keeps its old flag in the count until its row is
next handed out or the index rebuilt.

Only processes that may write the index (root: the daemon, ``aimx ingest``)
update it; the owner's processes (``aimx mcp``) read it and fall back to
scanning whatever they cannot trust. The file is the owner's (0600) in
root-owned directories (0711), so an owner can read its own index and no
one else's. A corrupt or foreign file is rebuilt; it is only ever a cache.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from aimx.logs import kv, logger
from aimx.mail import frontmatter
from aimx.storage import safefs
from aimx.storage.emailfiles import email_entries_at, frontmatter_head, mailbox_or_none, open_email
from aimx.storage.layout import FOLDERS
from aimx.storage.readstate import has_read_line

if TYPE_CHECKING:  # imported when an index is first opened: the daemon may never list
    import sqlite3

log = logger("aimx::storage")


def scan_counts(directory: str | os.PathLike[str]) -> tuple[int, int]:
    """(total, unread) by opening every email: the reference the index must agree with.

    A file that cannot be read (or is not one aimx would read) counts unread.
    """
    total = unread = 0
    with mailbox_or_none(directory) as mailbox_fd:
        for _, relative in email_entries_at(mailbox_fd):
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


INDEX_DIR = ".index"
INDEX_VERSION = 1
#: The frontmatter keys a listing row or a listing filter needs.
SUMMARY_KEYS = ("from", "to", "subject", "date", "received_at", "read", "delivery_status")
_FLUSH_SECS = 2.0  # how long a stored email's row may wait to be written
_PENDING_MAX = 1000  # ... and how many may wait
_BUSY_MS = 5000  # how long a writer waits for another (sqlite3's default)
_FLUSH_BUSY_MS = 100  # ... but a delivery's flush gives up quickly instead
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


_SURROGATE = re.compile("[\ud800-\udfff]")


def summarize(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The listing fields of a frontmatter (absent keys as None)."""
    return {key: fields.get(key) for key in SUMMARY_KEYS}


def stored_summary(fields: Mapping[str, Any]) -> dict[str, Any] | None:
    """The summary a read of the file ``render_email(fields, ...)`` wrote would give, or
    None when it might differ (then the file is read instead).

    ``render_email`` leaves out None, and empty values of keys it does not require;
    strings come back as written, except a lone surrogate (written as U+FFFD). Only
    strings, booleans and None are vouched for.
    """
    summary: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        value = fields.get(key)
        if isinstance(value, str):
            if not value and key not in frontmatter.REQUIRED_KEYS:
                value = None
            elif _SURROGATE.search(value) is not None:
                return None
        elif value is not None and not isinstance(value, bool):
            return None
        summary[key] = value
    return summary


def note_stored(directory: str | os.PathLike[str], mailbox_fd: int, email_id: str,
                relative: str, fields: Mapping[str, Any]) -> None:
    """Tell the index of mailbox dir ``directory`` about an email just stored there."""
    index = MailboxIndex.for_mailbox_dir(directory)
    if index is not None:
        index.note_stored(email_id, relative, mailbox_fd, fields)


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
        fd, st = open_email(mailbox_fd, relative, None, relative)
    except OSError:
        return None
    os.close(fd)
    return st.st_ino, st.st_mtime_ns, st.st_size


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


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
        fd, st = open_email(mailbox_fd, relative, None, relative)
        with safefs.closing_fd(fd):
            head = frontmatter_head(fd)
    except OSError:
        return None, False, None
    facts = (st.st_ino, st.st_mtime_ns, st.st_size)
    try:
        summary: dict[str, Any] | None = summarize(frontmatter.read_header_fields(head))
    except (frontmatter.FrontmatterError, ValueError):
        summary = None
    return facts, has_read_line(head), summary


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
        # Rows of emails this process stored, not yet written (see ``note_stored``).
        self._pending: list[tuple[str, str, tuple[int, int, int], bool, dict[str, Any]]] = []
        self._pending_lock = threading.Lock()
        self._flush_due = 0.0

    @classmethod
    def for_mailbox_dir(cls, directory: str | os.PathLike[str]) -> MailboxIndex | None:
        """The index of ``<data>/<inbox|sent>/<name>``, or None for any other path."""
        if isinstance(directory, str | Path):  # the same text always names the same index
            known = _index_of_dir.get(str(directory))
            if known is not None and _indexes.get(known.index_path) is known:
                return known
        path = Path(directory)
        if path.parent.name not in FOLDERS or not path.name or path.name.startswith("."):
            return None
        index_path = path.parent.parent / INDEX_DIR / path.parent.name / f"{path.name}.sqlite"
        key = str(index_path)
        with _indexes_lock:
            index = _indexes.get(key)
            if index is None or index.directory != str(path):
                index = _indexes[key] = cls(path, index_path)
            if isinstance(directory, str | Path):
                _index_of_dir[str(directory)] = index
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
        entries = dict(email_entries_at(mailbox_fd))
        # str(Path(directory) / relative) for each entry, without a Path per entry (most of
        # a re-scan's time at 100,000 emails): entry names hold no "/", ".", "..".
        base = str(Path(self.directory))
        prefix = base if base.endswith("/") else base + "/"
        disk = {email_id: prefix + relative for email_id, relative in entries.items()}
        conn.execute("BEGIN IMMEDIATE")  # the rows compared are the rows replaced
        try:
            rows = dict(conn.execute("SELECT id, path FROM emails"))
            # (id, path) pairs on one side only, as set operations on the dict views.
            gone = [(email_id,) for email_id, _ in rows.items() - disk.items()]
            added = list(disk.items() - rows.items())
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
        # What a listing cost beyond the index: one line per re-scan, none when trusted.
        log.info("mailbox index re-scanned dir=%s emails=%d read=%d dropped=%d",
                 kv(self.directory), len(disk), len(added), len(gone))
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

        with mailbox_or_none(self.directory) as mailbox_fd:
            with self._lock:
                conn = self._open()
                if conn is not None:
                    try:
                        self._write_pending(conn)
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
            ids = sorted(email_entries_at(mailbox_fd), reverse=True)
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

    def note_stored(self, email_id: str, relative: str, mailbox_fd: int,
                    fields: Mapping[str, Any]) -> None:
        """Remember the row of a flat email this process just stored (writer; best effort).

        The rows are written together, at most every ``_FLUSH_SECS`` and before
        this process next answers from the index, so mail stored by the daemon
        is in the index when a listing (or a restart) comes and only the dir's
        names are re-scanned, no file read. The row is made from ``fields`` as
        ``frontmatter.render_email`` wrote them; anything a file read could see
        differently (a lone surrogate, which the file holds as U+FFFD) is left to
        the re-scan, as are bundles and rows that cannot be written now.
        """
        if not self._writable or "/" in relative:
            return
        summary = stored_summary(fields)
        if summary is None:
            return
        try:
            st = os.stat(relative, dir_fd=mailbox_fd, follow_symlinks=False)
        except OSError:
            return
        row = (email_id, str(Path(self.directory) / relative),
               (st.st_ino, st.st_mtime_ns, st.st_size), fields.get("read") is True, summary)
        now = time.monotonic()
        _flush_at_exit()
        with self._pending_lock:
            self._pending.append(row)
            due = now >= self._flush_due or len(self._pending) >= _PENDING_MAX
            if due:
                self._flush_due = now + _FLUSH_SECS
        if due:
            runner = _flush_runner
            if runner is None:
                self.flush_logged()
            else:
                runner(self.flush_logged)

    def flush_logged(self) -> None:
        """``flush``, logging instead of raising (the emails are stored; the rows are a cache)."""
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - the email is stored; the row is a cache
            log.warning("mailbox index rows not written path=%s error=%s",
                        kv(self.index_path), kv(exc))

    def flush(self) -> None:
        """Write the rows ``note_stored`` kept (writer); dropped if the index is busy."""
        if not self._pending:
            return
        with self._lock:
            conn = self._open()
            if conn is not None:
                self._write_pending(conn)

    def _write_pending(self, conn: sqlite3.Connection) -> None:
        """Pending rows in one transaction, each only if its file is still the one stored
        (checked inside the transaction, so a re-scan cannot interleave)."""
        import sqlite3

        with self._pending_lock:
            rows, self._pending = self._pending, []
        if not rows:
            return
        try:
            conn.execute(f"PRAGMA busy_timeout = {_FLUSH_BUSY_MS}")  # never hold up a delivery
            conn.execute("BEGIN IMMEDIATE")
            try:
                for email_id, path, facts, read_line, summary in rows:
                    try:
                        st = os.stat(path, follow_symlinks=False)
                    except OSError:
                        continue
                    if (st.st_ino, st.st_mtime_ns, st.st_size) == facts:
                        self._put(conn, email_id, path, facts, read_line, summary)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:  # busy or broken: the next re-scan reads these files
            log.info("mailbox index rows not written path=%s rows=%d error=%s",
                     kv(self.index_path), len(rows), kv(exc))
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")

    def note_rewritten(self, email_id: str, path: str | os.PathLike[str]) -> None:
        """Refresh one row after aimx rewrote the file (mark read/unread); writer only."""
        if not self._writable:
            return
        import sqlite3

        with self._lock:
            conn = self._open()
            if conn is None:
                return
            with mailbox_or_none(self.directory) as mailbox_fd:
                entry = _read_entry(mailbox_fd, self._relative(str(path)))
            try:
                self._put(conn, email_id, str(path), *entry)
            except sqlite3.Error:
                self._discard()

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_indexes: dict[str, MailboxIndex] = {}
#: The index ``for_mailbox_dir`` gave for a dir's text, so a repeat skips the path work.
_index_of_dir: dict[str, MailboxIndex] = {}
_indexes_lock = threading.Lock()
_exit_hook: list[bool] = []
_flush_runner: Callable[[Callable[[], None]], None] | None = None


def run_flushes_with(runner: Callable[[Callable[[], None]], None] | None) -> None:
    """Have a due write of stored emails' rows done by ``runner(flush)`` instead of by
    the storing thread (None: by the storing thread, before ``deliver_inbound`` returns).

    A server passes a runner that calls ``flush`` in another thread after the reply,
    so no SMTP reply waits for SQLite's commit. The rules above still hold: a listing
    writes pending rows first, and so does exit.
    """
    global _flush_runner
    _flush_runner = runner


def flush_all() -> None:
    """Write every index's pending rows (at exit: a stopped daemon leaves none behind)."""
    with _indexes_lock:
        indexes = list(_indexes.values())
    for index in indexes:
        index.flush()


def _flush_at_exit() -> None:
    with _indexes_lock:
        if not _exit_hook:
            atexit.register(flush_all)
            _exit_hook.append(True)


def list_page(directory: str | os.PathLike[str], offset: int, limit: int) -> list[IndexedEmail]:
    """One page of a mailbox listing, newest first, through the index when there is one."""
    index = MailboxIndex.for_mailbox_dir(directory)
    if index is None:
        with mailbox_or_none(directory) as mailbox_fd:
            ids = sorted(email_entries_at(mailbox_fd), reverse=True)
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
    with mailbox_or_none(directory) as mailbox_fd:
        for email_id, relative in sorted(email_entries_at(mailbox_fd), reverse=True):
            if keep is None or keep(email_id):
                yield _from_file(directory, mailbox_fd, email_id, relative)
