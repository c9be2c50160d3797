"""Which IPv4 address the A and SPF records must name, and why.

Behind NAT (a home router, a cloud VPC, Docker) the machine's own address is
private and useless in DNS: the internet reaches the server at the router's
public address. ``setup`` and ``doctor`` check the records against, in order:
``--public-ip``, ``public_ip`` in ``config.toml``, the machine's own address
when it is public, else the address the verifier service saw the request
come from. The note says which one was used and why, so a failing A record is
never a mystery.

Pure: the verifier is asked through the ``learn`` callable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import attrs

# Not routable on the internet: RFC 1918, shared CGNAT space (RFC 6598), link-local,
# and IPv6 unique-local and link-local.
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(net) for net in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
    "fc00::/7", "fe80::/10",
))


class LearnFailed(Exception):
    """The verifier could not say which address it saw; the text says why."""


@attrs.frozen
class PublicAddress:
    """The address to check DNS against; ``note`` explains it (``None``: nothing to say)."""

    address: str | None
    note: str | None = None


def is_private(address: str) -> bool:
    """Whether ``address`` sits in a range that only exists behind NAT."""
    ip = ipaddress.ip_address(address)
    return any(ip in network for network in PRIVATE_NETWORKS if network.version == ip.version)


def ipv4_problem(value: str) -> str | None:
    """Why ``value`` cannot be ``--public-ip``, or ``None``."""
    try:
        if ipaddress.ip_address(value).version == 4:
            return None
    except ValueError:
        pass
    return f"invalid public IP '{value}': expected an IPv4 address such as 203.0.113.7"


def choose(own: str | None, *, flag: str | None, configured: str | None,
           learn: Callable[[], str], verifier: str) -> PublicAddress:
    """The address DNS must name for a machine whose own IPv4 is ``own``.

    ``learn`` asks the verifier at ``verifier`` (a URL, for the note) and is
    called only when the own address is private and nothing was configured;
    it returns the address the verifier saw or raises ``LearnFailed``.
    """
    if flag:
        return PublicAddress(flag, f"checking against public address {flag} (from --public-ip)")
    if configured:
        return PublicAddress(configured, f"checking against public address {configured} "
                                         "(public_ip in config.toml)")
    if own is None or not is_private(own):
        return PublicAddress(own)
    try:
        seen = learn()
    except LearnFailed as exc:
        return PublicAddress(own, (
            f"this machine's address {own} is private and the verifier at {verifier} could "
            f"not tell the public one ({exc}); checking against {own}. Pass --public-ip or "
            "set public_ip in config.toml"))
    if ipv4_problem(seen) is not None:
        return PublicAddress(own, (
            f"this machine's address {own} is private and the verifier at {verifier} saw "
            f"this machine at {seen}, not an IPv4 address; checking against {own}. Pass "
            "--public-ip or set public_ip in config.toml"))
    return PublicAddress(seen, f"checking against public address {seen} (this machine's "
                               f"address {own} is private; learned from the verifier at "
                               f"{verifier})")
