"""A mailbox owner attacks the root daemon through its own mailbox dir.

The daemon runs as root; ``alice`` and ``bob`` each own one mailbox. Alice owns
her mailbox dir, so she can rename anything in it and put symlinks in its
place while the daemon works there. The attacks, each done by a real process
running as alice (``tests.support.hostile``), timed by inotify and repeated
over many rounds:

* a hook replaces its stored email with a link to a root-only file (or
  ``/dev/zero``); the next hook of the same email must still get the email;
* the staging dir of an inbound bundle is swapped for a link to a root-only
  dir while the daemon fills it; nothing may land in that dir;
* a bundle dir is swapped for a link while MARK-READ rewrites its ``.md``;
  the root-only file of the same name elsewhere must stay as it was;
* an 800 MB (sparse) email file must be refused, not read into memory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.support import hostile as hostile_actions
from tests.support.daemon import REPO_ROOT, RunningDaemon, stored_emails
from tests.support.dnsserver import DnsServer
from tests.support.users import LinuxUser, ensure_user, python_as_command, run_program_as

DOMAIN = "hostile.test"
ROUNDS = 40
EMAIL_FILE_LIMIT = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    """No records but a null MX for ``void.test``: sends there fail at once, with a copy."""
    with DnsServer({"void.test": [["MX", "0 ."]]}) as server:
        yield server


@pytest.fixture
def users(test_users) -> dict[str, LinuxUser]:
    return {short: ensure_user(user.name) for short, user in test_users.items()}


@pytest.fixture
def vault() -> Iterator[Path]:
    """A root-only dir (0700) holding a root-only secret: what the attacks aim at."""
    path = Path(tempfile.mkdtemp(prefix="aimx-vault-"))
    (path / "secret").write_text(f"root secret {secrets.token_hex(16)}\n")
    (path / "secret").chmod(0o600)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A dir every user may write (hook output)."""
    path = Path(tempfile.mkdtemp(prefix="aimx-hostile-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def config(dns: DnsServer, users: dict[str, LinuxUser],
           alice_hooks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "domain": DOMAIN,
        "dns_resolvers": [dns.address],
        "mailboxes": {
            "alice": {"address": f"alice@{DOMAIN}", "owner": users["alice"].name,
                      "hooks": alice_hooks or []},
            "bob": {"address": f"bob@{DOMAIN}", "owner": users["bob"].name},
        },
    }


def hostile(user: LinuxUser, daemon: RunningDaemon, action: str, *, wait: bool = True,
            **args: Any) -> Any:
    """Run one ``tests.support.hostile`` action as ``user``; its JSON result (or the process)."""
    spec = {"action": action, "args": args}
    env = user.env(daemon.client_env({k: v for k, v in os.environ.items()
                                      if not k.startswith("AIMX_")}))
    cmd = python_as_command(user, hostile_actions.RUN, spec, prepare=hostile_actions.PREPARE)
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, env=env, cwd=str(REPO_ROOT), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def message(subject: str, attachments: int = 0) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "ann@example.org"
    msg["To"] = f"alice@{DOMAIN}"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{secrets.token_hex(8)}@example.org>"
    msg.set_content(f"{subject}\n")
    for index in range(attachments):
        msg.add_attachment(f"part {index}\n".encode() * 64, maintype="application",
                           subtype="octet-stream", filename=f"part-{index}.bin")
    return msg


def deliver(daemon: RunningDaemon, msg: EmailMessage) -> int:
    """The SMTP code the daemon gave for ``msg``."""
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=60) as client:
        try:
            client.send_message(msg)
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code
    return 250


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def peak_memory_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# -- finding 1: the hook chain ------------------------------------------------------------


SWAP_HOOK = ('cp "$AIMX_FILEPATH" {out}/orig-$AIMX_EVENT-$AIMX_ID; rm -f "$AIMX_FILEPATH"; '
             'case "$AIMX_SUBJECT" in zero) t=/dev/zero;; *) t={secret};; esac; '
             'ln -s "$t" "$AIMX_FILEPATH"')
READ_HOOK = 'cat > {out}/stdin-$AIMX_EVENT-$AIMX_ID'


