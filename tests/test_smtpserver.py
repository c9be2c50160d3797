"""Inbound SMTP against a running daemon: the reply table, limits, DATA, STARTTLS, routing.

Every test talks to a real ``aimx serve`` over loopback TCP (raw sockets for
byte-exact replies, smtplib for whole transactions) and checks what lands
on disk.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import smtplib
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path

import pytest

from aimx.mail import frontmatter
from aimx.smtp.server import end_of_data_mark, source_key
from tests.support.daemon import RunningDaemon, SmtpWire, stored_emails
from tests.support.dkimkeys import shared_key
from tests.support.dnsserver import DnsServer, SilentDns

DOMAIN = "test.local"
CAP = 26_214_400


def _owner_names(request: pytest.FixtureRequest) -> tuple[str, str]:
    """Owners for two mailboxes: test users as root, the current user otherwise."""
    if os.geteuid() == 0:
        users = request.getfixturevalue("test_users")
        return users["alice"].name, users["bob"].name
    me = pwd.getpwuid(os.getuid()).pw_name
    return me, me


def message(subject: str = "hello", *, msg_id: str | None = None, to: str = f"alice@{DOMAIN}",
            body: str = "Hi there.\r\n", extra: str = "") -> bytes:
    msg_id = msg_id or f"{time.time_ns()}.{subject.replace(' ', '-')}@example.com"
    return (f"From: Bob <bob@example.com>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{msg_id}>\r\nDate: Mon, 02 Jun 2025 12:00:00 +0000\r\n{extra}\r\n"
            f"{body}").encode()


def read_email(path) -> tuple[dict, str]:
    data = path.read_bytes()
    _, rest = frontmatter.split(data)
    return frontmatter.parse(data), rest if isinstance(rest, str) else rest.decode()


def files_with(data_dir, mailbox: str, needle: str) -> list:
    return [p for p in stored_emails(data_dir, mailbox) if needle in p.read_text()]


@pytest.fixture(scope="module")
def owners(request: pytest.FixtureRequest) -> tuple[str, str]:
    return _owner_names(request)


@pytest.fixture(scope="module")
def plain(owners: tuple[str, str]):
    """alice only (no catchall), STARTTLS on, no authentication DNS."""
    config = {"domain": DOMAIN, "mailboxes": {
        "alice": {"address": f"alice@{DOMAIN}", "owner": owners[0]}}}
    with RunningDaemon(config, tls=True) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def routing(owners: tuple[str, str]):
    """alice (with a slow hook) + catchall, no TLS; deliveries to carol@ fail on purpose."""
    # Not under pytest's tmp dirs: a concurrent pytest run resets those to 0700,
    # and the hook runs as the mailbox owner.
    marker_dir = Path(tempfile.mkdtemp(prefix="aimx-hooks-"))
    marker_dir.chmod(0o777)
    catchall_owner = owners[1]
    config = {"domain": DOMAIN, "mailboxes": {
        "alice": {"address": f"alice@{DOMAIN}", "owner": owners[0], "hooks": [{
            "event": "on_receive", "fire_on_untrusted": True,
            "cmd": ["/bin/sh", "-c", 'sleep 2; cat > "$0/hook-$$.md"', str(marker_dir)],
        }]},
        "catchall": {"address": f"*@{DOMAIN}", "owner": catchall_owner},
    }}
    env = {"AIMX_TEST_INGEST_FAIL_FOR": f"carol@{DOMAIN}", "AIMX_SANDBOX_FORCE_FALLBACK": "1"}
    try:
        with RunningDaemon(config, env=env) as daemon:
            daemon.marker_dir = marker_dir
            yield daemon
    finally:
        shutil.rmtree(marker_dir, ignore_errors=True)


def greeted(daemon: RunningDaemon, name: str = "client.example") -> SmtpWire:
    wire = SmtpWire(daemon.smtp_port)
    assert wire.cmd(f"EHLO {name}").startswith("250-")
    return wire


# -- greeting and EHLO -------------------------------------------------------------


def test_banner_and_ehlo_lines_with_tls(plain: RunningDaemon) -> None:
    with SmtpWire(plain.smtp_port) as wire:
        assert wire.banner == f"220 {DOMAIN} ESMTP aimx"
        assert wire.cmd("EHLO  mx.sender.example ") == "\n".join([
            f"250-{DOMAIN} Hello mx.sender.example", "250-SIZE 26214400", "250-8BITMIME",
            "250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-STARTTLS", "250 SMTPUTF8"])


def test_ehlo_without_tls_and_starttls_unavailable(routing: RunningDaemon) -> None:
    with SmtpWire(routing.smtp_port) as wire:
        ehlo = wire.cmd("EHLO x")
        assert "STARTTLS" not in ehlo and ehlo.endswith("250 SMTPUTF8")
        assert wire.cmd("STARTTLS") == "502 5.5.1 STARTTLS not available"


def test_helo_and_missing_arguments(plain: RunningDaemon) -> None:
    with SmtpWire(plain.smtp_port) as wire:
        assert wire.cmd("EHLO") == "501 5.5.4 EHLO requires domain argument"
        assert wire.cmd("HELO") == "501 5.5.4 HELO requires domain argument"
        assert wire.cmd("HELO old.example") == f"250 {DOMAIN} Hello old.example"
        assert wire.cmd("MAIL FROM:<a@example.com>") == "250 2.0.0 OK"


# -- MAIL / RCPT / DATA state machine -------------------------------------------------


def test_mail_needs_greeting_and_only_once(plain: RunningDaemon) -> None:
    with SmtpWire(plain.smtp_port) as wire:
        assert wire.cmd("MAIL FROM:<a@example.com>") == "503 5.5.1 Send EHLO/HELO first"
        wire.cmd("EHLO x")
        assert wire.cmd("mail from:<a@example.com>") == "250 2.0.0 OK"
        assert wire.cmd("MAIL FROM:<b@example.com>") == "503 5.5.1 MAIL FROM already given"
        assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>") == "250 2.0.0 OK"
        assert wire.cmd("MAIL FROM:<b@example.com>") == "503 5.5.1 MAIL FROM already given"


def test_mail_syntax_and_null_sender(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        assert wire.cmd("MAIL TO:<a@example.com>") == "501 5.5.4 Syntax: MAIL FROM:<address>"
        assert wire.cmd("MAIL") == "501 5.5.4 Syntax: MAIL FROM:<address>"
        assert wire.cmd("MAIL FROM:<>") == "250 2.0.0 OK"


def test_rcpt_needs_mail_and_syntax(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>") == "503 5.5.1 Send MAIL FROM first"
        wire.cmd("MAIL FROM:<a@example.com>")
        assert wire.cmd(f"RCPT FROM:<alice@{DOMAIN}>") == "501 5.5.4 Syntax: RCPT TO:<address>"
        assert wire.cmd("RCPT TO:<>") == "501 5.5.4 Syntax: RCPT TO:<address>"
        assert wire.cmd("RCPT TO:") == "501 5.5.4 Syntax: RCPT TO:<address>"


def test_relay_refused_and_routing(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<a@example.com>")
        for rcpt in (f"u@sub.{DOMAIN}", "u@evil.example", "alice", "alice@", f"alice@{DOMAIN}.x"):
            assert wire.cmd(f"RCPT TO:<{rcpt}>") == "550 5.7.1 relay not permitted", rcpt
        assert wire.cmd(f"RCPT TO:<bob@{DOMAIN}>") == (
            f"550 5.1.1 <bob@{DOMAIN}>: Recipient address rejected: User unknown")
        assert wire.cmd("RCPT TO:<alice@TEST.LOCAL>") == "250 2.0.0 OK"
        # D4: the local part matches case-insensitively.
        assert wire.cmd(f"RCPT TO:<Alice@{DOMAIN}>") == "250 2.0.0 OK"


def test_data_needs_an_accepted_recipient(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        assert wire.cmd("DATA") == "503 5.5.1 Send RCPT TO first"
        wire.cmd("MAIL FROM:<a@example.com>")
        wire.cmd(f"RCPT TO:<nobody@{DOMAIN}>")
        assert wire.cmd("DATA") == "503 5.5.1 Send RCPT TO first"
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        assert wire.cmd("DATA") == "354 Start mail input; end with <CRLF>.<CRLF>"


def test_rset_noop_quit(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<a@example.com>")
        assert wire.cmd("RSET") == "250 2.0.0 OK"
        # The transaction is gone, the greeting stays.
        assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>") == "503 5.5.1 Send MAIL FROM first"
        assert wire.cmd("MAIL FROM:<a@example.com>") == "250 2.0.0 OK"
        assert wire.cmd("NOOP whatever") == "250 2.0.0 OK"
        assert wire.cmd("QUIT") == "221 2.0.0 Bye"
        assert wire.eof()


@pytest.mark.parametrize("line", ["VRFY alice", "EXPN staff", "HELP", "AUTH PLAIN AGFAAGI=",
                                  "BDAT 10 LAST", "hello there"])
def test_unknown_commands(plain: RunningDaemon, line: str) -> None:
    with greeted(plain) as wire:
        assert wire.cmd(line) == "500 5.5.1 Unrecognized command"
        assert wire.cmd("NOOP") == "250 2.0.0 OK"


@pytest.mark.parametrize("line", [b"EHLO evil\r250 forged", b"NOOP\r", b"\rNOOP",
                                  b"RSET\rMAIL FROM:<x@evil.example>", b"HELO a\x00b",
                                  b"\x00\x01"])
def test_bare_cr_and_control_characters_in_commands_are_refused(plain: RunningDaemon,
                                                                line: bytes) -> None:
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<b@example.com>")
        answer = wire.cmd(line)
        assert answer == "501 5.5.2 Syntax error: bare CR or other control character in command"
        # Nothing of the line was obeyed: the transaction is still open, the session in sync.
        assert wire.cmd("MAIL FROM:<c@example.com>") == "503 5.5.1 MAIL FROM already given"
        assert wire.cmd("NOOP") == "250 2.0.0 OK"


def test_blank_lines_are_ignored(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        wire.send(b"\r\n   \r\n\n")
        assert wire.cmd("NOOP") == "250 2.0.0 OK"


# -- whole transactions --------------------------------------------------------------


def test_message_is_on_disk_when_250_is_read(plain: RunningDaemon) -> None:
    msg = message("on disk", msg_id="ondisk-1@example.com")
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<bob@example.com>")
        wire.cmd("RCPT TO:<alice@TEST.LOCAL>")
        wire.cmd("DATA")
        assert wire.cmd(msg + b".") == "250 2.0.0 OK message accepted"
        found = files_with(plain.data_dir, "alice", "ondisk-1@example.com")
        assert len(found) == 1
        fields, body = read_email(found[0])
    assert fields["delivered_to"] == "alice@TEST.LOCAL"
    assert fields["received_from_ip"] == "127.0.0.1"
    assert fields["subject"] == "on disk"
    assert body.strip() == "Hi there."
    assert found[0].stat().st_mode & 0o777 == 0o600


def test_one_good_one_rejected_recipient_gives_one_file(plain: RunningDaemon) -> None:
    with smtplib.SMTP("127.0.0.1", plain.smtp_port) as client:
        refused = client.sendmail("bob@example.com", [f"alice@{DOMAIN}", f"zed@{DOMAIN}"],
                                  message("partial rcpt", msg_id="partial-rcpt@example.com"))
    assert list(refused) == [f"zed@{DOMAIN}"]
    assert len(files_with(plain.data_dir, "alice", "partial-rcpt@example.com")) == 1


def test_dot_stuffing_and_dot_space_terminator(plain: RunningDaemon) -> None:
    body = b"..starts with a dot\r\n.foo stays\r\nend\r\n"
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<bob@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd("DATA")
        wire.send(message("dots", msg_id="dots@example.com", body=body.decode()))
        assert wire.cmd(". ") == "250 2.0.0 OK message accepted"
    _, text = read_email(files_with(plain.data_dir, "alice", "dots@example.com")[0])
    assert text.splitlines()[-3:] == [".starts with a dot", ".foo stays", "end"]


def test_pipelined_transactions_answer_in_order(plain: RunningDaemon) -> None:
    first = message("pipe one", msg_id="pipe-1@example.com")
    second = message("pipe two", msg_id="pipe-2@example.com")
    with SmtpWire(plain.smtp_port) as wire:
        wire.send(b"EHLO p\r\nMAIL FROM:<b@example.com>\r\nRCPT TO:<nobody@" + DOMAIN.encode()
                  + b">\r\nRCPT TO:<alice@" + DOMAIN.encode() + b">\r\nDATA\r\n" + first
                  + b".\r\nMAIL FROM:<b@example.com>\r\nRCPT TO:<alice@test.local>\r\nDATA\r\n"
                  + second + b".\r\nQUIT\r\n")
        replies = [wire.reply() for _ in range(11)]
        assert wire.eof()
    assert [r[:3] for r in replies] == ["250", "250", "550", "250", "354", "250", "250", "250",
                                        "354", "250", "221"]
    assert replies[5] == "250 2.0.0 OK message accepted"
    assert len(files_with(plain.data_dir, "alice", "pipe-2@example.com")) == 1


def test_same_message_id_twice_is_one_file(plain: RunningDaemon) -> None:
    with smtplib.SMTP("127.0.0.1", plain.smtp_port) as client:
        for _ in range(2):
            client.sendmail("b@example.com", [f"alice@{DOMAIN}"],
                            message("dup", msg_id="dup-twice@example.com"))
        client.sendmail("b@example.com", [f"alice@{DOMAIN}"],
                        message("dup", msg_id="dup-other@example.com"))
    assert len(files_with(plain.data_dir, "alice", "dup-twice@example.com")) == 1
    assert len(files_with(plain.data_dir, "alice", "dup-other@example.com")) == 1


def test_8bit_utf8_split_across_packets_survives(plain: RunningDaemon) -> None:
    text = "Grüße aus Köln — ✓ 日本語"
    raw = message("utf8", msg_id="utf8-split@example.com", body=text + "\r\n",
                  extra="Content-Type: text/plain; charset=utf-8\r\n"
                        "Content-Transfer-Encoding: 8bit\r\n")
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<bob@example.com> BODY=8BITMIME")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd("DATA")
        cut = raw.index("✓".encode()) + 1  # in the middle of a 3-byte character
        wire.send(raw[:cut])
        time.sleep(0.2)
        wire.send(raw[cut:])
        assert wire.cmd(".") == "250 2.0.0 OK message accepted"
    _, body = read_email(files_with(plain.data_dir, "alice", "utf8-split@example.com")[0])
    assert text in body


# -- D13: bare LF, NUL, long lines ------------------------------------------------------


def test_bare_lf_mid_data_is_refused_and_session_stays_in_sync(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<bob@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd("DATA")
        wire.send(b"Subject: t\nMessage-ID: <barelf@example.com>\r\n\r\nbody\r\nNOOP\r\n")
        assert wire.cmd(".") == "550 5.6.0 Bare LF not allowed"
        assert wire.cmd("NOOP") == "250 2.0.0 OK"
        assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>") == "503 5.5.1 Send MAIL FROM first"
    assert files_with(plain.data_dir, "alice", "barelf@example.com") == []


def test_nul_in_data_is_refused(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<bob@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd("DATA")
        wire.send(message("nul", msg_id="nul@example.com", body="a\x00b\r\n"))
        assert wire.cmd(".") == "550 5.6.0 Bare LF not allowed"
    assert files_with(plain.data_dir, "alice", "nul@example.com") == []


def test_end_of_data_search_finds_what_the_line_pattern_finds() -> None:
    """The fast search for the end mark (a line of "." and blanks) agrees with the
    plain multi-line pattern on every buffer, dot-led lines and bare CR/LF included."""
    reference = re.compile(rb"^\.[ \t]*\r\n", re.MULTILINE)
    rng = random.Random(25)
    for _ in range(20_000):
        buffer = bytearray(rng.choice(b"... \t\r\r\n\nab") for _ in range(rng.randrange(24)))
        start = rng.randrange(len(buffer) + 1)
        end = rng.randrange(start, len(buffer) + 1)
        match = reference.search(buffer, start, end)
        assert end_of_data_mark(buffer, start, end) == (match.start() if match else -1), (
            bytes(buffer), start, end)


def test_lf_dot_lf_does_not_end_data(plain: RunningDaemon) -> None:
    """SMTP smuggling: only CRLF.CRLF ends a message, so nothing hidden after <LF>.<LF> runs."""
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<bob@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd("DATA")
        wire.send(message("smuggle", msg_id="smuggle@example.com")
                  + b"\n.\nMAIL FROM:<x@example.com>\r\nRCPT TO:<alice@test.local>\r\n"
                    b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n")
        assert wire.cmd(".") == "550 5.6.0 Bare LF not allowed"
        assert wire.cmd("NOOP") == "250 2.0.0 OK"
    assert files_with(plain.data_dir, "alice", "smuggled") == []


def test_megabyte_line_in_data_is_refused_without_desync(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<bob@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd("DATA")
        wire.send(message("long line", msg_id="longline@example.com", body="")
                  + b"x" * 1_000_000 + b"\r\nMAIL FROM:<x@example.com>\r\n")
        assert wire.cmd(".") == "500 5.5.2 Line too long"
        assert wire.cmd("NOOP") == "250 2.0.0 OK"
        # The session goes on normally.
        wire.cmd("MAIL FROM:<bob@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd("DATA")
        assert wire.cmd(message("after long", msg_id="afterlong@example.com") + b".") == (
            "250 2.0.0 OK message accepted")
    assert files_with(plain.data_dir, "alice", "longline@example.com") == []
    assert len(files_with(plain.data_dir, "alice", "afterlong@example.com")) == 1


def test_line_of_998_octets_is_accepted(plain: RunningDaemon) -> None:
    line = "y" * 998
    with smtplib.SMTP("127.0.0.1", plain.smtp_port) as client:
        client.sendmail("b@example.com", [f"alice@{DOMAIN}"],
                        message("998", msg_id="998@example.com", body=line + "\r\n"))
    _, body = read_email(files_with(plain.data_dir, "alice", "998@example.com")[0])
    assert line in body


def test_long_command_lines(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        assert wire.cmd("MAIL FROM:<bob@example.com>") == "250 2.0.0 OK"
        assert wire.cmd("NOOP " + "z" * 507) == "250 2.0.0 OK"  # 512 octets
        assert wire.cmd("NOOP " + "z" * 508) == "500 5.5.2 Line too long"
        assert wire.cmd("RCPT TO:<" + "q" * 200_000 + ">") == "500 5.5.2 Line too long"
        # State unchanged: the MAIL above still holds.
        assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>") == "250 2.0.0 OK"


# -- size, recipients, errors, sessions -----------------------------------------------------


def test_size_parameter_over_the_cap_is_refused_at_mail(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        assert wire.cmd(f"MAIL FROM:<b@example.com> SIZE={CAP + 1}") == (
            "552 5.3.4 Message exceeds maximum size")
        assert wire.cmd(f"MAIL FROM:<b@example.com> SIZE={CAP}") == "250 2.0.0 OK"


def _sized_message(total: int, msg_id: str) -> bytes:
    head = message("big", msg_id=msg_id, body="")
    line = b"a" * 998 + b"\r\n"
    remaining = total - len(head)
    body = line * (remaining // len(line))
    tail = remaining - len(body)
    assert tail >= 2
    body += b"b" * (tail - 2) + b"\r\n"
    raw = head + body
    assert len(raw) == total
    return raw


def test_message_of_exactly_the_cap_is_accepted_one_more_byte_is_not(
        plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<b@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd("DATA")
        wire.send(_sized_message(CAP + 1, "over-cap@example.com"))
        assert wire.cmd(".") == "552 5.3.4 Message exceeds maximum size"
        assert wire.cmd("NOOP") == "250 2.0.0 OK"
        wire.cmd("MAIL FROM:<b@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd("DATA")
        wire.send(_sized_message(CAP, "at-cap@example.com"))
        assert wire.cmd(".") == "250 2.0.0 OK message accepted"
    found = [p for p in stored_emails(plain.data_dir, "alice")
             if "at-cap@example.com" in p.read_text()[:4000]]
    assert len(found) == 1
    fields, _ = read_email(found[0])
    assert fields["size_bytes"] == CAP


def test_101st_recipient_is_refused(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<b@example.com>")
        wire.send(b"".join(f"RCPT TO:<alice@{DOMAIN}>\r\n".encode() for _ in range(100)))
        assert all(wire.reply() == "250 2.0.0 OK" for _ in range(100))
        assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>") == "452 4.5.3 Too many recipients"
        wire.cmd("DATA")
        assert wire.cmd(message("many", msg_id="many-rcpts@example.com") + b".") == (
            "250 2.0.0 OK message accepted")
    assert len(files_with(plain.data_dir, "alice", "many-rcpts@example.com")) == 1


def test_no_command_cap(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        wire.send(b"NOOP\r\n" * 120)
        assert all(wire.reply() == "250 2.0.0 OK" for _ in range(120))
        assert wire.cmd("MAIL FROM:<b@example.com>") == "250 2.0.0 OK"


def test_twenty_errors_in_a_row_close_the_session(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        for _ in range(19):
            assert wire.cmd("JUNK") == "500 5.5.1 Unrecognized command"
        assert wire.cmd("NOOP") == "250 2.0.0 OK"  # a success resets the count
        for _ in range(19):
            wire.cmd("JUNK")
        assert wire.cmd("JUNK") == "500 5.5.1 Unrecognized command"
        assert wire.reply() == "421 4.7.0 Too many errors"
        assert wire.eof()


def test_twenty_sessions_per_client_ip(plain: RunningDaemon) -> None:
    wires = [SmtpWire(plain.smtp_port) for _ in range(20)]
    try:
        assert all(w.banner.startswith("220 ") for w in wires)
        extra = SmtpWire(plain.smtp_port)
        assert extra.banner == "421 4.7.0 Too many connections from your address, try again later"
        assert extra.eof()
        # Another client address is still welcome.
        with SmtpWire(plain.smtp_port, source="127.0.0.2") as other:
            assert other.banner.startswith("220 ")
        wires.pop().close()
        deadline = time.monotonic() + 5
        while True:
            again = SmtpWire(plain.smtp_port)
            if again.banner.startswith("220 ") or time.monotonic() > deadline:
                break
            again.close()
            time.sleep(0.1)
        assert again.banner.startswith("220 ")
        wires.append(again)
    finally:
        for w in wires:
            w.close()


def test_hundred_sessions_in_all(plain: RunningDaemon) -> None:
    wires = []
    try:
        for n in range(100):
            wire = SmtpWire(plain.smtp_port, source=f"127.0.0.{10 + n // 20}")
            assert wire.banner.startswith("220 "), n
            wires.append(wire)
        extra = SmtpWire(plain.smtp_port, source="127.0.0.30")
        assert extra.banner == "421 4.7.0 Too many connections, try again later"
        assert extra.eof()
    finally:
        for w in wires:
            w.close()


# -- STARTTLS (D14) ---------------------------------------------------------------------


def _tls(wire: SmtpWire) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    wire.sock = context.wrap_socket(wire.sock, server_hostname=DOMAIN)


def test_starttls_flow(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        wire.cmd("MAIL FROM:<b@example.com>")
        assert wire.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
        _tls(wire)
        assert wire.cmd("MAIL FROM:<b@example.com>") == "503 5.5.1 Send EHLO/HELO first"
        ehlo = wire.cmd("EHLO again")
        assert "STARTTLS" not in ehlo and "250-SIZE 26214400" in ehlo
        assert wire.cmd("STARTTLS") == "503 5.5.1 TLS already active"
        # The MAIL given before the handshake is gone.
        assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>") == "503 5.5.1 Send MAIL FROM first"
        wire.cmd("MAIL FROM:<b@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd("DATA")
        assert wire.cmd(message("over tls", msg_id="tls@example.com") + b".") == (
            "250 2.0.0 OK message accepted")
    assert len(files_with(plain.data_dir, "alice", "tls@example.com")) == 1


def test_starttls_discards_pipelined_plaintext(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        wire.send(b"STARTTLS\r\nEHLO injected\r\nMAIL FROM:<evil@example.com>\r\n"
                  b"RCPT TO:<alice@test.local>\r\n")
        assert wire.reply() == "220 2.0.0 Ready to start TLS"
        _tls(wire)
        # Had the injected lines run, the session would be greeted with a transaction open.
        assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>") == "503 5.5.1 Send MAIL FROM first"
        assert wire.cmd("MAIL FROM:<b@example.com>") == "503 5.5.1 Send EHLO/HELO first"
        assert wire.cmd("EHLO real").startswith("250-")


def test_starttls_with_parameters_is_refused(plain: RunningDaemon) -> None:
    with greeted(plain) as wire:
        assert wire.cmd("STARTTLS now").startswith("501 ")
        assert wire.cmd("NOOP") == "250 2.0.0 OK"


# -- several recipients (spec 20 §12) and failures ----------------------------------------


def test_alice_and_catchall_each_get_a_copy(routing: RunningDaemon) -> None:
    with smtplib.SMTP("127.0.0.1", routing.smtp_port) as client:
        client.sendmail("b@example.com", [f"alice@{DOMAIN}", f"Bob@{DOMAIN}"],
                        message("two copies", msg_id="two-copies@example.com"))
    (alice,) = files_with(routing.data_dir, "alice", "two-copies@example.com")
    (catchall,) = files_with(routing.data_dir, "catchall", "two-copies@example.com")
    assert read_email(alice)[0]["delivered_to"] == f"alice@{DOMAIN}"
    assert read_email(catchall)[0]["delivered_to"] == f"Bob@{DOMAIN}"


def test_bcc_copy_keeps_header_to_and_own_delivered_to(routing: RunningDaemon) -> None:
    with smtplib.SMTP("127.0.0.1", routing.smtp_port) as client:
        client.sendmail("b@example.com", [f"hidden@{DOMAIN}"],
                        message("bcc", msg_id="bcc@example.com", to=f"alice@{DOMAIN}"))
    (copy,) = files_with(routing.data_dir, "catchall", "bcc@example.com")
    fields, _ = read_email(copy)
    assert fields["to"] == f"alice@{DOMAIN}"
    assert fields["delivered_to"] == f"hidden@{DOMAIN}"
    assert files_with(routing.data_dir, "alice", "bcc@example.com") == []


def test_two_recipients_into_the_catchall_give_one_file(routing: RunningDaemon) -> None:
    with smtplib.SMTP("127.0.0.1", routing.smtp_port) as client:
        client.sendmail("b@example.com", [f"x@{DOMAIN}", f"y@{DOMAIN}"],
                        message("one file", msg_id="catchall-dedup@example.com"))
    (copy,) = files_with(routing.data_dir, "catchall", "catchall-dedup@example.com")
    assert read_email(copy)[0]["delivered_to"] == f"x@{DOMAIN}"


@pytest.mark.parametrize("rcpt", [
    f"alice@evil.example@{DOMAIN}",  # routed to alice by its first local part
    f"@evil.example:alice@{DOMAIN}",  # an explicit source route
    f"alice%evil.example@{DOMAIN}",  # the percent hack
    f"evil.example!alice@{DOMAIN}",  # a bang path
    f'"alice@evil.example"@{DOMAIN}',
])
def test_source_routed_recipients_are_refused(routing: RunningDaemon, rcpt: str) -> None:
    """Even with a catch-all that takes every local part, a recipient naming another
    host inside its local part is refused, never stored."""
    with greeted(routing) as wire:
        wire.cmd("MAIL FROM:<b@example.com>")
        assert wire.cmd(f"RCPT TO:<{rcpt}>") == (
            "501 5.1.3 Source-routed recipient address not accepted")
        assert wire.cmd("DATA") == "503 5.5.1 Send RCPT TO first"
        assert wire.cmd(f"RCPT TO:<someone@{DOMAIN}>") == "250 2.0.0 OK"  # catch-all


def test_partial_and_total_failure(routing: RunningDaemon) -> None:
    with greeted(routing) as wire:
        wire.cmd("MAIL FROM:<b@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd(f"RCPT TO:<carol@{DOMAIN}>")
        wire.cmd("DATA")
        assert wire.cmd(message("partial", msg_id="partial-fail@example.com") + b".") == (
            "451 4.3.0 Temporary failure on partial accept; please retry")
        wire.cmd("MAIL FROM:<b@example.com>")
        wire.cmd(f"RCPT TO:<carol@{DOMAIN}>")
        wire.cmd("DATA")
        assert wire.cmd(message("total", msg_id="total-fail@example.com") + b".") == (
            "451 4.3.0 Temporary failure, please retry")
    assert len(files_with(routing.data_dir, "alice", "partial-fail@example.com")) == 1
    assert files_with(routing.data_dir, "catchall", "partial-fail@example.com") == []
    assert files_with(routing.data_dir, "catchall", "total-fail@example.com") == []


def test_slow_hook_does_not_delay_the_reply(routing: RunningDaemon) -> None:
    with greeted(routing) as wire:
        wire.cmd("MAIL FROM:<b@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd("DATA")
        started = time.monotonic()
        assert wire.cmd(message("hooked", msg_id="hooked@example.com") + b".") == (
            "250 2.0.0 OK message accepted")
        assert time.monotonic() - started < 1.5
    assert not any("hooked@example.com" in p.read_text()
                   for p in routing.marker_dir.iterdir())
    deadline = time.monotonic() + 15
    while not any("hooked@example.com" in p.read_text() for p in routing.marker_dir.iterdir()):
        assert time.monotonic() < deadline, routing.log_text()
        time.sleep(0.2)


# -- idle timeout -------------------------------------------------------------------------


def test_idle_timeout(owners: tuple[str, str]) -> None:
    config = {"domain": DOMAIN, "mailboxes": {
        "alice": {"address": f"alice@{DOMAIN}", "owner": owners[0]}}}
    with RunningDaemon(config, env={"AIMX_SMTP_IDLE_TIMEOUT": "1"}) as daemon:
        with greeted(daemon) as wire:
            started = time.monotonic()
            assert wire.reply(timeout=10) == "421 4.4.2 Idle timeout exceeded"
            assert wire.eof()
            assert 0.8 < time.monotonic() - started < 5
        with greeted(daemon) as wire:
            wire.cmd("MAIL FROM:<b@example.com>")
            wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
            wire.cmd("DATA")
            wire.send(b"Subject: slow\r\n")
            assert wire.reply(timeout=10) == "421 4.4.2 Timeout during DATA"
            assert wire.eof()
        assert "outcome=timeout" in daemon.log_text()


def test_session_deadline_frees_a_trickling_client(owners: tuple[str, str]) -> None:
    """A client that keeps the idle timer happy still loses its slot at the deadline."""
    config = {"domain": DOMAIN, "mailboxes": {
        "alice": {"address": f"alice@{DOMAIN}", "owner": owners[0]}}}
    env = {"AIMX_SMTP_SESSION_DEADLINE": "2", "AIMX_SMTP_IDLE_TIMEOUT": "1"}
    with RunningDaemon(config, env=env) as daemon, greeted(daemon) as wire:
        started = time.monotonic()
        reply = ""
        while time.monotonic() - started < 10:
            reply = wire.cmd("NOOP")  # every 0.5 s: never idle for a whole second
            if reply != "250 2.0.0 OK":
                break
            time.sleep(0.5)
        assert reply == "421 4.4.2 Connection timed out"
        assert wire.eof()
        assert 1.5 < time.monotonic() - started < 5


# -- deadlines and caps against trickling clients ----------------------------------------------


@pytest.fixture(scope="module")
def strict(owners: tuple[str, str]):
    """1 s per command line, DATA at 100 bytes/s at least, and a session deadline far
    beyond both, so only the new deadlines can end a trickling session in time."""
    config = {"domain": DOMAIN, "mailboxes": {
        "alice": {"address": f"alice@{DOMAIN}", "owner": owners[0]}}}
    env = {"AIMX_SMTP_IDLE_TIMEOUT": "1", "AIMX_SMTP_MIN_DATA_RATE": "100",
           "AIMX_SMTP_SESSION_DEADLINE": "60"}
    with RunningDaemon(config, env=env) as daemon:
        yield daemon


def _trickle_until_closed(wires: list[SmtpWire], payload: bytes, gap: float,
                          give_up: float = 10.0) -> tuple[list[str], int]:
    """Send ``payload`` byte by byte to every wire, ``gap`` seconds apart, until each one
    is answered (or ``give_up`` s pass): (first reply per wire, bytes sent in all)."""
    answers: dict[int, str] = {}
    sent = 0
    started = time.monotonic()
    for byte in payload * 100:
        if len(answers) == len(wires) or time.monotonic() - started > give_up:
            break
        for index, wire in enumerate(wires):
            if index in answers:
                continue
            wire.sock.settimeout(0)
            try:
                if wire.sock.recv(1, socket.MSG_PEEK):
                    answers[index] = wire.reply(timeout=5)
                    continue
            except BlockingIOError:
                pass
            try:
                wire.send(bytes([byte]))
                sent += 1
            except OSError:
                answers[index] = "closed without a reply"
        time.sleep(gap)
    return [answers.get(index, "no reply") for index in range(len(wires))], sent


@pytest.mark.parametrize(("peer", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 client on a dual-stack socket
    ("2001:db8:1:2::25", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:1", "2001:db8:1:2::/64"),  # same /64, same count
    ("2001:db8:1:3::25", "2001:db8:1:3::/64"),
])
def test_sessions_are_counted_per_ipv4_address_and_ipv6_slash_64(peer: str, key: str) -> None:
    assert source_key(peer) == key


def test_trickled_command_line_is_cut_at_the_command_deadline(strict: RunningDaemon) -> None:
    """Bytes every 0.2 s keep an idle timer happy; the line is still due within 1 s."""
    with greeted(strict) as wire:
        [answer], sent = _trickle_until_closed([wire], b"NOOP-NOOP-NOOP", gap=0.2)
        assert answer == "421 4.4.2 Command not completed in time"
        assert wire.eof()
        assert sent >= 4  # the client kept sending until it was cut off


def test_data_below_the_minimum_rate_is_cut(strict: RunningDaemon) -> None:
    """Whole lines every 0.25 s (no line is late) at 40 bytes/s: under the 100 bytes/s floor."""
    with greeted(strict) as wire:
        wire.cmd("MAIL FROM:<b@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        assert wire.cmd("DATA").startswith("354")
        started, lines, answer = time.monotonic(), 0, ""
        while time.monotonic() - started < 10:
            try:
                answer = wire.reply(timeout=0.25)
                break
            except TimeoutError:
                wire.send(b"slow line\r\n")
                lines += 1
        assert answer == "421 4.4.2 Timeout during DATA"
        assert wire.eof()
        assert lines >= 4  # lines kept coming, faster than the 1 s per-line limit
    assert not files_with(strict.data_dir, "alice", "slow line")
    # A client at ordinary speed is unaffected by the same limits.
    with greeted(strict) as wire:
        wire.cmd("MAIL FROM:<b@example.com>")
        wire.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        wire.cmd("DATA")
        assert wire.cmd(message("fast enough", msg_id="fast-enough@example.com")
                        + b".") == "250 2.0.0 OK message accepted"


def test_trickling_sessions_hold_only_their_own_address_and_not_for_long(
        strict: RunningDaemon) -> None:
    """The slow-loris of the finding: one address fills its 20 slots with trickling
    sessions; the 21st is refused, another address is served, and the deadline frees all."""
    source = "127.0.0.3"
    wires = [SmtpWire(strict.smtp_port, source=source) for _ in range(20)]
    try:
        assert all(wire.banner.startswith("220 ") for wire in wires)
        with SmtpWire(strict.smtp_port, source=source) as extra:
            assert extra.banner == (
                "421 4.7.0 Too many connections from your address, try again later")
            assert extra.eof()
        with greeted(strict) as other:  # another address
            assert other.cmd("NOOP") == "250 2.0.0 OK"
        answers, _ = _trickle_until_closed(wires, b"EHLO slow.example\r\n", gap=0.2)
        assert answers == ["421 4.4.2 Command not completed in time"] * 20
        deadline = time.monotonic() + 5
        while True:  # the slots are released as the closes are processed
            again = SmtpWire(strict.smtp_port, source=source)
            if again.banner.startswith("220 ") or time.monotonic() > deadline:
                break
            again.close()
            time.sleep(0.1)
        with again:
            assert again.banner.startswith("220 ")
    finally:
        for wire in wires:
            wire.close()


def test_socket_is_alive_during_tests(plain: RunningDaemon) -> None:
    """The fixture's daemon answers on its Unix socket too (the API listener)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(plain.socket_path))
    assert oct(plain.socket_path.stat().st_mode & 0o777) == oct(0o666)


