"""The daemon socket API end to end: a real ``aimx serve``, real users, real sockets.

Each test starts the real service (``RunningDaemon``) and talks to its Unix
socket, as root from this process and as the test users ``alice`` and ``bob``
from subprocesses that drop to their uid, so ``SO_PEERCRED`` reports them.
Mail arrives over real SMTP; DNS lookups go to a local twisted.names server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from twisted.protocols import amp

from aimx.config import derived_hook_name
from aimx.daemon import protocol
from aimx.daemon.client import Client, read_box
from aimx.daemon.protocol import request_box
from tests.support.api import call, config_text, deliver, on_disk, outcome, run_as
from tests.support.daemon import REPO_ROOT, RunningDaemon

DOMAIN = "test.local"
TIMEOUT_SECS = 1.5  # AIMX_API_TIMEOUT for every daemon here

# -- fixtures and helpers (dns and users: tests/conftest.py) -------------------------------


@pytest.fixture
def daemon(dns, users) -> Iterator[RunningDaemon]:
    with RunningDaemon(config_text(dns, users),
                       env={"AIMX_API_TIMEOUT": str(TIMEOUT_SECS)}) as running:
        yield running


def email_ids(d: RunningDaemon, mailbox: str) -> list[str]:
    inbox = d.data_dir / "inbox" / mailbox
    return sorted(p.name[:-3] for p in inbox.iterdir() if p.name.endswith(".md"))


def is_read(d: RunningDaemon, mailbox: str, email_id: str) -> bool:
    text = (d.data_dir / "inbox" / mailbox / f"{email_id}.md").read_text()
    return tomllib.loads(text.split("+++\n")[1]).get("read") is True


def raw_exchange(d: RunningDaemon, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, return whatever comes back until the daemon stops talking."""
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(d.socket_path))
        sock.settimeout(wait)
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass
    return b"".join(chunks)


def assert_serving(d: RunningDaemon) -> None:
    assert call(d, protocol.Version)["tag"]


# -- the authorization matrix (spec 40 §5, §11.1) ---------------------------------------


def test_mark_verbs_pass_for_owner_and_root_and_refuse_others(daemon, users):
    alice, bob = users["alice"], users["bob"]
    deliver(daemon, "alice@test.local", 2)
    first, second = email_ids(daemon, "alice")

    assert run_as(alice, daemon, protocol.MarkRead, mailbox="alice", id=first) == {"ok": {}}
    assert is_read(daemon, "alice", first)
    denied = run_as(bob, daemon, protocol.MarkUnread, mailbox="alice", id=first)
    assert denied == {"error": ["ENOENT", "mailbox 'alice' does not exist"]}  # as if missing
    assert is_read(daemon, "alice", first)
    assert run_as(bob, daemon, protocol.MarkRead, mailbox="alice", id=second) == denied
    assert not is_read(daemon, "alice", second)
    assert outcome(daemon, protocol.MarkRead, mailbox="alice", id=second) == {"ok": {}}
    assert outcome(daemon, protocol.MarkUnread, mailbox="alice", id=first) == {"ok": {}}
    assert is_read(daemon, "alice", second) and not is_read(daemon, "alice", first)

    log = daemon.log_text()
    assert re.search(rf'WARN aimx::uds: uds authz reject verb="MARK-UNREAD" caller_uid={bob.uid} '
                     rf'caller_username="{bob.name}" mailbox="alice" decision="reject" '
                     r'reason="[^"]*does not own', log)
    assert re.search(r'INFO aimx::uds: uds authz root_bypass verb="MARK-READ" caller_uid=0 '
                     r'caller_username="root" mailbox="alice" decision="root_bypass"', log)


def test_mark_on_missing_mailbox_and_bad_ids(daemon, users):
    alice = users["alice"]
    deliver(daemon, "alice@test.local")
    assert run_as(alice, daemon, protocol.MarkRead, mailbox="nope", id="x") == {
        "error": ["ENOENT", "mailbox 'nope' does not exist"]}
    for bad in ("", "../alice/x", "a/b", "a\\b", "a\x00b", ".."):
        assert outcome(daemon, protocol.MarkRead, mailbox="alice", id=bad) == {
            "error": ["NOTFOUND", f"email id '{bad}' contains invalid characters"]}
    assert outcome(daemon, protocol.MarkRead, mailbox="alice", id="2020-nothing") == {
        "error": ["NOTFOUND", "email '2020-nothing' not found in inbox/alice"]}
    # A folder argument is refused outright.
    box = dict(request_box(protocol.MarkRead, {"mailbox": "alice", "id": "x"}, b"9"))
    box[b"folder"] = b"sent"
    reply = raw_exchange(daemon, amp.AmpBox(box).serialize(), wait=2)
    assert b"MALFORMED" in reply and b"Folder header is not allowed on MARK verbs" in reply
    assert_serving(daemon)


