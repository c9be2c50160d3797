"""Push on new mail, end to end: the daemon's WATCH verb, ``aimx watch`` and MCP resources.

A real ``aimx serve`` with mailboxes of two real users; mail arrives over real
SMTP; ``aimx mcp`` runs as the user through the SDK's own stdio client, and
``aimx watch`` as the user's real process. Nothing waits on a clock: each
test waits for the event it expects, with a generous bound against hangs.
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

from aimx.daemon import protocol
from aimx.daemon.client import Client, WatchEnded, read_box
from aimx.daemon.watch import MAX_UNANSWERED
from tests.support.daemon import RunningDaemon
from tests.support.users import LinuxUser, call_api_as, ensure_user, run_aimx_as
from tests.test_mcp import CONFIG, clear, deliver, mailbox_dir, server_params

WAIT = 60  # seconds: a bound against hangs, never a measured expectation

# Clients of the handshake-era protocol versions still subscribe this way; the SDK warns
# because the 2026-07-28 version replaced it with `subscriptions/listen` (tested too).
pytestmark = pytest.mark.filterwarnings(
    "ignore:resources/subscribe is removed as of 2026-07-28")


@pytest.fixture(scope="module")
def users(test_users) -> dict[str, LinuxUser]:
    return {short: ensure_user(user.name) for short, user in test_users.items()}


@pytest.fixture(scope="module")
def daemon(dns, users) -> Iterator[RunningDaemon]:
    config = CONFIG.format(dns=dns.address, alice=users["alice"].name, bob=users["bob"].name)
    with RunningDaemon(config, start=False) as d:
        d.extra_env["AIMX_TEST_MAIL_DROP"] = str(d.base / "outbox" / "drop.txt")
        d.start()
        yield d


@pytest.fixture
def inboxes(daemon, users) -> Iterator[None]:
    paths = [mailbox_dir(daemon, "inbox", name, users[name]) for name in ("alice", "bob")]
    for path in paths:
        clear(path)
    yield
    for path in paths:
        clear(path)


def mail(subject: str) -> str:
    return f"From: Ann <ann@example.com>\r\nTo: x@test.local\r\nSubject: {subject}\r\n"


# -- MCP ------------------------------------------------------------------------------------


class Notifications:
    """What the server pushed to one MCP client session, in order."""

    def __init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[Any](100)

    async def handler(self, message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification
                      | types.ResourceListChangedNotification):
            await self.send.send(message)

    async def next(self) -> Any:
        return await self.receive.receive()

    async def until_updated(self, uri: str) -> list[str]:
        """Wait for ``resources/updated`` of ``uri``; every updated URI seen until then."""
        seen = []
        while True:
            message = await self.next()
            if isinstance(message, types.ResourceUpdatedNotification):
                seen.append(message.params.uri)
                if message.params.uri == uri:
                    return seen

    async def until_list_changed(self) -> None:
        while not isinstance(await self.next(), types.ResourceListChangedNotification):
            pass


@asynccontextmanager
async def mcp_session(d: RunningDaemon, user: LinuxUser):
    notes = Notifications()
    with tempfile.TemporaryFile("w+") as errlog:
        async with stdio_client(server_params(d, user), errlog=errlog) as (read, write), \
                ClientSession(read, write, message_handler=notes.handler) as session:
            session.init_result = await session.initialize()
            yield session, notes


def run_mcp(d: RunningDaemon, user: LinuxUser, body) -> Any:
    async def main() -> Any:
        with anyio.fail_after(WAIT):
            async with mcp_session(d, user) as (session, notes):
                return await body(session, notes)

    return anyio.run(main)


async def deliver_async(d: RunningDaemon, rcpt: str, subject: str) -> None:
    await anyio.to_thread.run_sync(deliver, d, rcpt, mail(subject))


def row_with_subject(listing: str, subject: str) -> dict[str, Any] | None:
    return next((row for row in json.loads(listing) if row["subject"] == subject), None)


async def text_of(session: ClientSession, uri: str) -> str:
    result = await session.read_resource(uri)
    assert len(result.contents) == 1 and result.contents[0].uri == uri
    return result.contents[0].text


def test_subscriber_hears_of_new_mail_and_reads_it(daemon, users, inboxes):
    inbox = "aimx://mailbox/alice/inbox"

    async def body(session: ClientSession, notes: Notifications):
        caps = session.init_result.capabilities.resources
        listed = {r.uri for r in (await session.list_resources()).resources}
        await session.subscribe_resource(inbox)
        await deliver_async(daemon, "alice@test.local", "push me")
        await notes.until_updated(inbox)
        row = row_with_subject(await text_of(session, inbox), "push me")
        result = await session.call_tool("email_read", {"mailbox": "alice", "id": row["id"]})
        message = await text_of(session, f"{inbox}/{row['id']}")
        return caps, listed, row, result, message

    caps, listed, row, result, message = run_mcp(daemon, users["alice"], body)
    assert caps is not None and caps.subscribe and caps.list_changed
    assert {"aimx://mailbox/alice/inbox", "aimx://mailbox/alice/sent"} <= listed
    assert not any("/bob/" in uri for uri in listed)  # bob's mailbox is not alice's to see
    assert row is not None and row["from"] == "Ann <ann@example.com>"
    assert not result.is_error and 'subject = "push me"' in result.content[0].text
    assert message == result.content[0].text


def test_sent_copy_updates_the_sent_listing(daemon, users, inboxes):
    sent = "aimx://mailbox/alice/sent"

    async def body(session: ClientSession, notes: Notifications):
        await session.subscribe_resource(sent)
        result = await session.call_tool("email_send", {
            "from_mailbox": "alice", "to": "dana@example.com", "subject": "outbound push",
            "body": "Hello."})
        await notes.until_updated(sent)
        return result, row_with_subject(await text_of(session, sent), "outbound push")

    result, row = run_mcp(daemon, users["alice"], body)
    assert not result.is_error, result.content[0].text
    assert row is not None and row["to"] == "dana@example.com"


def test_non_owner_cannot_subscribe_and_hears_nothing_of_it(daemon, users, inboxes):
    async def body(session: ClientSession, notes: Notifications):
        with pytest.raises(MCPError) as refused:
            await session.subscribe_resource("aimx://mailbox/alice/inbox")
        with pytest.raises(MCPError):
            await session.read_resource("aimx://mailbox/alice/inbox")
        await session.subscribe_resource("aimx://mailbox/bob/inbox")
        # alice's mail first, then bob's over the same watch: anything bob could hear
        # of alice's would arrive before his own.
        await deliver_async(daemon, "alice@test.local", "for alice only")
        await deliver_async(daemon, "bob@test.local", "for bob")
        return refused.value, await notes.until_updated("aimx://mailbox/bob/inbox")

    refused, seen = run_mcp(daemon, users["bob"], body)
    assert "does not exist" in refused.message
    assert seen == ["aimx://mailbox/bob/inbox"]


def test_mailbox_create_and_delete_change_the_resource_list(daemon, users, inboxes):
    async def body(session: ClientSession, notes: Notifications):
        await session.list_resources()
        created = await session.call_tool("mailbox_create", {"name": "alice-watch"})
        await notes.until_list_changed()
        after_create = {r.uri for r in (await session.list_resources()).resources}
        deleted = await session.call_tool("mailbox_delete", {"name": "alice-watch"})
        await notes.until_list_changed()  # (its empty directories stay, listed unregistered)
        return created, after_create, deleted

    created, after_create, deleted = run_mcp(daemon, users["alice"], body)
    assert not created.is_error and not deleted.is_error
    assert "aimx://mailbox/alice-watch/inbox" in after_create


def test_subscription_survives_a_daemon_restart(dns, users, tmp_path):
    config = CONFIG.format(dns=dns.address, alice=users["alice"].name, bob=users["bob"].name)
    inbox = "aimx://mailbox/alice/inbox"
    with RunningDaemon(config) as d:
        async def body(session: ClientSession, notes: Notifications):
            await session.subscribe_resource(inbox)
            await anyio.to_thread.run_sync(d.restart)
            await deliver_async(d, "alice@test.local", "after the restart")
            while row_with_subject(await text_of(session, inbox), "after the restart") is None:
                await notes.until_updated(inbox)  # the reconnect's, then the mail's
            return True

        assert run_mcp(d, users["alice"], body)


# -- the WATCH verb ---------------------------------------------------------------------


def test_watch_is_authorized_like_listing(daemon, users):
    env = daemon.client_env()
    own = call_api_as(users["alice"], daemon.socket_path, "WATCH", {"mailboxes": ["alice"]}, env)
    everything = call_api_as(users["alice"], daemon.socket_path, "WATCH", {}, env)
    foreign = call_api_as(users["bob"], daemon.socket_path, "WATCH", {"mailboxes": ["alice"]},
                          env)
    missing = call_api_as(users["bob"], daemon.socket_path, "WATCH", {"mailboxes": ["nobody"]},
                          env)
    assert own == {"ok": {"mailboxes": ["alice"]}}
    assert everything == {"ok": {"mailboxes": ["alice", "catchall"]}}
    # Someone else's mailbox and one nobody has read the same.
    assert foreign == {"error": ["ENOENT", "mailbox 'alice' does not exist"]}
    assert missing == {"error": ["ENOENT", "mailbox 'nobody' does not exist"]}


def test_event_carries_what_a_line_shows(daemon, users, inboxes):
    stream = Client(daemon.socket_path).watch(["alice"])
    try:
        deliver(daemon, "alice@test.local", mail("carried"))
        event = next(iter(stream))
    finally:
        stream.close()
    stored = sorted(p.stem for p in (daemon.data_dir / "inbox" / "alice").iterdir())
    assert event["event"] == "stored" and event["mailbox"] == "alice"
    assert event["folder"] == "inbox" and [event["id"]] == stored
    assert event["from"] == "Ann <ann@example.com>" and event["subject"] == "carried"


def test_a_client_that_stops_answering_is_dropped(daemon, users, inboxes):
    deliver(daemon, "alice@test.local", mail("toggle me"))
    email_id = next((daemon.data_dir / "inbox" / "alice").iterdir()).stem
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(daemon.socket_path))
    sock.sendall(protocol.request_box(protocol.Watch, {"mailboxes": ["alice"]}, b"1")
                 .serialize())
    assert read_box(sock)[b"_answer"] == b"1"  # watching from here on
    # Each flip of the read state is one event nobody answers; all asked on one connection.
    flips = socket.socket(socket.AF_UNIX)
    flips.connect(str(daemon.socket_path))
    flips.sendall(b"".join(
        protocol.request_box(protocol.MarkRead if turn % 2 == 0 else protocol.MarkUnread,
                             {"mailbox": "alice", "id": email_id}, b"%d" % turn).serialize()
        for turn in range(MAX_UNANSWERED + 1)))
    answers = [read_box(flips) for _ in range(MAX_UNANSWERED + 1)]
    flips.close()
    assert all(b"_answer" in answer for answer in answers)
    sock.settimeout(WAIT)
    received = b""
    while chunk := sock.recv(65536):  # the daemon closes the connection: EOF
        received += chunk
    sock.close()
    # Cut off, not flushed: what the socket buffers held arrived, the rest was let go.
    assert 0 < received.count(b"WATCH-EVENT") <= MAX_UNANSWERED
    assert Client(daemon.socket_path).call(protocol.Version)["tag"]  # the daemon carries on
    assert f"left {MAX_UNANSWERED} events unanswered" in daemon.log_text()


def test_watch_ends_when_the_daemon_stops(dns, users):
    config = CONFIG.format(dns=dns.address, alice=users["alice"].name, bob=users["bob"].name)
    with RunningDaemon(config) as d:
        stream = Client(d.socket_path).watch()
        d.stop()
        with pytest.raises(WatchEnded):
            next(iter(stream))


def test_a_watch_outlives_the_idle_timeout(dns, users):
    config = CONFIG.format(dns=dns.address, alice=users["alice"].name, bob=users["bob"].name)
    with RunningDaemon(config, env={"AIMX_API_TIMEOUT": "0.2"}) as d:
        mailbox_dir(d, "inbox", "alice", users["alice"])
        stream = Client(d.socket_path).watch(["alice"])
        try:
            # Another connection idles past the timeout and is dropped; the watch is not.
            idle = socket.socket(socket.AF_UNIX)
            idle.connect(str(d.socket_path))
            idle.settimeout(WAIT)
            assert idle.recv(1) == b""
            idle.close()
            deliver(d, "alice@test.local", mail("still here"))
            assert next(iter(stream))["subject"] == "still here"
        finally:
            stream.close()


# -- aimx watch -------------------------------------------------------------------------


def test_aimx_watch_json_prints_a_line_per_new_email(daemon, users, inboxes):
    env = users["alice"].env(daemon.client_env({"PATH": "/usr/bin:/bin", "NO_COLOR": "1"}))
    proc = run_aimx_as(users["alice"], ["watch", "alice", "--json"], env, wait=False)
    try:
        assert "Watching mailbox 'alice'" in proc.stderr.readline()
        deliver(daemon, "alice@test.local", mail("line one"))
        line = json.loads(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.communicate(timeout=WAIT)
    stored = [p.stem for p in (daemon.data_dir / "inbox" / "alice").iterdir()]
    assert line["event"] == "stored" and line["mailbox"] == "alice"
    assert line["folder"] == "inbox" and [line["id"]] == stored
    assert line["subject"] == "line one" and line["from"] == "Ann <ann@example.com>"


def test_aimx_watch_human_line(daemon, users, inboxes):
    env = users["alice"].env(daemon.client_env({"PATH": "/usr/bin:/bin", "NO_COLOR": "1"}))
    proc = run_aimx_as(users["alice"], ["watch", "alice"], env, wait=False)
    try:
        proc.stderr.readline()
        deliver(daemon, "alice@test.local", mail("human"))
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.communicate(timeout=WAIT)
    email_id = next((daemon.data_dir / "inbox" / "alice").iterdir()).stem
    when, shown_id, rest = line.rstrip("\n").split("  ", 2)
    assert when.endswith("Z") and shown_id == email_id
    assert rest == "Ann <ann@example.com>  human"


def test_a_human_line_cannot_carry_terminal_escapes():
    from aimx.cli.watch import human_line

    line = human_line({"event": "stored", "folder": "inbox", "id": "2026-x",
                       "at": "2026-01-05T09:12:03.123456Z", "from": "Eve <e@example.com>",
                       "subject": "\x1b]0;owned\x07 hi"})
    assert line == "2026-01-05T09:12:03Z  2026-x  Eve <e@example.com>  \ufffd]0;owned\ufffd hi"


def test_aimx_watch_refuses_a_mailbox_of_another_user(daemon, users):
    env = users["bob"].env(daemon.client_env({"PATH": "/usr/bin:/bin", "NO_COLOR": "1"}))
    proc = run_aimx_as(users["bob"], ["watch", "alice", "--json"], env)
    assert isinstance(proc, subprocess.CompletedProcess)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == "Error: [ENOENT] mailbox 'alice' does not exist\n"


def test_aimx_watch_with_the_daemon_down(daemon, users, tmp_path):
    tmp_path.chmod(0o755)
    env = users["alice"].env(daemon.client_env({"PATH": "/usr/bin:/bin", "NO_COLOR": "1"}))
    env["AIMX_RUNTIME_DIR"] = str(tmp_path)
    proc = run_aimx_as(users["alice"], ["watch", "alice"], env)
    assert proc.returncode == 2
    assert proc.stderr == "Error: aimx daemon not running. Check 'systemctl status aimx'\n"


def test_listen_stream_of_a_modern_client_hears_of_new_mail(daemon, users, inboxes):
    """The 2026-07-28 protocol has no resources/subscribe: events ride subscriptions/listen."""
    from mcp import Client as McpClient

    inbox = "aimx://mailbox/alice/inbox"

    async def main() -> Any:
        with anyio.fail_after(WAIT):
            async with McpClient(server_params(daemon, users["alice"])) as client, \
                    client.listen(resource_subscriptions=[inbox],
                                  resources_list_changed=True) as subscription:
                await deliver_async(daemon, "alice@test.local", "heard by listen")
                async for event in subscription:
                    if getattr(event, "uri", None) == inbox:
                        break
                result = await client.read_resource(inbox)
                return client.session.protocol_version, result.contents[0].text

    version, listing = anyio.run(main)
    assert version >= "2026-07-28"
    assert row_with_subject(listing, "heard by listen") is not None
