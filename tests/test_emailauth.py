"""DKIM, SPF and DMARC against a real DNS server (twisted.names in a subprocess).

Zones use names under real public suffixes (.com, .org, .net, .co.uk) because
DMARC alignment depends on the Public Suffix List; the resolver is our own
test server, so nothing leaves the machine.
"""

from __future__ import annotations

import logging
import time

import attrs
import pytest

from aimx.mail import authresults
from aimx.mail.authresults import AuthResults
from aimx.smtp import dnsresolve, emailauth
from aimx.smtp.dnsresolve import Budget
from aimx.smtp.emailauth import authenticate
from tests.support.dkimkeys import shared_key
from tests.support.dnsserver import DnsServer, SilentDns

ALLOWED_IP = "192.0.2.10"     # in example.com's SPF record
HELO_IP = "192.0.2.20"        # in helo.example.com's SPF record
MX_IP = "192.0.2.30"          # the A record of example.net's MX host
STRANGER_IP = "198.51.100.7"  # in nobody's record


@attrs.frozen
class Parsed:
    """Stand-in for aimx.mail.message.ParsedMessage: the fields authentication reads."""

    from_: str
    from_addresses: tuple[str, ...]


def parsed_from(*addresses: str) -> Parsed:
    return Parsed(", ".join(addresses), tuple(addresses))


