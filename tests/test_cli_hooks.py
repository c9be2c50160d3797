"""``aimx hooks`` as users run it: the real CLI against the real daemon (or none)."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator

import pytest

from aimx.config import derived_hook_name
from tests.support.api import config_text
from tests.support.cli import NO_ANSWER, aimx
from tests.support.daemon import RunningDaemon

NEEDS_ROOT = ("Error: not authorized: aimx hooks {verb} requires root (run with sudo)\n"
              "hint: if the daemon is running, hook CRUD over UDS would handle this without "
              "sudo.\n")
NOTE = ("Note: aimx serve is not running. The change will take effect on the next start "
        "(`sudo systemctl start aimx`).\n")


@pytest.fixture
def daemon(dns, users) -> Iterator[RunningDaemon]:
    with RunningDaemon(config_text(dns, users)) as running:
        yield running


@pytest.fixture
def stopped(dns, users) -> Iterator[RunningDaemon]:
    with RunningDaemon(config_text(dns, users), start=False) as instance:
        yield instance


def hooks_of(d: RunningDaemon, mailbox: str) -> list[dict]:
    return tomllib.loads(d.config_path.read_text())["mailboxes"][mailbox].get("hooks", [])


def test_owner_creates_a_hook_and_only_the_owner_sees_it(daemon, users):
    alice, bob = users["alice"], users["bob"]
    run = aimx(daemon, "hooks", "create", "--mailbox", "alice", "--event", "on_receive",
               "--cmd", '["/bin/echo", "hi"]', user=alice)
    assert (run.returncode, run.stderr) == (0, "")
    assert run.stdout == "[OK] Hook '9f5503741a28' created on mailbox 'alice'.\n"
    # Default timeout and flags are not written.
    assert hooks_of(daemon, "alice") == [{"event": "on_receive", "cmd": ["/bin/echo", "hi"]}]
    listed = aimx(daemon, "hook", "list", user=alice)
    assert listed.stdout == (
        "NAME                         MAILBOX              EVENT       TIMEOUT CMD\n"
        '9f5503741a28                 alice                on_receive       60 '
        '["/bin/echo","hi"]\n')
    assert aimx(daemon, "hooks", "list", user=bob).stdout == "No hooks.\n"
    assert aimx(daemon, "hooks", "list").stdout == listed.stdout
    assert aimx(daemon, "hooks", "list", "--mailbox", "bob").stdout == "No hooks.\n"
    # Another user cannot attach hooks to alice's mailbox, nor learn that it exists.
    run = aimx(daemon, "hooks", "create", "--mailbox", "alice", "--event", "after_send",
               "--cmd", '["/bin/true"]', user=bob)
    assert (run.returncode, run.stderr) == (1, "Error: [ENOENT] mailbox 'alice' does not exist\n")


def test_a_duplicate_name_on_one_mailbox_names_it_once(daemon, users):
    alice = users["alice"]
    argv = ("hooks", "create", "--mailbox", "alice", "--event", "on_receive", "--name", "x",
            "--cmd")
    assert aimx(daemon, *argv, '["/bin/true"]', user=alice).returncode == 0
    run = aimx(daemon, *argv, '["/bin/false"]', user=alice)
    assert (run.returncode, run.stderr) == (
        1, "Error: [VALIDATION] duplicate hook name 'x' on mailbox 'alice': hook names must be "
           "unique across the mailboxes of one owner\n")


def test_a_config_dir_closed_to_users_leaves_the_socket_path_working(daemon, users):
    alice = users["alice"]
    daemon.config_dir.chmod(0o700)
    run = aimx(daemon, "hooks", "create", "--mailbox", "alice", "--event", "on_receive",
               "--cmd", '["/bin/true"]', "--name", "ok", user=alice)
    assert (run.returncode, run.stderr) == (0, "")
    assert [hook["name"] for hook in hooks_of(daemon, "alice")] == ["ok"]


def test_create_writes_non_default_fields_and_long_commands_are_cut(daemon, users):
    alice = users["alice"]
    argv = ["/usr/local/bin/agent", "--prompt", "summarise the new email and file it " * 2]
    run = aimx(daemon, "hooks", "create", "--mailbox", "alice", "--event", "on_receive",
               "--cmd", json.dumps(argv), "--name", "summariser",
               "--timeout-secs", "120", "--fire-on-untrusted", user=alice)
    assert run.returncode == 0, run.stderr
    assert hooks_of(daemon, "alice") == [{"name": "summariser", "event": "on_receive",
                                          "cmd": argv, "fire_on_untrusted": True,
                                          "timeout_secs": 120}]
    line = aimx(daemon, "hooks", "list", user=alice).stdout.splitlines()[1]
    assert line.startswith("summariser                   alice                on_receive      120 ")
    assert line.endswith('["/usr/local/bin/agent","--prompt","summarise the new email…')


@pytest.mark.parametrize("overrides, flags, code, message", [
    ({}, ["--name", "no spaces"], 2,
     "invalid hook name 'no spaces': must match [a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127}"),
    ({"--mailbox": "nope"}, [], 1, "Mailbox 'nope' does not exist"),
    ({"--event": "after_send"}, ["--fire-on-untrusted"], 2,
     "--fire-on-untrusted is on_receive only"),
    ({"--cmd": "  "}, [], 2, "--cmd must not be empty"),
    ({"--cmd": "[]"}, [], 2, "--cmd must be a non-empty JSON array of strings"),
    ({"--cmd": '{"a": 1}'}, [], 2,
     "--cmd must be a JSON array of strings, e.g. '[\"/bin/echo\",\"hi\"]'"),
    ({"--cmd": '["echo"]'}, [], 1,
     "[VALIDATION] hook has non-absolute `cmd[0]` 'echo': hooks run in working directory / "
     "with a fixed PATH, so name the program by its absolute path (e.g. `/bin/echo` instead "
     "of `echo`)"),
    ({}, ["--timeout-secs", "601"], 1,
     "[VALIDATION] `timeout_secs = 601` exceeds the max of 600"),
])
def test_create_check_order_and_messages(daemon, overrides, flags, code, message):
    options = {"--mailbox": "alice", "--event": "on_receive", "--cmd": '["/bin/true"]',
               **overrides}
    argv = [part for pair in options.items() for part in pair] + flags
    run = aimx(daemon, "hooks", "create", *argv)
    assert (run.returncode, run.stderr) == (code, f"Error: {message}\n")
    assert hooks_of(daemon, "alice") == []


def test_root_with_readable_config_checks_the_mailbox_first(daemon, users):
    # The catchall refuses hooks in the daemon, after the local checks pass.
    run = aimx(daemon, "hooks", "create", "--mailbox", "fallback", "--event", "on_receive",
               "--cmd", '["/bin/true"]')
    assert run.stderr == ("Error: [MAILBOX] mailbox 'fallback' is the catchall; hooks on the "
                          "catchall are forbidden\n")


def test_delete_shows_the_hook_and_asks(daemon, users):
    alice, bob = users["alice"], users["bob"]
    aimx(daemon, "hooks", "create", "--mailbox", "alice", "--event", "after_send",
         "--cmd", '["/bin/true"]', "--name", "audit", "--timeout-secs", "5", user=alice)
    run = aimx(daemon, "hooks", "delete", "audit", user=alice, input="no\n")
    assert (run.returncode, run.stdout) == (0, (
        "About to delete hook:\n"
        "  name:    audit\n"
        "  mailbox: alice\n"
        "  event:   after_send\n"
        "  timeout: 5s\n"
        '  cmd:     ["/bin/true"]\n'
        "Continue? [y/N] Cancelled.\n"))
    # Without a terminal and without -y the command says so instead of cancelling quietly.
    run = aimx(daemon, "hooks", "delete", "audit", user=alice, input="")
    assert (run.returncode, run.stderr) == (2, NO_ANSWER)
    assert run.stdout.endswith("Continue? [y/N] \n")
    assert len(hooks_of(daemon, "alice")) == 1
    # Bob neither sees it nor can delete it: the answer is "not found".
    run = aimx(daemon, "hooks", "delete", "audit", user=bob)
    assert (run.returncode, run.stdout, run.stderr) == (
        1, "", "Error: [ENOENT] hook 'audit' not found\n")
    run = aimx(daemon, "hooks", "delete", "audit", user=alice, input="Y\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("Continue? [y/N] [OK] Hook 'audit' deleted.\n")
    assert hooks_of(daemon, "alice") == []


def test_delete_by_derived_name_with_yes(daemon, users):
    bob = users["bob"]
    aimx(daemon, "hooks", "create", "--mailbox", "bob", "--event", "on_receive",
         "--cmd", '["/bin/echo","a b"]', user=bob)
    name = derived_hook_name("on_receive", ["/bin/echo", "a b"], False)
    assert name == "998053293ba5"
    run = aimx(daemon, "hooks", "delete", "-y", name, user=bob)
    assert (run.returncode, run.stdout) == (0, f"[OK] Hook '{name}' deleted.\n")
    assert hooks_of(daemon, "bob") == []


def test_daemon_down_non_root_is_refused_without_permission_errors(stopped, users):
    alice = users["alice"]
    before = stopped.config_path.read_bytes()
    for verb, argv in (("list", []), ("delete", ["x"]),
                       ("create", ["--mailbox", "alice", "--event", "on_receive",
                                   "--cmd", '["/bin/true"]'])):
        run = aimx(stopped, "hooks", verb, *argv, user=alice)
        assert (run.returncode, run.stdout, run.stderr) == (1, "", NEEDS_ROOT.format(verb=verb))
        assert "Permission denied" not in run.stderr
    assert stopped.config_path.read_bytes() == before


def test_daemon_down_root_edits_directly(stopped):
    run = aimx(stopped, "hooks", "create", "--mailbox", "alice", "--event", "on_receive",
               "--cmd", '["/bin/echo","hi"]', "--name", "greeter")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "[OK] Hook 'greeter' created on mailbox 'alice'.\n" + NOTE
    assert hooks_of(stopped, "alice") == [{"name": "greeter", "event": "on_receive",
                                           "cmd": ["/bin/echo", "hi"]}]
    assert "this comment must survive" in stopped.config_path.read_text()
    listed = aimx(stopped, "hooks", "list")
    assert listed.stdout.splitlines()[1].startswith("greeter ")
    # Names are unique per owner: bob's mailbox may have a "greeter" too.
    dup = aimx(stopped, "hooks", "create", "--mailbox", "bob", "--event", "on_receive",
               "--cmd", '["/bin/true"]', "--name", "greeter")
    assert dup.returncode == 0, dup.stderr
    ambiguous = aimx(stopped, "hooks", "delete", "--yes", "greeter")
    assert (ambiguous.returncode, ambiguous.stderr) == (
        1, "Error: [VALIDATION] hook name 'greeter' is used on mailboxes 'alice', 'bob'; "
           "name the mailbox to delete one\n")
    run = aimx(stopped, "hooks", "delete", "--yes", "greeter", "--mailbox", "bob")
    assert run.returncode == 0, run.stderr
    assert hooks_of(stopped, "bob") == [] and len(hooks_of(stopped, "alice")) == 1
    run = aimx(stopped, "hooks", "delete", "--yes", "greeter")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "[OK] Hook 'greeter' deleted.\n" + NOTE
    assert hooks_of(stopped, "alice") == []
    missing = aimx(stopped, "hooks", "delete", "--yes", "greeter")
    assert (missing.returncode, missing.stderr) == (
        1, "Error: [ENOENT] hook 'greeter' not found\n")