def test_symlinked_email_into_another_mailbox_is_not_found(daemon, users):
    alice = users["alice"]
    deliver(daemon, "bob@test.local")
    deliver(daemon, "alice@test.local")
    (bob_email,) = email_ids(daemon, "bob")
    link = daemon.data_dir / "inbox" / "alice" / "stolen.md"
    link.symlink_to(daemon.data_dir / "inbox" / "bob" / f"{bob_email}.md")
    bundle = daemon.data_dir / "inbox" / "alice" / "sneaky"
    bundle.symlink_to(daemon.data_dir / "inbox" / "bob")
    for email_id in ("stolen", "sneaky"):
        assert run_as(alice, daemon, protocol.MarkRead, mailbox="alice", id=email_id) == {
            "error": ["NOTFOUND", f"email '{email_id}' not found in inbox/alice"]}
    assert not is_read(daemon, "bob", bob_email)
    assert_serving(daemon)


def test_hook_create_passes_for_owner_and_root_only(daemon, users):
    alice, bob = users["alice"], users["bob"]
    ok = run_as(alice, daemon, protocol.HookCreate, mailbox="alice", event="on_receive",
                cmd=["/bin/echo", "hi"])
    assert ok == {"ok": {"name": "9f5503741a28"}}
    assert run_as(bob, daemon, protocol.HookCreate, mailbox="alice", event="after_send",
                  cmd=["/bin/true"], name="bobs") == {
        "error": ["ENOENT", "mailbox 'alice' does not exist"]}
    assert outcome(daemon, protocol.HookCreate, mailbox="alice", event="after_send",
                   cmd=["/bin/true"], name="ops-audit", timeout_secs=5) == {
        "ok": {"name": "ops-audit"}}
    hooks = on_disk(daemon)["mailboxes"]["alice"]["hooks"]
    assert hooks == [{"event": "on_receive", "cmd": ["/bin/echo", "hi"]},
                     {"name": "ops-audit", "event": "after_send", "cmd": ["/bin/true"],
                      "timeout_secs": 5}]
    assert re.search(rf"INFO aimx::hook: hook created verb=HOOK-CREATE mailbox=alice "
                     rf"hook_name=9f5503741a28 caller_uid={alice.uid}", daemon.log_text())


def test_hook_delete_leaks_nothing_about_other_users_hooks(daemon, users):
    alice, bob = users["alice"], users["bob"]
    assert outcome(daemon, protocol.HookCreate, mailbox="alice", event="on_receive",
                   cmd=["/bin/true"], name="alice-bot")["ok"]
    not_yours = run_as(bob, daemon, protocol.HookDelete, raw=True, name="alice-bot")
    assert "alice-bot" in on_disk(daemon)["mailboxes"]["alice"]["hooks"][0]["name"]
    assert run_as(alice, daemon, protocol.HookDelete, name="alice-bot") == {"ok": {}}
    missing = run_as(bob, daemon, protocol.HookDelete, raw=True, name="alice-bot")
    assert not_yours == missing
    assert run_as(bob, daemon, protocol.HookDelete, name="alice-bot") == {
        "error": ["ENOENT", "hook 'alice-bot' not found"]}
    assert "hooks" not in on_disk(daemon)["mailboxes"]["alice"]
    # The refusal is still logged for the operator.
    assert re.search(rf'uds authz reject verb="HOOK-DELETE" caller_uid={bob.uid} .*'
                     r'mailbox="alice"', daemon.log_text())