def test_a_hook_that_swaps_its_email_for_a_link_feeds_the_next_hook_nothing_else(
        dns, users, vault, shared) -> None:
    secret = vault / "secret"
    hooks = []
    for event in ("on_receive", "after_send"):
        extra = {"fire_on_untrusted": True} if event == "on_receive" else {}
        hooks += [
            {"name": f"swap-{event}", "event": event,
             "cmd": ["/bin/sh", "-c", SWAP_HOOK.format(out=shared, secret=secret)], **extra},
            {"name": f"read-{event}", "event": event,
             "cmd": ["/bin/sh", "-c", READ_HOOK.format(out=shared)], **extra},
        ]
    alice = users["alice"]
    with RunningDaemon(config(dns, users, hooks)) as daemon:
        for subject in ("shadow", "zero"):
            assert deliver(daemon, message(subject)) == 250
            sent = hostile(alice, daemon, "cli", argv=[
                "send", "--from", f"alice@{DOMAIN}", "--to", "bob@void.test",
                "--subject", subject, "--body", f"sent {subject}"])
            assert sent == {"exit": 1}  # null MX: failed, with a sent copy
        daemon.wait_for_log(r"hook_name=read-on_receive .* exit_code=0", timeout=30, count=2)
        daemon.wait_for_log(r"hook_name=read-after_send .* exit_code=0", timeout=30, count=2)
        swapped = [path for folder in ("inbox", "sent")
                   for path in (daemon.data_dir / folder / "alice").iterdir()]
        assert len(swapped) == 4 and all(path.is_symlink() for path in swapped)
        assert daemon.running()
    fed = sorted(p.name for p in shared.iterdir() if p.name.startswith("stdin-"))
    assert len(fed) == 4
    for name in fed:
        original = (shared / name.replace("stdin-", "orig-", 1)).read_bytes()
        assert original.startswith(b"+++\n")
        assert (shared / name).read_bytes() == original
        assert secret.read_bytes() not in (shared / name).read_bytes()


# -- finding 2: the staging dir of an inbound bundle ------------------------------------------


def test_a_staging_dir_swapped_for_a_link_gets_no_file_outside_the_mailbox(
        dns, users, vault) -> None:
    alice = users["alice"]
    with RunningDaemon(config(dns, users)) as daemon:
        assert deliver(daemon, message("first")) == 250  # the inbox dir now exists
        inbox = daemon.data_dir / "inbox" / "alice"
        attacker = hostile(alice, daemon, "swap_staging", wait=False,
                           mailbox_dir=str(inbox), target=str(vault))
        try:
            assert json.loads(attacker.stdout.readline()) == {"ready": True}, attacker.stderr
            codes = [deliver(daemon, message(f"round {index}", attachments=8))
                     for index in range(ROUNDS)]
        finally:
            out, err = attacker.communicate(timeout=60)
        result = json.loads(out.splitlines()[-1])
        assert result["swaps"] >= ROUNDS // 4, (result, err)  # the race was really run
        assert listing(vault) == ["secret"]
        assert not (daemon.data_dir / "inbox" / "bob").exists()
        # A tampered delivery is refused for a retry (the mail is not lost) or, when the
        # swap came too late to matter, stored whole.
        assert all(code == 250 or 400 <= code < 500 for code in codes), codes
        for path in stored_emails(daemon.data_dir, "alice"):
            if path.parent.name != "alice":
                assert len(list(path.parent.iterdir())) == 9  # the .md and 8 attachments
        assert daemon.running()


# -- finding 3: MARK-READ ------------------------------------------------------------------


