"""The store the daemon and ``aimx ingest`` write through: inbound mail, sent copies, read state.

Everything here blocks (disk I/O, ``fsync``, ``flock``), so the daemon calls
it from threads; ``aimx ingest`` calls it directly. Names are reserved under
the mailbox lock, the files written outside it, and renamed into place under
it again.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import threading
from collections.abc import Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import attrs

from aimx.mail import frontmatter
from aimx.mail.naming import (
    check_email_id,
    sanitize_attachment_name,
    slugify,
    stem_prefix,
    unique_attachment_names,
)
from aimx.storage import safefs
from aimx.storage.atomic import (
    pause_before_rename,
    publish_file,
    remove_quietly,
    stage_bundle,
    temp_name,
    write_file,
)
from aimx.storage.dedup import (
    STORED_LOG_LIMIT,
    DedupIndex,
    SharedDedup,
    close_claims,
    message_id_key,
    try_claim,
    wait_for_claim,
)
from aimx.storage.emailfiles import list_email_ids
from aimx.storage.index import IndexedEmail, MailboxIndex, count_emails, list_page, note_stored
from aimx.storage.layout import (
    StorageError,
    mailbox_dir,
    mailbox_dir_fd,
    mailbox_owner_ids,
    warn_unknown_owner,
)
from aimx.storage.locks import MailboxLocks
from aimx.storage.readstate import rewrite_read_state
from aimx.storage.spool import SpoolFile


@attrs.frozen
class StoredEmail:
    """Where an email landed; ``fields`` is the frontmatter as written (with ``id``)."""

    id: str
    path: Path
    fields: dict[str, Any] = attrs.field(factory=dict, eq=False)


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

    def __init__(self, data_dir: str | os.PathLike[str], *,
                 stored_log_limit: int = STORED_LOG_LIMIT) -> None:
        self.data_dir = Path(data_dir)
        self._mailbox_locks = MailboxLocks(self.data_dir)
        self._dedup: dict[str, DedupIndex] = {}
        self._shared = SharedDedup(self.data_dir, stored_log_limit)
        # Stems chosen by this process's writes in flight, not yet renamed into place
        # (guarded by the mailbox's thread lock). Only a hint that spares a collision:
        # the rename under the mailbox flock is what keeps processes apart.
        self._reserved: dict[tuple[str, str], set[str]] = {}
        self._stem_hints: dict[tuple[str, str], tuple[str, int]] = {}

    # -- locking ----------------------------------------------------------

    def _thread_lock(self, mailbox: str) -> threading.RLock:
        return self._mailbox_locks.thread_lock(mailbox)

    def mailbox_lock(self, mailbox: str) -> contextlib.AbstractContextManager[None]:
        """Exclusive access to one mailbox, across threads and processes; re-entrant."""
        return self._mailbox_locks.hold(mailbox)

    # -- dedup --------------------------------------------------------------

    def _index(self, mailbox: str, now: datetime.datetime | None) -> DedupIndex:
        """The mailbox's dedup index, caught up with the stored log (call under the lock)."""
        index = self._dedup.get(mailbox)
        if index is None:
            index = DedupIndex.scan(mailbox_dir(self.data_dir, "inbox", mailbox), now)
            self._dedup[mailbox] = index
        self._shared.catch_up(mailbox, index, now)
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
        ids = mailbox_owner_ids(owner)
        warn_unknown_owner(owner, ids)
        return self._publish_inbound(mailbox, ids, fields, body, attachments, when)

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

        Returns ``None`` for such a duplicate. The decision holds across threads
        and processes (the SMTP workers, ``aimx ingest``; see ``aimx.storage.dedup``):
        under the mailbox lock the delivery catches up on the stored log and
        claims the Message-ID; a delivery of a Message-ID that another one is
        still storing waits for it, then counts as its duplicate (or stores, if
        the first failed or its process died). The lock itself is held only
        for these decisions and the final rename, never across the writes and
        fsyncs, so deliveries to one mailbox overlap their disk waits. The
        Message-ID is logged as stored only once file and directory are
        durable, and before the claim is let go, so a failed store is never
        mistaken for one that happened.
        """
        ids = mailbox_owner_ids(owner)
        warn_unknown_owner(owner, ids)
        message_id = str(fields.get("message_id") or "")
        if not message_id:
            return self._publish_inbound(mailbox, ids, fields, body, attachments, when)
        key = message_id_key(message_id)
        claims = self._shared.open_claims(mailbox)
        try:
            while True:
                with self.mailbox_lock(mailbox):
                    index = self._index(mailbox, None)
                    if index.is_duplicate_key(key):
                        return None
                    self._shared.compact_if_due(mailbox, claims)
                    if try_claim(claims, key):
                        # A holder logs its store before letting go: read what it added.
                        self._shared.catch_up(mailbox, index)
                        if index.is_duplicate_key(key):
                            return None
                        break
                wait_for_claim(claims, key)
            stored = self._publish_inbound(mailbox, ids, fields, body, attachments, when)
            with self._thread_lock(mailbox):
                self._shared.note_stored(mailbox, key, when)
                index.record_key(key, when)
            return stored
        finally:
            close_claims(claims)

    def _publish_inbound(
        self,
        mailbox: str,
        ids: tuple[int, int] | None,
        fields: Mapping[str, Any],
        body: str,
        attachments: Sequence[Any],
        when: datetime.datetime,
    ) -> StoredEmail:
        directory = mailbox_dir(self.data_dir, "inbox", mailbox)
        with safefs.closing_fd(mailbox_dir_fd(self.data_dir, "inbox", mailbox, ids)) as dir_fd:
            stored = self._publish_inbound_at(dir_fd, directory, mailbox, ids, fields, body,
                                              attachments, when)
            note_stored(directory, dir_fd, stored.id, f"{stored.id}.md", stored.fields)
            return stored

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
                    source = temp_name(final)
                    made = write_file(dir_fd, source, frontmatter.render_email(record, body),
                                       ids, str(path))
                else:
                    unique = unique_attachment_names(names, reserved=(f"{stem}.md",))
                    files = [(name, a.data if isinstance(a.data, SpoolFile) else bytes(a.data))
                             for name, a in zip(unique, attachments, strict=True)]
                    record["attachments"] = [
                        {"filename": name, "content_type": _normalise_content_type(a.content_type),
                         "size": len(data), "path": name}
                        for (name, data), a in zip(files, attachments, strict=True)
                    ]
                    markdown = frontmatter.render_email(record, body)
                    source, made = stage_bundle(dir_fd, stem, markdown, files, ids, label)
                    final = stem
                    path = directory / stem / f"{stem}.md"
                pause_before_rename()
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
            except BaseException:
                if source is not None:
                    remove_quietly(dir_fd, source, label)
                raise
            finally:
                with lock:
                    reserved.discard(stem)
            if taken:
                remove_quietly(dir_fd, source, label)
                continue
            safefs.fsync_fd(dir_fd)
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
        ids = mailbox_owner_ids(owner)
        warn_unknown_owner(owner, ids)
        with self.mailbox_lock(mailbox), safefs.closing_fd(
                mailbox_dir_fd(self.data_dir, "sent", mailbox, ids, repair=True)) as dir_fd:
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
        ids = mailbox_owner_ids(owner)
        directory = mailbox_dir(self.data_dir, "inbox", mailbox)
        with self.mailbox_lock(mailbox):
            path = rewrite_read_state(directory, mailbox, email_id, read, ids, now)
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
