"""One local user against the others: capacity limits and information leaks over the socket.

Each test runs the real daemon as root and talks to it as the real users
``alice`` and ``bob`` (subprocesses that drop to their uid, so ``SO_PEERCRED``
reports them) and as root from this process.
"""

from __future__ import annotations

import json
import os
import resource
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aimx.daemon import protocol
from aimx.daemon.api import socket_connection_cap
from aimx.daemon.client import read_box
from tests.support.api import config_text, on_disk, outcome, run_as
from tests.support.cli import aimx
from tests.support.daemon import REPO_ROOT, RunningDaemon
from tests.support.users import LinuxUser, needs_root, python_as_command

pytestmark = needs_root

ROLE_NAMES = ("postmaster", "abuse", "hostmaster", "webmaster", "mailer-daemon", "root", "noc",
              "security")
PER_USER = 3
TOTAL = 5
LIMITS = (f"socket_max_connections_per_user = {PER_USER}\n"
          f"socket_max_connections = {TOTAL}\n"
          "max_mailboxes_per_user = 2\n")

# Holds ``hold`` connections open as a user, each proven admitted by a VERSION
# answer, then makes one more call and reports it; exits when stdin closes.
HOLDER_PREPARE = """
import socket
from aimx.daemon import client, protocol
"""

HOLDER = """
import socket
from aimx.daemon import protocol
from aimx.daemon.client import Client, read_box
held = []
for number in range(spec["hold"]):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(spec["socket"])
    sock.sendall(protocol.request_box(protocol.Version, {}, b"%d" % (number + 1)).serialize())
    reply = read_box(sock)
    assert b"_answer" in reply, reply
    held.append(sock)
try:
    result = {"ok": Client(spec["socket"], timeout=30).call(protocol.Version)}
except protocol.ApiError as exc:
    result = {"error": [exc.code, exc.reason]}
print(json.dumps(result), flush=True)
sys.stdin.read()
"""


class Holder:
    """A process of ``user`` holding ``hold`` admitted connections until ``release()``."""

    def __init__(self, user: LinuxUser, d: RunningDaemon, hold: int) -> None:
        spec = {"hold": hold, "socket": str(d.socket_path)}
        self.proc = subprocess.Popen(
            python_as_command(user, HOLDER, spec, prepare=HOLDER_PREPARE), cwd=str(REPO_ROOT),
            env=user.env(d.client_env()), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise AssertionError(self.proc.stderr.read())
        self.next_call = json.loads(line)

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture
def daemon(dns, users) -> Iterator[RunningDaemon]:
    text = LIMITS + config_text(dns, users)
    # Held connections must outlive a slow test: no idle drop while they are counted.
    with RunningDaemon(text, env={"AIMX_API_TIMEOUT": "600"}) as running:
        yield running


def version_as(user: LinuxUser | None, d: RunningDaemon) -> dict[str, Any]:
    if user is None:
        return outcome(d, protocol.Version)
    return run_as(user, d, protocol.Version)


# -- connection caps ------------------------------------------------------------------


def test_one_user_cannot_take_every_connection(daemon, users):
    alice, bob = users["alice"], users["bob"]
    holders = [Holder(alice, daemon, PER_USER)]
    try:
        # Alice at her cap: her next connection is refused with a message naming her uid.
        assert holders[0].next_call == {"error": [
            "TEMP", f"too many connections for uid {alice.uid} (limit {PER_USER}); "
                    "close some and retry"]}
        run = aimx(daemon, "mailboxes", "list", user=alice)
        assert (run.returncode, run.stderr) == (1, (
            f"Error: [TEMP] too many connections for uid {alice.uid} (limit {PER_USER}); "
            "close some and retry\n"))
        assert "ok" in version_as(bob, daemon)
        assert "ok" in version_as(None, daemon)
        # Bob takes the rest of the global cap: now every non-root user waits, root does not.
        holders.append(Holder(bob, daemon, TOTAL - PER_USER))
        assert holders[1].next_call == {"error": [
            "TEMP", f"the daemon is at its connection limit ({TOTAL}); retry later"]}
        for _ in range(TOTAL + 2):
            assert "ok" in version_as(None, daemon)
    finally:
        for holder in holders:
            holder.release()
    # Closed connections are given back.
    assert "ok" in version_as(alice, daemon) and "ok" in version_as(bob, daemon)
    log = daemon.log_text()
    assert f"refusing socket connections from uid {alice.uid}" in log
    assert "refusing socket connections from non-root users" in log


def test_the_global_cap_leaves_half_the_file_limit_free():
    assert socket_connection_cap(1024, 65536) == 1024
    assert socket_connection_cap(1024, 1024) == 512
    assert socket_connection_cap(1024, resource.RLIM_INFINITY) == 1024


def test_root_connections_count_against_no_cap(daemon, users):
    root_socks = []
    try:
        for number in range(TOTAL + 1):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(daemon.socket_path))
            root_socks.append(sock)
            sock.sendall(protocol.request_box(protocol.Version, {}, b"%d" % number).serialize())
            assert b"_answer" in read_box(sock)  # admitted, and still held below
        assert "ok" in version_as(None, daemon)
        assert "ok" in version_as(users["alice"], daemon)
    finally:
        for sock in root_socks:
            sock.close()


