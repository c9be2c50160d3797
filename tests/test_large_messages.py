"""Large messages over real SMTP: a 25 MB signed message is stored byte-exact and verified,
an over-limit one is refused with nothing kept, and no spool file outlives its session."""

from __future__ import annotations

import base64
import hashlib
import os
import smtplib
import time
from pathlib import Path

import dkim
import pytest

from aimx.mail import frontmatter
from aimx.storage.spool import SPOOL_DIR
from tests.support.daemon import RunningDaemon, SmtpWire, stored_emails
from tests.support.dkimkeys import shared_key
from tests.support.dnsserver import DnsServer
from tests.support.procs import child_pids
from tests.test_smtpserver import _owner_names

DOMAIN = "test.local"
CAP = 26_214_400
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def owners(request: pytest.FixtureRequest) -> tuple[str, str]:
    return _owner_names(request)


@pytest.fixture(scope="module")
def sender_key():
    return shared_key("large-sender.test")


@pytest.fixture(scope="module")
def daemon(owners: tuple[str, str], sender_key):
    records = {
        "sender.test": [["TXT", "v=spf1 ip4:127.0.0.1 -all"]],
        "sel._domainkey.sender.test": [["TXT", sender_key.txt_record]],
        "_dmarc.sender.test": [["TXT", "v=DMARC1; p=reject"]],
    }
    config_base = {"domain": DOMAIN, "mailboxes": {
        "alice": {"address": f"alice@{DOMAIN}", "owner": owners[0]}}}
    with DnsServer(records) as dns:
        config = {**config_base, "dns_resolvers": [dns.address]}
        with RunningDaemon(config) as running:
            yield running


def spool_fds(daemon: RunningDaemon) -> list[str]:
    """Open descriptors on spool files (each holds disk space) in the daemon and its
    SMTP workers."""
    found = []
    for pid in (daemon.pid, *child_pids(daemon.pid)):
        try:
            entries = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue  # a worker that just exited
        for entry in entries:
            try:
                target = os.readlink(entry)
            except OSError:
                continue
            if f"/{SPOOL_DIR}/" in target:
                found.append(target)
    return found


def wait_no_spool_fds(daemon: RunningDaemon, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (held := spool_fds(daemon)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return held


def big_signed_message(sender_key, payload: bytes, msg_id: str) -> bytes:
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    text = "The scanned contract is attached.  Please sign\tit.\r\n" * 2000
    message = (f"From: Boss <boss@sender.test>\r\nTo: alice@{DOMAIN}\r\n"
               f"Subject: The contract\r\nDate: Mon, 02 Jun 2025 12:00:00 +0000\r\n"
               f"Message-ID: <{msg_id}>\r\nMIME-Version: 1.0\r\n"
               "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
               f"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}"
               "--b1\r\nContent-Type: application/pdf; name=\"contract.pdf\"\r\n"
               "Content-Disposition: attachment; filename=\"contract.pdf\"\r\n"
               "Content-Transfer-Encoding: base64\r\n\r\n").encode() + encoded + b"--b1--\r\n\r\n"
    relaxed = sender_key.sign(message, domain="sender.test")
    simple = dkim.sign(relaxed, b"sel", b"sender.test", sender_key.private_pem,
                       canonicalize=(b"simple", b"simple"),
                       include_headers=[b"from", b"subject", b"message-id"])
    return simple + relaxed


def test_25_mb_signed_message_round_trips_byte_exact(daemon: RunningDaemon, sender_key) -> None:
    payload = os.urandom(18 * MIB)
    raw = big_signed_message(sender_key, payload, "contract@sender.test")
    assert 24 * MIB < len(raw) <= CAP
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=120) as client:
        client.ehlo("mx.sender.test")
        assert client.sendmail("boss@sender.test", [f"alice@{DOMAIN}"], raw) == {}
    (path,) = [p for p in stored_emails(daemon.data_dir, "alice")
               if "contract@sender.test" in p.read_text()[:4000]]
    fields = frontmatter.parse(path.read_bytes())
    assert (fields["dkim"], fields["spf"], fields["dmarc"]) == ("pass", "pass", "pass")
    assert fields["size_bytes"] == len(raw)
    (attachment,) = fields["attachments"]
    stored = path.parent / attachment["path"]
    assert attachment["size"] == len(payload) == stored.stat().st_size
    assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert path.read_text().count("The scanned contract is attached.") == 2000
    assert wait_no_spool_fds(daemon) == []
    assert list((daemon.data_dir / SPOOL_DIR).iterdir()) == []


def test_tampered_large_body_fails_dkim(daemon: RunningDaemon, sender_key) -> None:
    payload = os.urandom(2 * MIB)
    raw = big_signed_message(sender_key, payload, "tampered@sender.test")
    tampered = raw[:-200] + raw[-200:].replace(b"\r\n--b1--", b"x\r\n--b1--", 1)
    assert tampered != raw
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=60) as client:
        client.ehlo("mx.sender.test")
        client.sendmail("boss@sender.test", [f"alice@{DOMAIN}"], tampered)
    (path,) = [p for p in stored_emails(daemon.data_dir, "alice")
               if "tampered@sender.test" in p.read_text()[:4000]]
    assert frontmatter.parse(path.read_bytes())["dkim"] == "fail"


