"""Outbound delivery: find the recipient's mail servers and hand the message over.

One message, one recipient, straight to the recipient domain's MX hosts with
Twisted's ``ESMTPSenderFactory`` (spec 30 §2.10 with decisions D16, D17, D25).
There is no queue: the caller learns at once whether the message was
delivered, refused for good (``failed``) or could not be handed over now
(``deferred``), and tells the agent.

DNS answers come from dnspython in worker threads (the lookups block); the
SMTP conversations run on the reactor. Every step has a timeout, so a server
that accepts the connection and then says nothing costs one timeout, not a
stuck request.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet import defer, error, threads
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import connectionDone
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from aimx.logs import kv, logger
from aimx.smtp import dnsresolve

log = logger("aimx::delivery")

DELIVERED = "delivered"
FAILED = "failed"
DEFERRED = "deferred"

SMTP_PORT = 25
DEFAULT_TIMEOUT = 60.0
PORT_ENV = "AIMX_TEST_SMTP_PORT"
"""Test seam: deliver to this port instead of 25 (the MX addresses stay as DNS says)."""
TIMEOUT_ENV = "AIMX_SMTP_CLIENT_TIMEOUT"
"""Seconds allowed for the connect and for each SMTP step (default 60, D17)."""

# How long a finished attempt may keep its connection for a polite QUIT.
_CLOSE_GRACE = 5.0
# The per-step timeout restarts on every line, so a server that trickles lines could hold
# a send forever; one whole attempt may last this many step timeouts at most.
SESSION_STEPS = 10


@attrs.frozen
class DeliveryOutcome:
    """How one delivery ended; ``detail`` is the text shown to the agent and kept in the copy."""

    status: str = attrs.field(validator=attrs.validators.in_((DELIVERED, FAILED, DEFERRED)))
    detail: str


def smtp_port() -> int:
    """Port 25, unless the test seam ``AIMX_TEST_SMTP_PORT`` says otherwise."""
    value = os.environ.get(PORT_ENV, "").strip()
    return int(value) if value.isdigit() and 0 < int(value) < 65536 else SMTP_PORT


def client_timeout() -> float:
    """The per-step timeout, ``AIMX_SMTP_CLIENT_TIMEOUT`` when set to a positive number."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, ""))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


# --- the route (blocking DNS, run in a worker thread) -------------------------------------


class HostSkipped(Exception):
    """A mail host that cannot be tried (no usable address); the text says why."""


def envelope_problem(sender: str, recipient: str) -> str | None:
    """Why the envelope cannot be sent at all, or None (such problems never heal)."""
    for role, address in (("sender", sender), ("recipient", recipient)):
        local, _, domain = address.rpartition("@")
        if not local or not domain or re.search(r"[\s<>]", address):
            return f"invalid {role} address '{address}'"
        if not address.isascii():
            return (f"{role} address '{address}' is not ASCII; internationalised addresses "
                    "(SMTPUTF8) are not supported")
    return None


def mail_hosts(resolver: Any, domain: str) -> list[str] | DeliveryOutcome:
    """The hosts to try for ``domain``, best first, or the outcome when there are none (D16).

    A null MX or a domain that does not exist fails for good; a DNS error is
    temporary and never falls back to the A record; only an empty MX set means
    "the domain itself is the mail host" (RFC 5321 §5.1).
    """
    try:
        records = dnsresolve.mx(resolver, domain)
    except dnsresolve.NxDomain:
        return DeliveryOutcome(FAILED, f"DNS failure for {domain}: domain does not exist "
                                       "(NXDOMAIN)")
    except dnsresolve.NoAnswer:
        records = ()
    except dnsresolve.DnsError as exc:
        return DeliveryOutcome(DEFERRED, f"DNS failure for {domain}: {exc}")
    hosts: list[str] = []
    for _, host in records:  # already sorted by preference, stable
        if host and host.lower() not in (h.lower() for h in hosts):
            hosts.append(host)
    if records and not hosts:
        return DeliveryOutcome(FAILED, f"Domain {domain} does not accept mail (null MX)")
    return hosts or [domain]


