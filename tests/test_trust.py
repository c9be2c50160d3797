"""The trust gate (spec 20 §10 and §12 trust cases, D8 aligned DKIM, D9 case-insensitive globs)."""

from __future__ import annotations

import logging

import attrs
import pytest

from aimx.mail import trust
from aimx.mail.authresults import AuthResults


@attrs.frozen
class Mailbox:
    """Stand-in for aimx.config.Mailbox: the fields the gate reads."""

    name: str = "agent"
    trust: str | None = None
    trusted_senders: tuple[str, ...] | None = None
    address: str = "agent@test.com"

    def is_catchall(self, domain: str) -> bool:
        return self.address.lower() == f"*@{domain}"


@attrs.frozen
class Config:
    """Stand-in for aimx.config.Config with the documented inheritance rules."""

    trust: str = "verified"
    trusted_senders: tuple[str, ...] = ("*@company.com",)
    domain: str = "test.com"

    def effective_trust(self, mb: Mailbox) -> str:
        return mb.trust if mb.trust is not None else self.trust

    def effective_senders(self, mb: Mailbox) -> tuple[str, ...]:
        return mb.trusted_senders if mb.trusted_senders is not None else self.trusted_senders


@attrs.frozen
class Parsed:
    from_: str
    from_addresses: tuple[str, ...] = ()


SIGNED = AuthResults("pass", "pass", "pass", ("company.com",))
UNSIGNED_FAIL = AuthResults("fail", "pass", "fail", ())


def verdict(from_: str, auth: AuthResults = SIGNED, config: Config | None = None,
            mailbox: Mailbox | None = None) -> trust.Verdict:
    return trust.evaluate(config or Config(), mailbox or Mailbox(), Parsed(from_), auth)


def gate(from_: str, auth: AuthResults = SIGNED, config: Config | None = None,
         mailbox: Mailbox | None = None) -> str:
    return verdict(from_, auth, config, mailbox).trusted


# spec 20 §12, trust cases (verified, ["*@company.com"])

def test_allowlisted_sender_with_dkim_pass_is_trusted():
    assert gate("Boss <boss@company.com>") == "true"


def test_dkim_fail_is_untrusted():
    assert gate("Boss <boss@company.com>", UNSIGNED_FAIL) == "false"


def test_sender_not_on_list_is_untrusted():
    assert gate("boss@other.com", AuthResults("pass", "pass", "pass", ("other.com",))) == "false"


def test_sender_compared_lower_cased():
    assert gate("BOSS@COMPANY.COM") == "true"


def test_pattern_lower_cased_too():
    # The reference never matches `*@Company.com`; D9 makes it match.
    assert gate("boss@company.com", config=Config(trusted_senders=("*@Company.com",))) == "true"


def test_empty_mailbox_list_replaces_global_list():
    assert gate("boss@company.com", mailbox=Mailbox(trusted_senders=())) == "false"


def test_policy_none_is_none():
    assert gate("boss@company.com", config=Config(trust="none")) == "none"


def test_mailbox_policy_overrides_global():
    assert gate("boss@company.com", mailbox=Mailbox(trust="none")) == "none"
    assert gate("boss@company.com", config=Config(trust="none"),
                mailbox=Mailbox(trust="verified")) == "true"


def test_mailbox_list_overrides_global_list():
    mailbox = Mailbox(trusted_senders=("ops@company.com",))
    assert gate("ops@company.com", mailbox=mailbox) == "true"
    assert gate("boss@company.com", mailbox=mailbox) == "false"


# D8: the signature must come from the From domain's own organisation

def test_valid_signature_from_unrelated_domain_on_forged_from_is_untrusted():
    evil = AuthResults("pass", "pass", "fail", ("evil.org",))
    assert gate("Boss <boss@company.com>", evil) == "false"


def test_signature_from_subdomain_of_same_organisation_is_trusted():
    sub = AuthResults("pass", "none", "pass", ("mail.company.com",))
    assert gate("Boss <boss@company.com>", sub) == "true"


def test_any_one_aligned_signature_is_enough():
    both = AuthResults("pass", "none", "pass", ("evil.org", "company.com"))
    assert gate("boss@company.com", both) == "true"


