"""``aimx mcp`` end to end: the SDK's own client over stdio, a real daemon, real users.

Each test spawns ``aimx mcp`` as the unprivileged test user ``alice`` through
the MCP SDK's ``stdio_client`` and talks to it the way an agent does. The
daemon is a real ``aimx serve`` (``RunningDaemon``); most tests read what it
sent from its ``AIMX_TEST_MAIL_DROP`` file, the end-to-end agent flow has a
daemon of its own that delivers to an SMTP sink found through the test DNS
server. Inbound mail arrives over real SMTP.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import json
import os
import shutil
import smtplib
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError

from aimx import __version__
from aimx.mail import frontmatter
from aimx.mcp import server as mcpserver
from aimx.mcp.server import DAEMON_DOWN
from tests.support.daemon import REPO_ROOT, RunningDaemon
from tests.support.dnsserver import DnsServer
from tests.support.smtpsink import SmtpSink
from tests.support.users import LinuxUser, aimx_as_command, ensure_user

DOMAIN = "test.local"

CONFIG = """\
domain = "test.local"
dns_resolvers = ["{dns}"]
signature = ""

[mailboxes.catchall]
address = "*@test.local"
owner = "{alice}"

[mailboxes.alice]
address = "alice@test.local"
owner = "{alice}"

[mailboxes.bob]
address = "bob@test.local"
owner = "{bob}"
"""

# What ``aimx mcp`` loads before it drops to the user (tests.support.users): the
# server's imports, which every other command can do without.
MCP_PREPARE = """
import anyio._backends._asyncio, aimx.mcp.server
aimx.mcp.server.build_server()
"""

TOOL_NAMES = {
    "mailbox_list", "mailbox_create", "mailbox_delete", "email_list", "email_read",
    "email_mark_read", "email_mark_unread", "email_send", "email_reply", "hook_create",
    "hook_list", "hook_delete",
}


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer({}) as server:
        yield server


@pytest.fixture(scope="module")
def users(test_users) -> dict[str, LinuxUser]:
    return {short: ensure_user(user.name) for short, user in test_users.items()}


@pytest.fixture(scope="module")
def daemon(dns, users) -> Iterator[RunningDaemon]:
    config = CONFIG.format(dns=dns.address, alice=users["alice"].name, bob=users["bob"].name)
    with RunningDaemon(config, start=False) as d:
        d.mail_drop = d.base / "outbox" / "drop.txt"
        d.extra_env["AIMX_TEST_MAIL_DROP"] = str(d.mail_drop)
        d.start()
        yield d


@pytest.fixture
def alice_inbox(daemon, users) -> Iterator[Path]:
    """alice's inbox, emptied before and after the test."""
    path = mailbox_dir(daemon, "inbox", "alice", users["alice"])
    clear(path)
    yield path
    clear(path)


def mailbox_dir(d: RunningDaemon, folder: str, name: str, owner: LinuxUser) -> Path:
    path = d.data_dir / folder / name
    path.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o755)
    os.chown(path, owner.uid, owner.gid)
    path.chmod(0o700)
    return path


def clear(path: Path) -> None:
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def store(directory: Path, email_id: str, owner: LinuxUser, *, body: str = "Hello.\n",
          bundle: bool = False, **fields: Any) -> Path:
    """Write one email in the storage format, owned by ``owner``."""
    record = {"id": email_id, "message_id": f"{email_id}@example.com", "thread_id": "0" * 16,
              "from": "Ann <ann@example.com>", "to": "alice@test.local",
              "delivered_to": "alice@test.local", "subject": f"about {email_id}",
              "date": "Sun, 15 Jun 2025 12:00:00 +0000",
              "received_at": "2025-06-15T12:00:00Z", "size_bytes": 100, "dkim": "none",
              "spf": "none", "dmarc": "none", "trusted": "none", "mailbox": directory.name,
              "read": False}
    record.update(fields)
    target = directory
    if bundle:
        target = directory / email_id
        target.mkdir()
        os.chown(target, owner.uid, owner.gid)
    path = target / f"{email_id}.md"
    path.write_bytes(frontmatter.render_email(record, body))
    os.chown(path, owner.uid, owner.gid)
    return path


# -- talking to ``aimx mcp`` -------------------------------------------------------------


def server_params(d: RunningDaemon, user: LinuxUser, runtime_dir: Path | None = None
                  ) -> StdioServerParameters:
    env = {"HOME": user.home, "USER": user.name, "LOGNAME": user.name,
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "AIMX_RUNTIME_DIR": str(runtime_dir or d.runtime_dir)}
    command = aimx_as_command(user, ["mcp"], prepare=MCP_PREPARE)
    return StdioServerParameters(command=command[0], args=command[1:], env=env,
                                 cwd=str(REPO_ROOT))


@asynccontextmanager
async def session_for(params: StdioServerParameters):
    with tempfile.TemporaryFile("w+") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), \
                ClientSession(read, write) as session:
            session.init_result = await session.initialize()
            yield session


