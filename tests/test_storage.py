"""Storage: naming, sanitiser, modes, atomic publish, locks, dedup, listing, MARK, README."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import errno
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import attrs
import pytest

from aimx.mail.naming import (
    check_email_id,
    sanitize_attachment_name,
    slugify,
    stem_prefix,
    unique_attachment_names,
)
from aimx.storage.atomic import PAUSE_ENV, cleanup_temp_files
from aimx.storage.dedup import (
    DEDUP_CAP,
    DedupIndex,
    SharedDedup,
    claim_offset,
    close_claims,
    message_id_key,
    try_claim,
    try_claim_all,
)
from aimx.storage.emailfiles import list_email_ids, resolve_email_path
from aimx.storage.index import IndexedEmail, count_emails, iter_listing, list_page, summarize
from aimx.storage.layout import README_MARKER, StorageError, readme_text, write_readme
from aimx.storage.mailstore import MailStore
from tests.support.users import ensure_user, needs_root, python_as_command, run_program_as

UTC = datetime.UTC
WHEN = datetime.datetime(2025, 3, 14, 15, 9, 26, tzinfo=UTC)
OWNER = "nobody"  # exists on every Linux box; chown to it is real when we are root
ROOT_DIR = Path(__file__).resolve().parents[1]


@attrs.frozen
class Att:
    filename: str
    content_type: str
    data: bytes


def fields(subject: str = "Hello", message_id: str = "m1@example.com",
           received_at: datetime.datetime = WHEN, **extra: object) -> dict:
    base = {
        "message_id": message_id,
        "thread_id": "5e8ba5eb6cc1fd88",
        "from": "Sender <sender@example.com>",
        "to": "alice@test.com",
        "delivered_to": "alice@test.com",
        "subject": subject,
        "date": "2025-03-14T15:09:20Z",
        "received_at": received_at.isoformat(),
        "size_bytes": 123,
        "dkim": "none",
        "spf": "none",
        "dmarc": "none",
        "trusted": "none",
        "mailbox": "alice",
        "read": False,
    }
    base.update(extra)
    return base


def frontmatter_of(path: Path) -> dict:
    text = path.read_text()
    lines = text.split("\n")
    assert lines[0] == "+++"
    end = lines.index("+++", 1)
    return tomllib.loads("\n".join(lines[1:end]))


def body_of(path: Path) -> str:
    text = path.read_text()
    lines = text.split("\n")
    end = lines.index("+++", 1)
    return "\n".join(lines[end + 1:])


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def store(data: Path) -> MailStore:
    return MailStore(data)


# ---------------------------------------------------------------------------
# Naming


@pytest.mark.parametrize(("subject", "slug"), [
    ("Hello World", "hello-world"),
    ("Invoice #123 for 2025", "invoice-123-for-2025"),
    ("This is a very long subject that should be truncated", "this-is-a-very-long"),
    ("abcdefghijklmnopqrs tuv", "abcdefghijklmnopqrs"),
    ("!!!???@@@", "no-subject"),
    ("", "no-subject"),
    ("   ", "no-subject"),
    (None, "no-subject"),
    ("He\u0301llo", "h\u00e9llo"),
    ("Héllo Wörld!", "héllo-wörld"),
    ("C+++ tips", "c-tips"),
    ("日本語のメール", "日本語のメール"),
])
def test_slugify(subject: str | None, slug: str) -> None:
    assert slugify(subject) == slug


def test_stem_prefix_is_utc() -> None:
    assert stem_prefix(WHEN) == "2025-03-14-150926"
    plus_two = WHEN.astimezone(datetime.timezone(datetime.timedelta(hours=2)))
    assert stem_prefix(plus_two) == "2025-03-14-150926"


@pytest.mark.parametrize(("name", "index", "expected"), [
    ("../../../etc/cron.d/evil", 0, "evil"),
    ("bad\0name.txt", 0, "bad_name.txt"),
    ("report\r\nline2.pdf", 0, "report_line2.pdf"),
    ("a\\b\\c.pdf", 0, "a_b_c.pdf"),
    ("a////b\\\\c.pdf", 0, "b_c.pdf"),
    ("-rf", 0, "rf"),
    ("safe\u202efdp.pdf", 0, "safe_fdp.pdf"),
    ("inv\u200doice.pdf", 0, "inv_oice.pdf"),
    ("cafe\u0301.pdf", 0, "caf\u00e9.pdf"),
    ("\0\0\r\n\x01\x02", 3, "attachment-3"),
    ("", 0, "attachment-0"),
    (None, 2, "attachment-2"),
    ("..", 1, "attachment-1"),
    ("  my report (final).pdf  ", 0, "my report (final).pdf"),
    ("x\x7f\x85\ufeffy", 0, "x_y"),
])
def test_sanitize_attachment_name(name: str | None, index: int, expected: str) -> None:
    assert sanitize_attachment_name(name, index) == expected


def test_sanitize_caps_at_200_bytes_on_a_character_boundary() -> None:
    assert sanitize_attachment_name("a" * 500, 0) == "a" * 200
    cut = sanitize_attachment_name("é" * 150, 0)  # 2 bytes each
    assert len(cut.encode()) == 200 and cut == "é" * 100
    cut = sanitize_attachment_name("a" + "é" * 150, 0)
    assert len(cut.encode()) == 199 and cut == "a" + "é" * 99
    assert sanitize_attachment_name("a" * 199 + "-" * 10 + "b", 0) == "a" * 199


def test_unique_attachment_names() -> None:
    assert unique_attachment_names(["notes.txt", "notes.txt", "notes.txt"]) == [
        "notes.txt", "notes-1.txt", "notes-2.txt"]
    assert unique_attachment_names(["archive.tar.gz", "archive.tar.gz"]) == [
        "archive.tar.gz", "archive.tar-1.gz"]
    assert unique_attachment_names(["name", "name"]) == ["name", "name-1"]
    assert unique_attachment_names(["a.txt", "a-1.txt", "a.txt"]) == [
        "a.txt", "a-1.txt", "a-2.txt"]
    assert unique_attachment_names(["s.md", "x"], reserved=["s.md"]) == ["s-1.md", "x"]


@pytest.mark.parametrize(("email_id", "ok"), [
    ("2025-01-01-000000-x", True), ("", False), ("../x", False), ("a/b", False),
    ("a\\b", False), ("a\0b", False), ("a..b", False),
])
def test_check_email_id(email_id: str, ok: bool) -> None:
    assert check_email_id(email_id) is ok


# ---------------------------------------------------------------------------
# Publishing, names and modes


def test_flat_publish_layout_modes_and_content(store: MailStore, data: Path) -> None:
    old = os.umask(0o077)  # as the daemon runs
    try:
        stored = store.publish_inbound("alice", OWNER, fields(), "Hi there\n", [], WHEN)
    finally:
        os.umask(old)
    assert stored.id == "2025-03-14-150926-hello"
    assert stored.path == data / "inbox" / "alice" / "2025-03-14-150926-hello.md"
    fm = frontmatter_of(stored.path)
    assert fm["id"] == stored.id
    assert list(fm) == ["id", *fields().keys()]
    assert body_of(stored.path) == "\nHi there\n"
    assert mode(data / "inbox") == 0o755
    assert mode(data / "inbox" / "alice") == 0o700
    assert mode(stored.path) == 0o600
    assert sorted(os.listdir(data / "inbox" / "alice")) == [stored.path.name]
    if os.geteuid() == 0:
        nobody = os.lstat(stored.path)
        assert (nobody.st_uid, nobody.st_gid) == (65534, 65534)


def test_missing_data_dir_is_created_readable(tmp_path: Path) -> None:
    data = tmp_path / "var" / "lib" / "aimx"
    old = os.umask(0o077)
    try:
        MailStore(data).publish_sent("alice", OWNER, fields(), "x\n", WHEN)
        assert write_readme(data) is True
    finally:
        os.umask(old)
    assert mode(data) == 0o755 and mode(data / "sent") == 0o755
    assert mode(data / "README.md") == 0o644
    assert not (data / "inbox").exists()  # only what was needed


def test_bundle_publish_layout_names_and_modes(store: MailStore, data: Path) -> None:
    atts = [Att("notes.txt", "text/plain", b"note one\n"),
            Att("notes.txt", "Text/Plain; charset=utf-8", b"note two\n"),
            Att("../../evil.sh", "application/x-sh", b"#!/bin/sh\n"),
            Att("", "", b"\x00\x01")]
    stored = store.publish_inbound("alice", OWNER, fields(), "See attached.\n", atts, WHEN)
    bundle = data / "inbox" / "alice" / stored.id
    assert stored.path == bundle / f"{stored.id}.md"
    assert sorted(os.listdir(bundle)) == sorted(
        [f"{stored.id}.md", "notes.txt", "notes-1.txt", "evil.sh", "attachment-3"])
    assert (bundle / "notes-1.txt").read_bytes() == b"note two\n"
    assert not (data / "evil.sh").exists() and not (data / "inbox" / "evil.sh").exists()
    fm = frontmatter_of(stored.path)
    assert list(fm)[-1] == "attachments"
    assert fm["attachments"] == [
        {"filename": "notes.txt", "content_type": "text/plain", "size": 9, "path": "notes.txt"},
        {"filename": "notes-1.txt", "content_type": "text/plain", "size": 9,
         "path": "notes-1.txt"},
        {"filename": "evil.sh", "content_type": "application/x-sh", "size": 10,
         "path": "evil.sh"},
        {"filename": "attachment-3", "content_type": "application/octet-stream", "size": 2,
         "path": "attachment-3"},
    ]
    assert mode(bundle) == 0o700
    for name in os.listdir(bundle):
        assert mode(bundle / name) == 0o600, name


def test_attachment_named_like_the_email_does_not_replace_it(store: MailStore) -> None:
    stem = "2025-03-14-150926-hello"
    atts = [Att(f"{stem}.md", "text/markdown", b"not the email")]
    stored = store.publish_inbound("alice", OWNER, fields(), "body\n", atts, WHEN)
    assert stored.id == stem
    fm = frontmatter_of(stored.path)
    assert fm["id"] == stem
    assert fm["attachments"][0]["filename"] == f"{stem}-1.md"
    assert (stored.path.parent / f"{stem}-1.md").read_bytes() == b"not the email"


def test_collisions_count_up_and_flat_and_bundle_never_share_a_name(
        store: MailStore, data: Path) -> None:
    first = store.publish_inbound("alice", OWNER, fields(message_id="a"), "1\n", [], WHEN)
    second = store.publish_inbound("alice", OWNER, fields(message_id="b"), "2\n", [], WHEN)
    third = store.publish_inbound("alice", OWNER, fields(message_id="c"), "3\n", [], WHEN)
    assert [first.id, second.id, third.id] == [
        "2025-03-14-150926-hello", "2025-03-14-150926-hello-2", "2025-03-14-150926-hello-3"]
    assert body_of(first.path) == "\n1\n"  # never overwritten

    other = data / "inbox" / "bob"
    other.mkdir(parents=True)
    (other / "2025-03-14-150926-hello").mkdir()  # an existing bundle dir
    flat = store.publish_inbound("bob", OWNER, fields(), "x\n", [], WHEN)
    assert flat.path == other / "2025-03-14-150926-hello-2.md"
    bundle = store.publish_inbound("bob", OWNER, fields(), "x\n", [Att("a.txt", "text/plain",
                                                                        b"a")], WHEN)
    assert bundle.path == other / "2025-03-14-150926-hello-3" / "2025-03-14-150926-hello-3.md"

    carol = data / "inbox" / "carol"
    carol.mkdir(parents=True)
    (carol / "2025-03-14-150926-hello.md").write_text("+++\n+++\n")  # an existing flat email
    bundle = store.publish_inbound("carol", OWNER, fields(), "x\n",
                                   [Att("a.txt", "text/plain", b"a")], WHEN)
    assert bundle.id == "2025-03-14-150926-hello-2"


def test_sent_copy_is_flat_and_keeps_listed_attachments(store: MailStore, data: Path) -> None:
    sent_fields = fields(outbound=True, outbound_format="markdown",
                         delivery_status="delivered",
                         attachments=[{"filename": "a.pdf", "content_type": "application/pdf",
                                       "size": 3}])
    stored = store.publish_sent("alice", OWNER, sent_fields, "# Hi\n", WHEN)
    assert stored.path == data / "sent" / "alice" / "2025-03-14-150926-hello.md"
    fm = frontmatter_of(stored.path)
    assert fm["attachments"] == [{"filename": "a.pdf", "content_type": "application/pdf",
                                  "size": 3}]
    assert fm["outbound"] is True
    assert mode(data / "sent") == 0o755 and mode(data / "sent" / "alice") == 0o700
    assert mode(stored.path) == 0o600


def test_mailbox_dir_mode_is_reapplied_on_every_write(store: MailStore, data: Path) -> None:
    store.publish_inbound("alice", OWNER, fields(message_id="a"), "x\n", [], WHEN)
    box = data / "inbox" / "alice"
    box.chmod(0o755)
    store.publish_inbound("alice", OWNER, fields(message_id="b"), "x\n", [], WHEN)
    assert mode(box) == 0o700


def test_unknown_owner_still_stores(store: MailStore) -> None:
    stored = store.publish_inbound("alice", "aimxt-no-such-user", fields(), "x\n", [], WHEN)
    assert frontmatter_of(stored.path)["id"] == stored.id
    assert mode(stored.path) == 0o600


def test_files_belong_to_the_mailbox_owner(instance_dirs: dict[str, Path], test_users) -> None:
    # Re-resolved: a concurrent test session may have removed and re-created the user.
    alice, bob = (ensure_user(test_users[short].name) for short in ("alice", "bob"))
    data = instance_dirs["data"]  # parents traversable by the test users
    store = MailStore(data)
    stored = store.publish_inbound("alice", alice.name, fields(), "x\n",
                                   [Att("a.txt", "text/plain", b"a")], WHEN)
    for path in (data / "inbox" / "alice", stored.path.parent, stored.path,
                 stored.path.parent / "a.txt"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (alice.uid, alice.gid), path
    assert os.lstat(data / "inbox").st_uid == 0
    # The owner can read it; the other test user cannot.
    read = ["/bin/cat", str(stored.path)]
    ok = run_program_as(alice, read, capture_output=True, text=True)
    assert ok.stdout.startswith("+++\n")
    denied = run_program_as(bob, read, capture_output=True)
    assert denied.returncode != 0


@contextlib.contextmanager
def file_size_limit(limit: int):
    """A real write failure (EFBIG) for files growing past ``limit`` bytes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_failed_writes_leave_nothing(store: MailStore, data: Path) -> None:
    store.publish_inbound("alice", OWNER, fields(message_id="first"), "x\n", [], WHEN)
    box = data / "inbox" / "alice"
    before = sorted(os.listdir(box))
    big = b"x" * 300_000
    # The second attachment fails while the bundle is half built.
    atts = [Att("a.txt", "text/plain", b"a"), Att("b.bin", "application/octet-stream", big)]
    with file_size_limit(100_000), pytest.raises(OSError) as info:
        store.publish_inbound("alice", OWNER, fields(), "x\n", atts, WHEN)
    assert info.value.errno == errno.EFBIG
    with file_size_limit(100_000), pytest.raises(OSError):
        store.publish_inbound("alice", OWNER, fields(), "y" * 300_000, [], WHEN)
    assert sorted(os.listdir(box)) == before