def test_mailbox_delete_leaks_nothing_and_keeps_the_victims_dirs(daemon, users):
    alice, bob = users["alice"], users["bob"]
    deliver(daemon, "bob@test.local")
    not_yours = run_as(alice, daemon, protocol.MailboxDelete, raw=True, name="bob", force=True)
    assert run_as(alice, daemon, protocol.MailboxDelete, name="bob", force=True) == {
        "error": ["MAILBOX", "mailbox 'bob' does not exist"]}
    assert len(email_ids(daemon, "bob")) == 1
    assert "bob" in on_disk(daemon)["mailboxes"]
    assert outcome(daemon, protocol.MailboxDelete, name="bob", force=True) == {"ok": {}}
    missing = run_as(alice, daemon, protocol.MailboxDelete, raw=True, name="bob", force=True)
    assert not_yours == missing
    # The owner may delete their own.
    assert run_as(bob, daemon, protocol.MailboxDelete, name="bob") == {
        "error": ["MAILBOX", "mailbox 'bob' does not exist"]}
    assert run_as(alice, daemon, protocol.MailboxDelete, name="alice") == {"ok": {}}
    assert set(on_disk(daemon)["mailboxes"]) == {"fallback"}


def test_lists_are_filtered_per_caller(daemon, users):
    alice, bob = users["alice"], users["bob"]
    deliver(daemon, "alice@test.local", 3)
    deliver(daemon, "bob@test.local", 1)
    first = email_ids(daemon, "alice")[0]
    call(daemon, protocol.MarkRead, mailbox="alice", id=first)
    # A stray inbox dir owned by alice, not in the config.
    stray = daemon.data_dir / "inbox" / "stray"
    stray.mkdir()
    os.chown(stray, alice.uid, alice.gid)
    call(daemon, protocol.HookCreate, mailbox="bob", event="on_receive", cmd=["/bin/true"])

    rows = run_as(alice, daemon, protocol.MailboxList)["ok"]["rows"]
    assert [r["name"] for r in rows] == ["alice", "stray"]
    assert rows[0] == {"name": "alice", "address": "alice@test.local",
                       "inbox_path": str(daemon.data_dir / "inbox" / "alice"),
                       "sent_path": str(daemon.data_dir / "sent" / "alice"),
                       "total": 3, "unread": 2, "sent_count": 0, "registered": True}
    assert rows[1]["address"] is None and rows[1]["registered"] is False
    assert [r["name"] for r in run_as(bob, daemon, protocol.MailboxList)["ok"]["rows"]] == ["bob"]
    assert [r["name"] for r in call(daemon, protocol.MailboxList)["rows"]] == [
        "alice", "bob", "fallback", "stray"]

    assert run_as(alice, daemon, protocol.HookList) == {"ok": {"rows": []}}
    bob_rows = run_as(bob, daemon, protocol.HookList)["ok"]["rows"]
    assert bob_rows == [{"name": derived_hook_name("on_receive", ["/bin/true"], False),
                         "mailbox": "bob", "event": "on_receive", "cmd": ["/bin/true"],
                         "fire_on_untrusted": False, "timeout_secs": 60}]
    assert call(daemon, protocol.HookList)["rows"] == bob_rows
    # VERSION needs no ownership at all.
    assert run_as(bob, daemon, protocol.Version)["ok"]["tag"]


# -- MAILBOX-CREATE (spec 40 §11.2) and names (§11.3) -------------------------------------


def test_non_root_create_is_forced_to_the_callers_ownership(daemon, users):
    alice = users["alice"]
    reply = run_as(alice, daemon, protocol.MailboxCreate, name="alice-bot", owner=users[
        "bob"].name)
    assert reply == {"ok": {"address": "alice-bot@test.local", "owner": alice.name}}
    assert on_disk(daemon)["mailboxes"]["alice-bot"] == {
        "address": "alice-bot@test.local", "owner": alice.name}
    for folder in ("inbox", "sent"):
        st = os.stat(daemon.data_dir / folder / "alice-bot")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (alice.uid, alice.gid, 0o700)
    # The new mailbox takes mail on the very next SMTP session, without a restart.
    deliver(daemon, "alice-bot@test.local", tag="fresh")
    assert len(email_ids(daemon, "alice-bot")) == 1
    assert run_as(alice, daemon, protocol.MailboxCreate, name="alice-bot") == {
        "error": ["MAILBOX", "mailbox 'alice-bot' already exists"]}


