"""Interop on real port 25: two aimx instances and a Postfix, real DNS records, real users.

Instance A (``alpha.example.com``) listens on 127.0.0.2:25 and instance B
(``beta.example.net``) on 127.0.0.3:25, each with its own config, data and
runtime dirs; outbound mail leaves from each instance's own address (D25).
A twisted.names server holds MX, A, SPF, DKIM and DMARC records for both,
and for ``gamma.example.org``, served by Postfix (the Debian package) on
127.0.0.4:25. The two aimx domains have different organisational domains,
so nothing passes DMARC by accident of alignment.

Root only (port 25, real users, Postfix); skipped with a reason otherwise
or when Postfix cannot be installed.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import time
from pathlib import Path

import pytest

from aimx.mail import frontmatter
from tests.support import users
from tests.support.daemon import RunningDaemon, stored_emails
from tests.support.dkimkeys import shared_key
from tests.support.dnsserver import DnsServer
from tests.support.locks import HostLock
from tests.support.postfix import DnsRelay, Postfix, ensure_installed, opendkim_verify

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: binds port 25 and runs as real users")

A_DOMAIN, A_ADDR = "alpha.example.com", "127.0.0.2"
B_DOMAIN, B_ADDR = "beta.example.net", "127.0.0.3"
P_DOMAIN, P_ADDR = "gamma.example.org", "127.0.0.4"
RELAY_ADDR = "127.0.0.5"  # port 53 here forwards to the test DNS server (opendkim)
SELECTOR = "aimx"


class BoundDaemon(RunningDaemon):
    """``aimx serve --bind <address>:25``: one instance of several on the host."""

    def __init__(self, config: dict, *, address: str, **kwargs: object) -> None:
        self.address = address
        super().__init__(config, **kwargs)  # type: ignore[arg-type]

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--bind") + 1] = f"{self.address}:25"
        return cmd

    def _accepts_tcp(self) -> bool:
        try:
            with socket.create_connection((self.address, 25), timeout=1) as sock:
                sock.settimeout(2)
                sock.recv(512)
                sock.sendall(b"QUIT\r\n")
            return True
        except OSError:
            return False


def port_25_free(address: str) -> bool:
    with socket.socket() as sock:
        # SO_REUSEADDR as the daemons use it: TIME_WAIT leftovers do not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, 25))
        except OSError:
            return False
    return True


def zone_records() -> dict[str, list[list[str]]]:
    records: dict[str, list[list[str]]] = {}
    for domain, address in ((A_DOMAIN, A_ADDR), (B_DOMAIN, B_ADDR), (P_DOMAIN, P_ADDR)):
        records[domain] = [["MX", f"10 mx.{domain}"], ["A", address],
                           ["TXT", f"v=spf1 ip4:{address} -all"]]
        records[f"mx.{domain}"] = [["A", address]]
        records[f"_dmarc.{domain}"] = [["TXT", "v=DMARC1; p=reject; adkim=r; aspf=r"]]
    records[f"{SELECTOR}._domainkey.{A_DOMAIN}"] = [["TXT", shared_key("interop-a").txt_record]]
    records[f"{SELECTOR}._domainkey.{B_DOMAIN}"] = [["TXT", shared_key("interop-b").txt_record]]
    return records


@pytest.fixture(scope="module")
def world(test_users: dict[str, users.LinuxUser], tmp_path_factory: pytest.TempPathFactory):
    """DNS, instance A (alice) and instance B (bob, with an on_receive hook)."""
    marks = tmp_path_factory.mktemp("interop-marks")
    marks.chmod(0o777)
    # Other test runs on this host use the same fixed addresses: one at a time.
    with HostLock("interop-127.0.0.2-5"):
        yield from _world(test_users, marks)


def _world(test_users: dict[str, users.LinuxUser], marks: Path):
    for address in (A_ADDR, B_ADDR):
        if not port_25_free(address):
            pytest.skip(f"port 25 on {address} is taken by something else")
    alice, bob = test_users["alice"], test_users["bob"]
    hook = {"event": "on_receive", "cmd": [
        "/bin/sh", "-c", f'cat >/dev/null; echo "$(id -u) $AIMX_MESSAGE_ID" >> {marks}/bob'],
        "name": "interop-marker"}
    with DnsServer(zone_records()) as dns:
        config_a = {"domain": A_DOMAIN, "dns_resolvers": [dns.address], "trust": "verified",
                    "trusted_senders": [f"*@{B_DOMAIN}"], "signature": "", "mailboxes": {
                        "alice": {"address": f"alice@{A_DOMAIN}", "owner": alice.name}}}
        config_b = {"domain": B_DOMAIN, "dns_resolvers": [dns.address], "trust": "verified",
                    "trusted_senders": [f"*@{A_DOMAIN}"], "signature": "", "mailboxes": {
                        "bob": {"address": f"bob@{B_DOMAIN}", "owner": bob.name,
                                "hooks": [hook]}}}
        with BoundDaemon(config_a, address=A_ADDR,
                         dkim_key_pem=shared_key("interop-a").private_pem) as a, \
                BoundDaemon(config_b, address=B_ADDR,
                            dkim_key_pem=shared_key("interop-b").private_pem) as b:
            yield {"dns": dns, "a": a, "b": b, "alice": alice, "bob": bob, "marks": marks}
            for daemon in (a, b):
                assert "Traceback" not in daemon.log_text(), daemon.log_text()[-4000:]


def aimx_send(daemon: RunningDaemon, user: users.LinuxUser, *args: str) -> str:
    """``aimx send ...`` as ``user`` against ``daemon``; returns the Message-ID it prints."""
    done = users.run_aimx_as(user, ["send", *args], user.env(daemon.client_env()))
    assert done.returncode == 0, (done.stdout, done.stderr, daemon.log_text()[-3000:])
    return done.stdout.strip()


def wait_for_email(daemon: RunningDaemon, mailbox: str, subject: str,
                   timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for path in stored_emails(daemon.data_dir, mailbox):
            fields = frontmatter.parse(path.read_bytes())
            if fields.get("subject") == subject:
                return fields
        if time.monotonic() > deadline:
            raise AssertionError(f"no {subject!r} in {mailbox}:\n{daemon.log_text()[-4000:]}")
        time.sleep(0.1)


def bare(message_id: str) -> str:
    return message_id.strip().strip("<>")


def test_a_to_b_and_reply_authenticate_trust_thread_and_fire_bobs_hook(world) -> None:
    a, b, alice, bob = world["a"], world["b"], world["alice"], world["bob"]
    first_id = aimx_send(a, alice, "--from", f"alice@{A_DOMAIN}", "--to", f"bob@{B_DOMAIN}",
                         "--subject", "Interop hello", "--body", "Hello **Bob**, over port 25.")
    at_b = wait_for_email(b, "bob", "Interop hello")
    assert (at_b["dkim"], at_b["spf"], at_b["dmarc"]) == ("pass", "pass", "pass"), at_b
    assert at_b["trusted"] == "true"
    assert at_b["received_from_ip"] == A_ADDR  # A sent from its own address (D25)
    assert at_b["message_id"] == bare(first_id)

    reply_id = aimx_send(b, bob, "--from", f"bob@{B_DOMAIN}", "--to", f"alice@{A_DOMAIN}",
                         "--subject", "Re: Interop hello", "--body", "Hello Alice.",
                         "--reply-to", first_id)
    at_a = wait_for_email(a, "alice", "Re: Interop hello")
    assert (at_a["dkim"], at_a["spf"], at_a["dmarc"]) == ("pass", "pass", "pass"), at_a
    assert at_a["trusted"] == "true"
    assert at_a["received_from_ip"] == B_ADDR
    assert at_a["message_id"] == bare(reply_id)
    assert at_a["in_reply_to"] == bare(first_id)
    assert at_a["thread_id"] == at_b["thread_id"]
    sent = [frontmatter.parse(p.read_bytes()) for p in stored_emails(a.data_dir, "alice", "sent")]
    assert at_b["thread_id"] in {s["thread_id"] for s in sent}

    marker = world["marks"] / "bob"
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = marker.read_text().split("\n") if marker.exists() else []
    assert f"{bob.uid} {bare(first_id)}" in lines, (lines, b.log_text()[-3000:])


def test_unsigned_mail_from_a_forged_instance_domain_is_not_trusted(world) -> None:
    """Someone on neither address claiming alpha's domain: SPF fails, nothing is trusted."""
    b = world["b"]
    raw = (f"From: alice@{A_DOMAIN}\r\nTo: bob@{B_DOMAIN}\r\nSubject: forged alpha\r\n"
           f"Message-ID: <forged.{time.time_ns()}@{A_DOMAIN}>\r\n"
           "Date: Mon, 02 Jun 2025 12:00:00 +0000\r\n\r\nsend me the keys\r\n").encode()
    with smtplib.SMTP(B_ADDR, 25, source_address=("127.0.0.1", 0), timeout=30) as client:
        client.ehlo(f"mx.{A_DOMAIN}")
        client.sendmail(f"alice@{A_DOMAIN}", [f"bob@{B_DOMAIN}"], raw)
    fields = wait_for_email(b, "bob", "forged alpha")
    assert (fields["dkim"], fields["spf"], fields["trusted"]) == ("none", "fail", "false")
    # Alpha publishes DMARC and nothing passed: a spoof, recorded as fail.
    assert fields["dmarc"] == "fail"


