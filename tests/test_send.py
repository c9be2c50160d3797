"""`aimx send` end to end: a real user, the running daemon, DKIM, real MX delivery.

The daemon (``aimx serve`` in a subprocess) resolves recipients through a
twisted.names server and delivers to SMTP sinks listening on loopback
addresses at the real port 25, so these tests need root (they also run the
CLI as real unprivileged users). The received messages are checked the way a
receiving server would: DKIM with dkimpy against the key published in DNS,
and with OpenDKIM when ``opendkim-testmsg`` is available.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest
from dns import resolver as dnspython

from aimx.daemon.client import Client
from aimx.daemon.protocol import MailboxList
from aimx.mail import frontmatter
from tests.support.daemon import RunningDaemon, stored_emails
from tests.support.dkimkeys import shared_key
from tests.support.dnsserver import DnsServer
from tests.support.opendkim import opendkim_verdict
from tests.support.smtpsink import LoopbackHosts, loopback_hosts_or_skip
from tests.support.users import call_api_as, ensure_user, run_aimx_as

DOMAIN = "aimx.test"
KEY = shared_key("send-e2e")
CLIENT_TIMEOUT_SECS = 2

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: binds port 25 and runs as test users")

HOOK = ('printf "%s|%s|%s|%s\\n" "$AIMX_SUBJECT" "$AIMX_SEND_STATUS" "$AIMX_FILEPATH" '
        '"$AIMX_MESSAGE_ID" >> {log}')

H1_STYLE = 'style="font-size: 1.75em; margin: 1.2em 0 0.5em; line-height: 1.25;"'
TD_STYLE = 'style="border: 1px solid #d0d7de; padding: 6px 10px;"'
MESSAGE_ID = re.compile(r"<[^<>@\s]+@aimx\.test>")


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users(test_users) -> dict[str, Any]:
    return {short: ensure_user(user.name) for short, user in test_users.items()}


@pytest.fixture(scope="module")
def hosts() -> Iterator[LoopbackHosts]:
    with loopback_hosts_or_skip(2, port=25) as loopback:
        yield loopback


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer({f"aimx._domainkey.{DOMAIN}": [["TXT", KEY.txt_record]]}) as server:
        yield server


@pytest.fixture(scope="module")
def shared(tmp_path_factory, users) -> Path:
    """A directory the test users can read and write (attachments, hook log)."""
    path = tmp_path_factory.mktemp("send-shared")
    for parent in (path, *path.parents):
        if str(parent) in ("/", "/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    path.chmod(0o777)
    return path


@pytest.fixture(scope="module")
def daemon(dns, users, shared) -> Iterator[RunningDaemon]:
    log = shared / "after_send.log"
    config = {
        "domain": DOMAIN,
        "dns_resolvers": [dns.address],
        "mailboxes": {
            "catchall": {"address": f"*@{DOMAIN}", "owner": "root", "allow_root_catchall": True},
            "alice": {"address": f"alice@{DOMAIN}", "owner": users["alice"].name, "hooks": [
                {"name": "sent-probe", "event": "after_send",
                 "cmd": ["/bin/sh", "-c", HOOK.format(log=log)]}]},
            "bob": {"address": f"bob@{DOMAIN}", "owner": users["bob"].name},
        },
    }
    with RunningDaemon(config, dkim_key_pem=KEY.private_pem,
                       env={"AIMX_SMTP_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT_SECS)}) as running:
        yield running


@pytest.fixture(scope="session")
def opendkim() -> str | None:
    """``opendkim-testmsg``, installed with apt when missing (None if that fails)."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    found = shutil.which("opendkim-testmsg")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for steps in ([["apt-get", "install", "-y", "-q", "opendkim-tools"]],
                      [["apt-get", "update", "-q"],
                       ["apt-get", "install", "-y", "-q", "opendkim-tools"]]):
            try:
                for step in steps:
                    subprocess.run(step, env=env, capture_output=True, timeout=600, check=True)
            except (subprocess.SubprocessError, OSError):
                continue
            found = shutil.which("opendkim-testmsg")
            if found:
                break
    return found


# -- helpers -----------------------------------------------------------------------------