def with_mcp(d: RunningDaemon, user: LinuxUser,
             body: Callable[[ClientSession], Awaitable[Any]], *,
             runtime_dir: Path | None = None) -> Any:
    """Run ``body(session)`` against a fresh ``aimx mcp`` running as ``user``."""
    async def main() -> Any:
        with anyio.fail_after(60):
            async with session_for(server_params(d, user, runtime_dir)) as session:
                return await body(session)

    return anyio.run(main)


async def call(session: ClientSession, tool: str, **arguments: Any) -> tuple[bool, str]:
    """(isError, text) of one tool call."""
    result = await session.call_tool(tool, arguments)
    assert len(result.content) == 1 and result.content[0].type == "text"
    return bool(result.is_error), result.content[0].text


async def ok(session: ClientSession, tool: str, **arguments: Any) -> str:
    is_error, text = await call(session, tool, **arguments)
    assert not is_error, text
    return text


async def fails(session: ClientSession, tool: str, **arguments: Any) -> str:
    is_error, text = await call(session, tool, **arguments)
    assert is_error, text
    return text


async def rejected(session: ClientSession, tool: str, **arguments: Any) -> MCPError:
    with pytest.raises(MCPError) as caught:
        await session.call_tool(tool, arguments)
    assert caught.value.code == types.INVALID_PARAMS
    return caught.value


def dropped_messages(d: RunningDaemon) -> list[email.message.EmailMessage]:
    try:
        text = d.mail_drop.read_bytes()
    except FileNotFoundError:
        return []
    parts = text.split(b"----- AIMX TEST DROP -----\n")
    return [email.message_from_bytes(part, policy=email.policy.default)
            for part in parts if part.strip()]


def deliver(d: RunningDaemon, rcpt: str, headers: str, body: str = "Hi there.\r\n") -> None:
    with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=30) as smtp:
        smtp.sendmail("ann@example.com", [rcpt], headers + "\r\n" + body)


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# -- pure helpers ----------------------------------------------------------------------------


def test_since_accepts_rfc3339_and_rejects_junk():
    utc = datetime.UTC
    assert mcpserver.parse_since("2025-06-15T09:00:00Z") == \
        datetime.datetime(2025, 6, 15, 9, tzinfo=utc)
    assert mcpserver.parse_since("2025-06-15T11:00:00+02:00") == \
        datetime.datetime(2025, 6, 15, 9, tzinfo=utc)
    assert mcpserver.parse_since("yesterday") is None
    # Stored dates come in both shapes; both compare as instants.
    assert mcpserver.parse_instant("Sun, 15 Jun 2025 09:00:00 +0000") == \
        mcpserver.parse_instant("2025-06-15T09:00:00Z")


# -- the tool catalogue ------------------------------------------------------------------------


def test_tools_list_has_exactly_the_twelve_tools(daemon, users):
    async def body(session: ClientSession):
        return session.init_result, (await session.list_tools()).tools

    init, tools = with_mcp(daemon, users["alice"], body)
    assert init.server_info.name == "aimx"
    assert init.server_info.version == __version__
    assert init.instructions == "aimx email server. Manage mailboxes and emails for AI agents"
    assert init.capabilities.tools is not None
    assert init.capabilities.prompts is None
    # Mailboxes are resources too (tests/test_watch.py), with subscriptions and listChanged.
    assert init.capabilities.resources.subscribe and init.capabilities.resources.list_changed

    by_name = {tool.name: tool for tool in tools}
    assert set(by_name) == TOOL_NAMES and len(tools) == 12
    required = {name: set(tool.input_schema.get("required", [])) for name, tool in by_name.items()}
    assert required == {
        "mailbox_list": set(), "mailbox_create": {"name"}, "mailbox_delete": {"name"},
        "email_list": {"mailbox"}, "email_read": {"mailbox", "id"},
        "email_mark_read": {"mailbox", "id"}, "email_mark_unread": {"mailbox", "id"},
        "email_send": {"from_mailbox", "to", "subject", "body"},
        "email_reply": {"mailbox", "id", "body"},
        "hook_create": {"mailbox", "event", "cmd"}, "hook_list": set(), "hook_delete": {"name"},
    }
    assert list(by_name["email_send"].input_schema["properties"]) == [
        "from_mailbox", "to", "subject", "reply_to", "body", "attachments", "references",
        "text_only", "html_body", "reply_to_address", "message_id",
        "idempotency_key", "auto_submitted"]
    for name in ("mailbox_create", "mailbox_delete", "email_mark_read", "email_mark_unread"):
        assert by_name[name].input_schema["additionalProperties"] is False
    assert set(by_name["email_list"].input_schema["properties"]) >= {
        "unread", "from", "subject", "since"}
    # The guidance an agent needs is in the descriptions.
    send = by_name["email_send"].input_schema["properties"]
    assert "NEVER set this for prose" in send["text_only"]["description"]
    assert "Markdown" in send["body"]["description"]
    assert "ignored" in send["references"]["description"]
    hook = by_name["hook_create"].input_schema["properties"]
    assert "explicitly asks" in hook["fire_on_untrusted"]["description"]
    assert "600" in hook["timeout_secs"]["description"]


