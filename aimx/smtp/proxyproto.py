"""PROXY protocol (v1 and v2) on the SMTP listener, for aimx behind a load balancer.

With ``smtp_proxy_protocol = true`` a connection from an address in
``smtp_trusted_proxies`` must open with a PROXY header; the client address it
carries becomes the session's peer (SPF, logs, ``received_from_ip``, the
per-source session cap). Connections from anywhere else stay plain SMTP, and
one that opens with a PROXY header is refused, so nobody outside the trusted
list can choose the address aimx believes.

The headers are parsed by Twisted's own parsers (``twisted.protocols.haproxy``).
Its ready-made wrapper is not used: it starts the wrapped protocol before the
header has arrived (twisted#12501), so SMTP would greet and count the session
under the proxy's address, and it drops a header split across reads
(twisted#8287). Its parser classes live in underscore modules because the
package exports only ``proxyEndpoint``; the pinned Twisted version and the
tests in ``tests/test_proxy_protocol.py`` guard that import.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from typing import Any

from twisted.internet import address, interfaces
from twisted.internet.protocol import Protocol
from twisted.protocols import policies
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from zope.interface import directlyProvides, providedBy

from aimx.logs import kv, logger

log = logger("aimx::smtp")

# Sent to an untrusted client whose first bytes are a PROXY header, before closing.
R_PROXY_NOT_TRUSTED = "554 5.7.1 PROXY header not accepted from your address"

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = V2Parser.PREFIX  # 12 bytes; byte 13 holds version and command, 15-16 the length
V1_MAX_LINE = 107  # the v1 header, CRLF included, is at most this long (PROXY spec §2.1)
V2_FIXED = 16


class HeaderError(ValueError):
    """The bytes from a trusted proxy are not a PROXY header."""


def header_length(buffer: bytes) -> int | None:
    """Bytes of the PROXY header at the start of ``buffer``; None while it is incomplete.

    Only framing: the content is checked by Twisted's parsers. Raises
    ``HeaderError`` as soon as the bytes cannot be the start of a header.
    """
    if buffer[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(buffer)]:
        if len(buffer) < V2_FIXED:
            return None
        return V2_FIXED + struct.unpack("!H", buffer[14:16])[0]
    if buffer[:len(V1_SIGNATURE)] == V1_SIGNATURE[:len(buffer)]:
        end = buffer.find(b"\r\n", 0, V1_MAX_LINE)
        if end >= 0:
            return end + 2
        if len(buffer) >= V1_MAX_LINE:
            raise HeaderError("PROXY v1 line longer than 107 bytes")
        return None
    raise HeaderError("no PROXY header")


def starts_like_header(buffer: bytes) -> bool | None:
    """Whether ``buffer`` opens with a PROXY signature; None while too short to tell."""
    for signature in (V1_SIGNATURE, V2_SIGNATURE):
        if buffer[:len(signature)] == signature[:len(buffer)]:
            return True if len(buffer) >= len(signature) else None
    return False


def forwarded_peer(header: bytes) -> tuple[str, Any]:
    """Parse one complete header: (version, the client address or None).

    None means the header names no TCP client (v2 ``LOCAL``, v1 ``UNKNOWN``, a
    UNIX-socket or UDP source): the connection is then the proxy's own, such
    as a health check. Raises ``HeaderError`` for a malformed header.
    """
    if header == b"PROXY UNKNOWN\r\n":  # valid v1, but Twisted's parser wants more words
        return "1", None
    try:
        if header.startswith(V2_SIGNATURE):
            version, info = "2", V2Parser.parse(header)
        else:
            version, info = "1", V1Parser.parse(header[:-2])
    except (InvalidProxyHeader, ValueError, KeyError) as exc:
        raise HeaderError(f"malformed PROXY header ({type(exc).__name__})") from None
    source = info.source
    if isinstance(source, address.IPv4Address | address.IPv6Address) and source.type == "TCP":
        try:
            ip = ipaddress.ip_address(source.host)
        except ValueError:
            raise HeaderError("malformed PROXY header (bad source address)") from None
        # The canonical text (Twisted spells v2 IPv6 addresses out in full), as a direct
        # connection from the same client would show it.
        kind = address.IPv4Address if ip.version == 4 else address.IPv6Address
        return version, kind("TCP", str(ip), source.port)
    return version, None


@functools.lru_cache(maxsize=8)
def _networks(entries: tuple[str, ...]) -> tuple[Any, ...]:
    from aimx.config import parse_proxy_network

    return tuple(parse_proxy_network(entry) for entry in entries)


def is_trusted_proxy(host: str, entries: tuple[str, ...]) -> bool:
    """Whether the connecting address ``host`` is in ``smtp_trusted_proxies``."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d
    return any(ip in network for network in _networks(entries))


