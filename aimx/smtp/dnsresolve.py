"""DNS lookups with bounded time, through resolvers the operator chose (D10, D11).

Every lookup here blocks, so callers run them off the reactor thread. One
message's authentication can ask many questions (DKIM keys, SPF includes,
DMARC records); a ``Budget`` shared by those lookups caps each query at 5 s
and the whole message at 15 s, and remembers answers so that a name asked
twice for one message (e.g. once per recipient) costs one query.

Failures are reduced to three kinds callers can act on: ``NxDomain`` (the
name does not exist), ``NoAnswer`` (it exists without records of that type)
and ``TempFailure`` (SERVFAIL, timeout, budget spent, no usable resolver).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import attrs
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

PER_QUERY_SECONDS = 5.0
TOTAL_SECONDS = 15.0
MAX_POSITIVE_TTL = 300.0
MAX_NEGATIVE_TTL = 60.0
CACHE_ENTRIES = 4096


class DnsError(Exception):
    """Base of every lookup failure raised by this module."""


class NxDomain(DnsError):
    """The name does not exist (NXDOMAIN), or cannot exist (malformed name)."""


class NoAnswer(DnsError):
    """The name exists but holds no record of the asked type."""


class TempFailure(DnsError):
    """SERVFAIL, timeout, exhausted budget or missing resolver: try again later."""


class ResolverConfigError(DnsError):
    """A ``dns_resolvers`` entry is not ``ip``, ``ip:port`` or ``[v6]:port``,
    or the system resolver configuration cannot be read."""


def parse_resolver_address(entry: str) -> tuple[str, int]:
    """Split ``ip``, ``ip:port``, ``[v6]`` or ``[v6]:port`` into (address, port)."""
    text = entry.strip()
    host, port_text = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ResolverConfigError(f"invalid DNS resolver {entry!r}")
        host, rest = text[1:close], text[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ResolverConfigError(f"invalid DNS resolver {entry!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    # Otherwise: IPv4 without port, or a bare IPv6 address without port.
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ResolverConfigError(f"invalid DNS resolver {entry!r}: not an IP address") from None
    port = 53
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ResolverConfigError(f"invalid DNS resolver {entry!r}: bad port")
        port = int(port_text)
    return address, port


def make_resolver(resolvers: Sequence[str], *, timeout: float = PER_QUERY_SECONDS,
                  lifetime: float = PER_QUERY_SECONDS,
                  factory: type[dns.resolver.Resolver] = dns.resolver.Resolver,
                  ) -> dns.resolver.Resolver:
    """A dnspython resolver: the system's when ``resolvers`` is empty, else exactly those.

    ``timeout`` bounds one attempt at one server, ``lifetime`` one whole query;
    a ``Budget`` passed to the lookup helpers can shorten the latter further.
    """
    try:
        if resolvers:
            resolver = factory(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(*parse_resolver_address(r))
                                    for r in resolvers]
        else:
            resolver = factory()
    except dns.exception.DNSException as exc:
        raise ResolverConfigError(f"cannot configure the system DNS resolver: {exc}") from exc
    resolver.timeout = timeout
    resolver.lifetime = lifetime
    resolver.cache = None  # dnspython's own cache stays off: see Budget and AnswerCache
    return resolver


class AnswerCache:
    """Answers shared by every message, each until its own DNS TTL runs out (capped).

    Thread-safe; bounded to ``max_entries`` (least recently used dropped first).
    """

    def __init__(self, *, max_entries: int = CACHE_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, ...], tuple[float, tuple | DnsError]] = \
            OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, ...]) -> tuple | DnsError | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            expires, result = found
            if expires <= self.clock():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return result

    def expires_at(self, key: tuple[str, ...]) -> float | None:
        """When the entry for ``key`` runs out (on ``clock``), or None if there is none."""
        with self._lock:
            found = self._entries.get(key)
            if found is None or found[0] <= self.clock():
                return None
            return found[0]

    def put(self, key: tuple[str, ...], result: tuple | DnsError, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            self._entries[key] = (self.clock() + ttl, result)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class SharedResolver(dns.resolver.Resolver):
    """A resolver that carries an ``AnswerCache`` (see ``shared_resolver``), and a cache of
    verdicts computed from those answers alone, each kept no longer than the answers
    it was computed from (``emailauth.check_spf`` fills it)."""

    answers: AnswerCache
    verdicts: AnswerCache


_shared: dict[tuple[str, ...], SharedResolver] = {}
_shared_lock = threading.Lock()


def shared_resolver(resolvers: Sequence[str]) -> SharedResolver:
    """The process-wide resolver for this ``dns_resolvers`` list, with its answer cache.

    Built once per distinct list (a config reload that changes the list gets
    a fresh one, with an empty cache). Raises ``ResolverConfigError`` like
    ``make_resolver``.
    """
    key = tuple(resolvers)
    with _shared_lock:
        resolver = _shared.get(key)
        if resolver is None:
            resolver = make_resolver(key, factory=SharedResolver)
            resolver.answers = AnswerCache()
            resolver.verdicts = AnswerCache(clock=resolver.answers.clock)
            _shared[key] = resolver
        return resolver


def _positive_ttl(answer: dns.resolver.Answer) -> float:
    rrset = answer.rrset
    ttl = float(rrset.ttl) if rrset is not None else 0.0
    return min(ttl, MAX_POSITIVE_TTL)


def _negative_ttl(exc: Exception) -> float:
    """RFC 2308: the negative TTL is min(SOA TTL, SOA MINIMUM); 0 without an SOA."""
    try:
        if isinstance(exc, dns.resolver.NXDOMAIN):
            responses = list(exc.responses().values())
        else:
            responses = [exc.response()]  # type: ignore[attr-defined]
        ttls = [min(rrset.ttl, rrset[0].minimum)
                for response in responses for rrset in response.authority
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset)]
    except Exception:  # noqa: BLE001 - an odd response is simply not cached
        return 0.0
    return min(min(ttls), MAX_NEGATIVE_TTL) if ttls else 0.0


@attrs.define
class Budget:
    """Time allowance and answer cache for the lookups made on behalf of one message."""

    total: float = TOTAL_SECONDS
    per_query: float = PER_QUERY_SECONDS
    clock: Callable[[], float] = time.monotonic
    started: float | None = None
    # (name, type) -> answer tuple, or the DnsError that lookup raised.
    cache: dict[tuple[str, str], tuple | DnsError] = attrs.field(factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.started is None:
            self.started = self.clock()

    def remaining(self) -> float:
        return self.total - (self.clock() - self.started)

    def next_query_seconds(self) -> float:
        """How long the next query may take; raises TempFailure once the budget is spent."""
        left = self.remaining()
        if left <= 0.05:
            raise TempFailure("DNS time budget for this message exhausted")
        return min(self.per_query, left)


def _resolve(resolver: dns.resolver.Resolver, name: str, rdtype: str,
             budget: Budget | None) -> tuple:
    if budget is None:
        budget = Budget(total=PER_QUERY_SECONDS)
    key = (name.lower().rstrip("."), rdtype)
    cached = budget.cache.get(key)
    if isinstance(cached, DnsError):
        raise cached
    if cached is not None:
        return cached
    shared: AnswerCache | None = getattr(resolver, "answers", None)
    if shared is not None:
        cached = shared.get(key)
        if isinstance(cached, DnsError):
            # A fresh exception per message: re-raising one shared instance from many
            # threads would keep growing its traceback.
            error = type(cached)(str(cached))
            budget.cache[key] = error
            raise error
        if cached is not None:
            budget.cache[key] = cached
            return cached
    ttl = 0.0
    try:
        lifetime = budget.next_query_seconds()
        qname = dns.name.from_text(key[0] or ".")
        answer = resolver.resolve(qname, rdtype, lifetime=lifetime, search=False)
        result: tuple | DnsError = tuple(answer)
        ttl = _positive_ttl(answer)
    except DnsError as exc:
        result = exc  # the budget ran out: remembered so later asks fail fast too
    except dns.resolver.NXDOMAIN as exc:
        result = NxDomain(f"{key[0]}: no such domain")
        ttl = _negative_ttl(exc)
    except dns.resolver.NoAnswer as exc:
        result = NoAnswer(f"{key[0]}: no {rdtype} record")
        ttl = _negative_ttl(exc)
    except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong,
            dns.name.BadEscape, dns.name.IDNAException) as exc:
        result = NxDomain(f"{key[0]!r}: not a valid DNS name ({exc})")
    except dns.exception.Timeout:
        result = TempFailure(f"{key[0]} {rdtype}: DNS timeout")
    except dns.resolver.NoNameservers as exc:
        result = TempFailure(f"{key[0]} {rdtype}: no server answered ({exc.msg})")
    except dns.exception.DNSException as exc:
        result = TempFailure(f"{key[0]} {rdtype}: DNS error ({exc})")
    except OSError as exc:  # e.g. no route to the configured server
        result = TempFailure(f"{key[0]} {rdtype}: network error ({exc})")
    budget.cache[key] = result
    if shared is not None and ttl > 0 and isinstance(result, tuple | NxDomain | NoAnswer):
        shared.put(key, result, ttl)
    if isinstance(result, DnsError):
        raise result
    return result


def txt(resolver: dns.resolver.Resolver, name: str, budget: Budget | None = None
        ) -> tuple[bytes, ...]:
    """Each TXT record of ``name``, its character-strings joined into one value."""
    return tuple(b"".join(r.strings) for r in _resolve(resolver, name, "TXT", budget))


def mx(resolver: dns.resolver.Resolver, domain: str, budget: Budget | None = None
       ) -> tuple[tuple[int, str], ...]:
    """``(preference, host)`` pairs, lowest preference first (stable), hosts without
    the trailing dot; a null MX (RFC 7505) shows as ``(0, "")``."""
    records = [(r.preference, r.exchange.to_text(omit_final_dot=True).rstrip("."))
               for r in _resolve(resolver, domain, "MX", budget)]
    return tuple(sorted(records, key=lambda pair: pair[0]))


def a(resolver: dns.resolver.Resolver, host: str, budget: Budget | None = None
      ) -> tuple[str, ...]:
    """IPv4 addresses of ``host``."""
    return tuple(r.address for r in _resolve(resolver, host, "A", budget))


def aaaa(resolver: dns.resolver.Resolver, host: str, budget: Budget | None = None
         ) -> tuple[str, ...]:
    """IPv6 addresses of ``host``."""
    return tuple(r.address for r in _resolve(resolver, host, "AAAA", budget))


def ptr(resolver: dns.resolver.Resolver, name: str, budget: Budget | None = None
        ) -> tuple[str, ...]:
    """PTR targets of ``name`` (an ``in-addr.arpa``/``ip6.arpa`` name), without trailing dot."""
    return tuple(r.target.to_text(omit_final_dot=True)
                 for r in _resolve(resolver, name, "PTR", budget))


__all__ = [
    "PER_QUERY_SECONDS", "TOTAL_SECONDS", "AnswerCache", "Budget", "DnsError", "NoAnswer",
    "NxDomain", "ResolverConfigError", "SharedResolver", "TempFailure", "a", "aaaa",
    "make_resolver", "mx", "parse_resolver_address", "ptr", "shared_resolver", "txt",
]