# -- mailboxes ------------------------------------------------------------------------------


def test_mailbox_tools(daemon, users):
    async def body(session: ClientSession):
        listed = json.loads(await ok(session, "mailbox_list"))
        assert [row["name"] for row in listed] == ["alice", "catchall"]  # never bob's
        assert set(listed[0]) == {"name", "address", "inbox_path", "sent_path", "total",
                                  "unread", "sent_count", "registered"}
        assert listed[0]["address"] == "alice@test.local"

        assert await ok(session, "mailbox_create", name="scratch") == "scratch@test.local"
        assert await fails(session, "mailbox_create", name="scratch") == \
            "[MAILBOX] mailbox 'scratch' already exists"
        assert "scratch" in [r["name"] for r in json.loads(await ok(session, "mailbox_list"))]
        await rejected(session, "mailbox_create", name="x", owner="root")
        await rejected(session, "mailbox_create")

        await rejected(session, "mailbox_delete", name="scratch", wipe=True)
        assert await fails(session, "mailbox_delete", name="bob") == \
            "Mailbox 'bob' does not exist."
        assert await fails(session, "mailbox_delete", name="catchall", force=True) == \
            "Cannot delete the catchall mailbox"
        assert await ok(session, "mailbox_delete", name="scratch") == \
            "Mailbox 'scratch' deleted."
        return json.loads(await ok(session, "mailbox_list"))

    after = {row["name"]: row for row in with_mcp(daemon, users["alice"], body)}
    # The config entry is gone; the (empty) directories stay, listed as unregistered.
    assert "scratch" not in tomllib.loads(daemon.config_path.read_text())["mailboxes"]
    assert after["scratch"]["registered"] is False and after["scratch"]["address"] is None
    shutil.rmtree(daemon.data_dir / "inbox" / "scratch")
    shutil.rmtree(daemon.data_dir / "sent" / "scratch")


def test_daemon_down_is_reported_by_every_tool(daemon, users, tmp_path):
    nowhere = tmp_path / "run"
    nowhere.mkdir()
    nowhere.chmod(0o755)
    calls = [
        ("mailbox_list", {}), ("mailbox_create", {"name": "x"}),
        ("mailbox_delete", {"name": "x"}), ("email_list", {"mailbox": "alice"}),
        ("email_read", {"mailbox": "alice", "id": "a"}),
        ("email_mark_read", {"mailbox": "alice", "id": "a"}),
        ("email_mark_unread", {"mailbox": "alice", "id": "a"}),
        ("email_send", {"from_mailbox": "alice", "to": "x@example.com", "subject": "s",
                        "body": "b"}),
        ("email_reply", {"mailbox": "alice", "id": "a", "body": "b"}),
        ("hook_create", {"mailbox": "alice", "event": "on_receive", "cmd": ["/bin/true"]}),
        ("hook_list", {}), ("hook_delete", {"name": "h"}),
    ]

    async def body(session: ClientSession):
        texts = {tool: await fails(session, tool, **args) for tool, args in calls}
        # The exclusion check needs no daemon at all: it answers before any socket I/O.
        exclusive = await fails(session, "email_send", from_mailbox="alice", to="x@example.com",
                                subject="s", body="b", text_only=True, html_body="")
        return texts, exclusive

    texts, exclusive = with_mcp(daemon, users["alice"], body, runtime_dir=nowhere)
    assert texts == {tool: DAEMON_DOWN for tool, _ in calls}
    assert exclusive == "AIMX/1 SEND: --text-only and --html-body are mutually exclusive"


# -- listing --------------------------------------------------------------------------------