def test_create_refusals_leave_no_dirs_behind(daemon, users):
    inbox = daemon.data_dir / "inbox"
    cases = [
        ({"name": "ops"}, ["VALIDATION", "MAILBOX-CREATE requires an Owner: header"]),
        ({"name": "ops", "owner": "nosuchuser"}, ["VALIDATION", "unknown owner 'nosuchuser'"]),
        ({"name": "ops", "owner": "root"},
         ["VALIDATION", "mailbox 'ops' cannot be owned by root; use a regular Linux user or set "
                        "'allow_root_catchall = true' on a catchall mailbox"]),
        ({"name": "ops", "owner": "Bad Owner"},
         ["MALFORMED", 'invalid owner value: "Bad Owner" (must match [a-z_][a-z0-9_-]*[$]?)']),
        ({"name": "alice", "owner": users["alice"].name},
         ["MAILBOX", "mailbox 'alice' already exists"]),
    ]
    before = daemon.config_path.read_bytes()
    for args, expected in cases:
        assert outcome(daemon, protocol.MailboxCreate, **args) == {"error": expected}, args
    assert not (inbox / "ops").exists() and not (daemon.data_dir / "sent" / "ops").exists()
    assert daemon.config_path.read_bytes() == before


def test_create_adopts_matching_dirs_and_refuses_foreign_ones(daemon, users):
    alice, bob = users["alice"], users["bob"]
    for folder in ("inbox", "sent"):
        for name, owner in (("mine", alice), ("theirs", bob)):
            path = daemon.data_dir / folder / name
            path.mkdir(parents=True)
            os.chown(path, owner.uid, owner.gid)
    (daemon.data_dir / "inbox" / "mine" / "old.md").write_text("kept")
    assert run_as(alice, daemon, protocol.MailboxCreate, name="mine")["ok"]
    assert (daemon.data_dir / "inbox" / "mine" / "old.md").read_text() == "kept"

    theirs = daemon.data_dir / "inbox" / "theirs"
    assert outcome(daemon, protocol.MailboxCreate, name="theirs", owner=alice.name) == {
        "error": ["ECONFLICT",
                  f"{theirs} already exists with owner {bob.uid}:{bob.gid}, expected "
                  f"{alice.uid}:{alice.gid}; run `chown -R {alice.uid}:{alice.gid} {theirs}` "
                  "(and the matching sibling) and retry"]}
    (daemon.data_dir / "inbox" / "afile").write_text("x")
    assert outcome(daemon, protocol.MailboxCreate, name="afile", owner=alice.name) == {
        "error": ["ECONFLICT", f"{daemon.data_dir / 'inbox' / 'afile'} exists but is not a "
                               "directory; remove it before creating the mailbox"]}
    assert not (daemon.data_dir / "sent" / "afile").exists()
    assert set(on_disk(daemon)["mailboxes"]) == {"fallback", "alice", "bob", "mine"}


def test_caller_without_passwd_entry_cannot_create(daemon):
    uid = 54321
    assert run_as(None, daemon, protocol.MailboxCreate, uid=uid, name="ghost") == {
        "error": ["VALIDATION", f"uid {uid} has no passwd entry"]}


@pytest.mark.parametrize("name, reason", [
    ("", "Mailbox name cannot be empty"),
    ("a..b", "Mailbox name cannot contain '..'"),
    (".a", "Mailbox name cannot start or end with '.'"),
    ("a.", "Mailbox name cannot start or end with '.'"),
    ("catchall", "Mailbox name 'catchall' is reserved for the wildcard catchall slot"),
    ("aimx-catchall", "Mailbox name 'aimx-catchall' is reserved for the wildcard catchall slot"),
    ("Alice", "Mailbox name contains invalid character 'A'; allowed: [a-z0-9._-]"),
    ("a b", "Mailbox name contains invalid character ' '; allowed: [a-z0-9._-]"),
    ("a" * 65, "Mailbox name is too long (max 64 characters)"),
])
def test_bad_mailbox_names(daemon, users, name, reason):
    alice = users["alice"]
    assert outcome(daemon, protocol.MailboxCreate, name=name, owner=alice.name) == {
        "error": ["VALIDATION", reason]}
    assert outcome(daemon, protocol.MailboxDelete, name=name) == {"error": ["VALIDATION", reason]}


def test_good_unusual_mailbox_names(daemon, users):
    alice = users["alice"]
    for name in ("-x", "a_b.c-d", "a" * 64):
        assert run_as(alice, daemon, protocol.MailboxCreate, name=name)["ok"]["address"] == (
            f"{name}@{DOMAIN}")
    assert {"-x", "a_b.c-d", "a" * 64} <= set(on_disk(daemon)["mailboxes"])