# ---------------------------------------------------------------------------
# Crash safety


def test_cleanup_removes_only_temp_leftovers(store: MailStore, data: Path) -> None:
    kept = store.publish_inbound("alice", OWNER, fields(), "x\n",
                                 [Att("a.txt", "text/plain", b"a")], WHEN)
    box = data / "inbox" / "alice"
    (box / ".2025-01-01-000000-x.md.tmp.0a1b2c").write_text("partial")
    staging = box / ".2025-01-01-000000-y.tmp.ffee00"
    staging.mkdir()
    (staging / "a.txt").write_text("half a bundle")
    (kept.path.parent / ".a.txt.tmp.123abc").write_text("partial")
    (data / ".README.md.tmp.abcdef").write_text("partial")
    (box / ".hidden-by-agent").write_text("not ours")
    pending = data / ".aimx" / "hooks-pending"
    pending.mkdir(parents=True)
    (pending / ".0badc0de.tmp.4242").write_text('{"mailbox": ')
    (pending / "0badc0de").write_text('{"mailbox": "alice", "path": "x"}')
    assert cleanup_temp_files(data) == 5
    assert os.listdir(pending) == ["0badc0de"]  # a complete marker is kept for the replay
    assert sorted(os.listdir(box)) == [".hidden-by-agent", kept.id]
    assert sorted(os.listdir(kept.path.parent)) == sorted(["a.txt", f"{kept.id}.md"])
    assert not (data / ".README.md.tmp.abcdef").exists()