def test_over_limit_message_is_refused_and_nothing_is_kept(daemon: RunningDaemon) -> None:
    line = b"x" * 998 + b"\r\n"
    head = (f"From: a@sender.test\r\nTo: alice@{DOMAIN}\r\nSubject: too big\r\n"
            "Message-ID: <too-big@sender.test>\r\n\r\n").encode()
    before = len(stored_emails(daemon.data_dir, "alice"))
    with SmtpWire(daemon.smtp_port) as wire:
        wire.cmd("EHLO mx.sender.test")
        wire.cmd("MAIL FROM:<a@sender.test>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        assert wire.cmd("DATA").startswith("354")
        wire.send(head)
        for _ in range((CAP + 4 * MIB) // len(line)):
            wire.send(line)
        assert wire.cmd(".") == "552 5.3.4 Message exceeds maximum size"
        assert wait_no_spool_fds(daemon) == []  # dropped at the limit, not at the end
        assert wire.cmd("NOOP") == "250 2.0.0 OK"
    assert len(stored_emails(daemon.data_dir, "alice")) == before
    assert list((daemon.data_dir / SPOOL_DIR).iterdir()) == []


def test_connection_dropped_mid_data_leaves_no_spool_file(daemon: RunningDaemon) -> None:
    wire = SmtpWire(daemon.smtp_port)
    wire.cmd("EHLO mx.sender.test")
    wire.cmd("MAIL FROM:<a@sender.test>")
    wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
    assert wire.cmd("DATA").startswith("354")
    wire.send(b"Subject: dropped\r\n\r\n" + (b"y" * 998 + b"\r\n") * 5000)  # 5 MB: spooled
    deadline = time.monotonic() + 10
    while not spool_fds(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spool_fds(daemon), "a 5 MB message in progress should be in the spool"
    wire.close()
    assert wait_no_spool_fds(daemon) == []
    assert list((daemon.data_dir / SPOOL_DIR).iterdir()) == []
    assert not [p for p in stored_emails(daemon.data_dir, "alice") if "dropped" in p.name]


def test_data_at_a_fair_rate_outlasts_the_session_deadline(owners: tuple[str, str]) -> None:
    """The session deadline (2 s here) does not cut DATA that keeps up the minimum rate;
    it applies again once the message is answered."""
    config = {"domain": DOMAIN, "mailboxes": {
        "alice": {"address": f"alice@{DOMAIN}", "owner": owners[0]}}}
    env = {"AIMX_SMTP_SESSION_DEADLINE": "2", "AIMX_SMTP_IDLE_TIMEOUT": "1",
           "AIMX_SMTP_MIN_DATA_RATE": "100"}
    with RunningDaemon(config, env=env) as running:
        wire = SmtpWire(running.smtp_port)
        wire.cmd("EHLO mx.sender.test")
        wire.cmd("MAIL FROM:<a@sender.test>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        assert wire.cmd("DATA").startswith("354")
        started = time.monotonic()
        wire.send(b"Subject: patient\r\nMessage-ID: <patient@sender.test>\r\n\r\n")
        while time.monotonic() - started < 4:  # ~4 KB/s, far above 100 B/s
            wire.send(b"z" * 398 + b"\r\n")
            time.sleep(0.1)
        assert wire.cmd(".") == "250 2.0.0 OK message accepted"
        assert wire.reply(timeout=5).startswith("421 4.4.2 ")  # deadline or idle: both over
        assert wire.eof()
        wire.close()
        assert [p for p in stored_emails(running.data_dir, "alice")
                if "patient@sender.test" in p.read_text()]


def test_start_up_removes_spool_files_a_crash_left(tmp_path: Path) -> None:
    from aimx.storage.atomic import cleanup_temp_files

    spool = tmp_path / SPOOL_DIR
    spool.mkdir(mode=0o700)
    (spool / ".msg.tmp.0123abcd").write_bytes(b"half a message")
    assert cleanup_temp_files(tmp_path) == 1
    assert list(spool.iterdir()) == []
