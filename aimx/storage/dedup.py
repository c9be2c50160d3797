"""Message-ID dedup: a message delivered twice to one mailbox within 24 h is stored once.

The Message-IDs of each mailbox are kept in memory and rebuilt from the files'
frontmatter the first time a mailbox is written after start-up.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from aimx.logs import kv, logger
from aimx.storage.emailfiles import email_entries_at, mailbox_or_none, read_entry_fields

log = logger("aimx::storage")


DEDUP_WINDOW = datetime.timedelta(hours=24)
DEDUP_CAP = 100_000


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