def test_readers_ignore_temp_files(data: Path) -> None:
    box = data / "inbox" / "alice"
    box.mkdir(parents=True)
    (box / ".2025-01-01-000000-x.md.tmp.0a1b2c").write_text("+++\nread = true\n+++\n")
    (box / ".2025-01-01-000000-x.md").write_text("+++\nread = true\n+++\n")
    assert list_email_ids(box) == []
    assert count_emails(box) == (0, 0)


# ---------------------------------------------------------------------------
# Locks


def waits_for_a_lock(pid: int, timeout: float = 30.0) -> bool:
    """True once ``pid`` is blocked on a file lock (a ``->`` line of /proc/locks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/locks") as locks:
            if any("->" in line and line.split()[5] == str(pid) for line in locks):
                return True
        time.sleep(0.02)
    return False


def test_mailbox_lock_excludes_another_process(store: MailStore, data: Path) -> None:
    script = textwrap.dedent(f"""
        import time
        from aimx.storage.mailstore import MailStore
        store = MailStore({str(data)!r})
        with store.mailbox_lock("alice"):
            print(time.monotonic(), flush=True)
    """)
    with store.mailbox_lock("alice"):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                 text=True, cwd=ROOT_DIR)
        assert waits_for_a_lock(child.pid)
        assert child.poll() is None  # still waiting for our lock
        released = time.monotonic()
    out, _ = child.communicate(timeout=30)
    assert float(out) >= released
    # The lock file lives outside the mailbox dir, so it is never listed as mail.
    assert not (data / "inbox" / "alice").exists()
    with store.mailbox_lock("alice"), store.mailbox_lock("alice"):
        pass  # re-entrant within one thread


def test_a_lock_file_removed_by_hand_is_made_again_and_still_excludes(store: MailStore,
                                                                      data: Path) -> None:
    with store.mailbox_lock("alice"):
        pass  # this process now keeps the lock file open
    (data / ".locks" / "alice.lock").unlink()
    script = textwrap.dedent(f"""
        from aimx.storage.mailstore import MailStore
        with MailStore({str(data)!r}).mailbox_lock("alice"):
            print("held", flush=True)
    """)
    with store.mailbox_lock("alice"):
        assert (data / ".locks" / "alice.lock").exists()
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                 text=True, cwd=ROOT_DIR)
        assert waits_for_a_lock(child.pid)
    assert child.communicate(timeout=30)[0] == "held\n"


# ---------------------------------------------------------------------------
# Dedup


def test_dedup_index_window_and_empty_ids() -> None:
    index = DedupIndex()
    index.record("a@x", WHEN, now=WHEN)
    index.record("", WHEN, now=WHEN)
    assert index.is_duplicate("a@x", now=WHEN + datetime.timedelta(hours=23, minutes=59))
    assert not index.is_duplicate("", now=WHEN)
    assert not index.is_duplicate("b@x", now=WHEN)
    assert not index.is_duplicate("a@x", now=WHEN + datetime.timedelta(hours=24))
    old = WHEN - datetime.timedelta(days=5)
    index.record("old@x", old, now=WHEN)
    assert not index.is_duplicate("old@x", now=WHEN)


def test_dedup_index_cap() -> None:
    index = DedupIndex()
    for n in range(DEDUP_CAP):
        index.record(f"{n}@x", WHEN, now=WHEN)
    index.record("overflow@x", WHEN, now=WHEN)
    assert len(index) == DEDUP_CAP
    assert not index.is_duplicate("overflow@x", now=WHEN)
    assert index.is_duplicate("0@x", now=WHEN)


def test_dedup_rebuilds_from_disk(data: Path) -> None:
    now = datetime.datetime.now(UTC)
    writer = MailStore(data)
    writer.publish_inbound("alice", OWNER, fields(message_id="fresh@x", received_at=now),
                           "x\n", [], now)
    writer.publish_inbound("alice", OWNER, fields(message_id="bundled@x", received_at=now),
                           "x\n", [Att("a.txt", "text/plain", b"a")], now)
    five_days = now - datetime.timedelta(days=5)
    writer.publish_inbound("alice", OWNER, fields(message_id="stale@x", received_at=five_days),
                           "x\n", [], now)
    reader = MailStore(data)  # a fresh process's view
    with reader.mailbox_lock("alice"):
        assert reader.is_duplicate("alice", "fresh@x")
        assert reader.is_duplicate("alice", "bundled@x")
        assert not reader.is_duplicate("alice", "stale@x")
        assert not reader.is_duplicate("alice", "")
        assert not reader.is_duplicate("bob", "fresh@x")
        reader.record("alice", "new@x", now)
        assert reader.is_duplicate("alice", "new@x")


def claims_file_locks(data: Path, mailbox: str = "alice") -> list[int]:
    """Start offsets of the OFD locks (claims) held on a mailbox's claims file."""
    claims = data / ".locks" / f"{mailbox}.claims"
    if not claims.exists():
        return []
    st = claims.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as locks:
        return [int(line.split()[-2]) for line in locks
                if "OFDLCK" in line and "->" not in line and line.split()[5] == inode]