def test_email_list_paging_rules(daemon, users, alice_inbox):
    alice = users["alice"]
    ids = [f"2025-06-15-12{minute:02d}{second:02d}-m" for minute in range(4)
           for second in range(60)][:205]
    for email_id in ids:
        store(alice_inbox, email_id, alice)
    newest = sorted(ids, reverse=True)
    # A bundle counts once, at its id; a symlink is never listed.
    store(alice_inbox, "2025-06-16-000000-bundle", alice, bundle=True)
    (alice_inbox / "2025-06-17-000000-link.md").symlink_to(alice_inbox / f"{ids[0]}.md")
    # On the first page: one file without delimiters, one with broken TOML.
    broken = alice_inbox / f"{newest[1]}.md"
    broken.write_text("no frontmatter here\n")
    bad_toml = alice_inbox / f"{newest[3]}.md"
    bad_toml.write_text('+++\nsubject = "unterminated\n+++\n\nbody\n')
    for path in (broken, bad_toml):
        os.chown(path, alice.uid, alice.gid)

    async def body(session: ClientSession):
        page = json.loads(await ok(session, "email_list", mailbox="alice"))
        capped = json.loads(await ok(session, "email_list", mailbox="alice", limit=500))
        empty = await ok(session, "email_list", mailbox="alice", limit=0)
        past = await ok(session, "email_list", mailbox="alice", offset=206)
        tail = json.loads(await ok(session, "email_list", mailbox="alice", offset=204))
        return page, capped, empty, past, tail

    page, capped, empty, past, tail = with_mcp(daemon, alice, body)
    # 50 slots, two of them unreadable files: dropped without back-filling.
    assert len(page) == 48
    assert page[0]["id"] == "2025-06-16-000000-bundle"
    assert [row["id"] for row in page[1:]] == [newest[0], newest[2]] + newest[4:49]
    assert page[1] == {"id": newest[0], "from": "Ann <ann@example.com>",
                       "to": "alice@test.local", "subject": f"about {newest[0]}",
                       "date": "Sun, 15 Jun 2025 12:00:00 +0000", "read": False}
    assert len(capped) == 198  # 200 slots minus the two unreadable files
    assert empty == "[]" and past == "[]"
    assert [row["id"] for row in tail] == [newest[-2], newest[-1]]


def test_email_list_sent_rows_and_errors(daemon, users):
    alice = users["alice"]
    sent = mailbox_dir(daemon, "sent", "alice", alice)
    clear(sent)
    store(sent, "2025-06-15-120000-out", alice, outbound=True, outbound_format="markdown",
          delivery_status="delivered")
    store(sent, "2025-06-15-130000-legacy", alice)  # no delivery_status at all

    async def body(session: ClientSession):
        rows = json.loads(await ok(session, "email_list", mailbox="alice", folder="sent"))
        return rows, [
            await fails(session, "email_list", mailbox="alice", folder="drafts"),
            await fails(session, "email_list", mailbox="bob"),
            await fails(session, "email_list", mailbox="nobody"),
            await fails(session, "email_list", mailbox="alice", since="last week"),
        ]

    try:
        rows, errors = with_mcp(daemon, alice, body)
    finally:
        clear(sent)
    assert rows == [
        {"id": "2025-06-15-130000-legacy", "from": "Ann <ann@example.com>",
         "to": "alice@test.local", "subject": "about 2025-06-15-130000-legacy",
         "date": "Sun, 15 Jun 2025 12:00:00 +0000", "delivery_status": ""},
        {"id": "2025-06-15-120000-out", "from": "Ann <ann@example.com>",
         "to": "alice@test.local", "subject": "about 2025-06-15-120000-out",
         "date": "Sun, 15 Jun 2025 12:00:00 +0000", "delivery_status": "delivered"},
    ]
    assert errors == [
        "Invalid folder 'drafts': expected \"inbox\" or \"sent\".",
        "Mailbox 'bob' does not exist.",
        "Mailbox 'nobody' does not exist.",
        "Invalid since 'last week': expected an RFC 3339 timestamp such as "
        "2025-06-15T09:00:00Z.",
    ]


def test_email_list_filters_apply_before_paging(daemon, users, alice_inbox):
    alice = users["alice"]
    store(alice_inbox, "2025-06-10-080000-a", alice, **{"from": "Boss <BOSS@corp.example>"},
          subject="Quarterly REPORT", received_at="2025-06-10T08:00:00Z", read=True)
    store(alice_inbox, "2025-06-11-080000-b", alice, **{"from": "boss@corp.example"},
          subject="lunch?", received_at="2025-06-11T08:00:00Z")
    store(alice_inbox, "2025-06-12-080000-c", alice, **{"from": "news@list.example"},
          subject="Weekly report", received_at="2025-06-12T08:00:00Z")
    store(alice_inbox, "2025-06-13-080000-d", alice, **{"from": "Boss <boss@corp.example>"},
          subject="Re: weekly report", received_at="2025-06-13T08:00:00Z")
    (alice_inbox / "2025-06-14-080000-bad.md").write_text("+++\nread = [\n+++\n")
    os.chown(alice_inbox / "2025-06-14-080000-bad.md", alice.uid, alice.gid)

    def ids(text: str) -> list[str]:
        return [row["id"][11:] for row in json.loads(text)]

    async def body(session: ClientSession):
        listing = {}
        for label, args in {
            "unread": {"unread": True},
            "read": {"unread": False},
            "from": {"from": "BOSS@corp"},
            "subject": {"subject": "report"},
            "since": {"since": "2025-06-11T08:00:00Z"},
            "since_offset": {"since": "2025-06-11T10:00:00+02:00"},
            "combined": {"from": "boss", "subject": "report", "unread": True},
            "paged": {"from": "boss", "offset": 1, "limit": 1},
            "none": {"subject": "no such subject"},
        }.items():
            listing[label] = ids(await ok(session, "email_list", mailbox="alice", **args))
        return listing

    listing = with_mcp(daemon, alice, body)
    assert listing == {
        "unread": ["080000-d", "080000-c", "080000-b"],
        "read": ["080000-a"],
        "from": ["080000-d", "080000-b", "080000-a"],
        "subject": ["080000-d", "080000-c", "080000-a"],
        "since": ["080000-d", "080000-c", "080000-b"],
        "since_offset": ["080000-d", "080000-c", "080000-b"],
        "combined": ["080000-d"],
        "paged": ["080000-b"],
        "none": [],
    }