# -- MAILBOX-DELETE (§11.4) ------------------------------------------------------------


def test_delete_counts_every_entry_and_force_wipes_them(daemon, users):
    deliver(daemon, "alice@test.local", 2)
    inbox, sent = daemon.data_dir / "inbox" / "alice", daemon.data_dir / "sent" / "alice"
    (inbox / ".hidden").write_text("x")
    sent.mkdir(parents=True, exist_ok=True)
    (sent / "bundle").mkdir()
    (sent / "bundle" / "bundle.md").write_text("x")
    assert outcome(daemon, protocol.MailboxDelete, name="alice") == {"error": [
        "NONEMPTY",
        "mailbox 'alice' has 4 files (3 in inbox, 1 in sent); archive or remove them first"]}
    call(daemon, protocol.HookCreate, mailbox="alice", event="on_receive", cmd=["/bin/true"])
    assert outcome(daemon, protocol.MailboxDelete, name="alice", force=True) == {"ok": {}}
    assert inbox.is_dir() and sent.is_dir()
    assert os.listdir(inbox) == [] and os.listdir(sent) == []
    assert "alice" not in on_disk(daemon)["mailboxes"]
    assert call(daemon, protocol.HookList)["rows"] == []  # its hooks went with it


def test_catchall_is_never_deleted(daemon):
    assert outcome(daemon, protocol.MailboxDelete, name="catchall") == {"error": [
        "VALIDATION", "Mailbox name 'catchall' is reserved for the wildcard catchall slot"]}
    assert outcome(daemon, protocol.MailboxDelete, name="fallback", force=True) == {
        "error": ["MAILBOX", "cannot delete the catchall mailbox"]}
    assert outcome(daemon, protocol.HookCreate, mailbox="fallback", event="on_receive",
                   cmd=["/bin/true"]) == {"error": [
        "MAILBOX", "mailbox 'fallback' is the catchall; hooks on the catchall are forbidden"]}
    assert "fallback" in on_disk(daemon)["mailboxes"]


# -- HOOK-CREATE checks ---------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    ({"mailbox": "nope", "event": "on_receive"}, ["ENOENT", "mailbox 'nope' does not exist"]),
    ({"event": "on_create"},
     ["VALIDATION", "invalid event 'on_create': expected 'on_receive' or 'after_send'"]),
    ({"name": "bad name"},
     ["VALIDATION", "invalid hook name 'bad name': must match [a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127}"]),
    ({"cmd": []}, ["VALIDATION", 'hook has empty `cmd`: must be a non-empty argv array, '
                                 'e.g. `["/bin/echo", "hi"]`']),
    ({"cmd": [" "]}, ["VALIDATION", "hook has blank `cmd[0]`"]),
    ({"cmd": ["echo"]}, ["VALIDATION", "hook has non-absolute `cmd[0]` 'echo': hooks run in "
                                       "working directory / with a fixed PATH, so name the "
                                       "program by its absolute path (e.g. `/bin/echo` instead "
                                       "of `echo`)"]),
    ({"type": "template"},
     ["VALIDATION", "hook has unsupported type 'template': only `cmd` is supported"]),
    ({"event": "after_send", "fire_on_untrusted": True},
     ["VALIDATION", "`fire_on_untrusted = true` is `on_receive` only"]),
    ({"timeout_secs": 0}, ["VALIDATION", "`timeout_secs = 0`: must be > 0"]),
    ({"timeout_secs": 601}, ["VALIDATION", "`timeout_secs = 601` exceeds the max of 600"]),
])
def test_hook_create_field_checks(daemon, args, expected):
    request = {"mailbox": "alice", "event": "on_receive", "cmd": ["/bin/true"], **args}
    assert outcome(daemon, protocol.HookCreate, **request) == {"error": expected}


def test_hook_create_duplicate_names_fail_validation(daemon):
    assert outcome(daemon, protocol.HookCreate, mailbox="alice", event="on_receive",
                   cmd=["/bin/true"], name="dup")["ok"]
    assert outcome(daemon, protocol.HookCreate, mailbox="alice", event="on_receive",
                   cmd=["/bin/false"], name="dup") == {"error": [
        "VALIDATION", "duplicate hook name 'dup' on mailbox 'alice': "
                      "hook names must be unique across the mailboxes of one owner"]}