def wait_for_claims(data: Path, count: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = claims_file_locks(data)
        if len(held) >= count:
            return held
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} claims appeared")


DELIVER_SCRIPT = f"""
import datetime, json, sys
from aimx.storage.mailstore import MailStore
data, message_id, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
now = datetime.datetime.now(datetime.UTC)
fields = {{"message_id": message_id, "subject": "Same", "received_at": now.isoformat(),
           "mailbox": "alice", "read": False}}
stored = MailStore(data, stored_log_limit=limit).deliver_inbound(
    "alice", {OWNER!r}, fields, "x\\n", [], now)
print(json.dumps(None if stored is None else stored.id), flush=True)
"""


def deliver_in_child(data: Path, message_id: str, *, limit: int = 1 << 20,
                     env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", DELIVER_SCRIPT, str(data), message_id,
                             str(limit)], stdout=subprocess.PIPE, text=True, cwd=ROOT_DIR,
                            env={**os.environ, **(env or {})})


def test_claims_through_two_descriptors_of_one_process_conflict(data: Path) -> None:
    shared = SharedDedup(data)
    first, second = shared.open_claims("alice"), shared.open_claims("alice")
    key, other = message_id_key("a@x"), message_id_key("b@x")
    try:
        assert try_claim(first, key)
        # The lock sits where it was asked for: struct flock is packed right.
        assert claims_file_locks(data) == [claim_offset(key)]
        assert not try_claim(second, key)
        assert try_claim(second, other)
        assert not try_claim_all(first)  # compaction waits for every claim
        close_claims(first)
        assert claims_file_locks(data) == [claim_offset(other)]
        assert try_claim(second, key)
    finally:
        close_claims(second)
    assert claims_file_locks(data) == []


def test_threads_store_one_message_id_once(store: MailStore, data: Path) -> None:
    now = datetime.datetime.now(UTC)
    start = threading.Barrier(8)

    def deliver() -> object:
        start.wait()
        return store.deliver_inbound("alice", OWNER, fields(message_id="same@x",
                                                            received_at=now), "x\n", [], now)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: deliver(), range(8)))
    assert sum(r is not None for r in results) == 1
    assert len(list_email_ids(data / "inbox" / "alice")) == 1