# -- authentication over real DNS (D8, D10, D11) -------------------------------------------


@pytest.fixture(scope="module")
def auth_zone():
    sender, other = shared_key("smtp-sender.test"), shared_key("smtp-other.test")
    records = {
        "sender.test": [["TXT", "v=spf1 ip4:127.0.0.1 -all"], ["A", "127.0.0.9"]],
        "sel._domainkey.sender.test": [["TXT", sender.txt_record]],
        "_dmarc.sender.test": [["TXT", "v=DMARC1; p=reject"]],
        "other.test": [["TXT", "v=spf1 ip4:127.0.0.1 -all"]],
        "sel._domainkey.other.test": [["TXT", other.txt_record]],
        "fail.test": [["TXT", "v=spf1 -all"]],
        "softfail.test": [["TXT", "v=spf1 ~all"]],
        "neutral.test": [["TXT", "v=spf1 ?all"]],
        "nospf.test": [["A", "127.0.0.9"]],
    }
    with DnsServer(records) as dns:
        yield dns, sender, other


@pytest.fixture(scope="module")
def authd(owners: tuple[str, str], auth_zone):
    dns, _, _ = auth_zone
    config = {"domain": DOMAIN, "trust": "verified", "trusted_senders": ["*@sender.test"],
              "dns_resolvers": [dns.address], "mailboxes": {
                  "alice": {"address": f"alice@{DOMAIN}", "owner": owners[0]}}}
    with RunningDaemon(config) as daemon:
        yield daemon


