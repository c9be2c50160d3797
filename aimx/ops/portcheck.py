"""Port-25 checks: can mail reach this server, and leave it?

Outbound: connect to the verifier's SMTP responder and expect a greeting.
Inbound: ask the verifier (``GET /probe``) to connect back to our port 25,
with a throwaway responder listening when nothing else holds the port.
Shared by the setup wizard's preflight and ``aimx portcheck``. Blocking.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import TextIO

from aimx import term
from aimx.config import (
    DEFAULT_VERIFY_HOST,
    Config,
)
from aimx.ops.console import Console, SetupError
from aimx.ops.initsystem import (
    System,
)
from aimx.ops.publicip import LearnFailed

OUTBOUND_TIMEOUT = 10.0
INBOUND_TIMEOUT = 60.0
LISTENER_IDLE = 30.0
OUTBOUND_BLOCKED = "Outbound port 25 is blocked. Your VPS provider may restrict SMTP traffic."
INBOUND_UNREACHABLE = (
    "Inbound port 25 is not reachable. Check your firewall and VPS provider settings."
)


# --------------------------------------------------------------------------- validation

def normalise_verify_host(value: str) -> str:
    """Check the scheme and trim a trailing ``/``; raises ``SetupError``."""
    if not value.startswith(("http://", "https://")):
        raise SetupError(f"verify-host must start with http:// or https:// (got: {value})")
    return value.rstrip("/")


def resolve_verify_host(flag: str | None, config: Config | None) -> str:
    """Flag, else the config's ``verify_host``, else the public verifier."""
    if flag is not None:
        return normalise_verify_host(flag)
    if config is not None and config.verify_host:
        return normalise_verify_host(config.verify_host)
    return DEFAULT_VERIFY_HOST


class _ProbeHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP for a reachability probe: banner, EHLO/HELO, QUIT."""

    def handle(self) -> None:
        self.connection.settimeout(self.server.idle)  # type: ignore[attr-defined]
        try:
            self.wfile.write(b"220 localhost ESMTP aimx\r\n")
            while True:
                line = self.rfile.readline(4096)
                if not line:
                    return
                verb = line.strip().split(b" ", 1)[0].upper()
                if verb in (b"EHLO", b"HELO"):
                    self.wfile.write(b"250 localhost\r\n")
                elif verb == b"QUIT":
                    self.wfile.write(b"221 Bye\r\n")
                    return
                else:
                    self.wfile.write(b"502 Not implemented\r\n")
        except OSError:  # idle timeout or the peer went away
            return


class _ProbeServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class TempListener:
    """A throwaway port-25 responder so the verifier has something to reach.

    Runs in a background thread, because the inbound check blocks the main
    thread while the verifier connects back to us.
    """

    def __init__(self, port: int = 25, host: str = "0.0.0.0", idle: float = LISTENER_IDLE):
        self.server = _ProbeServer((host, port), _ProbeHandler, bind_and_activate=True)
        self.server.idle = idle  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self) -> TempListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CheckFailed(Exception):
    """A port-25 check failed; ``str()`` is the operator text."""


def _read_reply(stream: TextIO) -> tuple[str, list[str]]:
    """One SMTP reply (possibly multi-line): (code, lines)."""
    lines = []
    while True:
        line = stream.readline(4096)
        if not line:
            raise CheckFailed("Outbound port 25 check failed: connection closed by the server")
        line = line.rstrip("\r\n")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return line[:3], lines


def check_outbound(host: str, port: int = 25, timeout: float = OUTBOUND_TIMEOUT) -> None:
    """Connect to ``host:port``, expect 220, EHLO, expect 250, QUIT; raise CheckFailed."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except (TimeoutError, ConnectionRefusedError, ConnectionResetError) as exc:
        raise CheckFailed(OUTBOUND_BLOCKED) from exc
    except OSError as exc:
        raise CheckFailed(f"Outbound port 25 check failed: {exc}") from exc
    try:
        with sock, sock.makefile("rw", encoding="latin-1", newline="") as stream:
            code, lines = _read_reply(stream)
            if code != "220":
                raise CheckFailed(f"Outbound port 25 check failed: unexpected greeting "
                                  f"{lines[-1]!r}")
            stream.write("EHLO aimx\r\n")
            stream.flush()
            code, lines = _read_reply(stream)
            if code != "250":
                raise CheckFailed(f"Outbound port 25 check failed: EHLO answered "
                                  f"{lines[-1]!r}")
            stream.write("QUIT\r\n")
            stream.flush()
    except TimeoutError as exc:
        raise CheckFailed(OUTBOUND_BLOCKED) from exc
    except OSError as exc:
        raise CheckFailed(f"Outbound port 25 check failed: {exc}") from exc


