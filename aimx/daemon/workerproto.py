"""The AMP conversation between the daemon and its SMTP worker processes.

Each worker holds one end of a socket pair the daemon created and passed to it
as a child descriptor; nobody else can reach it. Workers report every stored
email (after its 250) so the daemon fires its hooks; the daemon tells workers
to re-read the config and to drain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.protocols import amp

# AMP caps one value at 65,535 bytes; larger frontmatter is read back from the file.
MAX_FIELDS_BYTES = 60_000


class MessageStored(amp.Command):
    """Worker → daemon: one email is stored and its 250 was sent.

    ``fields`` is the frontmatter as written (JSON), or "" when too large to
    send, in which case the daemon reads it from ``path``.
    """

    arguments = [
        (b"mailbox", amp.Unicode()),
        (b"email_id", amp.Unicode()),
        (b"path", amp.Unicode()),
        (b"fields", amp.Unicode()),
    ]
    response: list[tuple[bytes, amp.Argument]] = []


class AdmitSession(amp.Command):
    """Worker → daemon: may this new connection (its ``source`` key) be served?

    The session limits (D12: 100 in all, 20 per source) hold over all workers,
    so the daemon counts. ``refusal`` is the 421 reply, or "" to admit.
    ``session`` is the worker's id for it, named again in ``SessionEnded``.
    """

    arguments = [(b"session", amp.Integer()), (b"source", amp.Unicode())]
    response = [(b"refusal", amp.Unicode()), (b"accepting", amp.Boolean())]


class SessionEnded(amp.Command):
    """Worker → daemon: an admitted session is over (unknown ids are ignored)."""

    arguments = [(b"session", amp.Integer())]
    requiresAnswer = False


class SetAccepting(amp.Command):
    """Daemon → worker: accept new connections, or leave them to less busy workers.

    All workers wait on one listening socket and the kernel tends to wake the
    same one first, so the daemon balances: only the workers with the fewest
    open sessions accept. A worker pauses itself after each accept until told
    (in the ``AdmitSession`` answer or here).
    """

    arguments = [(b"accepting", amp.Boolean())]
    requiresAnswer = False


class ReloadConfig(amp.Command):
    """Daemon → worker: read ``config.toml`` again (the daemon has just installed it)."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"installed", amp.Boolean())]


class Drain(amp.Command):
    """Daemon → worker: stop accepting, finish sessions within ``seconds``, then exit."""

    arguments = [(b"seconds", amp.Float())]
    response: list[tuple[bytes, amp.Argument]] = []


def encode_fields(fields: dict[str, Any]) -> str:
    """The frontmatter as JSON, or "" when it would not fit in one AMP value."""
    text = json.dumps(fields, default=str, ensure_ascii=False)
    return text if len(text.encode()) <= MAX_FIELDS_BYTES else ""


def stored_result(mailbox: str, email_id: str, path: str, fields: dict[str, Any]) -> Any:
    """The ``IngestResult`` the daemon fires hooks with, rebuilt from a report."""
    from aimx.smtp.ingest import IngestResult

    return IngestResult(status="stored", mailbox=mailbox, email_id=email_id, path=Path(path),
                        fields=fields)