def host_addresses(resolver: Any, host: str, enable_ipv6: bool) -> tuple[str, ...]:
    """The addresses to dial for ``host``: IPv4 first, then IPv6 when enabled.

    Raises ``HostSkipped`` when there is none to dial.
    """
    found: list[str] = []
    problems: list[str] = []
    kinds: list[tuple[str, Callable[..., tuple[str, ...]]]] = [("A", dnsresolve.a)]
    if enable_ipv6:
        kinds.append(("AAAA", dnsresolve.aaaa))
    for _, lookup in kinds:
        try:
            found.extend(lookup(resolver, host))
        except (dnsresolve.NxDomain, dnsresolve.NoAnswer):
            pass
        except dnsresolve.DnsError as exc:
            problems.append(str(exc))
    if found:
        return tuple(dict.fromkeys(found))
    if problems:
        raise HostSkipped(f"DNS lookup failed: {'; '.join(problems)}")
    if enable_ipv6:
        raise HostSkipped("no A or AAAA record; skipping")
    raise HostSkipped("no A record (enable_ipv6 = false); skipping")


def _plan(resolvers: Sequence[str], domain: str) -> tuple[Any, list[str]] | DeliveryOutcome:
    try:
        resolver = dnsresolve.make_resolver(resolvers)
    except dnsresolve.ResolverConfigError as exc:
        return DeliveryOutcome(DEFERRED, f"DNS failure for {domain}: {exc}")
    hosts = mail_hosts(resolver, domain)
    if isinstance(hosts, DeliveryOutcome):
        return hosts
    return resolver, hosts


def wire_data(message: bytes) -> bytes:
    """The DATA payload: CRLF line endings, dot-stuffed, ending in CRLF.

    Twisted's sender would rewrite LF to CRLF and stuff dots chunk by chunk
    (missing a dot at a chunk boundary); doing it here once, on the whole
    message, keeps the bytes the DKIM signature covers exactly as signed.
    """
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", data)


# --- one SMTP attempt (reactor) ----------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _OpportunisticTLS:
    """Client TLS for STARTTLS to an MX: any certificate is accepted (opportunistic
    encryption, as almost all MTAs do without MTA-STS/DANE), SNI names the MX."""

    def __init__(self, hostname: str) -> None:
        self._context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        self._context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        self._server_name: bytes | None = None
        try:
            ipaddress.ip_address(hostname)
        except ValueError:
            try:
                self._server_name = hostname.encode("idna")
            except UnicodeError:
                self._server_name = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:  # noqa: N802,N803
        connection = SSL.Connection(self._context, None)
        if self._server_name:
            connection.set_tlsext_host_name(self._server_name)
        return connection


@implementer(IHandshakeListener)
class _Sender(smtp.ESMTPSender):
    """``ESMTPSender`` that reports TLS trouble and the final reply to its factory."""

    factory: _AttemptFactory

    def connectionMade(self) -> None:  # noqa: N802
        # Each SMTP command is a small write answered before the next: with Nagle on,
        # a write waits for the peer's delayed ACK (~40 ms) at every pipelined step.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        super().connectionMade()

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:  # noqa: N802
        self.factory.tls_started = True
        super().esmtpState_starttls(code, resp)

    def handshakeCompleted(self) -> None:  # noqa: N802 (IHandshakeListener)
        self.factory.tls_up = True

    def esmtpTLSFailed(self, code: int = -1, resp: bytes | None = None) -> None:  # noqa: N802
        self.factory.tls_refused = True
        super().esmtpTLSFailed(code, resp)

    helo_sent = False

    def smtpState_helo(self, code: int, resp: bytes) -> None:  # noqa: N802
        # Twisted calls this again when the HELO itself is refused, and would answer
        # with another HELO, forever: a second call is the refusal.
        if self.helo_sent:
            self.smtpConnectionFailed(code, resp)
            return
        self.helo_sent = True
        super().smtpState_helo(code, resp)

    def sentMail(self, code: int, resp: bytes, numOk: int, addresses: Any,  # noqa: N802,N803
                 log: Any) -> None:
        self.factory.final_reply = (code, resp)
        super().sentMail(code, resp, numOk, addresses, log)

    def transformChunk(self, chunk: bytes) -> bytes:  # noqa: N802
        self.resetTimeout()
        return chunk  # already wire form (see wire_data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.factory.connection_closed()
        super().connectionLost(reason)


