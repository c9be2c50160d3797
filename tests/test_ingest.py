"""The ingest pipeline through the real ``aimx ingest`` command (subprocesses, real files)."""

from __future__ import annotations

import datetime
import hashlib
import os
import resource
import signal
import stat
import subprocess
import sys
import time
import tomllib
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest

from aimx.config import parse_config_text
from aimx.mail import authresults
from aimx.mail.naming import stem_prefix
from aimx.smtp import ingest
from aimx.storage.atomic import PAUSE_ENV, cleanup_temp_files
from aimx.storage.emailfiles import list_email_ids
from aimx.storage.index import count_emails
from aimx.storage.mailstore import MailStore
from tests.support.dnsserver import DnsServer
from tests.support.users import ensure_user

AIMX = Path(sys.executable).parent / "aimx"
PLAIN_KEYS = ["id", "message_id", "thread_id", "from", "to", "delivered_to", "subject", "date",
              "received_at", "size_bytes", "dkim", "spf", "dmarc", "trusted", "mailbox", "read",
              "trust_reason"]  # after every key the spec orders


@pytest.fixture(scope="module")
def dns():
    """An empty zone: every lookup answers NXDOMAIN at once, nothing leaves the host."""
    with DnsServer({}) as server:
        yield server


@pytest.fixture
def instance(instance_dirs: dict[str, Path], dns: DnsServer):
    return Instance(instance_dirs, dns.address)


class Instance:
    def __init__(self, dirs: dict[str, Path], resolver: str) -> None:
        self.dirs = dirs
        self.data = dirs["data"]
        self.resolver = resolver
        self.configure()

    def configure(self, owner: str = "nobody", catchall: bool = True) -> None:
        text = (f'domain = "test.com"\ndata_dir = "{self.data}"\n'
                f'dns_resolvers = ["{self.resolver}"]\n\n'
                f'[mailboxes.alice]\naddress = "alice@test.com"\nowner = "{owner}"\n')
        if catchall:
            text += '\n[mailboxes.catchall]\naddress = "*@test.com"\nowner = "aimx-catchall"\n'
        (self.dirs["config"] / "config.toml").write_text(text)

    def ingest(self, rcpt: str, raw: bytes, *args: str, env: dict[str, str] | None = None,
               **popen: object) -> subprocess.CompletedProcess[bytes]:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([str(AIMX), *args, "ingest", rcpt], input=raw,
                              capture_output=True, env=full_env, timeout=120, **popen)

    def box(self, mailbox: str = "alice") -> Path:
        return self.data / "inbox" / mailbox

    def entries(self, mailbox: str = "alice") -> list[str]:
        box = self.box(mailbox)
        return sorted(os.listdir(box)) if box.exists() else []


def message(subject: str = "Hello", message_id: str | None = "<plain-001@example.com>",
            attachments: tuple[tuple[str, str, bytes], ...] = (), body: str = "Hello Alice.\n",
            sender: str = "Sender Name <sender@example.com>", **headers: str) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = "alice@test.com"
    msg["Subject"] = subject
    msg["Date"] = "Wed, 01 Jan 2025 12:00:00 +0000"
    if message_id:
        msg["Message-ID"] = message_id
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    for filename, content_type, data in attachments:
        maintype, subtype = content_type.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def read_email(path: Path) -> tuple[dict, str]:
    text = path.read_text()
    lines = text.split("\n")
    assert lines[0] == "+++"
    end = lines.index("+++", 1)
    return tomllib.loads("\n".join(lines[1:end])), "\n".join(lines[end + 1:])


def md_path(box: Path, email_id: str) -> Path:
    flat = box / f"{email_id}.md"
    return flat if flat.exists() else box / email_id / f"{email_id}.md"


def only_email(instance: Instance, mailbox: str = "alice") -> tuple[str, dict, str]:
    ids = list_email_ids(instance.box(mailbox))
    assert len(ids) == 1, ids
    fm, body = read_email(md_path(instance.box(mailbox), ids[0]))
    return ids[0], fm, body


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# ---------------------------------------------------------------------------