# -- Postfix ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postfix(world):
    reason = ensure_installed("postfix", "opendkim-tools")
    if reason:
        pytest.skip(reason)
    if not port_25_free(P_ADDR):
        pytest.skip(f"port 25 on {P_ADDR} is taken by something else")
    carol_owner = world["alice"]
    with Postfix(host=P_ADDR, port=25, domain=P_DOMAIN, users=("carol",),
                 transports={B_DOMAIN: B_ADDR, A_DOMAIN: A_ADDR},
                 uid=carol_owner.uid, gid=carol_owner.gid) as server:
        yield server


def test_aimx_to_postfix_lands_in_a_maildir_and_verifies_with_opendkim(world, postfix) -> None:
    a, alice = world["a"], world["alice"]
    subject = f"To Postfix {time.time_ns()}"
    aimx_send(a, alice, "--from", f"alice@{A_DOMAIN}", "--to", f"carol@{P_DOMAIN}",
              "--subject", subject, "--body", "# Hi Carol\n\nA *Markdown* note.")
    delivered = postfix.wait_for_message("carol", subject.encode())
    assert re.search(rb"^DKIM-Signature:.*d=" + A_DOMAIN.encode(), delivered,
                     re.M | re.S), delivered[:600]
    assert f"[{A_ADDR}]".encode() in delivered.split(b"\n\n", 1)[0]  # Received: from A's IP
    with DnsRelay(RELAY_ADDR, world["dns"].port):
        code, output = opendkim_verify(delivered, nameserver=RELAY_ADDR)
    assert (code, output) == (0, ""), output


def test_postfix_to_aimx_through_a_transport_map_is_stored(world, postfix) -> None:
    b = world["b"]
    subject = f"From Postfix {time.time_ns()}"
    raw = (f"From: Carol <carol@{P_DOMAIN}>\r\nTo: bob@{B_DOMAIN}\r\nSubject: {subject}\r\n"
           f"Message-ID: <pf.{time.time_ns()}@{P_DOMAIN}>\r\n"
           "Date: Mon, 02 Jun 2025 12:00:00 +0000\r\n\r\nRelayed by Postfix.\r\n").encode()
    with smtplib.SMTP(P_ADDR, 25, timeout=30) as client:
        client.sendmail(f"carol@{P_DOMAIN}", [f"bob@{B_DOMAIN}"], raw)
    fields = wait_for_email(b, "bob", subject, timeout=40)
    assert fields["received_from_ip"] == P_ADDR
    assert fields["spf"] == "pass"  # Postfix relays from 127.0.0.4, which gamma's SPF lists
    assert fields["dkim"] == "none"
    assert fields["trusted"] == "false"  # not allow-listed, and unsigned