def aimx(user: Any, daemon: RunningDaemon | None, *argv: str,
         runtime_dir: Path | None = None, wait: bool = True,
         sudo_user: str | None = None) -> Any:
    """Run ``aimx <argv>`` as ``user`` (None: as root; ``sudo_user`` as if through sudo)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AIMX_") and k != "SUDO_USER"}
    env.update(NO_COLOR="1")
    if sudo_user is not None:
        env["SUDO_USER"] = sudo_user
    if daemon is not None:
        env = daemon.client_env(env)
    if runtime_dir is not None:
        env["AIMX_RUNTIME_DIR"] = str(runtime_dir)
    if user is not None:
        env = user.env(env)
    return run_aimx_as(user, list(argv), env, wait=wait)


def send(user: Any, daemon: RunningDaemon, to: str, subject: str, *extra: str,
         sender: str = f"alice@{DOMAIN}", body: str = "Hello **there**.") -> Any:
    return aimx(user, daemon, "send", "--from", sender, "--to", to, "--subject", subject,
                "--body", body, *extra)


def raw_send(user: Any, daemon: RunningDaemon, message: str) -> dict[str, Any]:
    """SEND ``message`` as ``user``: ``{"ok": {...}}`` or ``{"error": [code, reason]}``."""
    return call_api_as(user, daemon.socket_path, "SEND", {"body": message.encode()},
                       daemon.client_env())


def route(dns: DnsServer, domain: str, *mx: tuple[int, str]) -> None:
    """Publish MX records ``(preference, address)`` for ``domain``: host ``mxN.<domain>``."""
    for index, (_, address) in enumerate(mx):
        dns.records[f"mx{index}.{domain}"] = [["A", address]]
    dns.records[domain] = [["MX", f"{pref} mx{i}.{domain}"] for i, (pref, _) in enumerate(mx)]
    dns.reload()


def sent_copies(daemon: RunningDaemon) -> list[Path]:
    return stored_emails(daemon.data_dir, "alice", "sent")


def hook_record(shared: Path, subject: str, timeout: float = 10.0) -> dict[str, str]:
    log = shared / "after_send.log"
    deadline = time.monotonic() + timeout
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        for line in lines:
            fields = line.split("|")
            if fields[0] == subject:
                return dict(zip(("subject", "status", "filepath", "message_id"), fields,
                                strict=True))
        if time.monotonic() > deadline:
            raise AssertionError(f"no after_send record for {subject!r}: {lines}")
        time.sleep(0.05)


def published_txt(dns_server: DnsServer):
    resolver = dnspython.Resolver(configure=False)
    host, port = dns_server.address.split(":")
    resolver.nameservers = [host]
    resolver.port = int(port)

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(b"".join(record.strings) for record in answer)

    return lookup


def opendkim_verifies(tool: str, message: bytes, work: Path) -> subprocess.CompletedProcess:
    """OpenDKIM's verdict on ``message`` against the published test key."""
    return opendkim_verdict(tool, message, {f"aimx._domainkey.{DOMAIN}": [["TXT", KEY.txt_record]]},
                            work)


# -- delivery through the daemon -----------------------------------------------------------