def test_flat_message_file(instance: Instance) -> None:
    raw = message()
    before = datetime.datetime.now(datetime.UTC)
    done = instance.ingest("alice@test.com", raw)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    email_id, fm, body = only_email(instance)
    assert list(fm) == PLAIN_KEYS
    assert email_id.endswith("-hello") and fm["id"] == email_id
    assert instance.entries() == [f"{email_id}.md"]
    assert fm["message_id"] == "plain-001@example.com"
    assert fm["from"] == "Sender Name <sender@example.com>"
    assert fm["to"] == fm["delivered_to"] == "alice@test.com"
    assert fm["date"] == "2025-01-01T12:00:00Z"
    assert fm["size_bytes"] == len(raw)
    assert (fm["dkim"], fm["spf"], fm["dmarc"], fm["trusted"]) == ("none",) * 4
    assert fm["trust_reason"] == "policy_none"
    assert fm["mailbox"] == "alice" and fm["read"] is False
    received = datetime.datetime.fromisoformat(fm["received_at"].replace("Z", "+00:00"))
    assert before - datetime.timedelta(seconds=1) <= received <= datetime.datetime.now(
        datetime.UTC)
    assert email_id.startswith(received.strftime("%Y-%m-%d-%H%M%S"))
    assert "received_from_ip" not in fm
    assert body == "\nHello Alice.\n"
    assert mode(instance.box()) == 0o700
    assert mode(instance.box() / f"{email_id}.md") == 0o600
    assert mode(instance.data / "inbox") == 0o755


def test_bundle_message_files(instance: Instance) -> None:
    pdf = b"%PDF-1.4 not really\x00\xff"
    raw = message(attachments=(("notes.txt", "text/plain", b"remember the milk\n"),
                               ("notes.txt", "text/plain", b"second notes\n"),
                               ("../../report.pdf", "application/pdf", pdf)))
    assert instance.ingest("alice@test.com", raw).returncode == 0
    email_id, fm, body = only_email(instance)
    bundle = instance.box() / email_id
    assert instance.entries() == [email_id]
    assert sorted(os.listdir(bundle)) == sorted(
        [f"{email_id}.md", "notes.txt", "notes-1.txt", "report.pdf"])
    assert list(fm) == PLAIN_KEYS + ["attachments"]
    assert fm["attachments"] == [
        {"filename": "notes.txt", "content_type": "text/plain", "size": 18, "path": "notes.txt"},
        {"filename": "notes-1.txt", "content_type": "text/plain", "size": 13,
         "path": "notes-1.txt"},
        {"filename": "report.pdf", "content_type": "application/pdf", "size": len(pdf),
         "path": "report.pdf"},
    ]
    assert (bundle / "report.pdf").read_bytes() == pdf
    assert (bundle / "notes.txt").read_bytes() == b"remember the milk\n"
    assert body == "\nHello Alice.\n"
    assert mode(bundle) == 0o700
    assert all(mode(bundle / name) == 0o600 for name in os.listdir(bundle))
    assert not (instance.data / "report.pdf").exists()


def test_routing_by_local_part(instance: Instance) -> None:
    assert instance.ingest("bob@test.com", message(message_id="<1@x>")).returncode == 0
    _, fm, _ = only_email(instance, "catchall")
    assert fm["mailbox"] == "catchall" and fm["delivered_to"] == "bob@test.com"
    # The CLI does no domain check: the local part alone routes (spec 20 §4.1).
    assert instance.ingest("alice@other.org", message(message_id="<2@x>")).returncode == 0
    _, fm, _ = only_email(instance, "alice")
    assert fm["delivered_to"] == "alice@other.org"
    # Local parts match case-insensitively; delivered_to keeps the case (D4).
    assert instance.ingest("Alice@TEST.com", message(message_id="<3@x>")).returncode == 0
    assert len(list_email_ids(instance.box())) == 2
    assert any(read_email(md_path(instance.box(), i))[0]["delivered_to"] == "Alice@TEST.com"
               for i in list_email_ids(instance.box()))


