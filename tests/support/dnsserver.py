"""A real DNS server for tests, built on twisted.names.

Run as a subprocess (``python -m tests.support.dnsserver ZONEFILE``) so the
code under test talks to it over real UDP/TCP on loopback. The zone file is
JSON: ``{"name": [["MX", "10 mx.example.test"], ["A", "127.0.0.2"], ...]}``.
It is re-read on SIGHUP, so a test can change records without a restart;
the server prints a line once the new zone is in effect.
Names not in the file answer NXDOMAIN; a name present without the asked
type answers NOERROR with no records. ``["SERVFAIL", ""]`` makes a name
answer SERVFAIL; ``["DROP", ""]`` makes it never answer.

Usage from tests::

    with DnsServer({"example.test": [["MX", "10 mx.example.test"]]}) as dns:
        resolvers = [f"127.0.0.1:{dns.port}"]
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tests.support.ports import udp_and_tcp

_TYPES = ("A", "AAAA", "MX", "TXT", "CNAME", "NS", "PTR")


def _serve(zone_path: str, port: int) -> None:
    from twisted.internet import defer, reactor
    from twisted.names import dns, error, server
    from twisted.names.common import ResolverBase

    zone: dict[str, list[list[str]]] = {}

    def load() -> None:
        with open(zone_path) as fh:
            data = json.load(fh)
        zone.clear()
        zone.update({k.lower().rstrip("."): v for k, v in data.items()})

    def reload() -> None:
        load()
        print("reloaded", flush=True)  # DnsServer.reload() waits for this line

    class ZoneResolver(ResolverBase):
        def _lookup(self, name, cls, type_, timeout):  # noqa: ANN001
            key = name.decode().lower().rstrip(".")
            if key not in zone:
                return defer.fail(error.DomainError(name))
            entries = zone[key]
            kinds = {kind for kind, _ in entries}
            if "DROP" in kinds:
                return defer.Deferred()  # never answers
            if "SERVFAIL" in kinds:
                # Any failure that is not a DomainError is answered as SERVFAIL.
                return defer.fail(RuntimeError(f"configured SERVFAIL for {key}"))
            answers = []
            for kind, value in entries:
                if dns.QUERY_TYPES.get(type_) != kind and not (
                    kind == "CNAME" and type_ != dns.CNAME
                ):
                    continue
                answers.append(dns.RRHeader(name=name, type=getattr(dns, kind), ttl=60,
                                            payload=_payload(dns, kind, value)))
            return defer.succeed((answers, [], []))

    load()
    signal.signal(signal.SIGHUP, lambda *a: reactor.callFromThread(reload))
    factory = server.DNSServerFactory(clients=[ZoneResolver()])
    protocol = dns.DNSDatagramProtocol(controller=factory)
    udp, tcp = udp_and_tcp(port=port)
    for sock in (udp, tcp):
        sock.setblocking(False)
    reactor.adoptDatagramPort(udp.fileno(), socket.AF_INET, protocol, 65535)
    reactor.adoptStreamPort(tcp.fileno(), socket.AF_INET, factory)
    bound = udp.getsockname()[1]
    udp.close()
    tcp.close()
    print(bound, flush=True)
    reactor.run()


def _payload(dns, kind: str, value: str):  # noqa: ANN001
    if kind == "A":
        return dns.Record_A(value, ttl=60)
    if kind == "AAAA":
        return dns.Record_AAAA(value, ttl=60)
    if kind == "MX":
        pref, host = value.split(None, 1)
        # A null MX (RFC 7505) is "0 ." and has the root as its exchange.
        return dns.Record_MX(int(pref), host.rstrip(".").encode(), ttl=60)
    if kind == "TXT":
        # Long TXT values are split into 255-byte strings, as real zones publish them.
        raw = value.encode()
        return dns.Record_TXT(*[raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""], ttl=60)
    if kind == "CNAME":
        return dns.Record_CNAME(value, ttl=60)
    if kind == "NS":
        return dns.Record_NS(value, ttl=60)
    if kind == "PTR":
        return dns.Record_PTR(value, ttl=60)
    raise ValueError(kind)


class DnsServer:
    """A twisted.names server in a subprocess serving a mutable zone."""

    def __init__(self, records: dict[str, list[list[str]]] | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="aimx-dns-")
        self.zone_path = Path(self._dir.name) / "zone.json"
        self.records: dict[str, list[list[str]]] = dict(records or {})
        self._write()
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write(self) -> None:
        tmp = self.zone_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records))
        os.replace(tmp, self.zone_path)

    def set(self, name: str, entries: list[list[str]]) -> None:
        """Replace every record of ``name`` and make the server re-read the zone."""
        self.records[name] = [list(e) for e in entries]
        self.reload()

    def reload(self) -> None:
        """Write the zone; a running server answers from it when this returns."""
        self._write()
        if self.proc:
            self.proc.send_signal(signal.SIGHUP)
            line = self.proc.stdout.readline() if self.proc.stdout else ""
            if line.strip() != "reloaded":
                raise RuntimeError(f"test DNS server did not reload (said {line!r})")

    def start(self) -> DnsServer:
        root = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.dnsserver", str(self.zone_path)],
            stdout=subprocess.PIPE, text=True, cwd=str(root),
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip():
            raise RuntimeError("test DNS server did not start")
        self.port = int(line)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        self._dir.cleanup()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SilentDns:
    """A UDP+TCP endpoint on loopback that never answers a DNS query."""

    def __init__(self) -> None:
        self.udp, self.tcp = udp_and_tcp()
        self.port = self.udp.getsockname()[1]

    def wait_for_query(self, timeout: float = 10.0) -> bool:
        """True once a query has arrived over UDP (it stays unread, so unanswered)."""
        readable, _, _ = select.select([self.udp], [], [], timeout)
        return bool(readable)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()

    def __enter__(self) -> SilentDns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from a stream socket; ``OSError`` if it ends first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("short read")
        data += chunk
    return data


class ThreadedDnsEndpoint:
    """A hand-made DNS endpoint: one thread serves its UDP socket, one its TCP socket.

    Subclasses say what a query gets (``answer``) and, when TCP needs more than
    one length-prefixed query and answer, how a connection is served
    (``serve_stream``). For the endpoints twisted.names cannot play: a relay on
    a fixed address, a server that answers with junk.
    """

    def __init__(self, udp: socket.socket, tcp: socket.socket) -> None:
        self.udp, self.tcp = udp, tcp
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._udp_loop, daemon=True),
                         threading.Thread(target=self._tcp_loop, daemon=True)]
        for thread in self._threads:
            thread.start()

    def answer(self, query: bytes) -> bytes:
        raise NotImplementedError

    def serve_stream(self, conn: socket.socket) -> None:
        """One TCP connection: a length-prefixed query, its length-prefixed answer."""
        query = recv_exactly(conn, int.from_bytes(recv_exactly(conn, 2), "big"))
        reply = self.answer(query)
        conn.sendall(len(reply).to_bytes(2, "big") + reply)

    def _udp_loop(self) -> None:
        self.udp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                query, client = self.udp.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self.udp.sendto(self.answer(query), client)
            except OSError:
                continue

    def _tcp_loop(self) -> None:
        self.tcp.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(3)
                try:
                    self.serve_stream(conn)
                except OSError:
                    continue

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self.udp.close()
        self.tcp.close()

    def __enter__(self) -> ThreadedDnsEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
