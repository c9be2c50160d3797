"""The port-25 verifier: a small public service ``aimx setup`` and ``portcheck`` call.

A VPS cannot tell on its own whether the internet reaches its port 25, nor
whether its provider lets it connect out to port 25. This service answers
both: it listens for SMTP itself (the outbound target: the server connects
here and expects ``220``/``250``), and ``GET /probe`` connects back to the
caller's port 25 and reports ``{"reachable":bool,"ip":"<caller>"}``.

Run it with ``twistd aimx-verifier --port 8080 --smtp-port 25``. Behind a
reverse proxy on the same host, the proxy passes the real client address in
``X-AIMX-Client-IP`` (only honoured when the TCP peer is loopback). Private
and loopback callers are never probed unless ``--allow-private`` is given
(labs and tests), so the service cannot be used to scan internal networks.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from twisted.application import internet, service
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python import usage
from twisted.web import resource, server

CLIENT_IP_HEADER = b"x-aimx-client-ip"
PROBE_TIMEOUT = 45.0
IDLE_TIMEOUT = 30.0
MAX_PROBES_PER_IP = 3
SERVICE_NAME = "aimx-verifier"

log = Logger(namespace="aimx::verifier")


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------- SMTP side

class Responder(LineReceiver, TimeoutMixin):
    """The SMTP endpoint servers connect to for the outbound check."""

    delimiter = b"\n"
    MAX_LENGTH = 4096

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        self.setTimeout(IDLE_TIMEOUT)
        self.sendLine(b"220 localhost ESMTP aimx\r")

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.resetTimeout()
        verb = line.strip().split(b" ", 1)[0].upper()
        if verb in (b"EHLO", b"HELO"):
            self.sendLine(b"250 localhost\r")
        elif verb == b"QUIT":
            self.sendLine(b"221 Bye\r")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 Not implemented\r")

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.sendLine(b"500 Line too long\r")
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:  # noqa: N802 (Twisted's name)
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 (Twisted's name)
        self.setTimeout(None)


class ResponderFactory(protocol.ServerFactory):
    protocol = Responder


class Handshake(LineReceiver):
    """Client side of a probe: expect 220, send EHLO, expect 250, QUIT."""

    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self) -> None:
        self.done: defer.Deferred[bool] = defer.Deferred()
        self.state = "greeting"

    def _finish(self, reachable: bool) -> None:
        if not self.done.called:
            self.done.callback(reachable)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        line = line.rstrip(b"\r")
        if line[3:4] == b"-":
            return  # continuation of a multi-line reply
        code = line[:3]
        if self.state == "greeting":
            if code != b"220":
                self._finish(False)
                self.transport.loseConnection()
                return
            self.state = "ehlo"
            self.sendLine(b"EHLO aimx-verifier\r")
        elif self.state == "ehlo":
            self._finish(code == b"250")
            self.state = "quit"
            self.sendLine(b"QUIT\r")
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:  # noqa: N802 (Twisted's name)
        self._finish(False)
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 (Twisted's name)
        self._finish(False)


def probe(reactor: Any, ip: str, port: int, timeout: float = PROBE_TIMEOUT
          ) -> defer.Deferred[bool]:
    """Whether ``ip:port`` completes an SMTP greeting and EHLO within ``timeout``."""
    address = ipaddress.ip_address(ip)
    endpoint_type = (endpoints.TCP4ClientEndpoint if address.version == 4
                     else endpoints.TCP6ClientEndpoint)
    endpoint = endpoint_type(reactor, ip, port, timeout=timeout)
    handshake = Handshake()
    connecting = endpoints.connectProtocol(endpoint, handshake)

    def connected(_proto: Any) -> defer.Deferred[bool]:
        return handshake.done

    result = connecting.addCallback(connected)
    result.addTimeout(timeout, reactor)

    def failed(_failure: Any) -> bool:
        if handshake.transport is not None:
            handshake.transport.abortConnection()
        return False

    return result.addErrback(failed)


# --------------------------------------------------------------------------- HTTP side

class Health(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802 (Twisted's name)
        request.setHeader(b"content-type", b"application/json")
        return _json({"status": "ok", "service": SERVICE_NAME})


class Probe(resource.Resource):
    """``GET /probe``: connect back to the caller's port 25."""

    isLeaf = True

    def __init__(self, reactor: Any, *, probe_port: int = 25, allow_private: bool = False,
                 timeout: float = PROBE_TIMEOUT) -> None:
        super().__init__()
        self.reactor = reactor
        self.probe_port = probe_port
        self.allow_private = allow_private
        self.timeout = timeout
        self.in_flight: dict[str, int] = {}

    def caller(self, request: server.Request) -> str | None:
        """The address to probe: the peer, or the proxy's header when the peer is loopback."""
        peer = ipaddress.ip_address(request.getClientAddress().host)
        header = request.getHeader(CLIENT_IP_HEADER)
        if header is not None and peer.is_loopback:
            try:
                # Decode first: ipaddress reads 4 or 16 raw bytes as a packed address.
                return str(ipaddress.ip_address(header.decode("ascii").strip()))
            except (UnicodeDecodeError, ValueError):
                return None
        return str(peer)

    def render_GET(self, request: server.Request) -> Any:  # noqa: N802 (Twisted's name)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        ip = self.caller(request)
        if ip is None:
            request.setResponseCode(400)
            return _json({"error": "invalid X-AIMX-Client-IP header"})
        if not self.allow_private and not ipaddress.ip_address(ip).is_global:
            log.info("probe {ip}: private address, not probed", ip=ip)
            return _json({"reachable": False, "ip": ip})
        if self.in_flight.get(ip, 0) >= MAX_PROBES_PER_IP:
            request.setResponseCode(429)
            return _json({"error": "too many probes in flight for this address"})
        self.in_flight[ip] = self.in_flight.get(ip, 0) + 1
        hung_up: list[bool] = []
        request.notifyFinish().addErrback(lambda _f: hung_up.append(True))

        def answer(reachable: bool) -> None:
            self.in_flight[ip] -= 1
            if not self.in_flight[ip]:
                del self.in_flight[ip]
            log.info("probe {ip}: reachable={reachable}", ip=ip, reachable=reachable)
            if request.finished or hung_up:  # nobody left to answer
                return
            request.write(_json({"reachable": reachable, "ip": ip}))
            request.finish()

        probe(self.reactor, ip, self.probe_port, self.timeout).addCallback(answer)
        return server.NOT_DONE_YET


