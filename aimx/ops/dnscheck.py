"""The DNS records an aimx server needs, and the check lines that verify them.

``aimx setup`` prints the records to add and re-checks them until they
resolve; ``aimx doctor`` prints the same check lines. The order is fixed:
A, AAAA (IPv6 only), MX, SPF, SPF (IPv6) (IPv6 only), DKIM, DMARC.

Lookups go through ``aimx.smtp.dnsresolve`` (the operator's ``dns_resolvers``,
D11) and block, so callers run this off any reactor. Each question gets up to
three tries 300 ms apart, two seconds each; any real answer, including
NXDOMAIN or an empty one, is final.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Sequence

import attrs
import dns.resolver

from aimx import term
from aimx.ops.dkimkeys import record_name as dkim_record_name
from aimx.ops.dkimkeys import record_value as dkim_record_value
from aimx.smtp import dnsresolve

TRY_SECONDS = 2.0
TRIES = 3
RETRY_DELAY = 0.3
NAME_COLUMN = 45
HINT_INDENT = " " * 9

DKIM_FAIL_NOTE = (
    "!! Outbound DKIM signatures will FAIL verification at receivers until DNS matches."
)
DMARC_NONE_WARNING = (
    "DMARC record uses p=none (no enforcement). Consider p=quarantine or p=reject for "
    "production."
)

PASS, FAIL, WARN = "pass", "fail", "warn"


@attrs.frozen
class Record:
    """One DNS record the operator publishes."""

    type: str
    name: str
    value: str


@attrs.frozen
class DnsCheck:
    """The outcome of one check line; ``fix`` is the record to add when it fails."""

    label: str
    status: str
    reason: str = ""
    fix: Record | None = None

    @property
    def is_dkim(self) -> bool:
        return self.label == "DKIM"


# --------------------------------------------------------------------------- records

def spf_value(ipv4: str, ipv6: str | None = None) -> str:
    six = f" ip6:{ipv6}" if ipv6 else ""
    return f"v=spf1 ip4:{ipv4}{six} -all"


def dmarc_value(domain: str) -> str:
    return f"v=DMARC1; p=reject; rua=mailto:postmaster@{domain}"


def server_records(domain: str, ipv4: str, ipv6: str | None = None, *,
                   selector: str = "aimx", dkim_public_b64: str | None = None) -> list[Record]:
    """The records of the setup table, in order (AAAA only when ``ipv6`` is given)."""
    records = [Record("A", domain, ipv4)]
    if ipv6:
        records.append(Record("AAAA", domain, ipv6))
    records.append(Record("MX", domain, f"10 {domain}."))
    records.append(Record("TXT", domain, spf_value(ipv4, ipv6)))
    if dkim_public_b64:
        records.append(Record("TXT", dkim_record_name(selector, domain),
                              dkim_record_value(dkim_public_b64)))
    records.append(Record("TXT", f"_dmarc.{domain}", dmarc_value(domain)))
    return records


def record_table(records: Sequence[Record]) -> list[str]:
    """The ``TYPE NAME VALUE`` table of setup, names padded to a common column."""
    width = max([NAME_COLUMN, *(len(r.name) for r in records)])
    lines = [f"  TYPE {'NAME':<{width}} VALUE", f"  ---- {'-' * width} -----"]
    lines += [f"  {r.type:<4} {r.name:<{width}} {r.value}" for r in records]
    return lines


# --------------------------------------------------------------------------- lookups

def make_resolver(dns_resolvers: Sequence[str] = ()) -> dns.resolver.Resolver:
    """A resolver for checks: the configured ``dns_resolvers``, else the system's."""
    return dnsresolve.make_resolver(dns_resolvers, timeout=TRY_SECONDS, lifetime=TRY_SECONDS)


Lookup = Callable[[dns.resolver.Resolver, str, dnsresolve.Budget], tuple]


def _ask(lookup: Lookup, resolver: dns.resolver.Resolver, name: str, tries: int,
         delay: float) -> tuple:
    """Answers for ``name``; ``()`` when it does not exist or has none; raises TempFailure."""
    for attempt in range(tries):
        try:
            return lookup(resolver, name, dnsresolve.Budget(total=TRY_SECONDS,
                                                            per_query=TRY_SECONDS))
        except (dnsresolve.NxDomain, dnsresolve.NoAnswer):
            return ()
        except dnsresolve.TempFailure:
            if attempt == tries - 1:
                raise
            time.sleep(delay)
    return ()


def _txt(resolver: dns.resolver.Resolver, name: str, tries: int, delay: float) -> list[str]:
    return [value.decode("utf-8", "replace")
            for value in _ask(dnsresolve.txt, resolver, name, tries, delay)]


