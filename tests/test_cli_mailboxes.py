"""``aimx mailboxes`` as users run it: the real CLI against the real daemon (or none).

Commands run in subprocesses as root or as the test users (see
``tests.support.cli.aimx``), with colour off so output compares as text.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator

import pytest

from aimx.config import derived_hook_name
from aimx.daemon import protocol
from aimx.daemon.client import Client
from tests.support.api import config_text, deliver
from tests.support.cli import NO_ANSWER, aimx
from tests.support.daemon import RunningDaemon

DOWN = ("Error: daemon must be running for non-root mailbox CRUD; start `aimx serve` or run "
        "with sudo to fall back to direct config edit.\n")
HINT = "Hint: Restart the daemon for the change to take effect:\n  sudo systemctl restart aimx\n"


@pytest.fixture
def daemon(dns, users) -> Iterator[RunningDaemon]:
    with RunningDaemon(config_text(dns, users)) as running:
        yield running


@pytest.fixture
def stopped(dns, users) -> Iterator[RunningDaemon]:
    """An instance whose daemon is not running (no socket at all)."""
    with RunningDaemon(config_text(dns, users), start=False) as instance:
        yield instance


def mailboxes(d: RunningDaemon) -> dict:
    return tomllib.loads(d.config_path.read_text())["mailboxes"]


@pytest.mark.parametrize("group, subcommands", [
    ("mailboxes", ["create", "list", "show", "delete"]),
    ("hooks", ["list", "create", "delete"]),
    ("agents", ["setup", "list", "remove"]),
])
def test_group_help_lists_its_subcommands(group, subcommands):
    run = subprocess.run([sys.executable, "-m", "aimx.cli.main", group, "--help"],
                         capture_output=True, text=True, timeout=60, env={**os.environ,
                                                                         "NO_COLOR": "1"})
    assert run.returncode == 0, run.stderr
    listed = [line.split()[0] for line in run.stdout.splitlines()
              if line.startswith("    ") and len(line.split()) > 1]
    assert listed == subcommands


# -- create -----------------------------------------------------------------------


def test_user_creates_their_own_mailbox_over_the_socket(daemon, users):
    alice = users["alice"]
    run = aimx(daemon, "mailboxes", "create", "helper", user=alice)
    assert (run.returncode, run.stderr) == (0, "")
    assert run.stdout == f"[OK] Mailbox 'helper' created: helper@test.local (owner {alice.name})\n"
    assert mailboxes(daemon)["helper"] == {"address": "helper@test.local", "owner": alice.name}
    again = aimx(daemon, "mailbox", "create", "helper", user=alice)
    assert (again.returncode, again.stderr) == (
        1, "Error: [MAILBOX] mailbox 'helper' already exists\n")
    empty = aimx(daemon, "mailboxes", "create", "x", "--owner", "", user=alice)
    assert (empty.returncode, empty.stderr) == (2, "Error: --owner value cannot be empty\n")
    bad = aimx(daemon, "mailboxes", "create", "Bad", user=alice)
    assert bad.stderr == ("Error: [VALIDATION] Mailbox name contains invalid character 'B'; "
                          "allowed: [a-z0-9._-]\n")


def test_root_is_asked_for_an_owner_with_the_local_part_as_default(daemon, users):
    alice = users["alice"]
    run = aimx(daemon, "mailboxes", "create", alice.name, input="\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(
        f"Which Linux user should own `{alice.name}@test.local`? [{alice.name}]: ")
    assert mailboxes(daemon)[alice.name]["owner"] == alice.name
    # No such user: no default shown, five tries, a useradd hint each time.
    run = aimx(daemon, "mailboxes", "create", "ops", input="ghost1\n" * 5)
    assert run.returncode == 1
    assert run.stdout == "Which Linux user should own `ops@test.local`? " * 5
    assert run.stderr.count("useradd") == 5
    assert run.stderr.endswith("Error: no valid owner after 5 attempts\n")
    # A wrong name, an empty answer, then a good one.
    run = aimx(daemon, "mailboxes", "create", "ops", input=f"ghost1\n\n{alice.name}\n")
    assert run.returncode == 0, run.stderr
    assert "An owner is required: type the name of an existing Linux user.\n" in run.stderr
    assert mailboxes(daemon)["ops"]["owner"] == alice.name
    assert "ops2" not in mailboxes(daemon)


def test_noninteractive_root_takes_the_default_or_fails(daemon, users):
    bob = users["bob"]
    env = {"AIMX_NONINTERACTIVE": "1"}
    run = aimx(daemon, "mailboxes", "create", bob.name, env=env)
    assert run.returncode == 0, run.stderr
    assert "Which Linux user" not in run.stdout
    assert mailboxes(daemon)[bob.name]["owner"] == bob.name
    run = aimx(daemon, "mailboxes", "create", "ops", env=env)
    assert run.returncode == 1
    assert run.stderr.startswith("Error: no owner for mailbox 'ops': pass --owner")
    assert "ops" not in mailboxes(daemon)


def test_a_broken_config_is_reported_with_its_file_and_line(daemon, stopped, users):
    alice = users["alice"]
    for instance in (daemon, stopped):
        text = instance.config_path.read_text() + '\n[mailboxes.zed]\nowner = "root"\n'
        instance.write_config(text)
        line = text.splitlines().index("[mailboxes.zed]") + 1
        where = f"{instance.config_path}, line {line}: missing required field 'address' in " \
                "[mailboxes.zed]"
        if instance is daemon:  # the daemon refuses to edit a file that is already invalid
            run = aimx(instance, "mailboxes", "create", "ops", user=alice)
            assert (run.returncode, run.stderr) == (1, f"Error: [IO] {where}\n")
        run = aimx(instance, "mailboxes", "create", "ops", "--owner", alice.name)
        assert (run.returncode, run.stderr) == (1, f"Error: {where}\n" if instance is stopped
                                                else f"Error: [IO] {where}\n")
        assert instance.config_path.read_text() == text


def test_daemon_down_non_root_exits_2_and_touches_nothing(stopped, users):
    alice = users["alice"]
    before = stopped.config_path.read_bytes()
    for argv in (("create", "helper"), ("list",), ("delete", "-y", "alice")):
        run = aimx(stopped, "mailboxes", *argv, user=alice)
        assert (run.returncode, run.stdout, run.stderr) == (2, "", DOWN), argv
    assert stopped.config_path.read_bytes() == before
    assert not (stopped.data_dir / "inbox" / "helper").exists()


def test_daemon_down_root_edits_the_config_directly(stopped, users):
    alice = users["alice"]
    os.chmod(stopped.config_path, 0o640)
    run = aimx(stopped, "mailboxes", "create", "helper", "--owner", alice.name)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ("[OK] Mailbox 'helper' created: helper@test.local "
                          f"(owner {alice.name})\n" + HINT)
    assert mailboxes(stopped)["helper"] == {"address": "helper@test.local", "owner": alice.name}
    text = stopped.config_path.read_text()
    assert "# operator note: this comment must survive every rewrite" in text
    assert stat.S_IMODE(os.stat(stopped.config_path).st_mode) == 0o640
    inbox = os.stat(stopped.data_dir / "inbox" / "helper")
    assert (inbox.st_uid, stat.S_IMODE(inbox.st_mode)) == (alice.uid, 0o700)
    # The same validation as the daemon's.
    run = aimx(stopped, "mailboxes", "create", "ops", "--owner", "Bad Owner")
    assert (run.returncode, run.stderr) == (1, 'Error: [MALFORMED] invalid owner value: '
                                               '"Bad Owner" (must match [a-z_][a-z0-9_-]*[$]?)\n')
    run = aimx(stopped, "mailboxes", "create", "ops", "--owner", "root")
    assert run.returncode == 1
    assert run.stderr == ("Error: [VALIDATION] mailbox 'ops' cannot be owned by root; use a "
                          "regular Linux user or set 'allow_root_catchall = true' on a catchall "
                          "mailbox\n")
    # Delete applies NONEMPTY / --force like the daemon.
    (stopped.data_dir / "inbox" / "helper" / "x.md").write_text("+++\n+++\n")
    run = aimx(stopped, "mailboxes", "delete", "-y", "helper")
    assert run.stderr == ("Error: [NONEMPTY] mailbox 'helper' has 1 files (1 in inbox, 0 in "
                          "sent); archive or remove them first\n")
    run = aimx(stopped, "mailboxes", "delete", "-y", "--force", "helper")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "[OK] Mailbox 'helper' deleted.\n" + HINT
    assert "helper" not in mailboxes(stopped)
    assert (stopped.data_dir / "inbox" / "helper").is_dir()
    # And the daemon starts on the result.
    stopped.start()
    assert aimx(stopped, "mailboxes", "list", user=alice).returncode == 0


def test_daemon_down_fallback_does_without_twisted(stopped):
    """With the daemon down, root's ``aimx mailboxes list`` and ``aimx hooks list`` do the
    work themselves without loading Twisted (a tenth of a second instead of a quarter)."""
    if os.geteuid() != 0:
        pytest.skip("the daemon-down fallback is root's")
    probe = ("import sys\n"
             "from aimx.cli.main import main\n"
             "codes = [main(['mailboxes', 'list']), main(['hooks', 'list'])]\n"
             "print(codes, sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))\n")
    run = subprocess.run([sys.executable, "-c", probe], env=stopped.client_env(),
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.splitlines()[-1] == "[0, 0] []", run.stdout + run.stderr


# -- list and show ------------------------------------------------------------------


def test_list_layout_and_visibility(daemon, users):
    alice, bob = users["alice"], users["bob"]
    deliver(daemon, "alice@test.local", 3)
    stray = daemon.data_dir / "inbox" / "stray-dir"
    stray.mkdir()
    os.chown(stray, alice.uid, alice.gid)
    root = aimx(daemon, "mailboxes", "list")
    assert root.stdout == (
        "MAILBOX              INBOX    SENT\n"
        "alice                3        0\n"
        "bob                  0        0\n"
        "fallback             0        0\n"
        "stray-dir            0        0 (unregistered)\n")
    assert aimx(daemon, "mailbox", "list", user=alice).stdout == (
        "MAILBOX              INBOX    SENT\n"
        "alice                3        0\n"
        "stray-dir            0        0 (unregistered)\n")
    assert aimx(daemon, "mailboxes", "list", user=bob).stdout == (
        "MAILBOX              INBOX    SENT\n"
        "bob                  0        0\n")
    refused = aimx(daemon, "mailboxes", "list", "--all", user=bob)
    assert refused.returncode == 1 and "root" in refused.stderr
    coloured = aimx(daemon, "mailboxes", "list", env={"CLICOLOR_FORCE": "1"})
    assert "\x1b[33m (unregistered)\x1b[0m" in coloured.stdout
    assert "\x1b" not in root.stdout


def test_show_prints_settings_hooks_and_counts(dns, users):
    alice = users["alice"]
    owner_line = f'owner = "{alice.name}"\n'
    extra = (
        'trust = "verified"\ntrusted_senders = ["boss@example.com"]\n\n'
        '[[mailboxes.alice.hooks]]\nname = "bot"\nevent = "on_receive"\n'
        'cmd = ["/usr/local/bin/claude", "-p", "hi"]\nfire_on_untrusted = true\n\n'
        '[[mailboxes.alice.hooks]]\nevent = "after_send"\n'
        'cmd = ["/usr/local/bin/notify", "--channel", "ops-alerts-for-the-whole-team", '
        '"--verbose"]\n'
    )
    config = config_text(dns, users).replace(owner_line, owner_line + extra, 1)
    with RunningDaemon(config) as d:
        deliver(d, "alice@test.local", 3)
        first = sorted(p.name[:-3] for p in (d.data_dir / "inbox" / "alice").iterdir())[0]
        Client(d.socket_path).call(protocol.MarkRead, mailbox="alice", id=first)
        run = aimx(d, "mailboxes", "show", "alice")
        assert run.returncode == 0, run.stderr
        assert run.stdout == (
            "Mailbox: alice\n"
            "  Address: alice@test.local\n"
            "  Trust:   verified\n"
            "  Trusted senders:\n"
            "    - boss@example.com\n"
            "\n"
            "Hooks\n"
            "  on_receive\n"
            '    - bot  cmd: ["/usr/local/bin/claude","-p","hi"]   [fire_on_untrusted=true]\n'
            "  after_send\n"
            f"    - {_derived_after_send()}  cmd: "
            '["/usr/local/bin/notify","--channel","ops-alerts-for-the-wh…\n'
            "\n"
            "Messages\n"
            "  inbox: 3 (2 unread)\n"
            "  sent:  0\n")
        bob = aimx(d, "mailboxes", "show", "bob")
        assert "  Trusted senders: (none)\n\nHooks\n  (none)\n" in bob.stdout
        missing = aimx(d, "mailboxes", "show", "nope")
        assert (missing.returncode, missing.stderr) == (1, "Error: Mailbox 'nope' does not exist\n")
        denied = aimx(d, "mailboxes", "show", "alice", user=alice)
        assert denied.returncode == 1
        assert denied.stderr == (f"Error: this command needs to read {d.config_path} "
                                 "(root-owned). Re-run with sudo, or use a UDS-backed "
                                 "alternative.\n")
        assert "Permission denied" not in denied.stderr


def test_show_of_another_users_mailbox_looks_like_a_missing_one(daemon, users):
    alice = users["alice"]
    deliver(daemon, "alice@test.local", 1)
    deliver(daemon, "bob@test.local", 2)
    daemon.config_path.chmod(0o644)  # readable: the mailbox dirs are what stays private
    for name in ("bob", "fallback", "nope"):
        run = aimx(daemon, "mailboxes", "show", name, user=alice)
        assert (run.returncode, run.stdout, run.stderr) == (
            1, "", f"Error: Mailbox '{name}' does not exist\n")
    own = aimx(daemon, "mailboxes", "show", "alice", user=alice)
    assert own.returncode == 0, own.stderr
    assert own.stdout.endswith("Messages\n  inbox: 1 (1 unread)\n  sent:  0\n")
    assert aimx(daemon, "mailboxes", "show", "bob").stdout.endswith(
        "  inbox: 2 (2 unread)\n  sent:  0\n")


def _derived_after_send() -> str:
    return derived_hook_name("after_send", ["/usr/local/bin/notify", "--channel",
                                            "ops-alerts-for-the-whole-team", "--verbose"], False)


# -- delete -------------------------------------------------------------------------


def test_delete_asks_first_and_no_means_cancelled(daemon, users):
    alice = users["alice"]
    run = aimx(daemon, "mailboxes", "delete", "alice", user=alice, input="n\n")
    assert (run.returncode, run.stdout) == (0, "Delete mailbox 'alice'? [y/N] Cancelled.\n")
    # No answer at all (a script without -y): a usage error that names -y, nothing deleted.
    run = aimx(daemon, "mailboxes", "delete", "alice", user=alice, input="")
    assert (run.returncode, run.stdout) == (2, "Delete mailbox 'alice'? [y/N] \n")
    assert run.stderr == NO_ANSWER
    assert "alice" in mailboxes(daemon)
    run = aimx(daemon, "mailboxes", "delete", "alice", user=alice, input="y\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("[OK] Mailbox 'alice' deleted.\n")
    assert "alice" not in mailboxes(daemon)
    # Someone else's mailbox looks exactly like a missing one.
    run = aimx(daemon, "mailboxes", "delete", "-y", "bob", user=alice)
    assert (run.returncode, run.stderr) == (1, "Error: [MAILBOX] mailbox 'bob' does not exist\n")


def test_delete_nonempty_needs_force(daemon, users):
    bob = users["bob"]
    deliver(daemon, "bob@test.local", 2)
    run = aimx(daemon, "mailboxes", "delete", "-y", "bob", user=bob)
    assert run.stderr == ("Error: [NONEMPTY] mailbox 'bob' has 2 files (2 in inbox, 0 in sent); "
                          "archive or remove them first\n")
    run = aimx(daemon, "mailboxes", "delete", "--yes", "--force", "bob", user=bob)
    assert run.returncode == 0, run.stderr
    assert os.listdir(daemon.data_dir / "inbox" / "bob") == []