# -- mailbox creation ----------------------------------------------------------------


def test_role_names_are_reserved_for_root(daemon, users):
    alice = users["alice"]
    before = daemon.config_path.read_bytes()
    for name in ROLE_NAMES:
        assert run_as(alice, daemon, protocol.MailboxCreate, name=name) == {"error": [
            "EACCES", f"mailbox name '{name}' is a role address reserved for root (RFC 2142); "
                      "ask root to create it"]}, name
        assert not (daemon.data_dir / "inbox" / name).exists()
    assert daemon.config_path.read_bytes() == before
    assert outcome(daemon, protocol.MailboxCreate, name="postmaster", owner=alice.name) == {
        "ok": {"address": "postmaster@test.local", "owner": alice.name}}


def test_non_root_mailbox_creation_is_capped_per_user(daemon, users):
    alice, bob = users["alice"], users["bob"]
    # Alice already owns "alice"; the cap is 2.
    assert "ok" in run_as(alice, daemon, protocol.MailboxCreate, name="alice-two")
    refused = run_as(alice, daemon, protocol.MailboxCreate, name="alice-three")
    assert refused == {"error": [
        "EACCES", f"user '{alice.name}' owns 2 mailboxes and may not create more "
                  "(max_mailboxes_per_user = 2); ask root"]}
    assert not (daemon.data_dir / "inbox" / "alice-three").exists()
    assert "alice-three" not in on_disk(daemon)["mailboxes"]
    # Bob's count is his own, and root is not capped.
    assert "ok" in run_as(bob, daemon, protocol.MailboxCreate, name="bob-two")
    assert "ok" in outcome(daemon, protocol.MailboxCreate, name="alice-three", owner=alice.name)
    # Deleting one frees a slot.
    assert run_as(alice, daemon, protocol.MailboxDelete, name="alice-two") == {"ok": {}}
    assert run_as(alice, daemon, protocol.MailboxDelete, name="alice-three") == {"ok": {}}
    assert "ok" in run_as(alice, daemon, protocol.MailboxCreate, name="alice-four")


# -- leaks ----------------------------------------------------------------------------


def test_anothers_mailbox_answers_like_a_missing_one(daemon, users):
    alice, bob = users["alice"], users["bob"]
    for verb, args in ((protocol.MarkRead, {"id": "x"}), (protocol.MarkUnread, {"id": "x"}),
                       (protocol.HookCreate, {"event": "on_receive", "cmd": ["/bin/true"]})):
        foreign = run_as(bob, daemon, verb, mailbox="alice", **args)
        missing = run_as(bob, daemon, verb, mailbox="nobody", **args)
        assert foreign == {"error": ["ENOENT", "mailbox 'alice' does not exist"]}, verb
        assert missing == {"error": ["ENOENT", "mailbox 'nobody' does not exist"]}, verb
        assert str(alice.uid) not in json.dumps(foreign) and alice.name not in json.dumps(foreign)
    assert "hooks" not in on_disk(daemon)["mailboxes"]["alice"]


def test_conflicting_dir_names_no_other_user(daemon, users):
    alice, bob = users["alice"], users["bob"]
    theirs = daemon.data_dir / "inbox" / "theirs"
    theirs.mkdir(parents=True)
    os.chown(theirs, bob.uid, bob.gid)
    reply = run_as(alice, daemon, protocol.MailboxCreate, name="theirs")
    assert reply == {"error": ["ECONFLICT", f"{theirs} already exists and is not yours; ask "
                                            "root to remove it, or to create the mailbox"]}
    assert str(bob.uid) not in reply["error"][1]
    # Root still gets the ids it needs to fix the directory.
    assert outcome(daemon, protocol.MailboxCreate, name="theirs", owner=alice.name)["error"][1] \
        .startswith(f"{theirs} already exists with owner {bob.uid}:{bob.gid}, expected")


