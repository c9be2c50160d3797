"""Benchmark: ``email_list`` pages on a 10,000-message mailbox, through the real MCP server.

Builds a mailbox by writing files directly in the storage format, starts a real
daemon (``aimx serve`` on temp dirs and a free port), spawns ``aimx mcp`` with
the MCP SDK's stdio client and times ``email_list`` calls as an agent makes
them: the first page, a deep page, each filter alone, filters combined, and a
filter that matches nothing (the whole mailbox is scanned). ``mailbox_list``
is timed too: it is the daemon's MAILBOX-LIST that every ``email_list`` makes
first, so it shows how much of each call is the lookup; a second table times
the listing code alone, in process. Prints the first ("cold") call and p50/p95
of the following calls, in milliseconds.

    .venv/bin/python bench/email_list.py [--messages 10000] [--rounds 30]

Not part of ``make test``. As root the mailbox belongs to a test user (root may
not own a mailbox) and the MCP server runs as root; otherwise everything runs
as the current user.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aimx.mail import frontmatter  # noqa: E402
from aimx.mail.naming import slugify  # noqa: E402
from aimx.mcp import server as mcpserver  # noqa: E402
from tests.support.daemon import RunningDaemon  # noqa: E402

MAILBOX = "bench"
NEWEST = datetime.datetime(2025, 6, 30, 12, 0, tzinfo=datetime.UTC)
WORDS = ("invoice", "meeting", "lunch", "launch", "status", "report", "draft", "question",
         "travel", "notes", "budget", "review", "hiring", "offsite", "update", "release")
PARAGRAPH = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
             "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam.\n\n")


def owner_name() -> str:
    if os.geteuid() != 0:
        return getpass.getuser()
    from tests.support.users import ensure_user

    return ensure_user("aimxt-alice").name


def build_mailbox(directory: Path, count: int, seed: int = 7) -> None:
    """``count`` emails, newest every 5 minutes back from ``NEWEST``; about 10% unread,
    2% from the boss, a report subject now and then, bodies of a few KiB."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    senders = [f"Sender {i} <sender{i}@example.net>" for i in range(49)]
    for index in range(count):
        when = NEWEST - datetime.timedelta(minutes=5 * index)
        subject = " ".join(rng.choice(WORDS) for _ in range(3)).capitalize()
        sender = "The Boss <boss@corp.example>" if index % 50 == 7 else rng.choice(senders)
        email_id = f"{when:%Y-%m-%d-%H%M%S}-{slugify(subject)}"
        fields = {
            "id": email_id, "message_id": f"{index}.{seed}@example.net",
            "thread_id": f"{index:016x}", "from": sender, "to": f"{MAILBOX}@bench.test",
            "delivered_to": f"{MAILBOX}@bench.test", "subject": subject,
            "date": when.strftime("%a, %d %b %Y %H:%M:%S +0000"),
            "received_at": when.strftime("%Y-%m-%dT%H:%M:%S.000000Z"),
            "received_from_ip": "192.0.2.10", "size_bytes": 4096,
            "dkim": "pass", "spf": "pass", "dmarc": "pass", "trusted": "none",
            "mailbox": MAILBOX, "read": rng.random() > 0.1,
        }
        body = PARAGRAPH * rng.randint(5, 30)
        (directory / f"{email_id}.md").write_bytes(frontmatter.render_email(fields, body))


# (label, tool, arguments); mailbox_list is the floor: the daemon's MAILBOX-LIST that
# every email_list call makes first to resolve and authorize the mailbox.
SCENARIOS: list[tuple[str, str, dict[str, Any]]] = [
    ("mailbox_list (lookup only)", "mailbox_list", {}),
    ("first page (no filter)", "email_list", {}),
    ("deep page offset=5000", "email_list", {"offset": 5000}),
    ("limit=200", "email_list", {"limit": 200}),
    ("unread=true", "email_list", {"unread": True}),
    ("from=boss@corp", "email_list", {"from": "boss@corp"}),
    ("subject=report", "email_list", {"subject": "report"}),
    ("since=last 2 days", "email_list", {"since": "2025-06-28T12:00:00Z"}),
    ("since=whole mailbox", "email_list", {"since": "2020-01-01T00:00:00Z"}),
    ("from+unread combined", "email_list", {"from": "boss", "unread": True}),
    ("no match (full scan)", "email_list", {"subject": "no such subject"}),
]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def measure(daemon: RunningDaemon, rounds: int) -> list[tuple[str, float, float, float]]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "AIMX_RUNTIME_DIR": str(daemon.runtime_dir)}
    params = StdioServerParameters(command=sys.executable, args=["-m", "aimx.cli.main", "mcp"],
                                   env=env, cwd=str(ROOT))
    results = []
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        for label, tool, arguments in SCENARIOS:
            if tool == "email_list":
                arguments = {"mailbox": MAILBOX, **arguments}
            timings = []
            for _ in range(rounds + 1):
                start = time.perf_counter()
                result = await session.call_tool(tool, arguments)
                timings.append((time.perf_counter() - start) * 1000)
                if result.is_error:
                    raise SystemExit(f"{label}: {result.content[0].text}")
            cold, warm = timings[0], timings[1:]
            results.append((label, cold, statistics.median(warm), percentile(warm, 0.95)))
    return results


def measure_listing(directory: Path, rounds: int) -> list[tuple[str, float, float, float]]:
    """The listing work alone (the same code, in this process, no daemon lookup)."""
    results = []
    for label, tool, arguments in SCENARIOS:
        if tool != "email_list":
            continue
        arguments = dict(arguments)
        since = arguments.pop("since", None)
        sender, subject = arguments.pop("from", None), arguments.pop("subject", None)
        filters = mcpserver.ListFilters(
            unread=arguments.pop("unread", None),
            sender=sender.lower() if sender else None,
            subject=subject.lower() if subject else None,
            since=mcpserver.parse_since(since) if since else None)
        timings = []
        for _ in range(rounds + 1):
            start = time.perf_counter()
            mcpserver.list_emails(directory, "inbox", limit=arguments.get("limit", 50),
                                  offset=arguments.get("offset", 0), filters=filters)
            timings.append((time.perf_counter() - start) * 1000)
        warm = timings[1:]
        results.append((label, timings[0], statistics.median(warm), percentile(warm, 0.95)))
    return results


def print_table(title: str, results: list[tuple[str, float, float, float]]) -> None:
    print(f"\n{title}")
    print(f"{'scenario':<28}{'cold ms':>10}{'p50 ms':>10}{'p95 ms':>10}")
    for label, cold, p50, p95 in results:
        print(f"{label:<28}{cold:>10.1f}{p50:>10.1f}{p95:>10.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    config = (f'domain = "bench.test"\n\n[mailboxes.{MAILBOX}]\n'
              f'address = "{MAILBOX}@bench.test"\nowner = "{owner_name()}"\n')
    with RunningDaemon(config, start=False) as daemon:
        started = time.perf_counter()
        build_mailbox(daemon.data_dir / "inbox" / MAILBOX, args.messages)
        print(f"built {args.messages} messages in {time.perf_counter() - started:.1f} s")
        daemon.start()
        results = anyio.run(measure, daemon, args.rounds)
        listing = measure_listing(daemon.data_dir / "inbox" / MAILBOX, args.rounds)
    print_table(f"through aimx mcp ({args.messages} messages, {args.rounds} calls each "
                "after the first)", results)
    print_table("listing work alone (no daemon lookup)", listing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