# -- reading and marking ---------------------------------------------------------------------


def test_email_read_and_its_errors(daemon, users, alice_inbox):
    alice = users["alice"]
    plain = store(alice_inbox, "2025-06-15-120000-hello", alice, body="Hi **Alice**.\n")
    bundled = store(alice_inbox, "2025-06-15-130000-files", alice, bundle=True)
    # bob's mail, planted behind a symlink in alice's inbox, must never be readable.
    bob_dir = mailbox_dir(daemon, "inbox", "bob", users["bob"])
    secret = store(bob_dir, "2025-06-15-120000-secret", users["bob"], body="bob only\n")
    (alice_inbox / "2025-06-15-140000-leak.md").symlink_to(secret)
    (alice_inbox / "2025-06-15-150000-dirlink").symlink_to(bob_dir)
    sent = mailbox_dir(daemon, "sent", "alice", alice)
    sent_copy = store(sent, "2025-06-15-160000-out", alice, outbound=True,
                      outbound_format="markdown", delivery_status="delivered")

    async def body(session: ClientSession):
        return {
            "plain": await ok(session, "email_read", mailbox="alice",
                              id="2025-06-15-120000-hello"),
            "bundle": await ok(session, "email_read", mailbox="alice",
                               id="2025-06-15-130000-files", folder="inbox"),
            "sent": await ok(session, "email_read", mailbox="alice",
                             id="2025-06-15-160000-out", folder="sent"),
            "errors": [
                await fails(session, "email_read", mailbox="alice", id="../x"),
                await fails(session, "email_read", mailbox="alice", id="a/b"),
                await fails(session, "email_read", mailbox="alice", id=""),
                await fails(session, "email_read", mailbox="alice", id="2025-06-15-140000-leak"),
                await fails(session, "email_read", mailbox="alice",
                            id="2025-06-15-150000-dirlink"),
                await fails(session, "email_read", mailbox="alice", id="missing"),
                await fails(session, "email_read", mailbox="alice",
                            id="2025-06-15-120000-hello", folder="Inbox"),
                await fails(session, "email_read", mailbox="bob",
                            id="2025-06-15-120000-secret"),
            ],
        }

    expected = {"plain": plain.read_text(), "bundle": bundled.read_text(),
                "sent": sent_copy.read_text()}
    try:
        result = with_mcp(daemon, alice, body)
    finally:
        clear(bob_dir)
        clear(sent)
    assert {key: result[key] for key in expected} == expected
    assert result["errors"] == [
        "Email ID contains invalid characters.",
        "Email ID contains invalid characters.",
        "Email ID cannot be empty.",
        "Email '2025-06-15-140000-leak' not found in mailbox 'alice'.",
        "Email '2025-06-15-150000-dirlink' not found in mailbox 'alice'.",
        "Email 'missing' not found in mailbox 'alice'.",
        "Invalid folder 'Inbox': expected \"inbox\" or \"sent\".",
        "Mailbox 'bob' does not exist.",
    ]


def test_mark_read_and_unread(daemon, users, alice_inbox):
    alice = users["alice"]
    path = store(alice_inbox, "2025-06-15-120000-hello", alice)

    def read_flag() -> bool:
        return frontmatter.parse(path.read_bytes()).get("read") is True

    async def body(session: ClientSession):
        marked = await ok(session, "email_mark_read", mailbox="alice",
                          id="2025-06-15-120000-hello")
        after_read = read_flag()
        listed = json.loads(await ok(session, "email_list", mailbox="alice"))
        unmarked = await ok(session, "email_mark_unread", mailbox="alice",
                            id="2025-06-15-120000-hello")
        await rejected(session, "email_mark_read", mailbox="alice",
                       id="2025-06-15-120000-hello", folder="sent")
        await rejected(session, "email_mark_unread", mailbox="alice")
        errors = [
            await fails(session, "email_mark_read", mailbox="alice", id="../x"),
            await fails(session, "email_mark_read", mailbox="bob", id="2025-06-15-120000-hello"),
            await fails(session, "email_mark_unread", mailbox="alice", id="nope"),
        ]
        return marked, after_read, listed, unmarked, errors

    marked, after_read, listed, unmarked, errors = with_mcp(daemon, alice, body)
    assert marked == "Email '2025-06-15-120000-hello' marked as read."
    assert after_read is True and listed[0]["read"] is True
    assert unmarked == "Email '2025-06-15-120000-hello' marked as unread."
    assert read_flag() is False
    assert errors[0] == "Email ID contains invalid characters."
    assert errors[1] == "Mailbox 'bob' does not exist."
    assert errors[2].startswith("[NOTFOUND] ")