def test_processes_store_one_message_id_once(store: MailStore, data: Path) -> None:
    with store.mailbox_lock("alice"):  # every child queues on the lock, then they race
        children = [deliver_in_child(data, "same@x") for _ in range(4)]
        assert all(waits_for_a_lock(child.pid) for child in children)
    results = [json.loads(child.communicate(timeout=60)[0]) for child in children]
    assert sum(r is not None for r in results) == 1
    assert len(list_email_ids(data / "inbox" / "alice")) == 1
    # And this process, whose index was built before, learns it from the stored log.
    now = datetime.datetime.now(UTC)
    assert store.deliver_inbound("alice", OWNER, fields(message_id="same@x", received_at=now),
                                 "x\n", [], now) is None


def test_a_killed_process_leaves_no_claim_behind(store: MailStore, data: Path) -> None:
    child = deliver_in_child(data, "dying@x", env={PAUSE_ENV: "120"})
    try:
        (held,) = wait_for_claims(data, 1)  # claimed, and now paused before its rename
        assert held == claim_offset(message_id_key("dying@x"))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert claims_file_locks(data) == []
    now = datetime.datetime.now(UTC)
    stored = store.deliver_inbound("alice", OWNER, fields(message_id="dying@x",
                                                          received_at=now), "x\n", [], now)
    assert stored is not None
    assert list_email_ids(data / "inbox" / "alice") == [stored.id]


def test_a_compacted_stored_log_is_read_again_by_a_process_holding_the_old_one(
        store: MailStore, data: Path) -> None:
    now = datetime.datetime.now(UTC)
    two_days_ago = now - datetime.timedelta(days=2)
    for message_id, when in (("old@x", two_days_ago), ("a@x", now)):
        assert store.deliver_inbound("alice", OWNER, fields(message_id=message_id,
                                                            received_at=when),
                                     "x\n", [], when) is not None
    stored_log = data / ".locks" / "alice.stored"
    before = stored_log.stat().st_ino
    # Another process, with a tiny bound, compacts the log before storing b@x.
    child = deliver_in_child(data, "b@x", limit=1)
    assert json.loads(child.communicate(timeout=60)[0]) is not None
    assert stored_log.stat().st_ino != before
    keys = [line.split()[0] for line in stored_log.read_text().splitlines()]
    assert keys == [message_id_key("a@x"), message_id_key("b@x")]  # old@x expired
    # This process still had the replaced log open; it notices and reads the new one.
    assert store.deliver_inbound("alice", OWNER, fields(message_id="b@x", received_at=now),
                                 "x\n", [], now) is None
    assert store.deliver_inbound("alice", OWNER, fields(message_id="a@x", received_at=now),
                                 "x\n", [], now) is None
    assert len(list_email_ids(data / "inbox" / "alice")) == 3


def test_a_failed_store_leaves_the_message_id_unstored(store: MailStore, data: Path) -> None:
    now = datetime.datetime.now(UTC)
    (data / "inbox").mkdir(mode=0o755)
    (data / "inbox" / "alice").write_text("not a directory")
    with pytest.raises(OSError):
        store.deliver_inbound("alice", OWNER, fields(message_id="failed@x", received_at=now),
                              "x\n", [], now)
    assert claims_file_locks(data) == []
    stored_log = data / ".locks" / "alice.stored"
    assert not stored_log.exists() or stored_log.read_text() == ""
    (data / "inbox" / "alice").unlink()
    # Neither this process nor another one counts it as stored.
    child = deliver_in_child(data, "failed@x")
    assert json.loads(child.communicate(timeout=60)[0]) is not None
    assert len(list_email_ids(data / "inbox" / "alice")) == 1


def test_marker_dirs_of_earlier_versions_are_removed(store: MailStore, data: Path) -> None:
    markers = data / ".locks" / "alice.ids"
    markers.mkdir(parents=True)
    (markers / ("0" * 40)).write_text(WHEN.isoformat())
    now = datetime.datetime.now(UTC)
    store.deliver_inbound("alice", OWNER, fields(message_id="new@x", received_at=now),
                          "x\n", [], now)
    assert sorted(p.name for p in (data / ".locks").iterdir()) == [
        "alice.claims", "alice.lock", "alice.stored"]


# ---------------------------------------------------------------------------
# Lookup and listing


def test_resolve_email_path_strict_rules(store: MailStore, data: Path, tmp_path: Path) -> None:
    flat = store.publish_inbound("alice", OWNER, fields(message_id="a"), "x\n", [], WHEN)
    bundle = store.publish_inbound("alice", OWNER, fields(message_id="b", subject="B"), "x\n",
                                   [Att("a.txt", "text/plain", b"a")], WHEN)
    box = data / "inbox" / "alice"
    assert resolve_email_path(box, flat.id) == flat.path
    assert resolve_email_path(box, bundle.id) == bundle.path
    assert resolve_email_path(box, "nope") is None
    assert resolve_email_path(box, "../alice/" + flat.id) is None
    outside = tmp_path / "outside.md"
    outside.write_text("+++\nread = false\n+++\n")
    (box / "linked.md").symlink_to(outside)
    assert resolve_email_path(box, "linked") is None
    # "<id>.md" existing as a directory blocks the bundle fallback.
    (box / "odd.md").mkdir()
    (box / "odd").mkdir()
    (box / "odd" / "odd.md").write_text("+++\n+++\n")
    assert resolve_email_path(box, "odd") is None
    # A symlinked bundle dir does not resolve either.
    real = tmp_path / "realbundle"
    real.mkdir()
    (real / "sneaky.md").write_text("+++\n+++\n")
    (box / "sneaky").symlink_to(real)
    assert resolve_email_path(box, "sneaky") is None