def probe_answer(verify_host: str, timeout: float = INBOUND_TIMEOUT) -> dict[str, object]:
    """The verifier's ``/probe`` answer (``reachable``, ``ip``); raises CheckFailed."""
    url = f"{verify_host}/probe"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http[s] only)
            body = response.read(65536)
    except urllib.error.HTTPError as exc:
        raise CheckFailed(f"Inbound port 25 check failed: HTTP {exc.code} from {url}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CheckFailed(f"Inbound port 25 check failed: {reason}") from exc
    try:
        answer = json.loads(body)
    except ValueError as exc:
        raise CheckFailed(f"Inbound port 25 check failed: invalid JSON from {url}") from exc
    if not isinstance(answer, dict):
        raise CheckFailed(f"Inbound port 25 check failed: invalid JSON from {url}")
    return answer


def seen_address(answer: dict[str, object]) -> str | None:
    """The caller's address as the verifier saw it (behind NAT: the public one)."""
    ip = answer.get("ip")
    return ip if isinstance(ip, str) and ip else None


def check_inbound(verify_host: str, timeout: float = INBOUND_TIMEOUT) -> str | None:
    """Ask the verifier to connect back to our port 25; raise CheckFailed unless it could.

    Returns the address the verifier saw this machine at.
    """
    answer = probe_answer(verify_host, timeout)
    if answer.get("reachable") is not True:
        raise CheckFailed(INBOUND_UNREACHABLE)
    return seen_address(answer)


def learn_public_address(verify_host: str, timeout: float = INBOUND_TIMEOUT) -> str:
    """The address the verifier sees this machine at; raises ``publicip.LearnFailed``.

    ``/probe`` is the one call every verifier answers; its ``ip`` is the caller's
    address whether or not the connect-back reached port 25.
    """
    try:
        ip = seen_address(probe_answer(verify_host, timeout))
    except CheckFailed as exc:
        raise LearnFailed(str(exc).removeprefix("Inbound port 25 check failed: ")) from exc
    if ip is None:
        raise LearnFailed("its answer names no address")
    return ip


def verify_smtp_host(verify_host: str) -> str:
    """The outbound target: the verifier's own host name."""
    return urllib.parse.urlsplit(verify_host).hostname or ""


def run_port_checks(console: Console, system: System, verify_host: str,
                    *, listen: bool) -> tuple[str | None, str | None, str | None]:
    """Print the two check lines; returns (outbound failure, inbound failure, the
    address the verifier saw this machine at).

    ``listen`` starts the temporary responder for the inbound check (when
    nothing holds the port); raises ``SetupError`` if it cannot bind.
    """
    console.out.write("  Outbound port 25... ")
    console.out.flush()
    outbound = None
    try:
        check_outbound(verify_smtp_host(verify_host), system.verify_smtp_port)
        console.say(term.mark("ok"))
    except CheckFailed as exc:
        outbound = str(exc)
        console.say(term.mark("fail"))
        console.problem(outbound)
    console.out.write("  Inbound port 25... ")
    console.out.flush()
    listener = None
    if listen:
        try:
            listener = TempListener(system.smtp_port, system.smtp_host)
        except OSError as exc:
            console.say(term.mark("fail"))
            raise SetupError(f"Cannot bind port 25 for preflight: {exc}\n"
                             "Run with sudo or ensure port 25 is available.") from exc
    inbound = seen = None
    try:
        seen = check_inbound(verify_host)
        console.say(term.mark("ok"))
    except CheckFailed as exc:
        inbound = str(exc)
        console.say(term.mark("fail"))
        console.problem(inbound)
    finally:
        if listener is not None:
            listener.close()
    return outbound, inbound, seen
