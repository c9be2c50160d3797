"""Listing a mailbox of 100,000 messages: ``mailbox_list`` and ``email_list`` pages.

The mailbox is written straight to disk (real aimx files, rendered by
``aimx.mail.frontmatter``, without fsync: only reading is measured here), then a
daemon is started on the data dir.

- ``mailbox_list``: the MAILBOX-LIST request the MCP tool makes, round trip
  through the daemon's socket (the daemon counts from the mailbox index).
- ``email_list``: one page of 50 rows, newest first, without filters and with
  each filter the tool has. Measured two ways, with identical rows checked:
  the listing code of ``aimx mcp`` as it stands (``mcpserver.list_emails``:
  a directory scan plus one file read per row looked at, with its in-process
  header cache cold and warm), and the same rows built from
  the per-mailbox index (``aimx.storage.index``).
"""

from __future__ import annotations

import datetime
import os
import pwd
import re
import smtplib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from aimx.mail import frontmatter
from aimx.mail.naming import slugify, stem_prefix
from aimx.storage.index import iter_listing, list_page, scan_counts
from bench.targets import DOMAIN, MAILBOX, OWNER
from tests.support.daemon import RunningDaemon

_START = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
_SENDERS = ("Ann Example <ann@example.com>", "Billing <billing@vendor.example>",
            "CI Robot <ci@build.example>", "Dana <dana@partner.example>",
            "Newsletter <news@list.example>")