def test_listing_counts_and_order(store: MailStore, data: Path, tmp_path: Path) -> None:
    box = data / "inbox" / "alice"
    ids = []
    for n, subject in enumerate(["one", "two", "three"]):
        when = WHEN + datetime.timedelta(seconds=n)
        atts = [Att("a.txt", "text/plain", b"a")] if n == 1 else []
        ids.append(store.publish_inbound("alice", OWNER, fields(subject=subject,
                                                                message_id=str(n)),
                                         "x\n", atts, when).id)
    store.set_read("alice", OWNER, ids[0], True)
    (box / "notes.txt").write_text("not an email")
    (box / "empty-bundle").mkdir()
    (tmp_path / "t.md").write_text("+++\nread = false\n+++\n")
    (box / "link.md").symlink_to(tmp_path / "t.md")
    (box / "garbage.md").write_bytes(b"\xff\xfe no frontmatter at all")
    assert list_email_ids(box) == sorted([*ids, "garbage"], reverse=True)
    assert count_emails(box) == (4, 3)
    assert store.count("inbox", "alice") == (4, 3)
    assert store.list_emails("inbox", "alice")[-1] == ids[0]
    assert count_emails(data / "inbox" / "nobody-here") == (0, 0)
    assert list_email_ids(data / "inbox" / "nobody-here") == []


def test_read_line_counts_only_inside_frontmatter(data: Path) -> None:
    box = data / "inbox" / "alice"
    box.mkdir(parents=True)
    (box / "a.md").write_text('+++\nid = "a"\nread = false\n+++\n\nread = true\n')
    (box / "b.md").write_text('+++\r\nid = "b"\r\nread = true\r\n+++\r\n\r\nbody\r\n')
    assert count_emails(box) == (2, 1)


# ---------------------------------------------------------------------------
# Read state


def test_mark_read_and_unread(store: MailStore, data: Path) -> None:
    body = "Line one\n\n+++\nnot frontmatter\n"
    stored = store.publish_inbound("alice", OWNER, fields(labels=["work"]), body, [], WHEN)
    original_body = body_of(stored.path)
    before = datetime.datetime.now(UTC)
    store.set_read("alice", OWNER, stored.id, True)
    after = datetime.datetime.now(UTC)
    fm = frontmatter_of(stored.path)
    assert fm["read"] is True
    read_at = datetime.datetime.fromisoformat(fm["read_at"].replace("Z", "+00:00"))
    assert before - datetime.timedelta(seconds=1) <= read_at <= after
    assert fm["labels"] == ["work"]  # unknown-to-ingest keys survive
    assert body_of(stored.path) == original_body
    assert mode(stored.path) == 0o600
    assert os.listdir(stored.path.parent) == [stored.path.name]  # no temp left behind
    if os.geteuid() == 0:
        assert os.lstat(stored.path).st_uid == 65534

    time.sleep(1.1)
    store.set_read("alice", OWNER, stored.id, True)
    again = frontmatter_of(stored.path)
    assert again["read"] is True
    assert datetime.datetime.fromisoformat(again["read_at"].replace("Z", "+00:00")) > read_at

    store.set_read("alice", OWNER, stored.id, False)
    fm = frontmatter_of(stored.path)
    assert fm["read"] is False and "read_at" not in fm
    store.set_read("alice", OWNER, stored.id, False)  # repeats are fine
    assert body_of(stored.path) == original_body
    assert count_emails(stored.path.parent) == (1, 1)


def test_mark_bundle(store: MailStore) -> None:
    stored = store.publish_inbound("alice", OWNER, fields(), "x\n",
                                   [Att("a.txt", "text/plain", b"a")], WHEN)
    store.set_read("alice", OWNER, stored.id, True)
    assert frontmatter_of(stored.path)["read"] is True
    assert sorted(os.listdir(stored.path.parent)) == sorted(["a.txt", stored.path.name])


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "", "a\\b", "x\0"])
def test_mark_rejects_bad_ids(store: MailStore, bad_id: str) -> None:
    with pytest.raises(StorageError) as info:
        store.set_read("alice", OWNER, bad_id, True)
    assert info.value.code == "NOTFOUND"
    assert info.value.reason == f"email id '{bad_id}' contains invalid characters"


