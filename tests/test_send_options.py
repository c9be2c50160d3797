"""Send options end to end: idempotency keys, Reply-To and Message-ID, Auto-Submitted.

A real daemon delivers to SMTP sinks on loopback port 25 found through a real DNS
server; the CLI and the MCP server run as real users; the hook-run test fires a
real ``on_receive`` hook whose script runs ``aimx send``. Needs root.
"""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest

from aimx.mail import frontmatter
from tests.support.daemon import RunningDaemon, stored_emails
from tests.support.dnsserver import DnsServer
from tests.support.smtpsink import LoopbackHosts, loopback_hosts_or_skip
from tests.support.users import call_api_as, ensure_user, run_aimx_as, system_python_path
from tests.test_mcp import fails, ok, with_mcp
from tests.test_send import (
    DOMAIN,
    KEY,
    aimx,
    opendkim,  # noqa: F401 (a fixture)
    opendkim_verifies,
    published_txt,
    raw_send,
    route,
    send,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: binds port 25 and runs as test users")

CLIENT_TIMEOUT_SECS = 2


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
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a hook running as a test user needs to run ``aimx`` with the system python3."""
    return system_python_path(tmp_path_factory.mktemp("shim"))


def hook_sender(shim: Path, runtime_dir: Path) -> list[str]:
    """An on_receive hook that answers with ``aimx send``. It drops AIMX_EVENT first, so
    only the daemon's own check can tell that the send comes from a hook run."""
    script = (f"unset AIMX_EVENT; cd / && AIMX_RUNTIME_DIR={runtime_dir} PYTHONPATH={shim} "
              f"exec /usr/bin/python3 -m aimx.cli.main send --from alice@{DOMAIN} "
              '--to bot@hooked.test --subject "Re: $AIMX_SUBJECT" --body "Got it."')
    return ["/bin/sh", "-c", script]


@pytest.fixture(scope="module")
def daemon(dns, users, shim) -> Iterator[RunningDaemon]:
    config = {
        "domain": DOMAIN,
        "dns_resolvers": [dns.address],
        "signature": "",
        "mailboxes": {
            "alice": {"address": f"alice@{DOMAIN}", "owner": users["alice"].name},
            "bob": {"address": f"bob@{DOMAIN}", "owner": users["bob"].name},
        },
    }
    env = {"AIMX_SMTP_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT_SECS),
           # Hooks as plain child processes, as on a host without systemd.
           "AIMX_SANDBOX_FORCE_FALLBACK": "1"}
    with RunningDaemon(config, dkim_key_pem=KEY.private_pem, env=env, start=False) as running:
        config["mailboxes"]["alice"]["hooks"] = [{
            "name": "answer", "event": "on_receive", "fire_on_untrusted": True,
            "cmd": hook_sender(shim, running.runtime_dir)}]
        running.write_config(config)
        running.start()
        yield running


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def sent_copy(d: RunningDaemon, slug: str) -> dict[str, Any]:
    [copy] = [p for p in stored_emails(d.data_dir, "alice", "sent") if slug in p.name]
    return frontmatter.parse(copy.read_bytes())


# -- idempotency keys -------------------------------------------------------------------------


def test_a_retried_send_reaches_the_mx_once_also_after_a_restart(daemon, dns, hosts, users):
    alice = users["alice"]
    route(dns, "once.test", (10, hosts.addresses[0]))
    with hosts.sink(0) as sink:
        first = send(alice, daemon, "dana@once.test", "Invoice 7", "--idempotency-key",
                     "invoice-7")
        again = send(alice, daemon, "dana@once.test", "Invoice 7", "--idempotency-key",
                     "invoice-7")
        assert first.returncode == 0, first.stderr + daemon.log_text()[-2000:]
        assert (again.returncode, again.stdout) == (0, first.stdout)
        daemon.restart()
        after_restart = send(alice, daemon, "dana@once.test", "Invoice 7",
                             "--idempotency-key", "invoice-7")
        assert (after_restart.returncode, after_restart.stdout) == (0, first.stdout)
        # Another user's identical key is another key.
        bobs = send(users["bob"], daemon, "dana@once.test", "Invoice 7", "--idempotency-key",
                    "invoice-7", sender=f"bob@{DOMAIN}")
        assert bobs.returncode == 0 and bobs.stdout != first.stdout
        # The sink is shared with this module's other tests: count this test's mail only.
        messages = [raw for raw in sink.messages() if parsed(raw)["Subject"] == "Invoice 7"]
    assert [parsed(raw)["Message-ID"] for raw in messages] == [
        first.stdout.strip(), bobs.stdout.strip()]
    assert len([p for p in stored_emails(daemon.data_dir, "alice", "sent")
                if "invoice-7" in p.name]) == 1
    assert f"send replayed: uid={alice.uid} idempotency key invoice-7" in daemon.log_text()

    store_dir = daemon.data_dir / ".aimx"
    store = store_dir / "send-keys.sqlite"
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
    assert (store.stat().st_uid, stat.S_IMODE(store.stat().st_mode)) == (0, 0o600)


def test_the_same_key_for_another_message_is_refused(daemon, dns, hosts, users):
    alice = users["alice"]
    route(dns, "once.test", (10, hosts.addresses[0]))
    with hosts.sink(0) as sink:
        first = send(alice, daemon, "dana@once.test", "Order 1", "--idempotency-key", "ord-1")
        other = send(alice, daemon, "dana@once.test", "Order 1", "--idempotency-key", "ord-1",
                     body="A different body.")
        assert first.returncode == 0, first.stderr
        # The sink is shared with this module's other tests: count this test's mail only.
        messages = [raw for raw in sink.messages() if parsed(raw)["Subject"] == "Order 1"]
    assert [parsed(raw)["Message-ID"] for raw in messages] == [first.stdout.strip()]
    assert (other.returncode, other.stdout) == (1, "")
    assert other.stderr == ("Error: [ECONFLICT] idempotency key 'ord-1' was already used "
                            "within 24 hours for a different message; use a new key for a "
                            "new message\n")
    bad = send(alice, daemon, "dana@once.test", "Order 2", "--idempotency-key", "two words")
    assert (bad.returncode, bad.stderr) == (
        1, "Error: Invalid idempotency key 'two words': use letters, digits and . _ : - "
           "only, starting with a letter or digit (a UUID works)\n")
    # The daemon checks the key itself, whatever the client did.
    raw = call_api_as(alice, daemon.socket_path, "SEND", {
        "body": f"From: alice@{DOMAIN}\r\nTo: dana@once.test\r\nSubject: s\r\n\r\nx\r\n"
                .encode(), "idempotency_key": "../../etc"}, daemon.client_env())
    assert raw == {"error": ["MALFORMED", 'invalid idempotency key "../../etc": use letters, '
                             "digits and . _ : - only, starting with a letter or digit "
                             "(a UUID works)"]}


def test_a_duplicate_in_flight_waits_and_a_temporary_failure_may_be_retried(daemon, dns,
                                                                            hosts, users):
    alice = users["alice"]
    route(dns, "slow.test", (10, hosts.addresses[1]))
    argv = ("send", "--from", f"alice@{DOMAIN}", "--to", "dana@slow.test", "--subject",
            "Slow one", "--body", "x", "--idempotency-key", "slow-1")
    with hosts.sink(1, "silent") as silent:
        first = aimx(alice, daemon, *argv, wait=False)
        silent.wait_for("connect")
        second = aimx(alice, daemon, *argv, wait=False)
        outputs = [proc.communicate(timeout=60) for proc in (first, second)]
        # The second request shared the first one's attempt: one connection, one answer.
        assert len(silent.events("connect")) == 1
    assert first.returncode == second.returncode == 1
    assert outputs[0] == outputs[1]
    assert outputs[0][1].startswith("Error: [TEMP] All MX servers for slow.test unreachable")
    with hosts.sink(1) as sink:  # nothing was delivered, so the key is free again
        retried = aimx(alice, daemon, *argv)
        assert retried.returncode == 0, retried.stderr
        assert len(sink.messages()) == 1


def test_a_permanent_failure_is_returned_again_without_a_second_attempt(daemon, dns, hosts,
                                                                       users):
    alice = users["alice"]
    route(dns, "nope.test", (10, hosts.addresses[1]))
    with hosts.sink(1, "reject", reply_at="rcpt") as sink:
        first = send(alice, daemon, "dana@nope.test", "Refused", "--idempotency-key", "ref-1")
        again = send(alice, daemon, "dana@nope.test", "Refused", "--idempotency-key", "ref-1")
        assert len(sink.events("connect")) == 1
    assert first.returncode == again.returncode == 1
    assert first.stderr == again.stderr
    assert first.stderr.startswith("Error: [DELIVERY] ")


def test_mcp_send_with_an_idempotency_key_sends_once(daemon, dns, hosts, users):
    route(dns, "once.test", (10, hosts.addresses[0]))

    async def body(session):
        args = {"from_mailbox": "alice", "to": "dana@once.test", "subject": "Via MCP",
                "body": "Once.", "idempotency_key": "mcp-1"}
        first = await ok(session, "email_send", **args)
        second = await ok(session, "email_send", **args)
        conflict = await fails(session, "email_send", **{**args, "body": "Twice?"})
        invalid = await fails(session, "email_send", **{**args, "idempotency_key": "x" * 129})
        return first, second, conflict, invalid

    with hosts.sink(0) as sink:
        first, second, conflict, invalid = with_mcp(daemon, users["alice"], body)
        assert len(sink.messages()) == 1
    assert first == second and first.startswith("Email sent to dana@once.test. Message-ID: <")
    assert conflict.startswith("[ECONFLICT] idempotency key 'mcp-1' was already used")
    assert invalid == (f"Invalid idempotency key '{'x' * 129}': it is longer than 128 "
                       "characters")


# -- Reply-To and Message-ID ------------------------------------------------------------------


def test_reply_to_and_message_id_are_signed_and_threading_follows_the_chosen_id(
        daemon, dns, hosts, users, opendkim, tmp_path):  # noqa: F811 (the fixture)
    alice = users["alice"]
    chosen = f"<order-4711-confirmation@{DOMAIN}>"
    route(dns, "partner.test", (10, hosts.addresses[0]))
    with hosts.sink(0) as sink:
        result = send(alice, daemon, "dana@partner.test", "Order 4711", "--reply-to-address",
                      "orders@partner.test", "--message-id", chosen)
        assert result.returncode == 0, result.stderr
        [raw] = sink.messages()
    assert result.stdout == chosen + "\n"
    message = parsed(raw)
    assert message["Message-ID"] == chosen and message["Reply-To"] == "orders@partner.test"
    signature = parsed(raw)["DKIM-Signature"]
    covered = [name.strip() for name in signature.split("h=", 1)[1].split(";")[0].split(":")]
    assert "reply-to" in covered and "message-id" in covered
    assert dkim.verify(raw, dnsfunc=published_txt(dns))
    if opendkim:
        verdict = opendkim_verifies(opendkim, raw, tmp_path / "opendkim")
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    tampered = raw.replace(b"Reply-To: orders@partner.test", b"Reply-To: thief@evil.test")
    assert not dkim.verify(tampered, dnsfunc=published_txt(dns))

    copy = sent_copy(daemon, "order-4711")
    assert copy["message_id"] == chosen.strip("<>")
    assert copy["reply_to"] == "orders@partner.test"
    # The partner answers the chosen id: the answer joins the sent message's thread.
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as smtp:
        smtp.sendmail("dana@partner.test", [f"alice@{DOMAIN}"],
                      f"From: dana@partner.test\r\nTo: alice@{DOMAIN}\r\n"
                      f"Subject: Re: Order 4711\r\nMessage-ID: <answer-4711@partner.test>\r\n"
                      f"In-Reply-To: {chosen}\r\nReferences: {chosen}\r\n\r\nThanks.\r\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answers = [p for p in stored_emails(daemon.data_dir, "alice") if "re-order-4711" in p.name]
        if answers:
            break
        time.sleep(0.1)
    [answer] = answers
    assert frontmatter.parse(answer.read_bytes())["thread_id"] == copy["thread_id"]


@pytest.mark.parametrize(("flag", "value", "error"), [
    ("--message-id", "<order-4712-confirmation@elsewhere.test>",
     "Error: Invalid Message-ID '<order-4712-confirmation@elsewhere.test>': it must end in "
     f"this server's domain ({DOMAIN}), not elsewhere.test\n"),
    ("--message-id", f"<abc@{DOMAIN}>",
     f"Error: Invalid Message-ID '<abc@{DOMAIN}>': the part before the @ is shorter than 8 "
     "characters; use something unique, such as a UUID\n"),
    ("--message-id", f"<order-4713-confirmation@{DOMAIN}>\r\nBcc: spy@evil.test",
     f"Error: Invalid Message-ID '<order-4713-confirmation@{DOMAIN}>\\r\\nBcc: "
     "spy@evil.test': it contains a line break\n"),
    ("--reply-to-address", "desk@partner.test\r\nBcc: spy@evil.test",
     "Error: Invalid Reply-To address 'desk@partner.test\\r\\nBcc: spy@evil.test': it "
     "contains a line break\n"),
    ("--reply-to-address", "desk@partner.test, spy@evil.test",
     "Error: Invalid Reply-To address 'desk@partner.test, spy@evil.test': give exactly one "
     "bare address, like desk@example.com\n"),
])
def test_invalid_reply_headers_are_refused_before_anything_is_sent(daemon, users, flag, value,
                                                                  error):
    result = send(users["alice"], daemon, "dana@partner.test", "Refused header", flag, value)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", error)


def test_the_daemon_refuses_a_foreign_message_id_and_a_second_reply_to(daemon, users):
    head = f"From: alice@{DOMAIN}\r\nTo: dana@partner.test\r\nSubject: raw\r\n"
    foreign = raw_send(users["alice"], daemon,
                       head + "Message-ID: <someone-else-123@victim.test>\r\n\r\nx\r\n")
    assert foreign == {"error": [
        "MALFORMED", "invalid Message-ID '<someone-else-123@victim.test>': it must end in this "
                     f"server's domain ({DOMAIN}), not victim.test"]}
    bare = raw_send(users["alice"], daemon,
                    head + f"Message-ID: bare-id-12345@{DOMAIN}\r\n\r\nx\r\n")
    assert bare == {"error": [
        "MALFORMED", f"invalid Message-ID 'bare-id-12345@{DOMAIN}': it must be enclosed in "
                     "angle brackets: <unique-part@domain>"]}
    two = raw_send(users["alice"], daemon,
                   head + "Reply-To: a@partner.test, b@partner.test\r\n\r\nx\r\n")
    assert two == {"error": ["MALFORMED",
                             "Reply-To: must name exactly one address: a@partner.test, "
                             "b@partner.test"]}
    assert not [p for p in stored_emails(daemon.data_dir, "alice", "sent") if "raw" in p.name]


# -- Auto-Submitted ---------------------------------------------------------------------------


def test_mail_sent_from_a_hook_run_is_auto_replied(daemon, dns, hosts, users):
    """The hook's script drops AIMX_EVENT: only the daemon's own check can mark it."""
    route(dns, "hooked.test", (10, hosts.addresses[0]))
    with hosts.sink(0) as sink:
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as smtp:
            smtp.sendmail("carol@partner.test", [f"alice@{DOMAIN}"],
                          f"From: carol@partner.test\r\nTo: alice@{DOMAIN}\r\n"
                          "Subject: ping 1\r\nMessage-ID: <ping-1@partner.test>\r\n\r\nhi\r\n")
        sink.wait_for("stored", timeout=30)
        [raw] = sink.messages()
    message = parsed(raw)
    assert message["Subject"] == "Re: ping 1"
    assert message["Auto-Submitted"] == "auto-replied"
    assert dkim.verify(raw, dnsfunc=published_txt(dns))
    assert not dkim.verify(raw.replace(b"Auto-Submitted: auto-replied\r\n", b""),
                           dnsfunc=published_txt(dns))
    assert sent_copy(daemon, "re-ping-1")["auto_submitted"] == "auto-replied"
    assert "hook_run=yes" in daemon.log_text()


def test_auto_flag_and_hook_marker_set_auto_submitted(daemon, dns, hosts, users):
    alice = users["alice"]
    route(dns, "partner.test", (10, hosts.addresses[0]))
    inside_hook = alice.env(daemon.client_env(
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NO_COLOR": "1",
         "AIMX_EVENT": "on_receive"}))
    with hosts.sink(0) as sink:
        plain = send(alice, daemon, "dana@partner.test", "By hand")
        auto = send(alice, daemon, "dana@partner.test", "Nightly report", "--auto")
        marked = run_aimx_as(alice, ["send", "--from", f"alice@{DOMAIN}", "--to",
                                     "dana@partner.test", "--subject", "Hook env", "--body",
                                     "x"], inside_hook)
        for result in (plain, auto, marked):
            assert result.returncode == 0, result.stderr
        raws = sink.messages()
    assert [parsed(raw)["Auto-Submitted"] for raw in raws] == [
        None, "auto-generated", "auto-replied"]
    assert all(dkim.verify(raw, dnsfunc=published_txt(dns)) for raw in raws)