def test_send_delivers_signed_markdown_with_attachments(daemon, dns, hosts, users, shared,
                                                        opendkim, tmp_path):
    alice = users["alice"]
    binary = bytes(range(256)) * 37 + b"\r\n.\r\n\x00end"
    files = shared / "files"
    files.mkdir(exist_ok=True)
    (files / "data.bin").write_bytes(binary)
    (files / "notes é.txt").write_text("non-ASCII name ✓\n")
    body = ("# Weekly report\n\nAll **good**.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
            "- [x] shipped\n\n.a line starting with a dot\n")
    route(dns, "ok.test", (10, hosts.addresses[0]))
    with hosts.sink(0) as sink:
        result = send(alice, daemon, "Bob <bob@ok.test>", "Report 1", "--attachment",
                      str(files / "data.bin"), "--attachment", str(files / "notes é.txt"),
                      body=body)
        assert result.returncode == 0, result.stderr + daemon.log_text()[-3000:]
        message_id = result.stdout.strip()
        assert MESSAGE_ID.fullmatch(message_id) and result.stdout == message_id + "\n"
        assert result.stderr == f"Email sent.\nMessage-ID: {message_id}\n"

        [raw] = sink.messages()
        [stored] = sink.events("stored")
    assert stored["tls"] is True  # opportunistic STARTTLS was used
    assert stored["mail_from"] == f"alice@{DOMAIN}" and stored["rcpts"] == ["bob@ok.test"]

    # DKIM, as a receiving server checks it.
    assert raw.startswith(b"DKIM-Signature:")
    assert dkim.verify(raw, dnsfunc=published_txt(dns))
    assert not dkim.verify(raw.replace(b"Weekly report", b"Weekly rep0rt"),
                           dnsfunc=published_txt(dns))
    if opendkim:
        verdict = opendkim_verifies(opendkim, raw, tmp_path / "opendkim")
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr

    # Structure: mixed ⊃ (alternative: text, html), attachments byte for byte.
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Message-ID"] == message_id
    assert msg.get_content_type() == "multipart/mixed"
    alternative, *attachments = msg.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    text, html = alternative.iter_parts()
    assert text.get_content_type() == "text/plain" and html.get_content_type() == "text/html"
    assert "# Weekly report" in text.get_content()
    assert "Sent from AIMX." in text.get_content()
    markup = html.get_content()
    assert re.search(r"<h1[^>]*" + re.escape(H1_STYLE) + r">.*Weekly report</h1>", markup)
    assert TD_STYLE in markup and "<table" in markup and 'checked=""' in markup
    assert "<style" not in markup
    assert [(part.get_filename(), part.get_payload(decode=True)) for part in attachments] == [
        ("data.bin", binary), ("notes é.txt", "non-ASCII name ✓\n".encode())]

    # The sent copy: the source the agent wrote, owned by alice, marked delivered.
    copies = [p for p in sent_copies(daemon) if "report-1" in p.name]
    assert len(copies) == 1
    copy = copies[0]
    info = copy.stat()
    assert (info.st_uid, info.st_mode & 0o777) == (alice.uid, 0o600)
    fields = frontmatter.parse(copy.read_bytes())
    assert fields["delivery_status"] == "delivered" and "delivered_at" in fields
    assert fields["outbound"] is True and fields["outbound_format"] == "markdown"
    assert fields["message_id"] == message_id.strip("<>")
    assert [a["filename"] for a in fields["attachments"]] == ["data.bin", "notes é.txt"]
    assert "# Weekly report" in copy.read_text()

    hook = hook_record(shared, "Report 1")
    assert hook["status"] == "delivered" and hook["filepath"] == str(copy)
    assert hook["message_id"].strip("<>") == message_id.strip("<>")


def test_text_only_and_html_body_reach_the_recipient(daemon, dns, hosts, users):
    route(dns, "ok.test", (10, hosts.addresses[0]))
    with hosts.sink(0) as sink:
        plain = send(users["alice"], daemon, "bob@ok.test", "Plain", "--text-only",
                     body="just text")
        html = send(users["alice"], daemon, "bob@ok.test", "Html", "--html-body",
                    "<h1>Made by hand</h1>", body="fallback text")
        assert plain.returncode == 0 and html.returncode == 0, plain.stderr + html.stderr
        first, second = (email.message_from_bytes(raw, policy=email.policy.default)
                         for raw in sink.messages())
    assert first.get_content_type() == "text/plain"
    assert first.get_content().startswith("just text")
    text, markup = second.iter_parts()
    assert markup.get_content().strip() == "<h1>Made by hand</h1>"
    assert text.get_content().startswith("fallback text")


def test_rejected_send_keeps_a_failed_copy(daemon, dns, hosts, users, shared):
    route(dns, "reject.test", (10, hosts.addresses[1]))
    with hosts.sink(1, "reject", reply_at="data"):
        result = send(users["alice"], daemon, "bob@reject.test", "Refused mail")
    detail = "Rejected by mx0.reject.test: 550 5.7.1 Message content rejected by the test sink"
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"Error: [DELIVERY] {detail}\n"
    [copy] = [p for p in sent_copies(daemon) if "refused-mail" in p.name]
    fields = frontmatter.parse(copy.read_bytes())
    assert fields["delivery_status"] == "failed" and fields["delivery_details"] == detail
    assert "delivered_at" not in fields
    hook = hook_record(shared, "Refused mail")
    assert hook["status"] == "failed" and hook["filepath"] == str(copy)