# -- sending ------------------------------------------------------------------------------------


def test_send_refusals(daemon, users, alice_inbox):
    alice = users["alice"]
    store(alice_inbox, "2025-06-15-120000-hello", alice)
    catchall = mailbox_dir(daemon, "inbox", "catchall", alice)
    store(catchall, "2025-06-15-120000-stray", alice)
    stray = mailbox_dir(daemon, "inbox", "stray", alice)  # a dir with no config entry
    before = len(dropped_messages(daemon))

    async def body(session: ClientSession):
        return [
            await fails(session, "email_send", from_mailbox="catchall", to="x@example.com",
                        subject="s", body="b"),
            await fails(session, "email_reply", mailbox="catchall",
                        id="2025-06-15-120000-stray", body="b"),
            await fails(session, "email_send", from_mailbox="stray", to="x@example.com",
                        subject="s", body="b"),
            await fails(session, "email_send", from_mailbox="bob", to="x@example.com",
                        subject="s", body="b"),
            await fails(session, "email_send", from_mailbox="alice", to="x@example.com",
                        subject="s", body="b", text_only=True, html_body=""),
            await fails(session, "email_reply", mailbox="alice", id="2025-06-15-120000-hello",
                        body="b", text_only=True, html_body="<p>b</p>"),
            await fails(session, "email_reply", mailbox="alice", id="../x", body="b"),
            await fails(session, "email_reply", mailbox="alice", id="gone", body="b"),
            await fails(session, "email_send", from_mailbox="alice",
                        to="a@example.com, b@example.com", subject="s", body="b"),
            await fails(session, "email_send", from_mailbox="alice", to="x@example.com",
                        subject="s", body="b", attachments=["/nonexistent/file.pdf"]),
        ]

    try:
        errors = with_mcp(daemon, alice, body)
    finally:
        shutil.rmtree(catchall)
        shutil.rmtree(stray)
    assert errors == [
        "Cannot send from 'catchall': catchall mailbox has no valid sender address. "
        "Use a named mailbox.",
        "Cannot reply from 'catchall': catchall mailbox has no valid sender address. "
        "Use a named mailbox.",
        "Mailbox 'stray' is not registered.",
        "Mailbox 'bob' does not exist.",
        "AIMX/1 SEND: --text-only and --html-body are mutually exclusive",
        "AIMX/1 SEND: --text-only and --html-body are mutually exclusive",
        "Email ID contains invalid characters.",
        "Email 'gone' not found in mailbox 'alice'.",
        "Only one recipient per message is supported; To has 2 addresses",
        "Attachment file not found: /nonexistent/file.pdf",
    ]
    assert len(dropped_messages(daemon)) == before  # nothing went out


def test_send_with_threading_and_attachment(daemon, users, tmp_path):
    alice = users["alice"]
    # A directory of its own in alice's home: other test runs on the host use the same user.
    own = Path(tempfile.mkdtemp(prefix="mcp-test-", dir=alice.home))
    os.chown(own, alice.uid, alice.gid)
    attachment = own / "mcp-test-notes.txt"
    attachment.write_text("see attached\n")
    os.chown(attachment, alice.uid, alice.gid)
    attachment.chmod(0o600)  # readable by alice only: the MCP process reads it as alice
    before = len(dropped_messages(daemon))

    async def body(session: ClientSession):
        return await ok(session, "email_send", from_mailbox="alice", to="Carol <carol@example.com>",
                        subject="Notes", body="# Notes\n\n- one\n- two\n",
                        reply_to="parent@example.com", references="<root@example.com>",
                        attachments=[str(attachment)])

    try:
        text = with_mcp(daemon, alice, body)
    finally:
        shutil.rmtree(own)
    sent = dropped_messages(daemon)[before:]
    assert len(sent) == 1
    message = sent[0]
    assert text == f"Email sent to Carol <carol@example.com>. Message-ID: {message['Message-ID']}"
    assert message["From"] == "alice@test.local"
    assert message["In-Reply-To"] == "<parent@example.com>"
    assert message["References"] == "<root@example.com>"
    files = [part.get_filename() for part in message.iter_attachments()]
    assert files == ["mcp-test-notes.txt"]
    html = message.get_body(("html",))
    assert html is not None and "<h1" in html.get_content()


