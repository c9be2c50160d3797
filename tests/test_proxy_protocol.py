"""PROXY protocol on the SMTP listener, against a running daemon over loopback TCP.

The daemon trusts 127.0.0.3 as its proxy; clients bound to 127.0.0.2 (or the
default 127.0.0.1) play untrusted hosts (Linux routes all of 127/8 to lo). The
DNS server publishes an SPF record that passes exactly one forwarded address, so the stored ``spf``
result shows which address SPF was evaluated for.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import socket
import ssl
import struct
import time

import pytest

from aimx.smtp.proxyproto import header_length, starts_like_header
from tests.support.daemon import RunningDaemon, SmtpWire, stored_emails
from tests.support.dnsserver import DnsServer
from tests.test_smtpserver import read_email

DOMAIN = "proxied.test"
SENDER_DOMAIN = "sender.example"
SPF_PASS_IP = "192.0.2.10"  # the one address the sender's SPF record allows
OTHER_IP = "198.51.100.7"
PROXY_IP = "127.0.0.3"
PROXY_REFUSED = "554 5.7.1 PROXY header not accepted from your address"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1_header(client: str, client_port: int = 40000) -> bytes:
    family = "TCP6" if ":" in client else "TCP4"
    server = "::1" if ":" in client else "127.0.0.1"
    return f"PROXY {family} {client} {server} {client_port} 25\r\n".encode()


def v2_header(client: str | None, client_port: int = 40000) -> bytes:
    """A PROXY v2 header built per the spec: signature, version 2 + command (PROXY, or
    LOCAL when ``client`` is None), family/transport, length, then the addresses."""
    if client is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    ip = ipaddress.ip_address(client)
    if ip.version == 4:
        family, server = 0x11, ipaddress.ip_address("127.0.0.1")  # AF_INET, STREAM
    else:
        family, server = 0x21, ipaddress.ip_address("::1")  # AF_INET6, STREAM
    body = ip.packed + server.packed + struct.pack("!HH", client_port, 25)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def message(subject: str) -> bytes:
    return (f"From: Bob <bob@{SENDER_DOMAIN}>\r\nTo: alice@{DOMAIN}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.time_ns()}.{subject}@{SENDER_DOMAIN}>\r\n"
            "Date: Mon, 02 Jun 2025 12:00:00 +0000\r\n\r\nHello.\r\n").encode()


def deliver(wire: SmtpWire, subject: str) -> str:
    """One transaction on an open session; returns the reply after DATA."""
    assert wire.cmd("EHLO relay.example").startswith("250-")
    assert wire.cmd(f"MAIL FROM:<bob@{SENDER_DOMAIN}>") == "250 2.0.0 OK"
    assert wire.cmd(f"RCPT TO:<alice@{DOMAIN}>") == "250 2.0.0 OK"
    assert wire.cmd("DATA").startswith("354 ")
    wire.send(message(subject) + b".\r\n")
    return wire.reply()


def proxied(daemon: RunningDaemon, header: bytes, *, source: str = PROXY_IP) -> SmtpWire:
    """A connection that sends ``header`` first, then reads the banner."""
    wire = SmtpWire(daemon.smtp_port, source=source, read_banner=False)
    wire.send(header)
    wire.banner = wire.reply()
    return wire


def stored_with(daemon: RunningDaemon, subject: str) -> dict:
    for path in stored_emails(daemon.data_dir, "alice"):
        fields, _ = read_email(path)
        if fields.get("subject") == subject:
            return fields
    raise AssertionError(f"no stored email with subject {subject!r}")


@pytest.fixture(scope="module")
def owner(request: pytest.FixtureRequest) -> str:
    if os.geteuid() == 0:
        return request.getfixturevalue("test_users")["alice"].name
    return pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(scope="module")
def spf_dns():
    records = {SENDER_DOMAIN: [["TXT", f"v=spf1 ip4:{SPF_PASS_IP} -all"]]}
    with DnsServer(records) as server:
        yield server


def _config(owner: str, dns: DnsServer, **extra: object) -> dict:
    return {"domain": DOMAIN, "dns_resolvers": [f"127.0.0.1:{dns.port}"], **extra,
            "mailboxes": {"alice": {"address": f"alice@{DOMAIN}", "owner": owner}}}


@pytest.fixture(scope="module")
def behind_proxy(owner: str, spf_dns: DnsServer):
    config = _config(owner, spf_dns, smtp_proxy_protocol=True,
                     smtp_trusted_proxies=[f"{PROXY_IP}/32", "::1"])
    with RunningDaemon(config, tls=True) as daemon:
        yield daemon


# -- framing (pure) -------------------------------------------------------------------


def test_header_framing_waits_for_split_headers_and_rejects_other_bytes() -> None:
    v1, v2 = v1_header(SPF_PASS_IP), v2_header(SPF_PASS_IP)
    assert [header_length(v1[:n]) for n in (1, 6, len(v1) - 1)] == [None, None, None]
    assert header_length(v1 + b"EHLO x\r\n") == len(v1)
    assert [header_length(v2[:n]) for n in (1, 12, 15)] == [None, None, None]
    assert header_length(v2[:16]) == len(v2)  # the length field is in: the end is known
    for junk in (b"EHLO x\r\n", b"PROXY" + b"x" * 200, b"\r\n\r\n\x00\r\nQUIZ"):
        with pytest.raises(ValueError):
            header_length(junk)
    assert (starts_like_header(b"PRO"), starts_like_header(b"PROXY "),
            starts_like_header(b"EHLO"), starts_like_header(V2_SIGNATURE)) == \
        (None, True, False, True)


# -- a trusted proxy -------------------------------------------------------------------


def test_v1_header_makes_spf_and_logs_use_the_forwarded_address(behind_proxy) -> None:
    with proxied(behind_proxy, v1_header(SPF_PASS_IP)) as wire:
        assert wire.banner == f"220 {DOMAIN} ESMTP aimx"
        assert deliver(wire, "via-v1") == "250 2.0.0 OK message accepted"
    fields = stored_with(behind_proxy, "via-v1")
    assert (fields["spf"], fields["received_from_ip"]) == ("pass", SPF_PASS_IP)
    log = behind_proxy.wait_for_log(rf"message peer={SPF_PASS_IP} ")
    assert f"proxied connection proxy={PROXY_IP} peer={SPF_PASS_IP} version=1" in log


def test_v2_header_makes_spf_fail_for_a_forwarded_address_it_does_not_allow(
        behind_proxy) -> None:
    with proxied(behind_proxy, v2_header(OTHER_IP)) as wire:
        assert deliver(wire, "via-v2") == "250 2.0.0 OK message accepted"
    fields = stored_with(behind_proxy, "via-v2")
    assert (fields["spf"], fields["received_from_ip"]) == ("fail", OTHER_IP)
    behind_proxy.wait_for_log(rf"message peer={OTHER_IP} .*rcpts=1 stored=1")


def test_v2_header_split_across_reads_and_ipv6_client(behind_proxy) -> None:
    header = v2_header("2001:db8::25")
    wire = SmtpWire(behind_proxy.smtp_port, source=PROXY_IP, read_banner=False)
    wire.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with wire:
        for byte in header:
            wire.send(bytes([byte]))
            time.sleep(0.002)
        assert wire.reply().startswith("220 ")
        assert deliver(wire, "via-v2-ipv6") == "250 2.0.0 OK message accepted"
    fields = stored_with(behind_proxy, "via-v2-ipv6")
    assert (fields["spf"], fields["received_from_ip"]) == ("fail", "2001:db8::25")


def test_starttls_through_the_proxy_keeps_the_forwarded_address(behind_proxy) -> None:
    with proxied(behind_proxy, v2_header(SPF_PASS_IP) + b"EHLO early.example\r\n") as wire:
        assert "250-STARTTLS" in wire.reply()  # pipelined right behind the header
        assert wire.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        wire.sock = context.wrap_socket(wire.sock, server_hostname=DOMAIN)
        assert deliver(wire, "via-v2-tls") == "250 2.0.0 OK message accepted"
    fields = stored_with(behind_proxy, "via-v2-tls")
    assert (fields["spf"], fields["received_from_ip"]) == ("pass", SPF_PASS_IP)
    behind_proxy.wait_for_log(rf"connection closed peer={SPF_PASS_IP} helo=relay.example "
                              r"tls=true")


def test_per_source_cap_counts_the_forwarded_address(behind_proxy) -> None:
    wires = [proxied(behind_proxy, v1_header("203.0.113.5", 41000 + n)) for n in range(20)]
    try:
        assert all(w.banner.startswith("220 ") for w in wires)
        extra = proxied(behind_proxy, v2_header("203.0.113.5"))
        assert extra.banner == \
            "421 4.7.0 Too many connections from your address, try again later"
        assert extra.eof()
        extra.close()
        # Same proxy, another client: the cap is per client, not per proxy.
        with proxied(behind_proxy, v2_header("203.0.113.6")) as other:
            assert other.banner.startswith("220 ")
    finally:
        for wire in wires:
            wire.close()


def test_local_command_uses_the_proxy_address(behind_proxy) -> None:
    with proxied(behind_proxy, v2_header(None)) as wire:
        assert wire.banner.startswith("220 ")
        assert deliver(wire, "via-local") == "250 2.0.0 OK message accepted"
    assert stored_with(behind_proxy, "via-local")["received_from_ip"] == PROXY_IP


def test_trusted_proxy_without_a_header_is_closed_and_logged(behind_proxy) -> None:
    with SmtpWire(behind_proxy.smtp_port, source=PROXY_IP, read_banner=False) as wire:
        wire.send(b"EHLO direct.example\r\n")
        assert wire.drain() == b""  # not even a banner: the proxy is misconfigured
    behind_proxy.wait_for_log(r"connection from trusted proxy closed proxy=127\.0\.0\.3: "
                              r"no PROXY header")
    with SmtpWire(behind_proxy.smtp_port, source=PROXY_IP, read_banner=False) as wire:
        wire.send(b"PROXY TCP4 not-an-address 127.0.0.1 1 25\r\n")
        assert wire.drain() == b""
    behind_proxy.wait_for_log(r"proxy=127\.0\.0\.3: malformed PROXY header")


# -- an untrusted client -------------------------------------------------------------


@pytest.mark.parametrize("header", [v1_header(SPF_PASS_IP), v2_header(SPF_PASS_IP)],
                         ids=["v1", "v2"])
def test_untrusted_address_sending_a_header_is_refused(behind_proxy, header: bytes) -> None:
    with SmtpWire(behind_proxy.smtp_port, source="127.0.0.2") as wire:
        assert wire.banner.startswith("220 ")
        wire.send(header)
        assert wire.reply() == PROXY_REFUSED
        assert wire.eof()
    behind_proxy.wait_for_log(r"PROXY header refused from untrusted peer=127\.0\.0\.2")


def test_untrusted_address_speaks_plain_smtp(behind_proxy) -> None:
    with SmtpWire(behind_proxy.smtp_port, source="127.0.0.2") as wire:
        assert deliver(wire, "direct-untrusted") == "250 2.0.0 OK message accepted"
    fields = stored_with(behind_proxy, "direct-untrusted")
    assert (fields["received_from_ip"], fields["spf"]) == ("127.0.0.2", "fail")


# -- deadlines and the option off -------------------------------------------------------


def test_a_proxy_that_never_sends_its_header_times_out(owner: str, spf_dns: DnsServer) -> None:
    config = _config(owner, spf_dns, smtp_proxy_protocol=True,
                     smtp_trusted_proxies=[PROXY_IP])
    with RunningDaemon(config, env={"AIMX_SMTP_IDLE_TIMEOUT": "1"}) as daemon:
        with SmtpWire(daemon.smtp_port, source=PROXY_IP, read_banner=False,
                      timeout=30) as wire:
            wire.send(b"PROXY TCP4 192.0.2.")  # a header that never ends
            assert wire.eof(timeout=30)
        daemon.wait_for_log(r"proxy=127\.0\.0\.3: no PROXY header in time")


def test_without_the_option_a_header_is_an_unrecognized_command(owner: str,
                                                                spf_dns: DnsServer) -> None:
    with RunningDaemon(_config(owner, spf_dns)) as daemon:
        with SmtpWire(daemon.smtp_port) as wire:
            assert wire.banner.startswith("220 ")
            assert wire.cmd(v1_header(SPF_PASS_IP)[:-2]) == "500 5.5.1 Unrecognized command"
            assert deliver(wire, "no-proxy") == "250 2.0.0 OK message accepted"
        assert stored_with(daemon, "no-proxy")["received_from_ip"] == "127.0.0.1"


def test_proxy_protocol_without_trusted_proxies_does_not_start(owner: str,
                                                               spf_dns: DnsServer) -> None:
    daemon = RunningDaemon(_config(owner, spf_dns, smtp_proxy_protocol=True), start=False)
    with daemon:
        daemon.start(wait=False)
        assert daemon.proc is not None
        assert daemon.proc.wait(30) == 1
        assert "smtp_proxy_protocol = true needs smtp_trusted_proxies" in daemon.log_text()


def test_connecting_address_family_is_checked_with_mapped_ipv4() -> None:
    from aimx.smtp.proxyproto import is_trusted_proxy

    entries = ("10.0.0.0/8", "::1")
    assert [is_trusted_proxy(host, entries) for host in
            ("10.1.2.3", "::ffff:10.1.2.3", "::1", "11.0.0.1", "fe80::1%eth0", "")] == \
        [True, True, True, False, False, False]