def test_deferred_send_keeps_no_copy(daemon, dns, hosts, users, shared):
    route(dns, "later.test", (10, hosts.addresses[1]))
    with hosts.sink(1, "defer"):
        result = send(users["alice"], daemon, "bob@later.test", "Try later")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: [TEMP] All MX servers for later.test unreachable: "
                                    "mx0.later.test: 451 4.7.1 <bob@later.test>: greylisted")
    assert not [p for p in sent_copies(daemon) if "try-later" in p.name]
    hook = hook_record(shared, "Try later")
    assert hook["status"] == "deferred" and hook["filepath"] == ""
    assert MESSAGE_ID.fullmatch(hook["message_id"])


def test_null_mx_fails_with_a_copy(daemon, dns, users):
    dns.records["void.test"] = [["MX", "0 ."]]
    dns.reload()
    result = send(users["alice"], daemon, "bob@void.test", "Nowhere")
    assert result.returncode == 1
    assert result.stderr == "Error: [DELIVERY] Domain void.test does not accept mail (null MX)\n"
    [copy] = [p for p in sent_copies(daemon) if "nowhere" in p.name]
    assert frontmatter.parse(copy.read_bytes())["delivery_status"] == "failed"


def test_mx_preference_and_failover(daemon, dns, hosts, users):
    # Preference 10 (second record) is tried first; its 451 moves on to preference 20.
    route(dns, "two.test", (20, hosts.addresses[1]), (10, hosts.addresses[0]))
    with hosts.sink(0, "defer") as preferred, hosts.sink(1) as backup:
        result = send(users["alice"], daemon, "bob@two.test", "Failover")
        assert result.returncode == 0, result.stderr
        assert len(preferred.events("connect")) == 1 and preferred.messages() == []
        assert len(backup.messages()) == 1
        assert preferred.events("connect")[0]["time"] < backup.events("connect")[0]["time"]


def test_broken_starttls_is_retried_in_plaintext(daemon, dns, hosts, users):
    route(dns, "oldtls.test", (10, hosts.addresses[0]))
    with hosts.sink(0, "break-tls") as sink:
        result = send(users["alice"], daemon, "bob@oldtls.test", "Plaintext please")
        assert result.returncode == 0, result.stderr
        assert len(sink.events("starttls")) == 1
        [stored] = sink.events("stored")
        assert stored["tls"] is False and stored["session"] == 2
        assert dkim.verify(sink.messages()[0], dnsfunc=published_txt(dns))


def test_silent_mx_is_abandoned_while_the_daemon_keeps_serving(daemon, dns, hosts, users):
    route(dns, "silent.test", (10, hosts.addresses[0]))
    with hosts.sink(0, "silent") as sink:
        started = time.monotonic()
        pending = aimx(users["alice"], daemon, "send", "--from", f"alice@{DOMAIN}", "--to",
                       "bob@silent.test", "--subject", "Into the void", "--body", "x",
                       wait=False)
        try:
            sink.wait_for("connect")
            asked = time.monotonic()
            rows = Client(daemon.socket_path, timeout=10).call(MailboxList)["rows"]
            assert time.monotonic() - asked < 1.0 and rows
            out, err = pending.communicate(timeout=30)
        finally:
            if pending.poll() is None:
                pending.kill()
                pending.communicate()
    elapsed = time.monotonic() - started
    assert pending.returncode == 1
    assert err == ("Error: [TEMP] All MX servers for silent.test unreachable: mx0.silent.test: "
                   f"connection timed out (no reply within {CLIENT_TIMEOUT_SECS}s)\n")
    assert CLIENT_TIMEOUT_SECS <= elapsed < CLIENT_TIMEOUT_SECS + 6


# -- who may send ------------------------------------------------------------------------


