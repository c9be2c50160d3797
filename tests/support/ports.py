"""Loopback ports for tests, taken without a race.

Never pick a free number and bind it later: between the two, any other
process on the host (another test worker, another test run) can take it.
Instead, either

- a server we run binds port 0 itself and reports the number
  (``SmtpSink``, ``DnsServer``), or gets a socket already bound here; or
- a server that only takes a number (``aimx serve --bind``, twistd, Postfix,
  the code under test) gets the number of a ``ReservedPort``, which stays
  bound in the test process for as long as the server may run.
"""

from __future__ import annotations

import socket


class ReservedPort:
    """A TCP port number held for a server that binds it by number.

    The socket is bound with ``SO_REUSEADDR`` and never listens. A server that
    also sets ``SO_REUSEADDR`` (Twisted, asyncio, socketserver with
    ``allow_reuse_address``, Postfix) binds and listens on the same number;
    nothing else gets it: the kernel hands it to no port-0 bind and no outgoing
    connection, and a plain bind fails. While no server listens, connections
    are refused, as on a free port. Held until ``close()``, so a server that
    restarts finds its port still free.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.port: int = self.sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ReservedPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def udp_and_tcp(host: str = "127.0.0.1", port: int = 0,
                attempts: int = 200) -> tuple[socket.socket, socket.socket]:
    """A UDP socket and a listening TCP socket bound to one port number, as DNS needs.

    With ``port=0`` the kernel picks the UDP port; when the TCP port of that
    number is taken, both are let go and a new number is tried.
    """
    for _ in range(attempts):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind((host, port))
            # No SO_REUSEADDR: the number must not be anyone's ReservedPort either.
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(64)
        except OSError:
            udp.close()
            tcp.close()
            if port:
                raise
            continue
        return udp, tcp
    raise RuntimeError(f"no port on {host} free for both UDP and TCP after {attempts} tries")