@pytest.mark.parametrize("key, reason", [
    ("template", "hook sets `template`; template hooks were removed. See book/hooks.md for the "
                 "supported raw-cmd schema"),
    ("run_as", "hook sets `run_as`; the field was removed — hooks now run as the mailbox's "
               "`owner`"),
    ("origin", "hook sets `origin`; the field was removed"),
    ("dangerously_support_untrusted", "hook sets `dangerously_support_untrusted`; the field was "
                                      "renamed to `fire_on_untrusted`"),
    ("stdin", "hook sets removed field 'stdin' — the email is always piped to hooks; remove "
              "this key from the request"),
    ("colour", "unknown field 'colour'"),
])
def test_hook_create_legacy_and_unknown_keys(daemon, key, reason):
    box = dict(request_box(protocol.HookCreate, {"mailbox": "alice", "event": "on_receive",
                                                 "cmd": ["/bin/true"]}, b"5"))
    box[key.encode()] = b"x"
    reply = amp.parseString(raw_exchange(daemon, amp.AmpBox(box).serialize(), wait=1))
    assert reply == [{b"_error": b"5", b"_error_code": b"PROTOCOL",
                      b"_error_description": reason.encode()}]
    assert "hooks" not in on_disk(daemon)["mailboxes"]["alice"]


# -- rewrites (§11.7) ------------------------------------------------------------------


def test_every_crud_verb_keeps_comments_tables_mode_and_owner(daemon, users):
    alice = users["alice"]
    os.chown(daemon.config_path, 0, alice.gid)
    os.chmod(daemon.config_path, 0o640)

    def intact() -> None:
        text = daemon.config_path.read_text()
        assert "# operator note: this comment must survive every rewrite\n" in text
        assert ("# an unrelated table the API must never touch\n[upgrade]\n"
                'release_manifest_url = "https://example.invalid/manifest.json"\n') in text
        st = os.stat(daemon.config_path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, alice.gid)
        assert "data_dir" not in text  # the daemon's data-dir override never lands in the file
        assert not [p for p in daemon.config_dir.iterdir() if p.name.startswith(".config")]

    assert call(daemon, protocol.MailboxCreate, name="ops", owner=alice.name)
    intact()
    assert call(daemon, protocol.HookCreate, mailbox="ops", event="on_receive",
                cmd=["/bin/true"], name="h1") == {"name": "h1"}
    intact()
    assert call(daemon, protocol.HookDelete, name="h1") == {}
    intact()
    assert call(daemon, protocol.MailboxDelete, name="ops") == {}
    intact()
    assert set(on_disk(daemon)["mailboxes"]) == {"fallback", "alice", "bob"}


def test_hand_edits_survive_and_broken_files_change_nothing(daemon, users):
    alice = users["alice"]
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text + '\n[mailboxes.manual]\naddress = "manual@test.local"\n'
                                  f'owner = "{alice.name}"\n')
    assert call(daemon, protocol.MailboxCreate, name="ops", owner=alice.name)
    assert {"manual", "ops"} <= set(on_disk(daemon)["mailboxes"])

    broken = daemon.config_path.read_text() + "\n[mailboxes.x\n"
    daemon.config_path.write_text(broken)
    reply = outcome(daemon, protocol.MailboxCreate, name="ops2", owner=alice.name)
    assert reply["error"][0] == "IO"
    assert reply["error"][1].startswith(f"failed to parse {daemon.config_path}: ")
    assert daemon.config_path.read_text() == broken
    assert not (daemon.data_dir / "inbox" / "ops2").exists()
    assert_serving(daemon)


# -- the socket itself (§11.11) and bad input -------------------------------------------