def _deliver(daemon: RunningDaemon, mail_from: str, raw: bytes, needle: str) -> dict:
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as client:
        client.ehlo("mx.sender.test")
        client.sendmail(mail_from, [f"alice@{DOMAIN}"], raw)
    (path,) = files_with(daemon.data_dir, "alice", needle)
    return read_email(path)[0]


def _authored(author: str, msg_id: str) -> bytes:
    return (f"From: Boss <{author}>\r\nTo: alice@{DOMAIN}\r\nSubject: signed\r\n"
            f"Date: Mon, 02 Jun 2025 12:00:00 +0000\r\nMessage-ID: <{msg_id}>\r\n\r\n"
            "Please act on this.\r\n").encode()


def test_signed_aligned_allow_listed_mail_is_trusted(authd: RunningDaemon, auth_zone) -> None:
    _, sender, _ = auth_zone
    raw = sender.sign(_authored("boss@sender.test", "auth-pass@sender.test"),
                      domain="sender.test")
    fields = _deliver(authd, "boss@sender.test", raw, "auth-pass@sender.test")
    assert (fields["dkim"], fields["spf"], fields["dmarc"], fields["trusted"]) == (
        "pass", "pass", "pass", "true")


def test_tampered_body_fails_dkim(authd: RunningDaemon, auth_zone) -> None:
    _, sender, _ = auth_zone
    raw = sender.sign(_authored("boss@sender.test", "auth-tampered@sender.test"),
                      domain="sender.test").replace(b"act on", b"ignore")
    fields = _deliver(authd, "boss@sender.test", raw, "auth-tampered@sender.test")
    assert fields["dkim"] == "fail"
    assert fields["trusted"] == "false"