def test_no_route_without_catchall(instance: Instance) -> None:
    instance.configure(catchall=False)
    done = instance.ingest("bob@test.com", message())
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == ["Error: no mailbox routes recipient bob@test.com"]
    assert not (instance.data / "inbox" / "bob").exists()
    assert instance.entries() == []


def test_empty_stdin_fails_to_parse(instance: Instance) -> None:
    done = instance.ingest("alice@test.com", b"")
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == ["Error: Failed to parse email"]
    assert instance.entries() == []


def test_duplicates_are_skipped_across_processes(instance: Instance) -> None:
    raw = message()
    first = instance.ingest("alice@test.com", raw)
    second = instance.ingest("alice@test.com", raw)  # a fresh process, same 24 h window
    assert (first.returncode, second.returncode) == (0, 0)
    assert len(list_email_ids(instance.box())) == 1
    # Same message to another mailbox is not a duplicate there.
    assert instance.ingest("zed@test.com", raw).returncode == 0
    assert len(list_email_ids(instance.box("catchall"))) == 1


def test_duplicate_older_than_a_day_is_stored_again(instance: Instance) -> None:
    raw = message()
    assert instance.ingest("alice@test.com", raw).returncode == 0
    email_id, fm, _ = only_email(instance)
    path = instance.box() / f"{email_id}.md"
    five_days = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=5)).isoformat()
    path.write_text(path.read_text().replace(fm["received_at"], five_days))
    # Every record of the store ages: the file and its line in the stored log beside the lock.
    stored_log = instance.data / ".locks" / "alice.stored"
    (entry,) = stored_log.read_text().splitlines()
    key, _ = entry.split()
    five_days_secs = int(datetime.datetime.fromisoformat(five_days).timestamp())
    stored_log.write_text(f"{key} {five_days_secs}\n")
    assert instance.ingest("alice@test.com", raw).returncode == 0
    assert len(list_email_ids(instance.box())) == 2


def test_messages_without_message_id_are_never_deduplicated(instance: Instance) -> None:
    raw = message(message_id=None)
    assert instance.ingest("alice@test.com", raw).returncode == 0
    assert instance.ingest("alice@test.com", raw).returncode == 0
    ids = list_email_ids(instance.box())
    assert len(ids) == 2
    assert read_email(md_path(instance.box(), ids[0]))[0]["message_id"] == ""


def test_delimiters_in_headers_cannot_break_the_file(instance: Instance) -> None:
    raw = message(subject="+++ C+++ tips +++", sender='"+++" <plus@example.com>')
    assert instance.ingest("alice@test.com", raw).returncode == 0
    email_id, fm, _ = only_email(instance)
    assert email_id.endswith("-c-tips")
    assert fm["subject"] == "+++ C+++ tips +++"
    text = (instance.box() / f"{email_id}.md").read_text()
    assert text.split("\n").count("+++") == 2


def test_attachment_named_like_the_email(instance: Instance) -> None:
    # The stem depends on the second the message arrives, so offer the next few.
    start = datetime.datetime.now(datetime.UTC)
    names = [f"{stem_prefix(start + datetime.timedelta(seconds=n))}-hello.md"
             for n in range(6)]
    raw = message(attachments=tuple((name, "text/markdown", b"# decoy\n") for name in names))
    assert instance.ingest("alice@test.com", raw).returncode == 0
    email_id, fm, _ = only_email(instance)
    assert fm["id"] == email_id and f"{email_id}.md" in names
    listed = [a["filename"] for a in fm["attachments"]]
    assert f"{email_id}.md" not in listed and f"{email_id}-1.md" in listed
    assert (instance.box() / email_id / f"{email_id}-1.md").read_bytes() == b"# decoy\n"