def test_mark_read_with_the_bundle_swapped_mid_rewrite_leaves_other_dirs_alone(
        dns, users, vault) -> None:
    alice = users["alice"]
    with RunningDaemon(config(dns, users)) as daemon:
        assert deliver(daemon, message("bundled", attachments=1)) == 250
        [md] = stored_emails(daemon.data_dir, "alice")
        email_id = md.parent.name
        decoy = vault / f"{email_id}.md"
        decoy.write_bytes(b"root's own file\n")
        decoy.chmod(0o600)
        result = hostile(alice, daemon, "swap_bundle_on_read", socket=str(daemon.socket_path),
                         mailbox="alice", mailbox_dir=str(md.parent.parent),
                         email_id=email_id, target=str(vault), rounds=ROUNDS,
                         pad=8 * 1024 * 1024)
        assert result["swaps"] >= ROUNDS // 4, result  # the race was really run
        # Every flip landed in alice's own file, swapped away or not, and nowhere else.
        assert result["results"] == [
            "ok read" if index % 2 == 0 else "ok unread" for index in range(ROUNDS)], result
        assert listing(vault) == sorted(["secret", decoy.name])
        assert decoy.read_bytes() == b"root's own file\n"
        assert decoy.stat().st_uid == 0
        assert daemon.running()


def test_an_800_mb_email_is_refused_without_being_read(dns, users) -> None:
    alice = users["alice"]
    with RunningDaemon(config(dns, users)) as daemon:
        assert deliver(daemon, message("small")) == 250
        email_id = "2026-01-01-000000-huge"
        path = daemon.data_dir / "inbox" / "alice" / f"{email_id}.md"
        head = f'+++\nid = "{email_id}"\nsubject = "huge"\nread = false\n+++\n\n'
        assert hostile(alice, daemon, "sparse_email", path=str(path), size=800 * 1024 * 1024,
                       head=head) == {"size": 800 * 1024 * 1024}
        before = peak_memory_kib(daemon.pid)
        for verb in ("MARK-READ", "MARK-UNREAD"):
            answer = hostile(alice, daemon, "call", socket=str(daemon.socket_path), verb=verb,
                             args={"mailbox": "alice", "id": email_id})
            code, reason = answer["error"]
            assert code == "IO" and f"over {EMAIL_FILE_LIMIT}" in reason, answer
        # The listing still counts it (unread) from its first bytes.
        listed = hostile(alice, daemon, "call", socket=str(daemon.socket_path),
                         verb="MAILBOX-LIST", args={})
        [row] = [row for row in listed["ok"]["rows"] if row["name"] == "alice"]
        assert (row["total"], row["unread"]) == (2, 2)
        time.sleep(0.2)
        assert peak_memory_kib(daemon.pid) - before < 32 * 1024
        assert daemon.running()


# -- the same rule in the blocking storage calls root makes at start-up and for listings -------


def test_start_up_cleanup_and_counts_never_follow_an_owners_link(users, vault, shared) -> None:
    """Crash cleanup removes temp names in bundle dirs, and counts read every email:
    through a bundle an owner swapped for a link, neither may touch the root-only dir."""
    from aimx.storage.atomic import cleanup_temp_files
    from aimx.storage.emailfiles import list_email_ids, resolve_email_path
    from aimx.storage.index import count_emails, scan_counts
    from aimx.storage.layout import ensure_data_dir, ensure_mailbox_dir

    alice = users["alice"]
    shared.chmod(0o755)
    data = ensure_data_dir(shared / "data")
    inbox = ensure_mailbox_dir(data, "inbox", "alice", (alice.uid, alice.gid))
    bait = vault / ".bait.md.tmp.0123456789ab"
    bait.write_text("root's temp file\n")
    (vault / "2026-01-01-000000-x.md").write_text('+++\nread = true\n+++\n')
    (vault / "2026-01-01-000000-x.md").chmod(0o600)
    hostile_steps = (
        f"ln -s {vault} {inbox}/2026-01-01-000000-x && "
        f"printf '+++\\nread = true\\n+++\\n' > {inbox}/2026-01-01-000001-y.md && "
        f"ln {inbox}/2026-01-01-000001-y.md {inbox}/2026-01-01-000002-z.md")
    run_program_as(alice, ["/bin/sh", "-c", hostile_steps], check=True)

    assert cleanup_temp_files(data) == 0
    assert bait.exists()
    # The link is no email; the two names of one hard-linked file are listed but not
    # believed (a hard link could name a file the owner may not hand over).
    assert list_email_ids(inbox) == ["2026-01-01-000002-z", "2026-01-01-000001-y"]
    assert scan_counts(inbox) == (2, 2)
    assert count_emails(inbox) == (2, 2)
    assert resolve_email_path(inbox, "2026-01-01-000000-x") is None
