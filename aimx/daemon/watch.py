"""Push on new mail: the daemon's registry of watching socket connections.

A client that sent WATCH is a ``Watcher``. Whenever the main process learns
of a change (an inbound email stored, a sent copy written, a read state
flipped, a mailbox created or deleted) it ``publish``es one ``MailEvent``;
each watcher whose caller may read that mailbox *now* (the listing's rule:
root, or the owner by uid) and who watches it gets a ``WATCH-EVENT``.

Each event waits for the client's answer. A client that stops answering is
dropped once ``MAX_UNANSWERED`` events are outstanding, so a stalled reader
costs a bounded amount of memory; it reconnects and re-reads what it missed.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from aimx.logs import logger
from aimx.mail.headers import rfc3339_utc

log = logger("aimx::uds")

MAX_UNANSWERED = 256  # outstanding WATCH-EVENTs per connection before it is dropped
_MAX_TEXT = 1000  # characters of From / Subject carried in an event


@attrs.frozen
class MailEvent:
    """One change a watcher may hear about (the fields of a ``WATCH-EVENT``)."""

    event: str  # protocol.WATCH_EVENTS
    mailbox: str
    at: str
    folder: str | None = None
    id: str | None = None
    sender: str | None = None
    subject: str | None = None

    def fields(self) -> dict[str, Any]:
        return {"event": self.event, "mailbox": self.mailbox, "at": self.at,
                "folder": self.folder, "id": self.id, "from": self.sender,
                "subject": self.subject}


def now_rfc3339() -> str:
    return rfc3339_utc(datetime.datetime.now(datetime.UTC))


def _short(value: object) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text[:_MAX_TEXT]


def email_event(event: str, mailbox: str, folder: str, email_id: str,
                fields: dict[str, Any] | None = None) -> MailEvent:
    """An event about one email; ``fields`` (its frontmatter) supplies From and Subject."""
    fields = fields or {}
    return MailEvent(event, mailbox, now_rfc3339(), folder, email_id,
                     _short(fields.get("from")), _short(fields.get("subject")))


def may_read(caller: Any, mailbox: Any) -> bool:
    """The listing's rule: root reads every mailbox, anyone else the ones they own."""
    return mailbox is not None and (caller.is_root or caller.owns(mailbox))


@attrs.define(eq=False)
class Watcher:
    """One watching connection: who asks, which mailboxes (``None``: all), how to reach it."""

    caller: Any
    names: frozenset[str] | None
    send: Callable[[MailEvent], None]

    def wants(self, config: Any, event: MailEvent) -> bool:
        if self.names is not None and event.mailbox not in self.names:
            return False
        return may_read(self.caller, config.mailboxes.get(event.mailbox))


@attrs.define
class WatchHub:
    """Every watching connection of the daemon (reactor thread only)."""

    watchers: set[Watcher] = attrs.field(factory=set)

    def add(self, watcher: Watcher) -> None:
        self.watchers.add(watcher)

    def remove(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def publish(self, config: Any, event: MailEvent) -> None:
        """Send ``event`` to every watcher that may read its mailbox under ``config``."""
        for watcher in list(self.watchers):
            if watcher.wants(config, event):
                try:
                    watcher.send(event)
                except Exception:  # noqa: BLE001 (one broken watcher must not stop the rest)
                    log.exception("watch event to uid %s failed", watcher.caller.uid)

    def inbound_stored(self, config: Any, results: Iterable[Any]) -> None:
        """Stored inbound emails (``IngestResult``-shaped) as ``stored`` events."""
        if not self.watchers:
            return
        for result in results:
            if getattr(result, "status", None) == "stored" and result.email_id:
                self.publish(config, email_event("stored", result.mailbox, "inbox",
                                                 result.email_id, result.fields))

    def sent_stored(self, config: Any, mailbox: str, copy: Any) -> None:
        """A sent copy (``StoredEmail``) written to ``sent/<mailbox>``."""
        if self.watchers:
            self.publish(config, email_event("stored", mailbox, "sent", copy.id, copy.fields))

    def read_state(self, config: Any, mailbox: str, email_id: str, read: bool) -> None:
        if self.watchers:
            self.publish(config, email_event("read" if read else "unread", mailbox, "inbox",
                                             email_id))

    def config_swapped(self, old: Any, new: Any) -> None:
        """Mailboxes that came or went with a config swap, whatever made it (API, SIGHUP).

        A deleted mailbox is judged against the old config: whoever could read
        it hears that it is gone.
        """
        if not self.watchers:
            return
        at = now_rfc3339()
        for name in sorted(set(old.mailboxes) - set(new.mailboxes)):
            self.publish(old, MailEvent("deleted", name, at))
        for name in sorted(set(new.mailboxes) - set(old.mailboxes)):
            self.publish(new, MailEvent("created", name, at))
