"""DKIM rotation while mail flows: keygen, publish, rotate, retire.

A real daemon signs every message sent through its socket (``AIMX_TEST_MAIL_DROP``
keeps them); each one is checked the way a receiver would, with dkimpy against a
real DNS server and with OpenDKIM against the same records, at every step of the
rotation. The ``aimx`` commands run as the operator would run them, in a subprocess.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from dns import resolver as dnspython

from tests.support.cli import aimx
from tests.support.daemon import RunningDaemon
from tests.support.dkimkeys import shared_key
from tests.support.dnsserver import DnsServer
from tests.support.opendkim import opendkim_tool, opendkim_verdict
from tests.support.users import LinuxUser, call_api_as

DOMAIN = "rotate.test"
OLD_KEY = shared_key("rotation-old")
DROP_MARKER = b"----- AIMX TEST DROP -----\n"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: sends as a test user")


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer({f"aimx._domainkey.{DOMAIN}": [["TXT", OLD_KEY.txt_record]]}) as server:
        yield server


@pytest.fixture
def daemon(dns, users) -> Iterator[RunningDaemon]:
    config = {
        "domain": DOMAIN,
        "dkim_selector": "aimx",
        "dns_resolvers": [dns.address],
        "mailboxes": {"alice": {"address": f"alice@{DOMAIN}", "owner": users["alice"].name}},
    }
    with RunningDaemon(config, dkim_key_pem=OLD_KEY.private_pem, start=False) as d:
        d.mail_drop = d.base / "outbox" / "drop.eml"
        d.extra_env["AIMX_TEST_MAIL_DROP"] = str(d.mail_drop)
        d.start()
        yield d


def send(daemon: RunningDaemon, user: LinuxUser, subject: str) -> bytes:
    """Send one message as ``user``; returns it as it left the daemon (signed)."""
    before = daemon.mail_drop.read_bytes().count(DROP_MARKER) if daemon.mail_drop.exists() else 0
    message = (f"From: alice@{DOMAIN}\r\nTo: bob@example.net\r\nSubject: {subject}\r\n\r\n"
               "Rotation check.\r\n")
    reply = call_api_as(user, daemon.socket_path, "SEND", {"body": message.encode()},
                        daemon.client_env())
    assert "ok" in reply, reply
    drops = daemon.mail_drop.read_bytes().split(DROP_MARKER)[1:]
    assert len(drops) == before + 1
    return drops[-1].removesuffix(b"\n")


def signing_selector(message: bytes) -> str:
    header = message.split(b"\r\n\r\n", 1)[0].decode()
    found = re.search(r"DKIM-Signature:.*?\bs=([^;\s]+)", header, re.S)
    assert found, header
    return found.group(1)


def dkimpy_verifies(message: bytes, dns: DnsServer) -> bool:
    resolver = dnspython.Resolver(configure=False)
    host, port = dns.address.split(":")
    resolver.nameservers, resolver.port = [host], int(port)

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        except dnspython.NXDOMAIN:
            return b""
        return b"".join(b"".join(record.strings) for record in answer)

    return bool(dkim.verify(message, dnsfunc=lookup))


def assert_verifies(message: bytes, dns: DnsServer, selector: str, work: Path) -> None:
    """Signed with ``selector`` and verifiable by dkimpy and OpenDKIM against ``dns``."""
    assert signing_selector(message) == selector
    assert dkimpy_verifies(message, dns)
    tool = opendkim_tool()
    if tool is not None:
        verdict = opendkim_verdict(tool, message, dict(dns.records), work)
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr


def publish(dns: DnsServer, selector: str, public_pem_path: Path) -> None:
    from aimx.ops.dkimkeys import public_b64_from_pem, record_value

    value = record_value(public_b64_from_pem(public_pem_path.read_bytes()))
    dns.records[f"{selector}._domainkey.{DOMAIN}"] = [["TXT", value]]
    dns.reload()


def mode_and_owner(path: Path) -> tuple[int, int]:
    info = path.stat()
    return stat.S_IMODE(info.st_mode), info.st_uid


def config_selector(daemon: RunningDaemon) -> str:
    return tomllib.loads(daemon.config_path.read_text())["dkim_selector"]


def test_rotation_keeps_every_message_verifiable(daemon, dns, users, tmp_path):
    alice = users["alice"]
    keys = daemon.config_dir / "dkim"
    assert_verifies(send(daemon, alice, "before"), dns, "aimx", tmp_path / "v1")

    # A second key: printed record, nothing else changes.
    made = aimx(daemon, "dkim-keygen", "--selector", "s2")
    assert made.returncode == 0, made.stderr
    assert f"s2._domainkey.{DOMAIN}" in made.stdout
    assert mode_and_owner(keys / "s2.private.key") == (0o600, 0)
    assert_verifies(send(daemon, alice, "after keygen"), dns, "aimx", tmp_path / "v2")

    # Not in DNS yet: rotate refuses and says what it found.
    refused = aimx(daemon, "dkim", "rotate", "s2")
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        "Error: DNS does not publish the key of selector 's2' yet: No DKIM record found at "
        f"s2._domainkey.{DOMAIN} (DNS serves no DKIM key there;")
    assert config_selector(daemon) == "aimx"
    assert_verifies(send(daemon, alice, "after refusal"), dns, "aimx", tmp_path / "v3")

    # Published: rotate switches the config and the running daemon.
    publish(dns, "s2", keys / "s2.public.key")
    rotated = aimx(daemon, "dkim", "rotate", "s2")
    assert rotated.returncode == 0, rotated.stderr
    assert f"DNS publishes the key of selector 's2' at s2._domainkey.{DOMAIN}." in rotated.stdout
    assert "Asked the daemon to reload" in rotated.stdout
    daemon.wait_for_log(r"DKIM: now signing with selector s2 \(was aimx\)")
    assert config_selector(daemon) == "s2"
    # The original key got its selector's name and kept its mode.
    assert not (keys / "private.key").exists()
    assert (keys / "aimx.private.key").read_bytes() == OLD_KEY.private_pem
    assert mode_and_owner(keys / "aimx.private.key") == (0o600, 0)
    listed = aimx(daemon, "dkim", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["s2", "signing"], ["aimx", "[OK]"]]
    assert_verifies(send(daemon, alice, "after rotate"), dns, "s2", tmp_path / "v4")

    # Retire: never the signing selector; the old one goes, mail still verifies.
    kept = aimx(daemon, "dkim", "retire", "s2")
    assert kept.returncode == 1
    assert kept.stderr == ("Error: selector 's2' signs outgoing mail; rotate to another "
                           "selector before retiring it\n")
    retired = aimx(daemon, "dkim", "retire", "aimx")
    assert retired.returncode == 0, retired.stderr
    assert sorted(p.name for p in keys.iterdir()) == ["s2.private.key", "s2.public.key"]
    assert_verifies(send(daemon, alice, "after retire"), dns, "s2", tmp_path / "v5")

    # A restart signs with the configured selector's key.
    daemon.stop()
    daemon.start()
    assert_verifies(send(daemon, alice, "after restart"), dns, "s2", tmp_path / "v6")


def test_force_rotates_without_dns_and_an_unloadable_key_keeps_the_old_one(daemon, dns, users,
                                                                         tmp_path):
    alice = users["alice"]
    keys = daemon.config_dir / "dkim"
    assert aimx(daemon, "dkim-keygen", "--selector", "s3").returncode == 0
    forced = aimx(daemon, "dkim", "rotate", "s3", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "Not checking DNS (--force)" in forced.stdout
    daemon.wait_for_log(r"DKIM: now signing with selector s3")
    message = send(daemon, alice, "forced")
    assert signing_selector(message) == "s3"
    assert not dkimpy_verifies(message, dns)  # as promised: DNS does not have it
    tool = opendkim_tool()
    if tool is not None:
        assert opendkim_verdict(tool, message, dict(dns.records), tmp_path / "f").returncode != 0

    # A key that cannot be read: the reload keeps signing with the key it has.
    (keys / "s3.private.key").rename(keys / "s3.private.key.moved")
    daemon.sighup()
    daemon.wait_for_log(r"SIGHUP: DKIM key for selector s3 not loaded: .*Still signing with "
                        r"selector s3")
    (keys / "s3.private.key.moved").rename(keys / "s3.private.key")
    assert aimx(daemon, "dkim", "rotate", "aimx", "--force").returncode == 0
    daemon.wait_for_log(r"DKIM: now signing with selector aimx \(was s3\)")
    assert_verifies(send(daemon, alice, "back to the old key"), dns, "aimx", tmp_path / "v")


def test_rotate_to_a_selector_without_a_key_says_how_to_make_one(daemon):
    result = aimx(daemon, "dkim", "rotate", "nokey")
    assert result.returncode == 1
    assert result.stderr == ("Error: there is no key for selector 'nokey'. Create it with "
                             "`sudo aimx dkim-keygen --selector nokey`, publish its record, "
                             "then rotate.\n")
    assert aimx(daemon, "dkim", "rotate", "../x").returncode == 2
    assert config_selector(daemon) == "aimx"