def populate(inbox: Path, count: int, first: int = 0) -> None:
    """``count`` aimx emails, one every 37 s from 2025-01-01; 70% of them read."""
    inbox.mkdir(parents=True, exist_ok=True)
    entry = pwd.getpwnam(OWNER)
    os.chown(inbox, entry.pw_uid, entry.pw_gid)
    inbox.chmod(0o700)
    for i in range(first, first + count):
        when = _START + datetime.timedelta(seconds=37 * i)
        subject = f"Invoice {i} for project {i % 97}"
        stem = f"{stem_prefix(when)}-{slugify(subject)}"
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S")
        fields: dict[str, Any] = {
            "id": stem, "message_id": f"m{i}@example.com", "thread_id": f"{i:016x}",
            "from": _SENDERS[i % len(_SENDERS)], "to": f"{MAILBOX}@{DOMAIN}",
            "delivered_to": f"{MAILBOX}@{DOMAIN}", "subject": subject, "date": stamp + "Z",
            "received_at": stamp + ".000000Z", "received_from_ip": "203.0.113.5",
            "size_bytes": 2048, "dkim": "pass", "spf": "pass", "dmarc": "pass",
            "trusted": "false", "mailbox": MAILBOX, "read": i % 10 >= 3,
        }
        if fields["read"]:
            fields["read_at"] = stamp + ".500000Z"
        path = inbox / f"{stem}.md"
        path.write_bytes(frontmatter.render_email(fields, f"Invoice {i} is attached.\n"))
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _timed(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    """Median milliseconds of ``runs`` calls, and the last result."""
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


@attrs.frozen
class ListingCase:
    name: str
    mcp_cold_ms: float  # mcpserver.list_emails in a fresh process (empty header cache)
    mcp_warm_ms: float  # the same call again (an MCP process keeps its cache)
    index_ms: float  # the rows from the storage index
    rows: int
    identical: bool


@attrs.frozen
class ListingResult:
    messages: int
    populate_s: float
    index_build_ms: float  # the first MAILBOX-LIST: builds the index from the files
    mailbox_list_ms: float
    mailbox_list_scan_ms: float  # what counting by opening every file costs (before the index)
    cases: list[ListingCase]
    restart_mailbox_list_ms: float  # first MAILBOX-LIST after a daemon restart, dir unchanged
    restart_page_ms: float  # then the first page through a freshly opened index
    restart_stored_ms: float  # ... after the daemon stored CHANGED_WHILE_DOWN emails
    restart_stored_read: int  # ... files that re-scan had to read (-1: no re-scan logged)
    restart_changed_ms: float  # ... with CHANGED_WHILE_DOWN files written behind its back


#: Emails the daemon stores, then emails written behind its back, for the restart figures.
CHANGED_WHILE_DOWN = 1000


def _index_rows(inbox: Path, limit: int, offset: int, filters: Any) -> list[dict[str, Any]]:
    """``email_list`` rows from the index, with the MCP tool's own row and filter rules."""
    from aimx.mcp import server as mcpserver

    if not filters.active:
        return [mcpserver.list_row(e.id, e.summary, "inbox")
                for e in list_page(inbox, offset, limit) if e.summary is not None]
    rows: list[dict[str, Any]] = []
    skipped = 0
    floor = filters.since - mcpserver._STEM_SLACK if filters.since is not None else None

    def recent_enough(email_id: str) -> bool:  # the tool's shortcut: ids start with a time
        stored = mcpserver.stem_time(email_id)
        return floor is None or stored is None or stored >= floor

    for entry in iter_listing(inbox, recent_enough if floor is not None else None):
        if entry.summary is None or not mcpserver.matches(entry.summary, "inbox", filters):
            continue
        if skipped < offset:
            skipped += 1
            continue
        rows.append(mcpserver.list_row(entry.id, entry.summary, "inbox"))
        if len(rows) >= limit:
            break
    return rows


def _after_restart(daemon: RunningDaemon, inbox: Path) -> tuple[float, float]:
    """The first MAILBOX-LIST after a restart (the index file kept, the dir unchanged),
    then the first page through an index connection opened afresh."""
    from aimx.daemon import protocol
    from aimx.daemon.client import Client
    from aimx.mcp import server as mcpserver
    from aimx.storage.index import MailboxIndex

    daemon.stop()
    daemon.start()
    list_ms, _ = _timed(lambda: Client(daemon.socket_path).call(protocol.MailboxList), 1)
    index = MailboxIndex.for_mailbox_dir(inbox)
    if index is not None:
        index.close()
    page_ms, _ = _timed(lambda: _index_rows(inbox, 50, 0, mcpserver.ListFilters()), 1)
    return list_ms, page_ms


def measure(count: int = 100_000, runs: int = 15) -> ListingResult:
    from aimx.daemon import protocol
    from aimx.daemon.client import Client
    from aimx.mcp import server as mcpserver

    daemon = RunningDaemon({"domain": DOMAIN,
                            "mailboxes": {MAILBOX: {"address": f"{MAILBOX}@{DOMAIN}",
                                                    "owner": OWNER}}}, start=False)
    try:
        inbox = daemon.data_dir / "inbox" / MAILBOX
        started = time.perf_counter()
        populate(inbox, count)
        populate_s = time.perf_counter() - started
        scan_ms, _ = _timed(lambda: scan_counts(inbox), 1)
        daemon.start()
        client = Client(daemon.socket_path)
        build_ms, _ = _timed(lambda: client.call(protocol.MailboxList), 1)
        time.sleep(1.2)  # past the index's "racy" window, as for any mailbox at rest
        client.call(protocol.MailboxList)
        list_ms, reply = _timed(lambda: client.call(protocol.MailboxList), runs)
        row = next(r for r in reply["rows"] if r["name"] == MAILBOX)
        if (row["total"], row["unread"]) != scan_counts(inbox):
            raise RuntimeError("MAILBOX-LIST counts disagree with the files")
        filters = mcpserver.ListFilters
        cases = []
        for name, flt in (
            ("page of 50, no filter", filters()),
            ("page of 50, unread", filters(unread=True)),
            ("page of 50, from contains 'dana'", filters(sender="dana")),
            ("page of 50, subject contains 'project 7'", filters(subject="project 7")),
            ("page of 50, since 2025-02-01", filters(
                since=datetime.datetime(2025, 2, 1, tzinfo=datetime.UTC))),
        ):
            cold_ms, expected = _timed(lambda f=flt: mcpserver.list_emails(
                inbox, "inbox", limit=50, offset=0, filters=f), 1)
            warm_ms, _ = _timed(lambda f=flt: mcpserver.list_emails(
                inbox, "inbox", limit=50, offset=0, filters=f), 3)
            index_ms, got = _timed(lambda f=flt: _index_rows(inbox, 50, 0, f), runs)
            cases.append(ListingCase(name, cold_ms, warm_ms, index_ms, len(got),
                                     got == expected))
        restart_list_ms, restart_page_ms = _after_restart(daemon, inbox)
        # Mail the daemon stored, then a restart: the index has its rows, so the first
        # listing re-scans the names and reads no file.
        _send(daemon.smtp_port, CHANGED_WHILE_DOWN)
        daemon.stop()
        daemon.start()
        stored_ms, _ = _timed(lambda: Client(daemon.socket_path).call(protocol.MailboxList), 1)
        scans = re.findall(r"mailbox index re-scanned dir=\S*/inbox/\S+ emails=\d+ read=(\d+)",
                           daemon.log_text())
        stored_read = int(scans[-1]) if scans else -1
        # Files written behind the daemon's back while it was down: those are read.
        daemon.stop()
        populate(inbox, CHANGED_WHILE_DOWN, first=count)
        daemon.start()
        changed_ms, _ = _timed(lambda: Client(daemon.socket_path).call(protocol.MailboxList), 1)
        return ListingResult(count, populate_s, build_ms, list_ms, scan_ms, cases,
                             restart_list_ms, restart_page_ms, stored_ms, stored_read,
                             changed_ms)
    finally:
        daemon.close()


def _send(port: int, count: int) -> None:
    """``count`` small messages to the bench mailbox through the daemon's SMTP."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        for i in range(count):
            client.sendmail("ann@example.com", [f"{MAILBOX}@{DOMAIN}"],
                            f"From: ann@example.com\r\nTo: {MAILBOX}@{DOMAIN}\r\n"
                            f"Subject: delivered {i}\r\nMessage-ID: <d{i}.{time.time_ns()}"
                            "@example.com>\r\n\r\nhello\r\n")