def test_socket_is_world_writable(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o666


def test_unknown_verbs_missing_and_extra_arguments(daemon):
    replies = amp.parseString(raw_exchange(daemon, b"".join(amp.AmpBox(box).serialize() for box in [
        {b"_command": b"FROB", b"_ask": b"1"},
        {b"_command": b"MARK-READ", b"_ask": b"2", b"id": b"x"},
        {b"_command": b"MAILBOX-LIST", b"_ask": b"3", b"all": b"yes"},
        {b"_command": b"MARK-READ", b"_ask": b"4", b"mailbox": b"", b"id": b"x"},
        {b"_ask": b"5", b"mailbox": b"x"},
        {b"_command": b"VERSION", b"_ask": b"6"},
    ]), wait=1))
    by_tag = {box.get(b"_error", box.get(b"_answer")): box for box in replies}
    assert [(by_tag[t].get(b"_error_code"), by_tag[t].get(b"_error_description"))
            for t in (b"1", b"2", b"3", b"4", b"5")] == [
        (b"PROTOCOL", b"unknown verb 'FROB'"),
        (b"MALFORMED", b"missing required field: mailbox"),
        (b"MALFORMED", b"MAILBOX-LIST takes no arguments"),
        (b"MALFORMED", b"empty mailbox value"),
        (b"MALFORMED", b"request box has no _command"),
    ]
    assert by_tag[b"6"][b"tag"]  # the same connection still answers


def test_send_body_over_the_cap_and_send_before_sending_exists(daemon):
    body = b"x" * (26_214_400 + 1)
    assert outcome(daemon, protocol.Send, body=body) == {"error": [
        "MALFORMED", "body length 26214401 exceeds cap 26214400"]}
    assert outcome(daemon, protocol.Send, body=b"From: a\r\n\r\nx", text_only=True,
                   html_body=b"<p>x</p>") == {"error": [
        "MALFORMED", "AIMX/1 SEND: --text-only and --html-body are mutually exclusive"]}
    assert_serving(daemon)


def test_oversized_box_and_broken_framing_drop_only_that_connection(daemon):
    # 53 MiB of (valid-looking) chunk keys: dropped without an answer.
    piece = b"y" * 65535
    chunks = [amp.AmpBox({b"_command": b"SEND", b"_ask": b"1"}).serialize()[:-2]]
    for i in range(1, 850):
        key = b"body" if i == 1 else b"body.%d" % i
        chunks.append(len(key).to_bytes(2, "big") + key + len(piece).to_bytes(2, "big") + piece)
    assert raw_exchange(daemon, b"".join(chunks) + b"\x00\x00", wait=3) == b""
    # A key longer than 255 bytes is not AMP at all.
    assert raw_exchange(daemon, b"\x01\x00" + b"k" * 256, wait=2) == b""
    # A box with neither _command nor _ask cannot be answered.
    assert raw_exchange(daemon, amp.AmpBox({b"hello": b"x"}).serialize(), wait=2) == b""
    assert_serving(daemon)
    assert "request box over" in daemon.log_text()


def test_stalled_and_idle_connections_are_dropped_after_the_timeout(daemon):
    for data in (b"\x00\x08_command\x00\x07VERS", b""):  # half a box, then nothing at all
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(daemon.socket_path))
            started = time.monotonic()
            sock.sendall(data)
            sock.settimeout(15)
            assert sock.recv(100) == b""  # closed, no reply
            elapsed = time.monotonic() - started
        assert TIMEOUT_SECS - 0.2 <= elapsed <= TIMEOUT_SECS + 3
    # A box that completes within the timeout is answered.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(daemon.socket_path))
        whole = amp.AmpBox({b"_command": b"VERSION", b"_ask": b"1"}).serialize()
        sock.sendall(whole[:5])
        time.sleep(TIMEOUT_SECS / 2)
        sock.sendall(whole[5:])
        sock.settimeout(10)
        assert read_box(sock)[b"_answer"] == b"1"
    assert_serving(daemon)


# -- concurrency ---------------------------------------------------------------------