def test_only_the_owner_sends_and_never_from_catchall_or_foreign_domains(daemon, dns, hosts,
                                                                         users):
    route(dns, "ok.test", (10, hosts.addresses[0]))
    with hosts.sink(0) as sink:
        stranger = send(users["bob"], daemon, "x@ok.test", "Not mine")
        catchall = send(users["alice"], daemon, "x@ok.test", "Catchall",
                        sender=f"anyone@{DOMAIN}")
        foreign = send(users["alice"], daemon, "x@ok.test", "Foreign",
                       sender="alice@elsewhere.test")
        own = send(users["bob"], daemon, "x@ok.test", "Bob's own", sender=f"bob@{DOMAIN}")
        assert own.returncode == 0, own.stderr
        assert len(sink.messages()) == 1  # only bob's own mail left the host
    assert (stranger.returncode, stranger.stderr) == (  # as if alice's mailbox did not exist
        1, f"Error: [MAILBOX] no mailbox matches From: alice@{DOMAIN} (run `aimx mailboxes "
           "create <name>` to register one; catchall is inbound-only)\n")
    assert (catchall.returncode, catchall.stderr) == (
        1, f"Error: [MAILBOX] no mailbox matches From: anyone@{DOMAIN} (run `aimx mailboxes "
           "create <name>` to register one; catchall is inbound-only)\n")
    assert (foreign.returncode, foreign.stderr) == (
        1, f"Error: [DOMAIN] sender domain 'elsewhere.test' does not match aimx domain "
           f"'{DOMAIN}'\n")
    assert not [p for p in sent_copies(daemon) if "not-mine" in p.name]


def test_root_is_refused_before_anything_else(tmp_path):
    argv = ("send", "--from", f"alice@{DOMAIN}", "--to", "b@ok.test", "--subject", "s",
            "--body", "b", "--attachment", "/does/not/exist")
    through_sudo = aimx(None, None, *argv, runtime_dir=tmp_path, sudo_user="alice")
    assert (through_sudo.returncode, through_sudo.stdout) == (2, "")
    assert through_sudo.stderr == "Error: send is a per-user operation, run without sudo\n"
    # Someone logged in as root did not use sudo: the refusal says what to do instead.
    root_login = aimx(None, None, *argv, runtime_dir=tmp_path)
    assert (root_login.returncode, root_login.stdout) == (2, "")
    assert root_login.stderr == (
        "Error: send is a per-user operation, run without sudo\n"
        "hint: you are logged in as root; run aimx send as the user who owns the mailbox you "
        "send from (root cannot own one)\n")


def test_client_side_errors_and_missing_daemon(users, shared):
    alice = users["alice"]
    nowhere = shared / "no-daemon"  # traversable by alice, and no socket in it
    nowhere.mkdir(exist_ok=True)
    base = ("send", "--from", f"alice@{DOMAIN}", "--to", "b@ok.test", "--subject", "s",
            "--body", "b")
    both = aimx(alice, None, *base, "--text-only", "--html-body", "<p>x</p>",
                runtime_dir=nowhere)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    missing = aimx(alice, None, *base, "--attachment", "/does/not/exist", runtime_dir=nowhere)
    assert (missing.returncode, missing.stderr) == (
        1, "Error: Attachment file not found: /does/not/exist\n")
    injected = aimx(alice, None, "send", "--from", f"alice@{DOMAIN}", "--to", "b@ok.test",
                    "--subject", "s\r\nBcc: x@y.test", "--body", "b", runtime_dir=nowhere)
    assert (injected.returncode, injected.stderr) == (
        1, "Error: Header 'Subject' contains CRLF characters. Possible header injection\n")
    down = aimx(alice, None, *base, runtime_dir=nowhere)
    assert (down.returncode, down.stdout) == (2, "")
    assert down.stderr == "Error: aimx daemon not running. Check 'systemctl status aimx'\n"


def _box(**pairs: bytes) -> bytes:
    """An AMP box on the wire: length-prefixed keys and values, then an empty key."""
    out = b"".join(struct.pack("!H", len(k)) + k.encode() + struct.pack("!H", len(v)) + v
                   for k, v in pairs.items())
    return out + b"\x00\x00"