def test_hook_names_reveal_nothing_about_other_users_hooks(daemon, users):
    alice, bob = users["alice"], users["bob"]
    echo = {"event": "on_receive", "cmd": ["/bin/echo", "hi"]}
    assert run_as(alice, daemon, protocol.HookCreate, mailbox="alice", **echo) == {
        "ok": {"name": "9f5503741a28"}}
    assert run_as(alice, daemon, protocol.HookCreate, mailbox="alice", name="notify",
                  event="after_send", cmd=["/bin/true"]) == {"ok": {"name": "notify"}}
    # Bob guessing alice's command or her hook's name learns nothing: both just work.
    assert run_as(bob, daemon, protocol.HookCreate, mailbox="bob", **echo) == {
        "ok": {"name": "9f5503741a28"}}
    assert run_as(bob, daemon, protocol.HookCreate, mailbox="bob", name="notify",
                  event="after_send", cmd=["/bin/false"]) == {"ok": {"name": "notify"}}
    # Each sees and deletes only their own.
    rows = run_as(bob, daemon, protocol.HookList)["ok"]["rows"]
    assert {(row["mailbox"], row["name"]) for row in rows} == {
        ("bob", "9f5503741a28"), ("bob", "notify")}
    assert run_as(bob, daemon, protocol.HookDelete, name="notify") == {"ok": {}}
    assert run_as(bob, daemon, protocol.HookDelete, name="notify") == {
        "error": ["ENOENT", "hook 'notify' not found"]}
    assert run_as(bob, daemon, protocol.HookDelete, name="notify", mailbox="alice") == {
        "error": ["ENOENT", "hook 'notify' not found"]}
    assert [h.get("name") for h in on_disk(daemon)["mailboxes"]["alice"]["hooks"]] == [
        None, "notify"]
    # Root sees both owners' hooks and must say which one it means.
    assert outcome(daemon, protocol.HookDelete, name="9f5503741a28") == {"error": [
        "VALIDATION", "hook name '9f5503741a28' is used on mailboxes 'alice', 'bob'; "
                      "name the mailbox to delete one"]}
    assert outcome(daemon, protocol.HookDelete, name="9f5503741a28", mailbox="bob") == {"ok": {}}
    assert "hooks" not in on_disk(daemon)["mailboxes"]["bob"]
    # Within one owner's mailboxes names stay unique, and the error names only hers.
    assert outcome(daemon, protocol.MailboxCreate, name="alice-two", owner=alice.name)["ok"]
    assert run_as(alice, daemon, protocol.HookCreate, mailbox="alice-two", name="notify",
                  event="after_send", cmd=["/bin/true"]) == {"error": [
        "VALIDATION", "duplicate hook name 'notify' on mailboxes 'alice' and 'alice-two': "
                      "hook names must be unique across the mailboxes of one owner"]}


def test_hooks_get_a_fixed_path_and_nothing_of_the_daemons_environment(dns, users, shared_dir):
    alice = users["alice"]
    record = shared_dir / "env"
    hook = ('[[mailboxes.alice.hooks]]\nevent = "on_receive"\nfire_on_untrusted = true\n'
            f'cmd = ["/bin/sh", "-c", "env > {record}.tmp && mv {record}.tmp {record}"]\n\n')
    text = config_text(dns, users).replace("# an unrelated table", hook + "# an unrelated table")
    env = {"PATH": f"/root/.local/bin:{Path(sys.executable).parent}:/usr/bin:/bin",
           "DAEMON_SECRET": "must-not-leak"}
    with RunningDaemon(text, env=env) as running:
        with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=30) as smtp:
            smtp.sendmail("ann@example.com", ["alice@test.local"],
                          "From: ann@example.com\r\nTo: alice@test.local\r\nSubject: env\r\n"
                          "Message-ID: <env-1@example.com>\r\n\r\nhello\r\n")
        deadline = time.monotonic() + 30
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert record.exists(), running.log_text()
    hook_env = dict(line.split("=", 1) for line in record.read_text().splitlines() if "=" in line)
    assert hook_env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert hook_env["HOME"] == alice.home and hook_env["USER"] == alice.name
    assert "DAEMON_SECRET" not in hook_env
    assert {key for key in hook_env if not key.startswith("AIMX_")} <= {
        "PATH", "HOME", "USER", "LOGNAME", "PWD", "SHLVL", "_"}