def test_concurrent_ingests_make_complete_bundles(instance: Instance) -> None:
    procs = []
    for n in range(8):
        raw = message(message_id=f"<c{n}@example.com>", body=f"number {n}\n",
                      attachments=(("data.bin", "application/octet-stream", bytes([n]) * 5000),))
        proc = subprocess.Popen([str(AIMX), "ingest", "alice@test.com"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append((proc, raw))
    for proc, raw in procs:
        proc.communicate(raw, timeout=120)
        assert proc.returncode == 0
    ids = list_email_ids(instance.box())
    assert len(ids) == 8 and len(set(ids)) == 8
    assert instance.entries() == sorted(ids)  # bundles only, no temp leftovers
    seen = set()
    for email_id in ids:
        fm, body = read_email(instance.box() / email_id / f"{email_id}.md")
        n = int(body.split()[-1])
        seen.add(n)
        assert fm["message_id"] == f"c{n}@example.com"
        assert (instance.box() / email_id / "data.bin").read_bytes() == bytes([n]) * 5000
    assert seen == set(range(8))


def test_large_message_memory(instance: Instance, tmp_path: Path) -> None:
    blob = os.urandom(18 * 1024 * 1024)  # ~25 MB once base64-encoded
    raw = message(attachments=(("big.bin", "application/octet-stream", blob),))
    assert len(raw) > 24 * 1024 * 1024
    source = tmp_path / "big.eml"
    source.write_bytes(raw)
    # Measure in a wrapper process so only the ingest child counts toward the peak.
    wrapper = ("import resource, subprocess, sys\n"
               "with open(sys.argv[1], 'rb') as fh:\n"
               "    code = subprocess.run(sys.argv[2:], stdin=fh).returncode\n"
               "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", wrapper, str(source), str(AIMX), "ingest",
                           "alice@test.com"], capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    code, peak_kib = map(int, done.stdout.split())
    print(f"\n25 MB ingest: peak RSS {peak_kib / 1024:.0f} MiB for {len(raw) / 2**20:.1f} MiB "
          f"in {elapsed:.1f} s")
    assert code == 0, done.stderr
    # Past 256 KiB the message streams to a spool file: the interpreter and the
    # decoded attachment's buffers stay well under three times the message
    # (reading it whole into memory first took more than five).
    assert peak_kib * 1024 < 3 * len(raw)
    email_id, fm, _ = only_email(instance)
    assert fm["size_bytes"] == len(raw)
    stored = (instance.box() / email_id / "big.bin").read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(blob).digest()


@pytest.mark.parametrize("line_end", [b"\r\n", b"\n"])
def test_large_message_from_a_pipe_is_stored_whole(instance: Instance, line_end: bytes) -> None:
    # Above the in-memory threshold; a file saved with bare LF line ends must come
    # out the same as one with CRLF.
    blob = os.urandom(600 * 1024)
    raw = message(attachments=(("data.bin", "application/octet-stream", blob),),
                  body="A large one.\n").replace(b"\r\n", line_end)
    assert instance.ingest("alice@test.com", raw).returncode == 0
    email_id, fm, body = only_email(instance)
    assert fm["size_bytes"] == len(raw)
    assert body == "\nA large one.\n"
    assert (instance.box() / email_id / "data.bin").read_bytes() == blob
    assert not os.listdir(instance.data / ".spool")  # scratch files gone with the process


@pytest.mark.parametrize("with_attachment", [False, True])
def test_kill_before_rename_leaves_nothing_visible(instance: Instance,
                                                   with_attachment: bool) -> None:
    atts = (("a.txt", "text/plain", b"a\n"),) if with_attachment else ()
    proc = subprocess.Popen([str(AIMX), "ingest", "alice@test.com"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, PAUSE_ENV: "60"})
    proc.stdin.write(message(attachments=atts))
    proc.stdin.close()
    deadline = time.monotonic() + 30
    temps: list[str] = []
    while time.monotonic() < deadline and not temps:
        temps = [n for n in instance.entries() if n.startswith(".")]
        time.sleep(0.05)
    assert temps, "the ingest never reached its pause"
    time.sleep(0.2)  # the writer is asleep between fsync and rename now
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert [n for n in instance.entries() if not n.startswith(".")] == []
    assert list_email_ids(instance.box()) == []
    assert count_emails(instance.box()) == (0, 0)
    assert cleanup_temp_files(instance.data) == len(temps)
    assert instance.entries() == []
    # After the clean-up the same message stores normally (it was never recorded).
    assert instance.ingest("alice@test.com", message(attachments=atts)).returncode == 0
    assert len(list_email_ids(instance.box())) == 1


def test_disk_failure_is_an_error_and_leaves_nothing(instance: Instance) -> None:
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    raw = message(attachments=(("big.bin", "application/octet-stream", b"x" * 300_000),))
    done = instance.ingest("alice@test.com", raw, preexec_fn=limit_file_size)
    assert done.returncode == 1
    lines = done.stderr.decode().splitlines()
    assert lines == ["Error: failed to store message in inbox/alice: File too large"]
    assert instance.entries() == []


def test_forced_failure_seam(instance: Instance) -> None:
    done = instance.ingest("alice@test.com", message(),
                           env={"AIMX_TEST_INGEST_FAIL_FOR": "alice@test.com"})
    assert done.returncode == 1
    assert done.stderr.decode().startswith("Error: ")
    assert instance.entries() == []
    assert instance.ingest("alice@test.com", message(),
                           env={"AIMX_TEST_INGEST_FAIL_FOR": "bob@test.com"}).returncode == 0


def test_unknown_owner_still_stores(instance: Instance) -> None:
    instance.configure(owner="aimxt-ghost")
    done = instance.ingest("alice@test.com", message())
    assert done.returncode == 0, done.stderr
    only_email(instance)


def test_files_are_owned_by_the_mailbox_owner(instance: Instance, test_users) -> None:
    alice = ensure_user(test_users["alice"].name)  # another test session may have removed it
    instance.configure(owner=alice.name)
    raw = message(attachments=(("a.txt", "text/plain", b"a\n"),))
    assert instance.ingest("alice@test.com", raw).returncode == 0
    email_id, _, _ = only_email(instance)
    bundle = instance.box() / email_id
    for path in (instance.box(), bundle, bundle / f"{email_id}.md", bundle / "a.txt"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (alice.uid, alice.gid), path
    assert os.lstat(instance.data / "inbox").st_uid == 0


def test_data_dir_flag_beats_the_environment(instance: Instance, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert instance.ingest("alice@test.com", message(), "--data-dir",
                           str(elsewhere)).returncode == 0
    assert len(list_email_ids(elsewhere / "inbox" / "alice")) == 1
    assert instance.entries() == []


def test_ingest_is_hidden_from_help() -> None:
    done = subprocess.run([str(AIMX), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "ingest" not in done.stdout and "SUPPRESS" not in done.stdout


# ---------------------------------------------------------------------------
# The two steps in-process, as the daemon calls them (SMTP peer, pluggable auth)

PIPELINE_CONFIG = """
domain = "test.com"
trust = "verified"
trusted_senders = ["*@example.com"]

[mailboxes.alice]
address = "alice@test.com"
owner = "nobody"
"""


def signed_by(domain: str):
    """An authentication step that reports a passing DKIM signature by ``domain``."""
    calls = []

    def authenticate(config, raw, parsed, *, peer_ip, mail_from, helo):  # noqa: ANN001, ANN202
        calls.append((peer_ip, mail_from, helo))
        return authresults.AuthResults(dkim="pass", spf="pass", dmarc="pass",
                                     dkim_domains=(domain,))

    authenticate.calls = calls
    return authenticate


def test_pipeline_smtp_peer_auth_and_trust(tmp_path: Path) -> None:
    config = parse_config_text(PIPELINE_CONFIG, tmp_path / "config.toml",
                               data_dir_override=tmp_path / "data")
    store = MailStore(config.data_dir)
    auth = signed_by("mail.example.com")
    analysis = ingest.analyse(config, message(), peer_ip="203.0.113.50",
                              mail_from="sender@example.com", helo="mx.example.com",
                              authenticate=auth)
    assert auth.calls == [("203.0.113.50", "sender@example.com", "mx.example.com")]
    result = ingest.deliver(config, store, analysis, "alice@test.com")
    assert result.status == "stored"
    fm, _ = read_email(result.path)
    assert fm == result.fields
    assert fm["received_from_ip"] == "203.0.113.50"
    assert list(fm).index("received_from_ip") == list(fm).index("received_at") + 1
    assert (fm["dkim"], fm["spf"], fm["dmarc"], fm["trusted"]) == ("pass", "pass", "pass",
                                                                   "true")
    again = ingest.deliver(config, store, analysis, "ALICE@test.com")
    assert (again.status, again.email_id, again.path) == ("duplicate", None, None)
    assert len(list_email_ids(tmp_path / "data" / "inbox" / "alice")) == 1


def test_pipeline_unaligned_signature_is_not_trusted(tmp_path: Path) -> None:
    config = parse_config_text(PIPELINE_CONFIG, tmp_path / "config.toml",
                               data_dir_override=tmp_path / "data")
    analysis = ingest.analyse(config, message(), peer_ip="0.0.0.0",
                              authenticate=signed_by("attacker.test"))
    result = ingest.deliver(config, MailStore(config.data_dir), analysis,
                            "alice@test.com")
    assert result.fields["trusted"] == "false"
    assert "received_from_ip" not in result.fields  # unspecified address = no real peer


def test_pipeline_errors(tmp_path: Path) -> None:
    config = parse_config_text(PIPELINE_CONFIG, tmp_path / "config.toml",
                               data_dir_override=tmp_path / "data")
    with pytest.raises(ingest.IngestError, match="^Failed to parse email$"):
        ingest.analyse(config, b"  \r\n", authenticate=signed_by("example.com"))
    analysis = ingest.analyse(config, message(), authenticate=signed_by("example.com"))
    with pytest.raises(ingest.NoRoute, match="^no mailbox routes recipient bob@test.com$"):
        ingest.deliver(config, MailStore(config.data_dir), analysis, "bob@test.com")


def test_cli_ingest_waits_for_on_receive_hooks_and_fires_once(instance: Instance, tmp_path: Path,
                                                              test_users) -> None:
    """`aimx ingest` returns only after the mailbox's hook ran as the owner, once per id."""
    alice = test_users["alice"]
    out_dir = tmp_path / "hook-out"
    out_dir.mkdir()
    os.chown(out_dir, alice.uid, alice.gid)
    record = out_dir / "fired.log"
    config = instance.dirs["config"] / "config.toml"
    instance.configure(owner=alice.name)
    config.write_text(config.read_text().replace(
        '[mailboxes.catchall]',
        '[[mailboxes.alice.hooks]]\nname = "record"\nevent = "on_receive"\n'
        'fire_on_untrusted = true\n'
        f'cmd = ["/bin/sh", "-c", "{{ id -u; cat; }} >> {record}"]\n\n'
        '[mailboxes.catchall]'))
    raw = message(subject="Hook me", message_id="<hooked-1@example.com>")

    first = instance.ingest("alice@test.com", raw)
    assert first.returncode == 0, first.stderr
    fired = record.read_text()
    assert fired.startswith(f"{alice.uid}\n")
    stored = next((instance.box() / name) for name in instance.entries() if name.endswith(".md"))
    assert fired[len(f"{alice.uid}\n"):] == stored.read_text()

    again = instance.ingest("alice@test.com", raw)
    assert again.returncode == 0, again.stderr
    assert record.read_text() == fired  # duplicate: nothing stored, nothing fired