def test_alignment_uses_public_suffix_list():
    config = Config(trusted_senders=("*@company.co.uk",))
    neighbour = AuthResults("pass", "none", "fail", ("evil.co.uk",))
    own = AuthResults("pass", "none", "pass", ("news.company.co.uk",))
    assert gate("boss@company.co.uk", neighbour, config) == "false"
    assert gate("boss@company.co.uk", own, config) == "true"


# Sender extraction and globs

def test_sender_is_text_between_last_angle_brackets():
    assert trust.sender_address('"Eve <boss@company.com>" <eve@evil.org>') == "eve@evil.org"
    assert gate('"Eve <boss@company.com>" <eve@evil.org>',
                AuthResults("pass", "none", "pass", ("evil.org",))) == "false"
    assert trust.sender_address("Boss <Boss@Company.com") == "boss@company.com"


@pytest.mark.parametrize(("pattern", "sender", "expected"), [
    ("*@company.com", "boss@company.com", True),
    ("*@company.com", "boss@company.com.evil.org", False),   # whole string only
    ("*@company.com", "boss@sub.company.com", False),
    ("*@*.company.com", "boss@sub.company.com", True),
    ("*company.com", "a/b@company.com", False),               # * never crosses /
    ("b?ss@company.com", "boss@company.com", True),
    ("b?ss@company.com", "bss@company.com", False),
    ("[bc]oss@company.com", "coss@company.com", True),
    ("[a-c]oss@company.com", "doss@company.com", False),
    ("[!b]oss@company.com", "boss@company.com", False),
    ("[!b]oss@company.com", "moss@company.com", True),
    ("{boss,ceo}@company.com", "ceo@company.com", True),
    ("{boss,ceo}@company.com", "cfo@company.com", False),
    ("*@{company,corp}.{com,net}", "x@corp.net", True),
    ("boss@company.com", "boss@company.com", True),
    ("boss@company.com", "bosss@company.com", False),
    ("a+tag@company.com", "a+tag@company.com", True),          # regex characters are literal
    ("a.b@company.com", "axb@company.com", False),
    ("[unclosed@company.com", "[unclosed@company.com", True),
])
def test_glob_patterns(pattern, sender, expected):
    assert trust.matches_any(sender, [pattern]) is expected


def test_each_evaluation_logged(caplog):
    caplog.set_level(logging.DEBUG, logger="aimx::trust")
    gate("Boss <boss@company.com>", AuthResults("pass", "none", "fail", ("evil.org",)))
    lines = [r.getMessage() for r in caplog.records if r.name == "aimx::trust"]
    assert len(lines) == 1
    for part in ("policy=verified", "sender=boss@company.com", "dkim=pass", "match=true",
                 "aligned=false", "result=false", "reason=dkim_not_aligned"):
        assert part in lines[0]


# Why not trusted: each reason for the message that causes it, checks in order.

NO_SIGNATURE = AuthResults("none", "pass", "none", ())


@pytest.mark.parametrize(("from_", "auth", "config", "mailbox", "expected"), [
    ("Boss <boss@company.com>", SIGNED, Config(), Mailbox(), ("true", "trusted")),
    ("Boss <boss@company.com>", SIGNED, Config(trust="none"), Mailbox(), ("none", "policy_none")),
    ("Boss <boss@company.com>", SIGNED, Config(), Mailbox(trust="none"),
     ("none", "policy_none")),
    ("Boss <boss@company.com>", SIGNED, Config(), Mailbox(name="catchall", address="*@TEST.com"),
     ("false", "catchall")),
    ("Eve <eve@other.com>", SIGNED, Config(), Mailbox(), ("false", "sender_not_allowed")),
    ("", SIGNED, Config(), Mailbox(), ("false", "sender_not_allowed")),
    ("Eve <eve@other.com>", UNSIGNED_FAIL, Config(), Mailbox(), ("false", "sender_not_allowed")),
    ("Boss <boss@company.com>", NO_SIGNATURE, Config(), Mailbox(), ("false", "no_dkim")),
    ("Boss <boss@company.com>", UNSIGNED_FAIL, Config(), Mailbox(), ("false", "dkim_failed")),
    ("Boss <boss@company.com>", AuthResults("pass", "pass", "fail", ("evil.org",)), Config(),
     Mailbox(), ("false", "dkim_not_aligned")),
])
def test_every_verdict_names_its_reason(from_, auth, config, mailbox, expected):
    result = verdict(from_, auth, config, mailbox)
    assert (result.trusted, result.reason) == expected
    assert result.reason in trust.REASONS