class ProxiedConnection(policies.ProtocolWrapper):
    """A connection from a trusted proxy: the SMTP session starts only once the
    PROXY header is read, and sees the forwarded client as its peer.

    The header must arrive within the session's command timeout; a proxy that
    sends anything else, or nothing, is disconnected and logged.
    """

    factory: SmtpListenerFactory

    def __init__(self, factory: SmtpListenerFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self._buffer = b""
        self._peer: Any = None
        self._started = False
        self._timer: Any = None

    def makeConnection(self, transport: Any) -> None:  # noqa: N802 (Twisted's name)
        # ProtocolWrapper.makeConnection without starting the wrapped protocol.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self) -> None:  # noqa: N802
        smtp = self.factory.smtp_factory
        if len(self.factory.awaiting_header) >= smtp.limits.max_sessions:
            log.warning("connection refused proxy=%s reason=too-many-awaiting-proxy-header",
                        kv(self._proxy_ip()))
            self.transport.loseConnection()
            return
        self.factory.awaiting_header.add(self)
        self._timer = smtp.daemon.reactor.callLater(smtp.limits.idle_timeout, self._too_slow)

    def _proxy_ip(self) -> str:
        return str(getattr(self.transport.getPeer(), "host", ""))

    def _too_slow(self) -> None:
        self._timer = None
        self._reject("no PROXY header in time")

    def _reject(self, reason: str) -> None:
        log.warning("connection from trusted proxy closed proxy=%s: %s", kv(self._proxy_ip()),
                    reason)
        self._stop_waiting()
        self.transport.loseConnection()

    def _stop_waiting(self) -> None:
        self.factory.awaiting_header.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting or self not in self.factory.awaiting_header:
            return
        self._buffer += data
        try:
            length = header_length(self._buffer)
            if length is None:
                return
            if len(self._buffer) < length:
                return
            header, rest = self._buffer[:length], self._buffer[length:]
            version, peer = forwarded_peer(header)
        except HeaderError as exc:
            self._reject(str(exc))
            return
        self._buffer = b""
        self._stop_waiting()
        self._peer = peer
        if peer is None:
            log.info("PROXY header without a client address (health check) proxy=%s "
                     "version=%s: session uses the proxy's address", kv(self._proxy_ip()),
                     version)
        else:
            log.info("proxied connection proxy=%s peer=%s version=%s", kv(self._proxy_ip()),
                     kv(peer.host), version)
        self._started = True
        self.wrappedProtocol.makeConnection(self)
        if rest and self.connected and not self.disconnecting:
            self.wrappedProtocol.dataReceived(rest)

    def getPeer(self) -> Any:  # noqa: N802
        return self._peer if self._peer is not None else self.transport.getPeer()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        if self._started:
            super().connectionLost(reason)
            return
        if self in self.factory.awaiting_header:
            log.warning("connection from trusted proxy closed proxy=%s: gone before its "
                        "PROXY header", kv(self._proxy_ip()))
        self._stop_waiting()
        self.factory.unregisterProtocol(self)
        self.wrappedProtocol = None


class UntrustedConnection(policies.ProtocolWrapper):
    """A plain SMTP connection while PROXY protocol is on: refused if it opens with a
    PROXY header, since only a trusted proxy may name the client address."""

    def __init__(self, factory: SmtpListenerFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self._first = b""
        self._checked = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._checked:
            self.wrappedProtocol.dataReceived(data)
            return
        self._first += data
        verdict = starts_like_header(self._first)
        if verdict is None:
            return  # the session's own command timeout still runs
        self._checked = True
        data, self._first = self._first, b""
        if verdict:
            peer = str(getattr(self.transport.getPeer(), "host", ""))
            log.warning("PROXY header refused from untrusted peer=%s", kv(peer))
            self.transport.write(R_PROXY_NOT_TRUSTED.encode() + b"\r\n")
            self.loseConnection()
            return
        self.wrappedProtocol.dataReceived(data)


class SmtpListenerFactory(policies.WrappingFactory):
    """What the SMTP port listens with: the sessions of ``smtp_factory``, behind the
    PROXY-protocol check when the live config turns it on (a reload takes effect for
    the next connection)."""

    def __init__(self, smtp_factory: Any) -> None:
        super().__init__(smtp_factory)
        self.smtp_factory = smtp_factory
        self.awaiting_header: set[ProxiedConnection] = set()

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 (Twisted's name)
        session = self.smtp_factory.buildProtocol(addr)
        config = self.smtp_factory.daemon.config
        if not getattr(config, "smtp_proxy_protocol", False):
            return session
        host = str(getattr(addr, "host", ""))
        if is_trusted_proxy(host, tuple(config.smtp_trusted_proxies)):
            return ProxiedConnection(self, session)
        return UntrustedConnection(self, session)


def smtp_listener_factory(smtp_factory: Any) -> interfaces.IProtocolFactory:
    """The factory to listen on port 25 with (or to adopt a listening socket with)."""
    return SmtpListenerFactory(smtp_factory)