def test_valid_signature_of_another_domain_on_forged_from_is_not_trusted(
        authd: RunningDaemon, auth_zone) -> None:
    _, _, other = auth_zone
    raw = other.sign(_authored("boss@sender.test", "auth-forged@other.test"),
                     domain="other.test")
    fields = _deliver(authd, "bounce@other.test", raw, "auth-forged@other.test")
    assert fields["dkim"] == "pass"
    assert fields["dmarc"] == "fail"
    assert fields["trusted"] == "false"


@pytest.mark.parametrize(("domain", "spf"), [("fail.test", "fail"), ("softfail.test", "softfail"),
                                             ("neutral.test", "neutral"), ("nospf.test", "none")])
def test_spf_results_per_zone(authd: RunningDaemon, domain: str, spf: str) -> None:
    msg_id = f"spf-{domain}@example.com"
    fields = _deliver(authd, f"x@{domain}", _authored(f"x@{domain}", msg_id), msg_id)
    assert fields["spf"] == spf
    assert fields["dmarc"] == "none"  # none of these publish DMARC


def test_dmarc_fails_when_only_an_unaligned_domain_passes(authd: RunningDaemon) -> None:
    msg_id = "dmarc-fail@example.com"
    fields = _deliver(authd, "x@other.test", _authored("boss@sender.test", msg_id), msg_id)
    assert (fields["dkim"], fields["spf"], fields["dmarc"], fields["trusted"]) == (
        "none", "pass", "fail", "false")