def _fake_daemon(path: Path, replies: list[bytes]) -> threading.Thread:
    """A socket that reads each request and answers the next canned reply."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o777)
    server.listen(len(replies))

    def serve() -> None:
        with server:
            for reply in replies:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(10)
                    conn.recv(65536)
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_unreadable_replies_exit_3_and_a_refused_socket_exits_2(users, shared):
    alice = users["alice"]
    base = ("send", "--from", f"alice@{DOMAIN}", "--to", "b@ok.test", "--subject", "s",
            "--body", "b")
    runtime = shared / "fake-daemon"
    runtime.mkdir(exist_ok=True)
    sock = runtime / "aimx.sock"
    sock.unlink(missing_ok=True)
    server = _fake_daemon(sock, [
        _box(_answer=b"1"),  # an answer without the message_id field
        _box(_error=b"1", _error_code=b"WHATEVER", _error_description=b"no idea"),
        _box(_answer=b"99", message_id=b"<x@aimx.test>"),  # answers another request
    ])
    answers = [aimx(alice, None, *base, runtime_dir=runtime) for _ in range(3)]
    server.join(10)
    for result in answers:
        assert result.returncode == 3, result.stderr
        assert result.stderr.startswith("Error: malformed response from aimx daemon: ")
    assert "unknown error code 'WHATEVER'" in answers[1].stderr

    sock.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:  # bound, never listening
        stale.bind(str(sock))
        sock.chmod(0o777)
        refused = aimx(alice, None, *base, runtime_dir=runtime)
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"Error: Failed to connect to aimx daemon at {sock}: ")
    assert "Connection refused" in refused.stderr


# -- one sender identity ----------------------------------------------------------------------


def _header_lines(signed: bytes) -> tuple[list[bytes], bytes]:
    head, body = signed.split(b"\r\n\r\n", 1)
    return head.split(b"\r\n"), body


def _joined(lines: list[bytes], body: bytes) -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def test_a_second_from_never_gets_another_owners_signature(dns, users, tmp_path):
    """alice hands SEND a message whose second From is bob's (also a list, and a group).

    Before the fix the daemon authorized the first From, dkimpy signed the last, and the
    message with alice's From deleted verified as bob's. Now nothing is signed, and a From
    slipped in after signing breaks alice's own signatures."""
    drop = tmp_path / "drop.eml"
    config = {"domain": DOMAIN, "dns_resolvers": [dns.address], "mailboxes": {
        "alice": {"address": f"alice@{DOMAIN}", "owner": users["alice"].name},
        "bob": {"address": f"bob@{DOMAIN}", "owner": users["bob"].name}}}
    rest = "To: victim@nxdomain.test\r\nSubject: Pay the invoice\r\n\r\nPlease pay.\r\n"
    forged = {
        f"From: alice@{DOMAIN}\r\nFrom: bob@{DOMAIN}\r\n":
            "duplicate header: From appears 2 times (a message may have only one)",
        f"From: alice@{DOMAIN}, bob@{DOMAIN}\r\n":
            f"From: must name exactly one mailbox, not 2: alice@{DOMAIN}, bob@{DOMAIN}",
        f"From: Staff: alice@{DOMAIN}, bob@{DOMAIN};\r\n":
            f"From: must be a single mailbox, not a group: Staff: alice@{DOMAIN}, "
            f"bob@{DOMAIN};",
    }
    lookup = published_txt(dns)
    with RunningDaemon(config, dkim_key_pem=KEY.private_pem,
                       env={"AIMX_TEST_MAIL_DROP": str(drop)}) as d:
        for head, reason in forged.items():
            assert raw_send(users["alice"], d, head + rest) == {"error": ["MALFORMED", reason]}
        assert not drop.exists()  # nothing was signed, nothing left the host
        assert stored_emails(d.data_dir, "alice", "sent") == []

        assert "ok" in raw_send(users["alice"], d, f"From: alice@{DOMAIN}\r\n" + rest)
        signed = drop.read_bytes()[len(b"----- AIMX TEST DROP -----\n"):-1]
    assert dkim.verify(signed, dnsfunc=lookup)
    lines, body = _header_lines(signed)
    own = lines.index(f"From: alice@{DOMAIN}".encode())
    two_froms = [*lines[:own + 1], f"From: bob@{DOMAIN}".encode(), *lines[own + 1:]]
    assert not dkim.verify(_joined(two_froms, body), dnsfunc=lookup)
    del two_froms[own]  # the finding's last step: delete the first From
    assert not dkim.verify(_joined(two_froms, body), dnsfunc=lookup)
    with_reply_to = [*lines, b"Reply-To: thief@evil.test"]
    assert not dkim.verify(_joined(with_reply_to, body), dnsfunc=lookup)


# -- the test mail drop (spec 30 §2.12) -------------------------------------------------------