class _AttemptFactory(smtp.ESMTPSenderFactory):
    protocol = _Sender

    def __init__(self, reactor: Any, *, sender: str, recipient: str, wire: bytes,
                 helo_domain: str, tls_hostname: str | None, timeout: float,
                 result: defer.Deferred[Any]) -> None:
        super().__init__(
            None, None, sender, [recipient], io.BytesIO(wire), result, retries=0,
            timeout=timeout,
            contextFactory=_OpportunisticTLS(tls_hostname) if tls_hostname else None,
            heloFallback=True, requireAuthentication=False, requireTransportSecurity=False)
        self.domain = helo_domain.encode("idna")
        self.reactor = reactor
        self.tls_started = False
        self.tls_up = False
        self.tls_refused = False
        self.final_reply: tuple[int, bytes] | None = None
        self.sender_protocol: _Sender | None = None
        self.gave_up = False
        self._closer: Any = None

    def buildProtocol(self, addr: Any) -> _Sender:  # noqa: N802
        proto = super().buildProtocol(addr)
        self.sender_protocol = proto
        return proto

    @property
    def tls_failed(self) -> bool:
        return self.tls_refused or (self.tls_started and not self.tls_up)

    def give_up(self) -> None:
        """The whole attempt took too long: drop the connection (the result then fails)."""
        proto = self.sender_protocol
        if proto is not None and proto.transport is not None:
            self.gave_up = True
            proto.transport.abortConnection()

    def close_soon(self) -> None:
        """Once the outcome is known, give the server a moment for QUIT, then hang up."""
        proto = self.sender_protocol
        if proto is None or proto.transport is None or not proto.transport.connected:
            return
        self._closer = self.reactor.callLater(_CLOSE_GRACE, proto.transport.abortConnection)

    def connection_closed(self) -> None:
        if self._closer is not None and self._closer.active():
            self._closer.cancel()
        self._closer = None


@attrs.frozen
class _Attempt:
    kind: str  # ok | permanent | temporary | tls
    text: str


def _reply_text(code: int, resp: bytes | str) -> str:
    text = resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)
    text = " ".join(text.split())
    return f"{code} {text}" if code > 0 else text


def _connection_text(exc: BaseException) -> str:
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (error.TimeoutError, error.TCPTimedOutError)):
        return "connection timed out"
    if isinstance(exc, error.ConnectionDone):
        return "connection closed by the server"
    if isinstance(exc, error.ConnectionLost):
        return "connection lost"
    if isinstance(exc, SSL.Error):
        return f"TLS error: {exc}"
    text = str(exc).strip().rstrip(".")
    return text or type(exc).__name__


def classify(failure: Failure, factory: _AttemptFactory, timeout: float) -> _Attempt:
    """What a failed attempt means: TLS trouble, a permanent 5xx or something temporary."""
    exc = failure.value
    if factory.gave_up:
        return _Attempt("temporary", f"session abandoned after {timeout * SESSION_STEPS:g}s "
                                     "(server too slow)")
    if factory.tls_failed:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        detail = (_reply_text(exc.code, exc.resp) if factory.tls_refused
                  and isinstance(exc, smtp.SMTPClientError) else _connection_text(cause))
        return _Attempt("tls", f"STARTTLS failed: {detail}")
    if isinstance(exc, smtp.SMTPTimeoutError):
        return _Attempt("temporary", f"connection timed out (no reply within {timeout:g}s)")
    if isinstance(exc, smtp.SMTPDeliveryError):
        code, resp = exc.code, exc.resp
        for _, rcpt_code, rcpt_resp in exc.addresses or ():
            if rcpt_code not in smtp.SUCCESS:  # the RCPT reply says more than "no recipients"
                code, resp = rcpt_code, rcpt_resp
        kind = "permanent" if 500 <= code <= 599 else "temporary"
        return _Attempt(kind, _reply_text(code, resp))
    if isinstance(exc, smtp.SMTPClientError):
        if 500 <= exc.code <= 599:
            return _Attempt("permanent", _reply_text(exc.code, exc.resp))
        if exc.code > 0:
            return _Attempt("temporary", _reply_text(exc.code, exc.resp))
        if exc.__cause__ is not None:
            return _Attempt("temporary", _connection_text(exc.__cause__))
        return _Attempt("temporary", _reply_text(-1, exc.resp))
    return _Attempt("temporary", _connection_text(exc))


def _bind_for(bind_address: str | None, target: str) -> tuple[str, int] | None:
    """D25: leave from the listener's address, when it is one and of the target's family."""
    if not bind_address:
        return None
    try:
        local = ipaddress.ip_address(bind_address)
        remote = ipaddress.ip_address(target)
    except ValueError:
        return None
    if local.is_unspecified or local.version != remote.version:
        return None
    return (bind_address, 0)