def message(from_: str = "Boss <boss@example.com>", *, body: str = "Numbers attached.\r\n",
            top: tuple[str, ...] = ()) -> bytes:
    lines = [*top, f"From: {from_}", "To: agent@mail.aimx.org", "Subject: Quarterly numbers",
             "Date: Mon, 03 Mar 2025 12:00:00 +0000", "Message-ID: <q1@example.com>",
             "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "", body]
    return "\r\n".join(lines).encode()


EXAMPLE = shared_key("example.com")
OTHER = shared_key("other.org")

ZONE = {
    "sel._domainkey.example.com": [["TXT", EXAMPLE.txt_record]],
    "sel._domainkey.other.org": [["TXT", OTHER.txt_record]],
    "aimx._domainkey.example.com": [["TXT", EXAMPLE.txt_record]],
    "example.com": [["TXT", f"v=spf1 ip4:{ALLOWED_IP} -all"], ["TXT", "some-verification=1"]],
    "mail.example.com": [["TXT", f"v=spf1 ip4:{ALLOWED_IP} -all"]],
    "helo.example.com": [["TXT", f"v=spf1 ip4:{HELO_IP} -all"]],
    "other.org": [["TXT", f"v=spf1 ip4:{ALLOWED_IP} -all"]],
    "soft.example.net": [["TXT", f"v=spf1 ip4:{ALLOWED_IP} ~all"]],
    "neutral.example.net": [["TXT", f"v=spf1 ip4:{ALLOWED_IP} ?all"]],
    "nospf.example.net": [["A", "192.0.2.99"]],
    "perm.example.net": [["TXT", "v=spf1 ip4:192.0.2.10 frobnicate -all"]],
    # The test server's SERVFAIL entries currently answer NXDOMAIN (twisted.names maps
    # DNSServerError, a DomainError, to NXDOMAIN), so temporary failures use DROP.
    "timeout.example.net": [["DROP", ""]],
    "example.net": [["TXT", "v=spf1 include:viamx.example.net -all"]],
    "viamx.example.net": [["TXT", "v=spf1 mx -all"], ["MX", "10 mx1.example.net"]],
    "mx1.example.net": [["A", MX_IP]],
    "_dmarc.example.com": [["TXT", "v=DMARC1; p=reject; rua=mailto:d@example.com"]],
    "_dmarc.other.org": [["TXT", "v=DMARC1; p=none"]],
    "strict.com": [["TXT", "v=spf1 -all"]],
    "bounce.strict.com": [["TXT", f"v=spf1 ip4:{ALLOWED_IP} -all"]],
    "_dmarc.strict.com": [["TXT", "v=DMARC1; p=none; aspf=s"]],
    "nodmarc.net": [["TXT", f"v=spf1 ip4:{ALLOWED_IP} -all"]],
    "broken.com": [["TXT", f"v=spf1 ip4:{ALLOWED_IP} -all"]],
    "_dmarc.broken.com": [["DROP", ""]],
    # dnsresolve helpers
    "mxorder.example.com": [["MX", "20 b.example.com"], ["MX", "10 a.example.com"],
                            ["MX", "20 c.example.com"]],
    "v6.example.com": [["AAAA", "2001:db8::25"], ["A", "192.0.2.25"]],
}


@pytest.fixture(scope="module")
def dns_server():
    with DnsServer(ZONE) as server:
        yield server


@pytest.fixture(scope="module")
def resolver(dns_server):
    return dnsresolve.make_resolver([dns_server.address])


def auth(raw: bytes, resolver, *, parsed: Parsed | None = None, peer_ip: str | None = ALLOWED_IP,
         mail_from: str | None = "bounce@example.com", helo: str | None = "mx.sender.example",
         budget: Budget | None = None) -> AuthResults:
    if parsed is None:
        parsed = parsed_from("boss@example.com")
    return authenticate(raw, parsed, peer_ip=peer_ip, mail_from=mail_from, helo=helo,
                        resolver=resolver, budget=budget)


# ------------------------------------------------------------------ DKIM

def test_dkim_pass_for_published_key(resolver):
    raw = EXAMPLE.sign(message(), domain="example.com")
    result = auth(raw, resolver)
    assert result.dkim == "pass"
    assert result.dkim_domains == ("example.com",)


def test_dkim_fail_when_body_tampered(resolver):
    raw = EXAMPLE.sign(message(), domain="example.com").replace(b"Numbers", b"Invoice")
    result = auth(raw, resolver)
    assert (result.dkim, result.dkim_domains) == ("fail", ())


def test_dkim_none_for_unsigned_message(resolver):
    assert auth(message(), resolver).dkim == "none"


def test_dkim_fail_when_key_missing_from_dns(resolver):
    raw = EXAMPLE.sign(message(), domain="example.com", selector="retired")
    assert auth(raw, resolver).dkim == "fail"


def test_dkim_pass_records_only_verifying_domains(resolver):
    good = EXAMPLE.sign(message(), domain="example.com")
    # A second, outer signature whose key is not published does not spoil the pass.
    both = OTHER.sign(good, domain="other.org", selector="gone")
    result = auth(both, resolver)
    assert result.dkim == "pass"
    assert result.dkim_domains == ("example.com",)


def test_dkim_records_every_passing_domain(resolver):
    raw = OTHER.sign(EXAMPLE.sign(message(), domain="example.com"), domain="other.org")
    assert set(auth(raw, resolver).dkim_domains) == {"example.com", "other.org"}


def test_dkim_garbage_signature_is_fail_not_crash(resolver):
    raw = message(top=("DKIM-Signature: this is not a tag list",))
    assert auth(raw, resolver).dkim == "fail"


# ------------------------------------------------------------------ SPF

@pytest.mark.parametrize(("mail_from", "peer_ip", "expected"), [
    ("bounce@example.com", ALLOWED_IP, "pass"),
    ("bounce@example.com", STRANGER_IP, "fail"),
    ("bounce@soft.example.net", STRANGER_IP, "softfail"),
    ("bounce@neutral.example.net", STRANGER_IP, "neutral"),
    ("bounce@nospf.example.net", ALLOWED_IP, "none"),
    ("bounce@unknown-domain.example.net", ALLOWED_IP, "none"),
    ("bounce@example.net", MX_IP, "pass"),        # include: then mx, all via our resolver
    ("bounce@example.net", ALLOWED_IP, "fail"),
])
def test_spf_results(resolver, mail_from, peer_ip, expected):
    assert auth(message(), resolver, mail_from=mail_from, peer_ip=peer_ip).spf == expected


def test_spf_permerror_and_temperror_recorded_none_and_logged(resolver, caplog):
    caplog.set_level(logging.INFO, logger="aimx::auth")
    assert auth(message(), resolver, mail_from="x@perm.example.net").spf == "none"
    assert auth(message(), resolver, mail_from="x@timeout.example.net",
                budget=Budget(per_query=0.5)).spf == "none"
    lines = [r.getMessage() for r in caplog.records if r.name == "aimx::auth"]
    assert any("spf=permerror" in line and "frobnicate" in line for line in lines)
    assert any("spf=temperror" in line and "timeout" in line for line in lines)


def test_spf_null_sender_checks_helo_name(resolver):
    # From is example.com, whose record would pass ALLOWED_IP and fail HELO_IP:
    # the results below can only come from helo.example.com's record.
    null = {"mail_from": "", "helo": "helo.example.com"}
    assert auth(message(), resolver, peer_ip=HELO_IP, **null).spf == "pass"
    assert auth(message(), resolver, peer_ip=ALLOWED_IP, **null).spf == "fail"


def test_spf_null_sender_with_ip_literal_helo_is_none(resolver):
    assert auth(message(), resolver, mail_from="", helo="[192.0.2.10]").spf == "none"


def cli_auth(raw: bytes, resolver) -> AuthResults:
    return auth(raw, resolver, peer_ip=None, mail_from=None, helo=None)


def test_cli_spf_uses_bracketed_ip_of_first_received(resolver):
    top = ("Received: from m.example.com (m.example.com [192.0.2.10])\r\n"
           "\tby mx.aimx.org with ESMTP; Mon, 03 Mar 2025 12:00:00 +0000",
           "Received: from far.away (far.away [198.51.100.7]) by m.example.com")
    assert cli_auth(message(top=top), resolver).spf == "pass"
    first_is_stranger = (top[1], top[0])
    assert cli_auth(message(top=first_is_stranger), resolver).spf == "fail"


def test_cli_spf_skips_loopback_and_folded_lines_count(resolver):
    top = ("Received: from localhost (localhost [127.0.0.1]) by m.example.com",
           "Received: from m.example.com\r\n (m.example.com\r\n [192.0.2.10]) by x")
    assert cli_auth(message(top=top), resolver).spf == "pass"
    assert emailauth.received_ip(message(top=top)) == ALLOWED_IP


@pytest.mark.parametrize("received", [
    "Received: from x (HELO x 192.0.2.10) by mx.aimx.org",
    "Received: from host-192.0.2.10.example.com by mx.aimx.org",
    "Received: from localhost ([127.0.0.1]) by mx.aimx.org",
])
def test_cli_spf_ignores_unbracketed_or_loopback_ips(resolver, received):
    assert emailauth.received_ip(message(top=(received,))) is None
    assert cli_auth(message(top=(received,)), resolver).spf == "none"


def test_cli_spf_identity_is_envelope_sender_when_given(resolver):
    top = ("Received: from m (m [192.0.2.10]) by x",)
    result = auth(message("x@nodmarc.net", top=top), resolver, parsed=parsed_from("x@nodmarc.net"),
                  peer_ip=None, mail_from="bounce@soft.example.net", helo=None)
    assert result.spf == "pass"  # soft.example.net allows 192.0.2.10; From's domain is not asked


# ------------------------------------------------------------------ DMARC

def test_dmarc_pass_with_aligned_dkim_only(resolver):
    raw = EXAMPLE.sign(message(), domain="example.com")
    result = auth(raw, resolver, peer_ip=STRANGER_IP)
    assert (result.dkim, result.spf, result.dmarc) == ("pass", "fail", "pass")


def test_dmarc_pass_with_aligned_spf_only(resolver):
    result = auth(message(), resolver)
    assert (result.dkim, result.spf, result.dmarc) == ("none", "pass", "pass")


def test_dmarc_fail_when_nothing_aligns(resolver):
    # Valid signature from other.org and SPF pass for other.org, on From: example.com.
    raw = OTHER.sign(message(), domain="other.org")
    result = auth(raw, resolver, mail_from="bounce@other.org")
    assert (result.dkim, result.spf, result.dmarc) == ("pass", "pass", "fail")


def test_dmarc_none_without_record(resolver):
    result = auth(message("x@nodmarc.net"), resolver, parsed=parsed_from("x@nodmarc.net"),
                  mail_from="bounce@nodmarc.net")
    assert (result.spf, result.dmarc) == ("pass", "none")


def test_dmarc_fails_a_spoof_of_a_publishing_domain(resolver):
    # Nothing passed for a domain with a DMARC record: a spoof, recorded as fail
    # (the reference said none here).
    result = auth(message(), resolver, peer_ip=STRANGER_IP)
    assert (result.dkim, result.spf, result.dmarc) == ("none", "fail", "fail")


def test_dmarc_falls_back_to_organisational_domain(resolver):
    # No _dmarc.mail.example.com: the record of example.com applies, and a
    # signature by example.com is (relaxed) aligned with mail.example.com.
    parsed = parsed_from("ceo@mail.example.com")
    raw = EXAMPLE.sign(message("ceo@mail.example.com"), domain="example.com")
    assert auth(raw, resolver, parsed=parsed, peer_ip=STRANGER_IP).dmarc == "pass"
    spf_only = auth(message("ceo@mail.example.com"), resolver, parsed=parsed,
                    mail_from="bounce@mail.example.com")
    assert (spf_only.spf, spf_only.dmarc) == ("pass", "pass")


def test_dmarc_honours_strict_spf_alignment(resolver):
    parsed = parsed_from("a@strict.com")
    result = auth(message("a@strict.com"), resolver, parsed=parsed,
                  mail_from="bounce@bounce.strict.com")
    assert (result.spf, result.dmarc) == ("pass", "fail")  # relaxed would have passed


def test_dmarc_fail_on_dns_failure(resolver):
    parsed = parsed_from("a@broken.com")
    result = auth(message("a@broken.com"), resolver, parsed=parsed, mail_from="x@broken.com",
                  budget=Budget(per_query=0.5))
    assert (result.spf, result.dmarc) == ("pass", "fail")


def test_dmarc_none_for_several_author_domains(resolver):
    parsed = parsed_from("boss@example.com", "x@other.org")
    raw = EXAMPLE.sign(message("boss@example.com, x@other.org"), domain="example.com")
    assert auth(raw, resolver, parsed=parsed).dmarc == "none"


def test_alignment_follows_public_suffix_list():
    assert authresults.aligned("mail.company.co.uk", "company.co.uk")
    assert not authresults.aligned("evil.co.uk", "company.co.uk")
    assert not authresults.aligned("mail.company.com", "company.com", "s")


# ------------------------------------------------------------------ bounds and cache

def test_silent_dns_bounded_to_budget_and_never_raises():
    raw = OTHER.sign(EXAMPLE.sign(message(), domain="example.com"), domain="other.org")
    with SilentDns() as silent:
        resolver = dnsresolve.make_resolver([silent.address])
        started = time.monotonic()
        result = auth(raw, resolver)  # default budget: 5 s per query, 15 s in all
        elapsed = time.monotonic() - started
    # Unbounded this would be 4 queries x 5 s (two DKIM keys, SPF, DMARC).
    assert elapsed < 16.5
    assert elapsed > 9  # it did wait for DNS: at least two queries timed out
    assert result == AuthResults("fail", "none", "fail", ())


def test_small_budget_caps_total_time():
    raw = OTHER.sign(EXAMPLE.sign(message(), domain="example.com"), domain="other.org")
    with SilentDns() as silent:
        resolver = dnsresolve.make_resolver([silent.address])
        started = time.monotonic()
        result = auth(raw, resolver, budget=Budget(total=1.5, per_query=1.0))
        elapsed = time.monotonic() - started
    assert elapsed < 2.5
    assert (result.dkim, result.spf) == ("fail", "none")


def test_budget_cache_answers_each_name_once(dns_server, resolver):
    dns_server.set("sel._domainkey.cached.com", [["TXT", EXAMPLE.txt_record]])
    raw = EXAMPLE.sign(message("a@cached.com"), domain="cached.com")
    parsed = parsed_from("a@cached.com")
    budget = Budget()
    assert auth(raw, resolver, parsed=parsed, budget=budget).dkim == "pass"
    dns_server.set("sel._domainkey.cached.com", [])  # key withdrawn mid-message
    # Same message, next recipient: the cached answer is reused, no new query.
    assert auth(raw, resolver, parsed=parsed, budget=budget).dkim == "pass"
    assert auth(raw, resolver, parsed=parsed).dkim == "fail"  # a new message asks again


# ------------------------------------------------------------------ caches shared by messages

@attrs.define
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def shared_resolver(dns_server, clock: Clock) -> dnsresolve.SharedResolver:
    """A resolver like ``dnsresolve.shared_resolver``'s, on a clock the test moves."""
    resolver = dnsresolve.make_resolver([dns_server.address],
                                        factory=dnsresolve.SharedResolver)
    resolver.answers = dnsresolve.AnswerCache(clock=clock)
    resolver.verdicts = dnsresolve.AnswerCache(clock=clock)
    return resolver


def test_answers_serve_later_messages_until_their_ttl(dns_server):
    clock = Clock()
    resolver = shared_resolver(dns_server, clock)
    dns_server.set("sel._domainkey.ttl.com", [["TXT", EXAMPLE.txt_record]])
    raw = EXAMPLE.sign(message("a@ttl.com"), domain="ttl.com")
    parsed = parsed_from("a@ttl.com")
    assert auth(raw, resolver, parsed=parsed).dkim == "pass"
    dns_server.set("sel._domainkey.ttl.com", [])  # key withdrawn
    clock.now += 59  # the test server's TTL is 60 s
    assert auth(raw, resolver, parsed=parsed).dkim == "pass"
    clock.now += 2
    assert auth(raw, resolver, parsed=parsed).dkim == "fail"


def spf_of(resolver, mail_from: str, peer_ip: str = ALLOWED_IP) -> str:
    raw = message()
    return auth(raw, resolver, parsed=parsed_from("boss@example.com"), peer_ip=peer_ip,
                mail_from=mail_from).spf


def test_spf_verdict_lasts_as_long_as_the_answers_it_read(dns_server):
    clock = Clock()
    resolver = shared_resolver(dns_server, clock)
    dns_server.set("spfttl.com", [["TXT", "v=spf1 a:out.spfttl.com -all"]])
    dns_server.set("out.spfttl.com", [["A", ALLOWED_IP]])
    assert spf_of(resolver, "bounce@spfttl.com") == "pass"
    assert spf_of(resolver, "bounce@spfttl.com", STRANGER_IP) == "fail"  # its own verdict
    dns_server.set("out.spfttl.com", [["A", HELO_IP]])  # the sending host moved
    clock.now += 59
    assert spf_of(resolver, "bounce@spfttl.com") == "pass"  # answers (and verdict) still valid
    clock.now += 2
    assert spf_of(resolver, "bounce@spfttl.com") == "fail"


def test_spf_verdict_that_read_an_uncached_answer_is_not_kept(dns_server):
    clock = Clock()
    resolver = shared_resolver(dns_server, clock)
    dns_server.set("spfmiss.com", [["TXT", "v=spf1 a:late.spfmiss.com -all"]])
    # No such name, and no SOA to give the negative answer a TTL: nothing is cached.
    assert spf_of(resolver, "bounce@spfmiss.com") == "fail"
    dns_server.set("late.spfmiss.com", [["A", ALLOWED_IP]])
    assert spf_of(resolver, "bounce@spfmiss.com") == "pass"  # same instant, asked again


def test_no_resolver_gives_all_none():
    raw = EXAMPLE.sign(message(), domain="example.com")
    assert auth(raw, None) == authresults.NONE == AuthResults("none", "none", "none", ())


# ------------------------------------------------------------------ dnsresolve

def test_resolver_entries_with_ports_and_ipv6():
    resolver = dnsresolve.make_resolver(["192.0.2.1", "127.0.0.1:5353", "[::1]:53"])
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [
        ("192.0.2.1", 53), ("127.0.0.1", 5353), ("::1", 53)]
    for bad in ("dns.example.com", "127.0.0.1:0", "[::1", "1.2.3.4:x"):
        with pytest.raises(dnsresolve.ResolverConfigError):
            dnsresolve.make_resolver([bad])


def test_lookup_helpers_and_error_kinds(resolver):
    assert dnsresolve.mx(resolver, "mxorder.example.com") == (
        (10, "a.example.com"), (20, "b.example.com"), (20, "c.example.com"))
    assert dnsresolve.a(resolver, "v6.example.com") == ("192.0.2.25",)
    assert dnsresolve.aaaa(resolver, "v6.example.com") == ("2001:db8::25",)
    # A 2048-bit key spans several TXT strings; txt() joins them.
    assert dnsresolve.txt(resolver, "sel._domainkey.example.com") == (
        EXAMPLE.txt_record.encode(),)
    with pytest.raises(dnsresolve.NxDomain):
        dnsresolve.mx(resolver, "nowhere.example.com")
    with pytest.raises(dnsresolve.NoAnswer):
        dnsresolve.mx(resolver, "v6.example.com")
    started = time.monotonic()
    with pytest.raises(dnsresolve.TempFailure):
        dnsresolve.a(resolver, "timeout.example.net", Budget(per_query=0.5))
    assert time.monotonic() - started < 1.5


# ------------------------------------------------------------------ signing

def test_signed_message_verifies_against_published_key(resolver, tmp_path):
    (tmp_path / "private.key").write_bytes(EXAMPLE.private_pem)
    key = emailauth.load_signing_key(tmp_path / "private.key")
    signed = emailauth.sign(message(), domain="example.com", selector="aimx", key_pem=key)
    assert signed.startswith(b"DKIM-Signature: ")
    result = auth(signed, resolver, peer_ip=STRANGER_IP)
    assert (result.dkim, result.dkim_domains, result.dmarc) == ("pass", ("example.com",), "pass")


def test_signature_parameters(resolver):
    signed = emailauth.sign(message(), domain="example.com", selector="aimx",
                            key_pem=EXAMPLE.private_pem)
    field = signed.split(b"\r\n\r\n", 1)[0].decode()
    tags = _signature_tags(field)
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == (
        "rsa-sha256", "relaxed/relaxed", "example.com", "aimx")
    assert "l" not in tags
    assert abs(int(tags["t"]) - time.time()) < 60
    # Every signed field once more than present: fields added later break the signature.
    assert [h.strip() for h in tags["h"].split(":")] == [
        "from", "from", "sender", "reply-to", "to", "to", "cc", "subject", "subject", "date",
        "date", "message-id", "message-id", "in-reply-to", "references", "auto-submitted",
        "mime-version", "mime-version", "content-type", "content-type"]


@pytest.mark.parametrize("added", [
    b"Subject: Wire the money today\r\n",  # a second copy above the signed one
    b"Reply-To: thief@evil.example\r\n",  # a field the message did not have
    b"From: Boss <boss@example.com>\r\n",
])
def test_headers_added_after_signing_break_the_signature(resolver, added):
    signed = emailauth.sign(message(), domain="example.com", selector="aimx",
                            key_pem=EXAMPLE.private_pem)
    assert auth(signed, resolver).dkim == "pass"
    head, body = signed.split(b"\r\n\r\n", 1)
    on_top = head.replace(b"\r\nFrom:", b"\r\n" + added + b"From:", 1)
    at_bottom = head + b"\r\n" + added.rstrip(b"\r\n")
    for tampered in (on_top, at_bottom):
        assert auth(tampered + b"\r\n\r\n" + body, resolver).dkim == "fail"


def test_relaxed_body_survives_trailing_whitespace_but_not_edits(resolver):
    signed = emailauth.sign(message(body="Line one\r\nLine two\r\n"), domain="example.com",
                            selector="aimx", key_pem=EXAMPLE.private_pem)
    padded = signed.replace(b"Line one\r\n", b"Line one   \t\r\n") + b"\r\n\r\n"
    assert auth(padded, resolver).dkim == "pass"
    edited = signed.replace(b"Line two", b"Line 2")
    assert auth(edited, resolver).dkim == "fail"


def test_mime_headers_are_signed(resolver):
    signed = emailauth.sign(message(), domain="example.com", selector="aimx",
                            key_pem=EXAMPLE.private_pem)
    swapped = signed.replace(b"Content-Type: text/plain", b"Content-Type: text/html")
    assert auth(swapped, resolver).dkim == "fail"


def test_sign_lf_message_keeps_lf(resolver):
    raw = message().replace(b"\r\n", b"\n")
    signed = emailauth.sign(raw, domain="example.com", selector="aimx",
                            key_pem=EXAMPLE.private_pem)
    assert b"\r" not in signed
    assert auth(signed, resolver).dkim == "pass"


def test_load_signing_key_accepts_pkcs8_and_rejects_junk(tmp_path, resolver):
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(EXAMPLE.private_pem, password=None)
    pkcs8 = private.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    (tmp_path / "pkcs8.key").write_bytes(pkcs8)
    key = emailauth.load_signing_key(tmp_path / "pkcs8.key")
    signed = emailauth.sign(message(), domain="example.com", selector="aimx", key_pem=key)
    assert auth(signed, resolver).dkim == "pass"
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    with pytest.raises(emailauth.SigningError, match="invalid DKIM private key"):
        emailauth.load_signing_key(junk)
    with pytest.raises(emailauth.SigningError, match="cannot read"):
        emailauth.load_signing_key(tmp_path / "missing.key")


def test_sign_refuses_message_without_from():
    raw = b"To: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    with pytest.raises(emailauth.SigningError, match="no From"):
        emailauth.sign(raw, domain="example.com", selector="aimx", key_pem=EXAMPLE.private_pem)
    with pytest.raises(emailauth.SigningError):
        emailauth.sign(message(), domain="example.com", selector="aimx", key_pem=b"garbage")


def _signature_tags(field: str) -> dict[str, str]:
    value = field.split(":", 1)[1].replace("\r\n", "").replace("\n", "")
    tags = {}
    for part in value.split(";"):
        key, _, val = part.partition("=")
        if key.strip():
            tags[key.strip()] = val.strip()
    return tags


def test_signature_with_b_value_folded_anyhow_still_verifies(resolver):
    """Whitespace and line folds inside b= are not part of what was signed."""
    raw = EXAMPLE.sign(message(), domain="example.com")
    field, rest = raw.split(b"\r\nFrom:", 1)
    head, b_value = field.rsplit(b"b=", 1)
    compact = b"".join(b_value.split())
    refolded = b"\r\n\t ".join(compact[i:i + 17] for i in range(0, len(compact), 17))
    for value in (compact, refolded, b" \t" + refolded):
        assert auth(head + b"b=" + value + b"\r\nFrom:" + rest, resolver).dkim == "pass"
    flipped = compact[:40] + (b"A" if compact[40:41] != b"A" else b"B") + compact[41:]
    assert auth(head + b"b=" + flipped + b"\r\nFrom:" + rest, resolver).dkim == "fail"