def make_site(reactor: Any, **probe_options: Any) -> server.Site:
    root = resource.Resource()
    root.putChild(b"health", Health())
    root.putChild(b"probe", Probe(reactor, **probe_options))
    return server.Site(root)


# --------------------------------------------------------------------------- twistd

class Options(usage.Options):
    synopsis = "[--port 8080] [--smtp-port 25] [--interface ADDR] [--allow-private]"
    longdesc = ("Port-25 verifier for aimx: GET /health, GET /probe (connects back to the "
                "caller's port 25) and a minimal SMTP responder for outbound checks.")
    optParameters = [
        ["port", None, 8080, "HTTP port for /health and /probe", int],
        ["smtp-port", None, 25, "port of the SMTP responder (0 disables it)", int],
        ["interface", None, "", "address to listen on (default: all)"],
        ["probe-port", None, 25, "port /probe connects to on the caller", int],
        ["probe-timeout", None, PROBE_TIMEOUT, "seconds a probe may take", float],
    ]
    optFlags = [
        ["allow-private", None, "also probe private and loopback callers (labs, tests)"],
    ]


def makeService(options: Options) -> service.MultiService:  # noqa: N802 (twistd's name)
    from twisted.internet import reactor

    top = service.MultiService()
    site = make_site(reactor, probe_port=options["probe-port"],
                     allow_private=bool(options["allow-private"]),
                     timeout=options["probe-timeout"])
    internet.TCPServer(options["port"], site, interface=options["interface"]
                       ).setServiceParent(top)
    if options["smtp-port"]:
        internet.TCPServer(options["smtp-port"], ResponderFactory(),
                           interface=options["interface"]).setServiceParent(top)
    return top