def test_mail_drop_replaces_delivery_but_nothing_else(dns, users, shared, tmp_path):
    drop = tmp_path / "outbox" / "drop.eml"
    config = {"domain": DOMAIN, "dns_resolvers": [dns.address], "mailboxes": {
        "alice": {"address": f"alice@{DOMAIN}", "owner": users["alice"].name, "hooks": [
            {"event": "after_send", "cmd": ["/bin/sh", "-c", HOOK.format(
                log=shared / "after_send.log")]}]}}}
    with RunningDaemon(config, dkim_key_pem=KEY.private_pem,
                       env={"AIMX_TEST_MAIL_DROP": str(drop)}) as d:
        # The recipient domain does not exist: nothing may be looked up or dialled.
        ok = send(users["alice"], d, "bob@nxdomain.test", "Dropped")
        assert ok.returncode == 0, ok.stderr
        data = drop.read_bytes()
        assert data.startswith(b"----- AIMX TEST DROP -----\nDKIM-Signature:")
        assert data.endswith(b"\n")
        signed = data[len(b"----- AIMX TEST DROP -----\n"):-1]
        assert dkim.verify(signed, dnsfunc=published_txt(dns))
        [copy] = stored_emails(d.data_dir, "alice", "sent")
        assert frontmatter.parse(copy.read_bytes())["delivery_status"] == "delivered"
        hook = hook_record(shared, "Dropped")
        assert hook["status"] == "delivered" and hook["filepath"] == str(copy)

        shutil.rmtree(drop.parent)
        drop.parent.write_text("a file where the drop directory should be")
        broken = send(users["alice"], d, "bob@nxdomain.test", "Not dropped")
        assert broken.returncode == 1 and broken.stderr.startswith("Error: [TEMP] test mail drop")
        assert len(stored_emails(d.data_dir, "alice", "sent")) == 1


# -- what a receiver accepts: valid recipients, folded headers ----------------------------------


@pytest.mark.parametrize(("to", "why"), [
    ("a@@b.com", "an address has exactly one @"),
    ("dana@", "there is nothing after the @"),
    ("@example.com", "there is nothing before the @"),
    ("dana@example..com", "a host name cannot have an empty label"),
    ("dana@-bad-.com", "label '-bad-' starts or ends with a hyphen"),
])
def test_a_malformed_recipient_is_refused_by_name(users, shared, to, why):
    nowhere = shared / "no-daemon"  # refused before the daemon is asked
    nowhere.mkdir(exist_ok=True)
    refused = aimx(users["alice"], None, "send", "--from", f"alice@{DOMAIN}", "--to", to,
                   "--subject", "s", "--body", "b", runtime_dir=nowhere)
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr.startswith(f"Error: Invalid recipient address '{to}': {why}")


def test_a_long_subject_goes_out_folded_and_a_giant_word_is_refused(dns, users, tmp_path):
    drop = tmp_path / "drop.eml"
    config = {"domain": DOMAIN, "dns_resolvers": [dns.address], "mailboxes": {
        "alice": {"address": f"alice@{DOMAIN}", "owner": users["alice"].name}}}
    subject = " ".join(["lorem", "ipsum", "dolor", "sit", "amet"] * 350)  # ~10,000 chars
    with RunningDaemon(config, dkim_key_pem=KEY.private_pem,
                       env={"AIMX_TEST_MAIL_DROP": str(drop)}) as d:
        sent = send(users["alice"], d, "bob@nxdomain.test", subject)
        assert sent.returncode == 0, sent.stderr
        signed = drop.read_bytes()[len(b"----- AIMX TEST DROP -----\n"):-1]
        head = signed.split(b"\r\n\r\n", 1)[0]
        assert max(len(line) for line in head.split(b"\r\n")) <= 78
        received = email.message_from_bytes(signed, policy=email.policy.default)
        assert received["Subject"] == subject
        assert dkim.verify(signed, dnsfunc=published_txt(dns))
        [copy] = stored_emails(d.data_dir, "alice", "sent")
        assert frontmatter.parse(copy.read_bytes())["subject"] == subject

        giant = send(users["alice"], d, "bob@nxdomain.test", "see " + "x" * 1200)
        assert (giant.returncode, giant.stdout) == (1, "")
        assert giant.stderr == ("Error: Header 'Subject' has a word longer than 998 characters, "
                                "which cannot be folded into a valid line; shorten it\n")
        assert len(stored_emails(d.data_dir, "alice", "sent")) == 1