def attempt(reactor: Any, *, host: str, address: str, port: int, sender: str, recipient: str,
            wire: bytes, helo_domain: str, use_tls: bool, bind_address: str | None,
            timeout: float) -> defer.Deferred[_Attempt]:
    """One SMTP transaction with one server address; never fails, fires an ``_Attempt``."""
    result: defer.Deferred[Any] = defer.Deferred()
    factory = _AttemptFactory(reactor, sender=sender, recipient=recipient, wire=wire,
                              helo_domain=helo_domain, tls_hostname=host if use_tls else None,
                              timeout=timeout, result=result)

    def delivered(_: Any) -> _Attempt:
        code, resp = factory.final_reply or (250, b"")
        return _Attempt("ok", _reply_text(code, resp))

    watchdog = reactor.callLater(timeout * SESSION_STEPS, factory.give_up)

    def finished(outcome: _Attempt) -> _Attempt:
        if watchdog.active():
            watchdog.cancel()
        factory.close_soon()
        return outcome

    result.addCallbacks(delivered, lambda failure: classify(failure, factory, timeout))
    result.addCallback(finished)
    try:
        reactor.connectTCP(address, port, factory, timeout=timeout,
                           bindAddress=_bind_for(bind_address, address))
    except Exception as exc:  # noqa: BLE001 (e.g. a malformed address: this host is unusable)
        watchdog.cancel()
        return defer.succeed(_Attempt("temporary", _connection_text(exc)))
    return result


@defer.inlineCallbacks
def _attempt_with_fallback(reactor: Any, **kwargs: Any) -> Any:
    """D17: a failed STARTTLS handshake earns that server one more try in plaintext."""
    first = yield attempt(reactor, use_tls=True, **kwargs)
    if first.kind != "tls":
        return first
    log.info("delivery: %s [%s] %s; retrying once without TLS", kv(kwargs["host"]),
             kwargs["address"], kv(first.text))
    second = yield attempt(reactor, use_tls=False, **kwargs)
    return second


def _in_thread(reactor: Any, func: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), func, *args)


@defer.inlineCallbacks
def _deliver(reactor: Any, sender: str, recipient: str, message: bytes, helo_domain: str,
             resolvers: Sequence[str], enable_ipv6: bool, bind_address: str | None,
             port: int, timeout: float) -> Any:
    problem = envelope_problem(sender, recipient)
    if problem is not None:
        return DeliveryOutcome(FAILED, problem)
    domain = recipient.rpartition("@")[2].rstrip(".")
    plan = yield _in_thread(reactor, _plan, tuple(resolvers), domain)
    if isinstance(plan, DeliveryOutcome):
        return plan
    resolver, hosts = plan
    wire = wire_data(message)
    errors: list[str] = []
    for host in hosts:
        try:
            addresses = yield _in_thread(reactor, host_addresses, resolver, host, enable_ipv6)
        except HostSkipped as exc:
            errors.append(f"{host}: {exc}")
            continue
        last = ""
        for address in addresses:
            outcome = yield _attempt_with_fallback(
                reactor, host=host, address=address, port=port, sender=sender,
                recipient=recipient, wire=wire, helo_domain=helo_domain,
                bind_address=bind_address, timeout=timeout)
            if outcome.kind == "ok":
                return DeliveryOutcome(DELIVERED, f"{host} [{address}]: {outcome.text}")
            if outcome.kind == "permanent":
                return DeliveryOutcome(FAILED, f"Rejected by {host}: {outcome.text}")
            log.info("delivery: %s [%s] failed: %s", kv(host), address, kv(outcome.text))
            last = outcome.text
        errors.append(f"{host}: {last}")
    return DeliveryOutcome(DEFERRED, f"All MX servers for {domain} unreachable: "
                                     + "; ".join(errors))


def deliver(reactor: Any, *, sender: str, recipient: str, message: bytes, helo_domain: str,
            resolvers: Sequence[str], enable_ipv6: bool, bind_address: str | None = None,
            port: int | None = None, timeout: float | None = None
            ) -> defer.Deferred[DeliveryOutcome]:
    """Deliver ``message`` (signed, CRLF) from ``sender`` to ``recipient`` via its MX hosts.

    ``port`` and ``timeout`` default to 25 and 60 s, or to the test seams
    ``AIMX_TEST_SMTP_PORT`` and ``AIMX_SMTP_CLIENT_TIMEOUT``. The Deferred
    always fires with a ``DeliveryOutcome``; it never errbacks.
    """
    d = _deliver(reactor, sender, recipient, message, helo_domain, resolvers, enable_ipv6,
                 bind_address, port or smtp_port(), timeout or client_timeout())

    def unexpected(failure: Failure) -> DeliveryOutcome:
        log.error("delivery to %s failed unexpectedly", kv(recipient),
                  exc_info=(failure.type, failure.value, failure.getTracebackObject()))
        return DeliveryOutcome(DEFERRED, f"internal delivery error: {failure.getErrorMessage()}")

    return d.addErrback(unexpected)