def test_mark_missing_and_symlinked(store: MailStore, data: Path, tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info:
        store.set_read("alice", OWNER, "2025-01-01-000000-nope", True)
    assert (info.value.code, info.value.reason) == (
        "NOTFOUND", "email '2025-01-01-000000-nope' not found in inbox/alice")
    box = data / "inbox" / "alice"
    box.mkdir(parents=True, exist_ok=True)
    target = tmp_path / "target.md"
    target.write_text('+++\nid = "t"\nread = false\n+++\n\nbody\n')
    (box / "linked.md").symlink_to(target)
    with pytest.raises(StorageError) as info:
        store.set_read("alice", OWNER, "linked", True)
    assert info.value.code == "NOTFOUND"
    assert target.read_text() == '+++\nid = "t"\nread = false\n+++\n\nbody\n'


def test_mark_bad_frontmatter_is_io(store: MailStore, data: Path) -> None:
    box = data / "inbox" / "alice"
    box.mkdir(parents=True)
    (box / "single.md").write_text("+++\nid = \"single\"\nread = false\n\nbody\n")
    with pytest.raises(StorageError) as info:
        store.set_read("alice", OWNER, "single", True)
    assert (info.value.code, info.value.reason) == (
        "IO", f"malformed frontmatter in {box / 'single.md'}")
    (box / "badtoml.md").write_text("+++\nid = = nope\n+++\n\nbody\n")
    with pytest.raises(StorageError) as info:
        store.set_read("alice", OWNER, "badtoml", True)
    assert info.value.code == "IO"
    assert info.value.reason.startswith(f"failed to parse frontmatter in {box / 'badtoml.md'}: ")
    assert (box / "badtoml.md").read_text() == "+++\nid = = nope\n+++\n\nbody\n"


# ---------------------------------------------------------------------------
# README


def test_readme_written_when_missing(data: Path) -> None:
    assert write_readme(data) is True
    text = (data / "README.md").read_text()
    assert text.splitlines()[0] == README_MARKER
    for tool in ("mailbox_list", "mailbox_create", "mailbox_delete", "email_list", "email_read",
                 "email_send", "email_reply", "email_mark_read", "email_mark_unread",
                 "hook_create", "hook_list", "hook_delete"):
        assert f"`{tool}`" in text
    assert mode(data / "README.md") == 0o644


@pytest.mark.parametrize("existing", [
    "<!-- aimx-readme-version: 0 -->\nold text\n", "", "# my notes\n",
    "\n" + README_MARKER + "\n",
])
def test_readme_replaced_when_stale(data: Path, existing: str) -> None:
    (data / "README.md").write_text(existing)
    (data / "README.md").chmod(0o600)
    assert write_readme(data) is True
    assert (data / "README.md").read_text() == readme_text()
    assert mode(data / "README.md") == 0o644


def test_readme_with_current_marker_is_untouched(data: Path) -> None:
    path = data / "README.md"
    path.write_text(f"  {README_MARKER}  \nlocal copy\n")
    os.utime(path, (1_000_000, 1_000_000))
    assert write_readme(data) is False
    assert path.read_text().endswith("local copy\n")
    assert os.stat(path).st_mtime == 1_000_000
    assert write_readme(data, force=True) is True
    assert path.read_text() == readme_text()


# ---------------------------------------------------------------------------
# The listing index: whatever happens to the files, listings say what the files say


def expected_listing(box: Path) -> list[tuple[str, str, bool]]:
    """(id, subject, read) of every email, newest first, read straight from the files."""
    rows = []
    for email_id in sorted(list_email_ids(box), reverse=True):
        path = resolve_email_path(box, email_id)
        assert path is not None
        fm = frontmatter_of(path)
        rows.append((email_id, fm["subject"], fm["read"] is True))
    return rows


def shown(entries: list[IndexedEmail]) -> list[tuple[str, str, bool]]:
    return [(e.id, e.summary["subject"], e.summary["read"] is True)
            for e in entries if e.summary is not None]


def assert_listing_matches_files(box: Path) -> None:
    expected = expected_listing(box)
    unread = sum(1 for _, _, read in expected if not read)
    assert shown(list_page(box, 0, 1000)) == expected
    assert shown(list(iter_listing(box))) == expected
    assert shown(list_page(box, 1, 2)) == expected[1:3]
    assert count_emails(box) == (len(expected), unread)


def age(box: Path) -> None:
    """Date the mailbox dir's last change 10 s back, as if the mail had sat for a while:
    the next look may then trust what the index recorded about the dir."""
    then = time.time_ns() - 10_000_000_000
    os.utime(box, ns=(then, then))


def publish(store: MailStore, n: int, attachment: bool = False, **extra: object) -> str:
    atts = [Att("a.txt", "text/plain", b"a")] if attachment else []
    when = WHEN + datetime.timedelta(minutes=n)
    return store.publish_inbound("alice", OWNER, fields(subject=f"mail {n}", message_id=str(n),
                                                        **extra),
                                 "body\n", atts, when).id


@needs_root
def test_index_listing_follows_adds_deletes_and_marks(store: MailStore, data: Path) -> None:
    box = data / "inbox" / "alice"
    ids = [publish(store, n, attachment=(n == 2)) for n in range(5)]
    assert_listing_matches_files(box)
    age(box)
    assert_listing_matches_files(box)

    ids.append(publish(store, 10))  # arrives after the index was built
    assert_listing_matches_files(box)
    age(box)
    ids.append(publish(store, 11, attachment=True))  # a new bundle
    assert_listing_matches_files(box)
    assert shown(list_page(box, 0, 1)) == [(ids[-1], "mail 11", False)]

    age(box)
    (box / f"{ids[0]}.md").unlink()  # deleted by the owner, behind aimx's back
    shutil.rmtree(box / ids[2])  # a bundle removed as a whole
    assert_listing_matches_files(box)
    assert ids[0] not in [row[0] for row in shown(list_page(box, 0, 100))]

    age(box)
    store.set_read("alice", OWNER, ids[1], True)
    store.set_read("alice", OWNER, ids[-1], True)  # inside a bundle
    assert_listing_matches_files(box)
    assert count_emails(box) == (5, 3)
    age(box)
    store.set_read("alice", OWNER, ids[1], False)
    assert_listing_matches_files(box)
    assert count_emails(box) == (5, 4)


@needs_root
def test_index_has_the_rows_of_mail_it_stored(store: MailStore, data: Path, caplog) -> None:
    """Mail stored here is in the index without a file read (a later listing re-scans the
    names only), and those rows list exactly what reading the files gives."""
    import logging

    caplog.set_level(logging.INFO, logger="aimx::storage")
    box = data / "inbox" / "alice"
    publish(store, 0)
    age(box)
    assert_listing_matches_files(box)  # builds the index
    odd = {"subject": "tab\tquote\" back\\slash \x7f\u2028 \U0001f600", "to": "",
           "from": "", "received_at": "", "cc": "x@example.com"}
    for n, extra in enumerate(({}, odd, {"subject": "lone \udc80 surrogate"}), start=1):
        store.publish_inbound("alice", OWNER, {**fields(message_id=str(n)), **extra}, "body\n",
                              [], WHEN + datetime.timedelta(minutes=n))
    publish(store, 9, attachment=True)  # a bundle: left to the re-scan
    age(box)
    caplog.clear()
    assert_listing_matches_files(box)
    scans = [r.getMessage() for r in caplog.records if "index re-scanned" in r.getMessage()]
    # Read again: the surrogate one (the file holds U+FFFD) and the bundle, nothing else.
    assert scans and scans[0].endswith("emails=5 read=2 dropped=0")
    listed = {e.id: e.summary for e in list_page(box, 0, 100)}
    assert listed == {email_id: summarize(frontmatter_of(resolve_email_path(box, email_id)))
                      for email_id in list_email_ids(box)}


@needs_root
def test_index_listing_sees_in_place_edits(store: MailStore, data: Path) -> None:
    box = data / "inbox" / "alice"
    ids = [publish(store, n) for n in range(3)]
    assert_listing_matches_files(box)
    age(box)
    assert_listing_matches_files(box)
    # Another program rewrites one file in place: same inode, the dir does not change.
    path = box / f"{ids[1]}.md"
    inode = os.stat(path).st_ino
    text = path.read_text().replace('subject = "mail 1"', 'subject = "edited in place"')
    text = text.replace("read = false", "read = true")
    with open(path, "r+") as handle:
        handle.write(text)
        handle.truncate()
    assert os.stat(path).st_ino == inode
    assert (ids[1], "edited in place", True) in shown(list_page(box, 0, 10))
    assert_listing_matches_files(box)
    assert count_emails(box) == (3, 2)


@needs_root
def test_index_never_lists_symlinks(store: MailStore, data: Path, tmp_path: Path) -> None:
    box = data / "inbox" / "alice"
    ids = [publish(store, n, attachment=(n == 1)) for n in range(2)]
    assert_listing_matches_files(box)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.md").write_text('+++\nsubject = "planted"\nread = false\n+++\n')
    (outside / "2030-01-01-000000-dir").mkdir()
    (box / "2030-01-01-000000-link.md").symlink_to(outside / "x.md")
    (box / "2030-01-01-000000-dir").symlink_to(outside / "2030-01-01-000000-dir")
    (box / "2030-01-02-000000-inner").symlink_to(box / ids[1])  # a bundle, twice
    for _ in range(2):
        assert [row[0] for row in shown(list_page(box, 0, 10))] == ids[::-1]
        assert [e.id for e in iter_listing(box)] == ids[::-1]
        assert count_emails(box) == (2, 2)
        age(box)


@needs_root
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_index_is_rebuilt_and_never_wrong(store: MailStore, data: Path,
                                                  damage: str) -> None:
    box = data / "inbox" / "alice"
    ids = [publish(store, n, attachment=(n == 0)) for n in range(4)]
    store.set_read("alice", OWNER, ids[3], True)
    assert_listing_matches_files(box)
    age(box)
    assert_listing_matches_files(box)
    index_file = data / ".index" / "inbox" / "alice.sqlite"
    original = index_file.read_bytes()
    with open(index_file, "r+b") as handle:  # in place, under the open index
        if damage == "garbage":
            handle.write(b"\x5a" * len(original))
        else:
            handle.truncate(0 if damage == "empty" else len(original) // 2)
    for _ in range(3):
        assert_listing_matches_files(box)
        assert count_emails(box) == (4, 3)
        assert [e.id for e in iter_listing(box, keep=lambda i: i > ids[1])] == \
            [ids[3], ids[2]]
    ids.append(publish(store, 9))
    assert_listing_matches_files(box)
    assert index_file.read_bytes()[:16] == b"SQLite format 3\0"  # a usable index again


READER_PREPARE = """
import sqlite3
import aimx.mcp.server
from aimx.storage.index import count_emails, iter_listing, list_page
"""

READER = """
import aimx.mcp.server
from aimx.storage.index import count_emails, iter_listing, list_page
box = spec["box"]
rows = lambda entries: [[e.id, e.summary["subject"], e.summary["read"] is True]
                        for e in entries if e.summary is not None]
page = aimx.mcp.server.list_emails(box, "inbox", limit=50, offset=0)
unread = aimx.mcp.server.list_emails(box, "inbox", limit=50, offset=0,
                                    filters=aimx.mcp.server.ListFilters(unread=True))
print(json.dumps({
    "counts": list(count_emails(box)),
    "page": rows(list_page(box, 0, 100)),
    "all": rows(iter_listing(box)),
    "mcp": [[r["id"], r["subject"], r["read"]] for r in page],
    "mcp_unread": [r["id"] for r in unread],
}))
"""


def read_as(user, box: Path) -> dict:
    """What the mailbox owner's own process (as ``aimx mcp`` runs) sees in ``box``."""
    command = python_as_command(user, READER, {"box": str(box)}, prepare=READER_PREPARE)
    done = subprocess.run(command, cwd=ROOT_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_owner_without_write_access_to_the_index_reads_correctly(
        instance_dirs: dict[str, Path], test_users) -> None:
    alice = ensure_user(test_users["alice"].name)
    data = instance_dirs["data"]
    store = MailStore(data)
    box = data / "inbox" / "alice"

    def publish_as_alice(n: int, attachment: bool = False) -> str:
        atts = [Att("a.txt", "text/plain", b"a")] if attachment else []
        return store.publish_inbound("alice", alice.name, fields(subject=f"mail {n}",
                                                                  message_id=str(n)),
                                     "body\n", atts, WHEN + datetime.timedelta(minutes=n)).id

    def check(counts: bool = True) -> None:
        expected = [list(row) for row in expected_listing(box)]
        seen = read_as(alice, box)
        assert seen["page"] == expected and seen["all"] == expected
        assert seen["mcp"] == expected
        assert seen["mcp_unread"] == [row[0] for row in expected if not row[2]]
        if counts:
            assert seen["counts"] == [len(expected), sum(1 for row in expected if not row[2])]

    ids = [publish_as_alice(n, attachment=(n == 1)) for n in range(3)]
    check()  # no index exists yet: the owner cannot create one and scans
    assert_listing_matches_files(box)  # root builds the index
    age(box)
    assert_listing_matches_files(box)
    check()  # the owner reads the index it may not write
    age(box)
    ids.append(publish_as_alice(7))  # not yet in the index
    (box / f"{ids[0]}.md").unlink()
    check()
    store.set_read("alice", alice.name, ids[1], True)
    age(box)
    assert_listing_matches_files(box)
    path = box / f"{ids[2]}.md"  # then edited in place by the owner's own tools
    path.write_text(path.read_text().replace("read = false", "read = true"))
    # The listing shows the edit at once; the unread count follows once the daemon
    # has handed that row out (an in-place edit does not touch the directory).
    check(counts=False)
    assert_listing_matches_files(box)
    check()
    index_file = data / ".index" / "inbox" / "alice.sqlite"
    index_file.write_bytes(b"not a database at all")
    check()
