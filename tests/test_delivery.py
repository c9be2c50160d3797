"""Outbound delivery against real SMTP servers and a real DNS server (spec 30 §2.10, D16, D17).

Each scenario runs ``aimx.smtp.delivery.deliver`` in a subprocess with its own
reactor (this module run as ``python -m tests.test_delivery <spec>``) and
prints the outcome. The MX hosts are SMTP sinks on loopback addresses such as
127.25.x.2 and 127.25.x.3; their MX/A records come from a twisted.names
server. As root the sinks listen on the real port 25; otherwise on one free
high port shared by all addresses, passed as the delivery port.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aimx.smtp import delivery
from tests.support.dnsserver import DnsServer
from tests.support.smtpsink import LoopbackHosts, loopback_hosts_or_skip

REPO = Path(__file__).resolve().parent.parent
SENDER = "alice@src.test"
MESSAGE = (b"From: alice@src.test\r\nTo: bob@dest.test\r\nSubject: hello\r\n\r\n"
           b"first line\r\n.starts with a dot\r\n..two dots\r\n.\r\nlast line\r\n")


# -- the driver (subprocess side) -----------------------------------------------------------


def _driver(spec_json: str) -> None:
    from twisted.internet import task

    from aimx.logs import setup_logging

    setup_logging(sys.stderr)
    spec = json.loads(spec_json)

    def main(reactor: Any) -> Any:
        started = time.monotonic()
        d = delivery.deliver(
            reactor, sender=spec.get("sender", SENDER), recipient=spec["recipient"],
            message=base64.b64decode(spec["message"]), helo_domain="src.test",
            resolvers=spec["resolvers"], enable_ipv6=spec.get("enable_ipv6", False),
            bind_address=spec.get("bind_address"), port=spec["port"],
            timeout=spec.get("timeout", 10))

        def report(outcome: delivery.DeliveryOutcome) -> None:
            sys.stdout.write(json.dumps({"status": outcome.status, "detail": outcome.detail,
                                         "elapsed": time.monotonic() - started}))

        return d.addCallback(report)

    task.react(main)


# -- helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net() -> Iterator[LoopbackHosts]:
    with loopback_hosts_or_skip(3, port=25 if os.geteuid() == 0 else 0) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer({}) as server:
        yield server


def deliver(net: LoopbackHosts, dns: DnsServer, recipient: str = "bob@dest.test", *,
            message: bytes = MESSAGE, **spec: Any) -> dict[str, Any]:
    spec = {"recipient": recipient, "resolvers": [dns.address], "port": net.port,
            "message": base64.b64encode(message).decode(), **spec}
    proc = subprocess.run([sys.executable, "-m", "tests.test_delivery", json.dumps(spec)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    result["log"] = proc.stderr
    return result


def zone(dns: DnsServer, records: dict[str, list[list[str]]]) -> None:
    dns.records.clear()
    dns.records.update(records)
    dns.reload()


# -- pure helpers --------------------------------------------------------------------------


def test_wire_data_stuffs_dots_and_normalises_line_ends():
    assert delivery.wire_data(b".a\nb\r\n..c\rd") == b"..a\r\nb\r\n...c\r\nd\r\n"
    assert delivery.wire_data(b"x\r\n") == b"x\r\n"


def test_envelope_problems_are_named():
    assert delivery.envelope_problem("a@x.test", "b@y.test") is None
    assert "invalid recipient" in delivery.envelope_problem("a@x.test", "nobody")
    assert "SMTPUTF8" in delivery.envelope_problem("a@x.test", "jörg@y.test")


# -- delivery to real servers ------------------------------------------------------------------


def test_delivered_over_starttls_byte_for_byte(net, dns):
    zone(dns, {"dest.test": [["MX", "10 mx.dest.test"]], "mx.dest.test": [["A", net.addresses[0]]]})
    with net.sink(0) as sink:
        result = deliver(net, dns)
        assert result["status"] == "delivered", result
        assert result["detail"].startswith(f"mx.dest.test [{net.addresses[0]}]: 250 ")
        assert sink.messages() == [MESSAGE]  # dots survive the stuffing round trip
        stored = sink.wait_for("stored")[0]
        assert stored["tls"] is True
        assert stored["mail_from"] == SENDER and stored["rcpts"] == ["bob@dest.test"]
        assert any(e["line"] == "EHLO src.test" for e in sink.events("command"))


def test_mx_preference_order_lowest_first(net, dns):
    zone(dns, {"dest.test": [["MX", "20 mx-b.dest.test"], ["MX", "10 mx-a.dest.test"]],
               "mx-a.dest.test": [["A", net.addresses[0]]],
               "mx-b.dest.test": [["A", net.addresses[1]]]})
    with net.sink(0) as preferred, net.sink(1) as backup:
        result = deliver(net, dns)
        assert result["status"] == "delivered" and "mx-a.dest.test" in result["detail"]
        assert len(preferred.messages()) == 1
        assert backup.events("connect") == []


def test_temporary_failure_moves_on_to_the_next_mx(net, dns):
    zone(dns, {"dest.test": [["MX", "10 mx-a.dest.test"], ["MX", "20 mx-b.dest.test"]],
               "mx-a.dest.test": [["A", net.addresses[0]]],
               "mx-b.dest.test": [["A", net.addresses[1]]]})
    with net.sink(0, "defer") as first, net.sink(1) as second:
        result = deliver(net, dns)
        assert result["status"] == "delivered" and "mx-b.dest.test" in result["detail"]
        assert first.events("connect") and len(second.messages()) == 1


def test_permanent_rejection_stops_at_that_mx(net, dns):
    zone(dns, {"dest.test": [["MX", "10 mx-a.dest.test"], ["MX", "20 mx-b.dest.test"]],
               "mx-a.dest.test": [["A", net.addresses[0]]],
               "mx-b.dest.test": [["A", net.addresses[1]]]})
    with net.sink(0, "reject", reply_at="data") as first, net.sink(1) as second:
        result = deliver(net, dns)
        assert result["status"] == "failed"
        assert result["detail"] == ("Rejected by mx-a.dest.test: 550 5.7.1 Message content "
                                    "rejected by the test sink")
        assert first.events("connect") and second.events("connect") == []


def test_temporary_then_permanent_is_failed(net, dns):
    zone(dns, {"dest.test": [["MX", "10 mx-a.dest.test"], ["MX", "20 mx-b.dest.test"]],
               "mx-a.dest.test": [["A", net.addresses[0]]],
               "mx-b.dest.test": [["A", net.addresses[1]]]})
    with net.sink(0, "defer"), net.sink(1, "reject"):
        result = deliver(net, dns)
        assert result["status"] == "failed"
        assert result["detail"].startswith("Rejected by mx-b.dest.test: 550 5.1.1 <bob@dest.test>")


def test_all_temporary_is_deferred_naming_every_host(net, dns):
    zone(dns, {"dest.test": [["MX", "10 mx-a.dest.test"], ["MX", "20 mx-b.dest.test"],
                             ["MX", "30 mx-c.dest.test"]],
               "mx-a.dest.test": [["A", net.addresses[0]]],
               "mx-b.dest.test": [["A", net.addresses[2]]],  # nothing listens there
               "mx-c.dest.test": [["AAAA", "::1"]]})
    with net.sink(0, "defer", reply_at="data"):
        result = deliver(net, dns)
    assert result["status"] == "deferred"
    assert result["detail"] == (
        "All MX servers for dest.test unreachable: "
        "mx-a.dest.test: 451 4.3.0 Test sink cannot store the message right now; "
        "mx-b.dest.test: connection refused; "
        "mx-c.dest.test: no A record (enable_ipv6 = false); skipping")


def test_a_refused_helo_ends_the_attempt_instead_of_repeating_it(net, dns):
    zone(dns, {"dest.test": [["MX", "10 mx.dest.test"]], "mx.dest.test": [["A", net.addresses[0]]]})
    with net.sink(0, "refuse-helo") as sink:
        result = deliver(net, dns)
        helos = [e for e in sink.events("command") if e["line"].startswith("HELO ")]
    assert result["status"] in ("failed", "deferred"), result
    assert "550 5.7.1 HELO not accepted here" in result["detail"]
    assert len(helos) == 1  # Twisted alone would answer the refusal with HELO again, forever


def test_null_mx_and_nxdomain_fail_for_good(net, dns):
    zone(dns, {"dest.test": [["MX", "0 ."], ["A", net.addresses[0]]]})
    with net.sink(0) as sink:
        result = deliver(net, dns)
        assert result == {**result, "status": "failed",
                          "detail": "Domain dest.test does not accept mail (null MX)"}
        missing = deliver(net, dns, "bob@nowhere.test")
        assert missing["status"] == "failed" and "NXDOMAIN" in missing["detail"]
        assert sink.events("connect") == []


def test_dns_error_defers_without_a_fallback(net, dns):
    zone(dns, {"dest.test": [["SERVFAIL", ""]]})
    with net.sink(0) as sink:
        result = deliver(net, dns)
        assert result["status"] == "deferred"
        assert result["detail"].startswith("DNS failure for dest.test: ")
        assert sink.events("connect") == []


def test_empty_mx_set_falls_back_to_the_domain_address(net, dns):
    zone(dns, {"dest.test": [["A", net.addresses[1]]]})
    with net.sink(1) as sink:
        result = deliver(net, dns)
        assert result["status"] == "delivered"
        assert result["detail"].startswith(f"dest.test [{net.addresses[1]}]: 250")
        assert len(sink.messages()) == 1


def test_broken_starttls_gets_one_plaintext_retry(net, dns):
    zone(dns, {"dest.test": [["MX", "10 mx.dest.test"]], "mx.dest.test": [["A", net.addresses[0]]]})
    with net.sink(0, "break-tls") as sink:
        result = deliver(net, dns)
        assert result["status"] == "delivered", result
        sessions = {e["session"] for e in sink.events("connect")}
        assert len(sessions) == 2
        assert [e["session"] for e in sink.events("starttls")] == [min(sessions)]
        stored = sink.wait_for("stored")[0]
        assert stored["session"] == max(sessions) and stored["tls"] is False
        assert sink.messages() == [MESSAGE]
        assert "retrying once without TLS" in result["log"]


def test_silent_server_is_abandoned_within_the_timeout(net, dns):
    zone(dns, {"dest.test": [["MX", "10 mx-a.dest.test"], ["MX", "20 mx-b.dest.test"]],
               "mx-a.dest.test": [["A", net.addresses[0]]],
               "mx-b.dest.test": [["A", net.addresses[1]]]})
    with net.sink(0, "silent") as silent, net.sink(1) as backup:
        result = deliver(net, dns, timeout=1.5)
        assert result["status"] == "delivered" and "mx-b.dest.test" in result["detail"]
        assert 1.4 < result["elapsed"] < 6
        assert silent.events("connect") and len(backup.messages()) == 1


def test_server_that_trickles_lines_is_abandoned_after_the_session_cap(net, dns):
    zone(dns, {"dest.test": [["MX", "10 mx.dest.test"]], "mx.dest.test": [["A", net.addresses[0]]]})
    with net.sink(0, "trickle"):
        result = deliver(net, dns, timeout=0.4)
    assert result["status"] == "deferred"
    assert result["detail"].endswith("mx.dest.test: session abandoned after 4s (server too slow)")
    assert 3.9 < result["elapsed"] < 8


def test_outbound_connection_leaves_from_the_bind_address(net, dns):
    zone(dns, {"dest.test": [["MX", "10 mx.dest.test"]], "mx.dest.test": [["A", net.addresses[0]]]})
    with net.sink(0) as sink:
        result = deliver(net, dns, bind_address=net.addresses[2])
        assert result["status"] == "delivered"
        assert sink.events("connect")[0]["peer"][0] == net.addresses[2]


if __name__ == "__main__":
    _driver(sys.argv[1])
