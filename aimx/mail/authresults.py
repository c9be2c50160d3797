"""Authentication results as data, and DMARC identifier alignment.

The checks that produce these results need DNS and live in ``aimx.smtp.emailauth``;
the trust gate only reads them, so the values and the alignment rule sit in the
mail core, where both may import them. The Public Suffix List used for alignment
is the copy packaged with ``publicsuffixlist``: no network fetch, ever.
"""

from __future__ import annotations

import functools

import attrs
from publicsuffixlist import PublicSuffixList


@attrs.frozen
class AuthResults:
    """The three results stored in the frontmatter, plus every passing DKIM ``d=``."""

    dkim: str = "none"
    spf: str = "none"
    dmarc: str = "none"
    dkim_domains: tuple[str, ...] = ()


NONE = AuthResults()


@functools.cache
def _psl() -> PublicSuffixList:
    # The list packaged with publicsuffixlist: no network fetch, ever.
    return PublicSuffixList()


def load_suffix_list() -> None:
    """Parse the packaged list now: it takes tens of milliseconds of CPU, which a
    service would otherwise spend inside the first message's DMARC check."""
    _psl()


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """The registrable domain per the Public Suffix List (``mail.example.com`` →
    ``example.com``); a public suffix itself, or a bare label, stays as given."""
    name = domain.rstrip(".").lower()
    try:
        return _psl().privatesuffix(name) or name
    except Exception:  # noqa: BLE001 - odd input must never break authentication
        return name


def aligned(domain: str, author_domain: str, mode: str = "r") -> bool:
    """DMARC identifier alignment: strict = same name, relaxed = same organisational domain."""
    a, b = domain.rstrip(".").lower(), author_domain.rstrip(".").lower()
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)