def test_send_folds_a_long_subject_and_refuses_bad_recipients_by_name(daemon, users):
    alice = users["alice"]
    subject = " ".join(f"topic{i}" for i in range(2900))  # ~20,000 characters
    before = len(dropped_messages(daemon))

    async def body(session: ClientSession):
        sent = await ok(session, "email_send", from_mailbox="alice", to="carol@example.com",
                        subject=subject, body="b")
        refused = [await fails(session, "email_send", from_mailbox="alice", to=to,
                               subject="s", body="b")
                   for to in ("a@@b.com", "dana@", "Dana <dana@example..com>",
                              "dana@-bad-.com")]
        giant = await fails(session, "email_send", from_mailbox="alice", to="carol@example.com",
                            subject="x" * 1000, body="b")
        return sent, refused, giant

    sent, refused, giant = with_mcp(daemon, alice, body)
    [message] = dropped_messages(daemon)[before:]
    assert sent == f"Email sent to carol@example.com. Message-ID: {message['Message-ID']}"
    assert message["Subject"] == subject
    raw_head = daemon.mail_drop.read_bytes().rsplit(b"----- AIMX TEST DROP -----\n", 1)[1]
    raw_head = raw_head.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in raw_head.split(b"\r\n")) <= 78
    assert refused == [
        "Invalid recipient address 'a@@b.com': an address has exactly one @",
        "Invalid recipient address 'dana@': there is nothing after the @",
        "Invalid recipient address 'dana@example..com': a host name cannot have an empty "
        "label (a dot at either end or two in a row)",
        "Invalid recipient address 'dana@-bad-.com': label '-bad-' starts or ends with a "
        "hyphen",
    ]
    assert giant == ("Header 'Subject' has a word longer than 998 characters, which cannot be "
                     "folded into a valid line; shorten it")
    assert len(dropped_messages(daemon)) == before + 1


def test_reply_threading_rules(daemon, users, alice_inbox):
    alice = users["alice"]
    store(alice_inbox, "2025-06-15-120000-a", alice, subject="RE: status",
          **{"from": '"Doe, Jane" <jane@example.com>', "message_id": "orig@example.com",
             "references": "<root@example.com> <mid@example.com>"})
    store(alice_inbox, "2025-06-15-120100-b", alice, subject="plans",
          **{"from": "Ann <ann@example.com>", "reply_to": "Team <team@example.com>",
             "message_id": ""})
    store(alice_inbox, "2025-06-15-120200-c", alice, subject="hello",
          **{"from": "Bo <bo@example.com>", "message_id": "solo@example.com"})
    bad = alice_inbox / "2025-06-15-120300-bad.md"
    bad.write_text("+++\nsubject = \n+++\n\nbody\n")
    os.chown(bad, alice.uid, alice.gid)
    before = len(dropped_messages(daemon))

    async def body(session: ClientSession):
        texts = [await ok(session, "email_reply", mailbox="alice", id=f"2025-06-15-12{s}",
                          body="Thanks!") for s in ("0000-a", "0100-b", "0200-c")]
        texts.append(await fails(session, "email_reply", mailbox="alice",
                                 id="2025-06-15-120300-bad", body="x"))
        return texts

    texts = with_mcp(daemon, alice, body)
    a, b, c = dropped_messages(daemon)[before:]
    assert texts[0].startswith("Email sent to jane@example.com. Message-ID: <")
    assert texts[3] == "Failed to parse email frontmatter."
    # RE: in another case is not doubled; the chain keeps every id, bracketed.
    assert a["To"] == "jane@example.com" and a["Subject"] == "RE: status"
    assert a["In-Reply-To"] == "<orig@example.com>"
    assert a["References"] == "<root@example.com> <mid@example.com> <orig@example.com>"
    # Reply-To wins over From; no Message-ID on the original, no threading headers.
    assert b["To"] == "team@example.com" and b["Subject"] == "Re: plans"
    assert b["In-Reply-To"] is None and b["References"] is None
    assert c["To"] == "bo@example.com" and c["References"] == "<solo@example.com>"
    assert all(m["From"] == "alice@test.local" for m in (a, b, c))


# -- hooks --------------------------------------------------------------------------------------


def test_hook_tool_errors(daemon, users):
    async def body(session: ClientSession):
        return [
            await fails(session, "hook_create", mailbox="alice", event="on_receive", cmd=[]),
            await fails(session, "hook_create", mailbox="bob", event="on_receive",
                        cmd=["/bin/true"]),
            await fails(session, "hook_create", mailbox="alice", event="on_receive",
                        cmd=["true"]),
            await fails(session, "hook_list", mailbox="bob"),
            await fails(session, "hook_delete", name="no-such-hook"),
        ]

    errors = with_mcp(daemon, users["alice"], body)
    assert errors[:2] == ["cmd must not be empty", "Mailbox 'bob' does not exist."]
    assert errors[2].startswith("[VALIDATION] hook has non-absolute `cmd[0]` 'true'")
    assert errors[3] == "Mailbox 'bob' does not exist."
    assert errors[4] == "[ENOENT] hook 'no-such-hook' not found"


# -- an agent's day, end to end -----------------------------------------------------------------