def _tags(record: str) -> dict[str, str]:
    """``k=v; k=v`` tag lists (DKIM, DMARC) as a dict with lower-cased names."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def _address_check(label: str, rdtype: str, answers: Sequence[str], expected: str,
                   domain: str) -> DnsCheck:
    fix = Record(rdtype, domain, expected)
    if not answers:
        return DnsCheck(label, FAIL, f"No {rdtype} record found", fix)
    wanted = ipaddress.ip_address(expected)
    if any(ipaddress.ip_address(a) == wanted for a in answers):
        return DnsCheck(label, PASS)
    shown = ", ".join(answers)
    return DnsCheck(label, FAIL, f"{rdtype} record points to [{shown}], expected {expected}", fix)


def _mx_check(hosts: Sequence[tuple[int, str]], domain: str) -> DnsCheck:
    fix = Record("MX", domain, f"10 {domain}.")
    if not hosts:
        return DnsCheck("MX", FAIL, "No MX record found", fix)
    want = domain.lower().rstrip(".")
    if any(host.lower().rstrip(".") == want for _, host in hosts):
        return DnsCheck("MX", PASS)
    shown = ", ".join(host or "." for _, host in hosts)
    return DnsCheck("MX", FAIL, f"MX record points to [{shown}], expected {domain}", fix)


_SPF_START = re.compile(r"v=spf1(\s|$)", re.IGNORECASE)


def spf_authorizes(record: str, address: str) -> bool:
    """Whether an ``ip4:``/``ip6:`` mechanism (``+`` or no qualifier) covers ``address``.

    CIDR ranges count; ``a``, ``mx`` and ``include:`` are not followed (they
    would need more lookups and setup always publishes the address itself).
    """
    wanted = ipaddress.ip_address(address)
    kind = "ip4:" if wanted.version == 4 else "ip6:"
    for term_text in record.split()[1:]:
        mechanism = term_text[1:] if term_text.startswith("+") else term_text
        if not mechanism.lower().startswith(kind):
            continue
        value = mechanism[len(kind):]
        try:
            if "/" in value:
                if wanted in ipaddress.ip_network(value, strict=False):
                    return True
            elif ipaddress.ip_address(value) == wanted:
                return True
        except ValueError:
            continue
    return False


def _spf_check(label: str, records: Sequence[str], address: str, fix: Record) -> DnsCheck:
    spf = [r for r in records if _SPF_START.match(r.strip())]
    if not spf:
        return DnsCheck(label, FAIL, "No SPF record found", fix)
    if len(spf) > 1:
        return DnsCheck(label, FAIL,
                        "Multiple SPF records found (receivers treat this as an error)", fix)
    if spf_authorizes(spf[0], address):
        return DnsCheck(label, PASS)
    kind = "ip4" if ipaddress.ip_address(address).version == 4 else "ip6"
    return DnsCheck(label, FAIL, f"SPF record does not include {kind}:{address}", fix)


def _dkim_check(records: Sequence[str], local_b64: str | None, fix: Record | None) -> DnsCheck:
    keys = []
    for record in records:
        tags = _tags(record)
        version = tags.get("v")
        if (version is not None and version.upper() == "DKIM1") or (
                version is None and "p" in tags):
            keys.append(re.sub(r"\s+", "", tags.get("p", "")))
    if not keys:
        return DnsCheck("DKIM", FAIL, "No DKIM record found", fix)
    if local_b64 is None:
        return DnsCheck("DKIM", WARN, "DKIM record found but there is no local key to compare")
    if local_b64 in keys:
        return DnsCheck("DKIM", PASS)
    return DnsCheck("DKIM", FAIL, "DKIM record found but public key does not match local key",
                    fix)


def dkim_records(resolver: dns.resolver.Resolver, domain: str, selector: str, *,
                 tries: int = TRIES, retry_delay: float = RETRY_DELAY) -> list[str]:
    """The TXT values at ``<selector>._domainkey.<domain>``; raises ``DnsError``."""
    return _txt(resolver, dkim_record_name(selector, domain), tries, retry_delay)


def check_dkim_key(resolver: dns.resolver.Resolver, domain: str, selector: str,
                   local_b64: str | None, *, label: str = "DKIM", tries: int = TRIES,
                   retry_delay: float = RETRY_DELAY) -> DnsCheck:
    """Whether DNS publishes ``local_b64`` under ``selector``: one check line."""
    fix = (Record("TXT", dkim_record_name(selector, domain), dkim_record_value(local_b64))
           if local_b64 else None)
    try:
        records = dkim_records(resolver, domain, selector, tries=tries, retry_delay=retry_delay)
    except dnsresolve.DnsError as exc:
        return DnsCheck(label, FAIL, f"TXT lookup failed: {exc}", fix)
    return attrs.evolve(_dkim_check(records, local_b64, fix), label=label)


def _dmarc_check(records: Sequence[str], fix: Record) -> DnsCheck:
    for record in records:
        tags = _tags(record)
        if tags.get("v", "").upper() != "DMARC1":
            continue
        if tags.get("p", "").lower() == "none":
            return DnsCheck("DMARC", WARN, DMARC_NONE_WARNING)
        return DnsCheck("DMARC", PASS)
    return DnsCheck("DMARC", FAIL, "No DMARC record found", fix)


def check_dns(resolver: dns.resolver.Resolver, domain: str, ipv4: str, *,
              ipv6: str | None = None, enable_ipv6: bool = False, selector: str = "aimx",
              dkim_public_b64: str | None = None, tries: int = TRIES,
              retry_delay: float = RETRY_DELAY) -> list[DnsCheck]:
    """Run every check line for a server at ``ipv4`` (and ``ipv6`` when enabled)."""
    v6 = ipv6 if enable_ipv6 else None
    expected = {(r.type, r.name): r for r in server_records(
        domain, ipv4, v6, selector=selector, dkim_public_b64=dkim_public_b64)}
    spf_fix = expected[("TXT", domain)]
    checks: list[DnsCheck] = []

    def guarded(label: str, rdtype: str, run: Callable[[], DnsCheck]) -> None:
        try:
            checks.append(run())
        except dnsresolve.DnsError as exc:
            fix = {"A": expected[("A", domain)], "MX": expected[("MX", domain)]}.get(label)
            checks.append(DnsCheck(label, FAIL, f"{rdtype} lookup failed: {exc}", fix))

    def ask(lookup: Lookup, name: str) -> tuple:
        return _ask(lookup, resolver, name, tries, retry_delay)

    guarded("A", "A", lambda: _address_check("A", "A", ask(dnsresolve.a, domain), ipv4, domain))
    if enable_ipv6:
        if v6:
            guarded("AAAA", "AAAA", lambda: _address_check(
                "AAAA", "AAAA", ask(dnsresolve.aaaa, domain), v6, domain))
        else:
            checks.append(DnsCheck("AAAA", WARN,
                                   "enable_ipv6 is set but this server has no global IPv6 "
                                   "address"))
    guarded("MX", "MX", lambda: _mx_check(ask(dnsresolve.mx, domain), domain))
    spf_records: list[str] | None = None

    def spf(label: str, address: str) -> DnsCheck:
        nonlocal spf_records
        if spf_records is None:
            spf_records = _txt(resolver, domain, tries, retry_delay)
        return _spf_check(label, spf_records, address, spf_fix)

    guarded("SPF", "TXT", lambda: spf("SPF", ipv4))
    if v6:
        guarded("SPF (IPv6)", "TXT", lambda: spf("SPF (IPv6)", v6))
    checks.append(check_dkim_key(resolver, domain, selector, dkim_public_b64, tries=tries,
                                 retry_delay=retry_delay))
    dmarc_name = f"_dmarc.{domain}"
    guarded("DMARC", "TXT", lambda: _dmarc_check(
        _txt(resolver, dmarc_name, tries, retry_delay), expected[("TXT", dmarc_name)]))
    return checks


def all_pass(checks: Sequence[DnsCheck]) -> bool:
    """True when nothing failed; warnings (e.g. DMARC ``p=none``) are allowed."""
    return all(check.status != FAIL for check in checks)


# --------------------------------------------------------------------------- output

def format_check(check: DnsCheck, *, add_hint: bool = True) -> list[str]:
    """The lines of one check: ``  <label>: ✓`` or the failure with its fix hints.

    ``add_hint=False`` drops the ``→ Add:`` line (doctor does so for DKIM
    when there is no local key to publish).
    """
    if check.status == PASS:
        return [f"  {check.label}: {term.mark('ok')}"]
    if check.status == WARN:
        return [f"  {check.label}: {term.mark('warn')} - {check.reason}"]
    lines = [f"  {check.label}: {term.mark('fail')} - {check.reason}"]
    if check.fix is not None and add_hint:
        fix = check.fix
        lines.append(HINT_INDENT + term.style(f"→ Add: {fix.type}  {fix.name}  {fix.value}",
                                              "dim"))
    if check.is_dkim:
        lines.append(HINT_INDENT + term.style(DKIM_FAIL_NOTE, "yellow"))
    return lines


def format_checks(checks: Sequence[DnsCheck], *, dkim_add_hint: bool = True) -> list[str]:
    lines: list[str] = []
    for check in checks:
        lines += format_check(check, add_hint=dkim_add_hint or not check.is_dkim)
    return lines