def test_marks_racing_ingest_lose_no_update_and_leave_no_temp_files(daemon):
    deliver(daemon, "alice@test.local", 100, tag="seed")
    seeded = email_ids(daemon, "alice")
    assert len(seeded) == 100
    want_read = set(seeded[::2])

    def toggle(email_id: str) -> None:
        """Two marks per email (200 in all); the last one decides."""
        client = Client(daemon.socket_path, timeout=60)
        first, last = ((protocol.MarkUnread, protocol.MarkRead) if email_id in want_read
                       else (protocol.MarkRead, protocol.MarkUnread))
        client.call(first, mailbox="alice", id=email_id)
        client.call(last, mailbox="alice", id=email_id)

    def ingest(batch: int) -> None:
        deliver(daemon, "alice@test.local", 50, tag=f"race{batch}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(ingest, b) for b in range(4)]
        futures += [pool.submit(toggle, email_id) for email_id in seeded]
        for future in futures:
            future.result()

    ids = email_ids(daemon, "alice")
    assert len(ids) == 300
    for email_id in seeded:
        assert is_read(daemon, "alice", email_id) == (email_id in want_read), email_id
    assert not any(is_read(daemon, "alice", e) for e in set(ids) - set(seeded))
    leftovers = [p.name for p in (daemon.data_dir / "inbox" / "alice").iterdir()
                 if p.name.startswith(".")]
    assert leftovers == []


def test_create_and_delete_racing_sighup_lose_no_stanza(daemon, users):
    alice = users["alice"]
    stop = threading.Event()

    def hup() -> None:
        while not stop.is_set():
            daemon.signal(signal.SIGHUP)
            time.sleep(0.03)

    names = [f"race{i}" for i in range(30)]
    thread = threading.Thread(target=hup)
    thread.start()
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda n: call(daemon, protocol.MailboxCreate, name=n,
                                         owner=alice.name), names))
            list(pool.map(lambda n: call(daemon, protocol.MailboxDelete, name=n), names[::3]))
    finally:
        stop.set()
        thread.join()
    expected = {"fallback", "alice", "bob"} | set(names) - set(names[::3])
    assert set(on_disk(daemon)["mailboxes"]) == expected
    # The live config agrees with the file once the last reload has landed.
    deadline = time.monotonic() + 10
    while True:
        live = {r["name"] for r in call(daemon, protocol.MailboxList)["rows"] if r["registered"]}
        if live == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert live == expected
    assert "comment must survive" in daemon.config_path.read_text()


# -- the Deferred client (for reactor code such as the MCP server) ------------------------

_DEFERRED_SCRIPT = r"""
import json, sys
from twisted.internet import defer, task
from aimx.daemon import protocol
from aimx.daemon.client import DaemonDown, call_deferred

async def main(reactor, path):
    out = {"version": (await call_deferred(reactor, protocol.Version, path))["tag"]}
    try:
        await call_deferred(reactor, protocol.MarkRead, path, mailbox="nope", id="x")
    except protocol.ApiError as exc:
        out["error"] = [exc.code, exc.reason]
    try:
        await call_deferred(reactor, protocol.Version, path + ".missing")
    except DaemonDown as exc:
        out["down"] = exc.socket_path
    print(json.dumps(out))

task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1])))
"""


def test_deferred_client_maps_answers_and_errors_like_the_blocking_one(daemon):
    proc = subprocess.run([sys.executable, "-c", _DEFERRED_SCRIPT, str(daemon.socket_path)],
                          cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "version": call(daemon, protocol.Version)["tag"],
        "error": ["ENOENT", "mailbox 'nope' does not exist"],
        "down": f"{daemon.socket_path}.missing"}


def test_mailbox_index_is_reused_after_a_restart(daemon):
    """A restarted daemon answers MAILBOX-LIST from the index it kept on disk: no re-scan
    of the mailbox (its log says when it re-scans), the same counts; a dir changed while
    it was down is re-scanned and only the new email is read."""
    deliver(daemon, "alice@test.local", 3)
    inbox = daemon.data_dir / "inbox" / "alice"
    rescans = r"mailbox index re-scanned dir=\S*/inbox/alice "

    def alice_counts() -> tuple[int, int]:
        row = next(r for r in call(daemon, protocol.MailboxList)["rows"] if r["name"] == "alice")
        return row["total"], row["unread"]

    then = time.time_ns() - 10_000_000_000  # as if the mail had sat a while (past "racy")
    os.utime(inbox, ns=(then, then))
    assert alice_counts() == (3, 3)
    assert len(re.findall(rescans, daemon.log_text())) == 1

    daemon.restart()
    assert alice_counts() == (3, 3)
    assert alice_counts() == (3, 3)
    assert len(re.findall(rescans, daemon.log_text())) == 1  # the kept index was used

    daemon.stop()
    newest = max(inbox.glob("*.md"))
    (inbox / f"{newest.stem}-copy.md").write_bytes(newest.read_bytes())  # behind its back
    daemon.start()
    assert alice_counts() == (4, 4)
    found = re.findall(rescans + r"emails=(\d+) read=(\d+) dropped=(\d+)", daemon.log_text())
    assert found[1:] == [("4", "1", "0")]