@pytest.fixture
def partner_mx(dns) -> Iterator[SmtpSink]:
    """A sink MX for partner.test on loopback, found through the test DNS server."""
    with SmtpSink("127.0.0.1", 0, tls=False) as sink:
        dns.set("partner.test", [["MX", "10 mx.partner.test"]])
        dns.set("mx.partner.test", [["A", "127.0.0.1"]])
        yield sink


def test_agent_flow_end_to_end(dns, users, partner_mx):
    alice = users["alice"]
    config = CONFIG.format(dns=dns.address, alice=alice.name, bob=users["bob"].name)
    # A daemon of its own that really delivers: MX lookup, SMTP to the sink.
    with RunningDaemon(config, env={"AIMX_TEST_SMTP_PORT": str(partner_mx.port)}) as daemon:
        steps = with_mcp(daemon, alice, agent_day(daemon))
    assert steps["create"] == "helper@test.local"
    row = steps["rows"][0]
    assert row["from"] == "Ann Example <ann@example.com>" and row["read"] is False
    assert row["subject"] == "Re: launch plan"
    assert 'message_id = "m2@example.com"' in steps["read"]
    assert steps["read"].rstrip().endswith("Hi there.")

    stored = partner_mx.wait_for("stored")
    assert stored[0]["rcpts"] == ["desk@partner.test"]
    assert stored[0]["mail_from"] == "helper@test.local"
    (raw,) = partner_mx.messages()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert steps["reply"] == \
        f"Email sent to desk@partner.test. Message-ID: {message['Message-ID']}"
    assert message["From"] == "helper@test.local" and message["To"] == "desk@partner.test"
    assert message["Subject"] == "Re: launch plan"
    assert message["In-Reply-To"] == "<m2@example.com>"
    assert message["References"].split()[-1] == "<m2@example.com>"
    assert "<m1@example.com>" in message["References"].split()
    assert "DKIM-Signature" in message
    assert "<strong>Ship it.</strong>" in message.get_body(("html",)).get_content()
    assert [r["delivery_status"] for r in steps["sent"]] == ["delivered"]

    assert steps["mark"] == f"Email '{row['id']}' marked as read."
    assert steps["unread"] == "[]"
    assert steps["hook"] == "Hook created on mailbox 'helper'."
    assert steps["hooks"] == [{"name": "helper-cat", "mailbox": "helper", "event": "on_receive",
                               "cmd": ["/bin/cat"], "fire_on_untrusted": False,
                               "timeout_secs": 30}]
    assert steps["unhook"] == "Hook 'helper-cat' deleted."
    assert steps["hooks_after"] == "[]"
    assert steps["delete"] == "Mailbox 'helper' deleted."


def agent_day(daemon: RunningDaemon) -> Callable[[ClientSession], Awaitable[dict[str, Any]]]:
    """What an agent does: make a mailbox, wait for mail, read, reply, mark, wire a hook."""

    async def body(session: ClientSession) -> dict[str, Any]:
        steps: dict[str, Any] = {}
        steps["create"] = await ok(session, "mailbox_create", name="helper")
        await anyio.to_thread.run_sync(
            deliver, daemon, "helper@test.local",
            "From: Ann Example <ann@example.com>\r\nTo: helper@test.local\r\n"
            "Reply-To: Ann's Desk <desk@partner.test>\r\nSubject: Re: launch plan\r\n"
            "Message-ID: <m2@example.com>\r\nIn-Reply-To: <m1@example.com>\r\n"
            "References: <m0@example.com> <m1@example.com>\r\n")

        async def listed() -> list[dict[str, Any]]:
            return json.loads(await ok(session, "email_list", mailbox="helper"))

        with anyio.fail_after(20):
            while not (rows := await listed()):
                await anyio.sleep(0.1)
        steps["rows"] = rows
        email_id = rows[0]["id"]
        steps["read"] = await ok(session, "email_read", mailbox="helper", id=email_id)
        steps["reply"] = await ok(session, "email_reply", mailbox="helper", id=email_id,
                                  body="Sounds good. **Ship it.**")
        steps["sent"] = json.loads(await ok(session, "email_list", mailbox="helper",
                                            folder="sent"))
        steps["mark"] = await ok(session, "email_mark_read", mailbox="helper", id=email_id)
        steps["unread"] = await ok(session, "email_list", mailbox="helper", unread=True)
        steps["hook"] = await ok(session, "hook_create", mailbox="helper", event="on_receive",
                                 cmd=["/bin/cat"], name="helper-cat", timeout_secs=30)
        steps["hooks"] = json.loads(await ok(session, "hook_list", mailbox="helper"))
        steps["unhook"] = await ok(session, "hook_delete", name="helper-cat")
        steps["hooks_after"] = await ok(session, "hook_list", mailbox="helper")
        steps["delete"] = await ok(session, "mailbox_delete", name="helper", force=True)
        return steps

    return body