def test_silent_dns_delays_one_message_but_not_other_sessions(owners: tuple[str, str]) -> None:
    with SilentDns() as silent:
        config = {"domain": DOMAIN, "dns_resolvers": [silent.address], "mailboxes": {
            "alice": {"address": f"alice@{DOMAIN}", "owner": owners[0]}}}
        with RunningDaemon(config) as daemon:
            outcome: dict[str, object] = {}

            def slow_sender() -> None:
                started = time.monotonic()
                with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=60) as client:
                    outcome["refused"] = client.sendmail(
                        "x@slow.example", [f"alice@{DOMAIN}"],
                        message("slow dns", msg_id="slow-dns@example.com"))
                outcome["seconds"] = time.monotonic() - started

            thread = threading.Thread(target=slow_sender)
            thread.start()
            assert silent.wait_for_query()  # the first message now waits on DNS
            assert thread.is_alive()
            started = time.monotonic()
            with greeted(daemon) as wire:
                assert wire.cmd("MAIL FROM:<y@example.com>") == "250 2.0.0 OK"
                assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>") == "250 2.0.0 OK"
                assert wire.cmd("RSET") == "250 2.0.0 OK"
            assert time.monotonic() - started < 1.0
            thread.join(40)
            assert not thread.is_alive()
            assert outcome["refused"] == {}
            assert outcome["seconds"] < 20, outcome
            (path,) = files_with(daemon.data_dir, "alice", "slow-dns@example.com")
            assert read_email(path)[0]["spf"] == "none"
