"""``aimx portcheck``, the port-25 checks and the verifier service, over real loopback TCP."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from aimx.cli.main import CommandError
from aimx.cli.portcheck import ROOT_REQUIRED, portcheck
from aimx.ops.console import Console
from aimx.ops.initsystem import System
from aimx.ops.portcheck import (
    INBOUND_UNREACHABLE,
    OUTBOUND_BLOCKED,
    CheckFailed,
    TempListener,
    check_inbound,
    check_outbound,
)
from tests.support.ports import ReservedPort
from tests.support.users import run_aimx_as
from tests.support.verifier import Verifier, wait_http

_CANNED = textwrap.dedent("""
    import sys
    from twisted.internet import reactor
    from twisted.web import resource, server

    class Canned(resource.Resource):
        isLeaf = True
        def render_GET(self, request):
            request.setHeader(b"content-type", b"application/json")
            with open(sys.argv[2], "rb") as body:
                return body.read()

    root = resource.Resource()
    root.putChild(b"probe", Canned())
    root.putChild(b"health", Canned())
    reactor.listenTCP(int(sys.argv[1]), server.Site(root), interface="127.0.0.1")
    reactor.run()
""")


class CannedVerifier:
    """A stand-in verifier (Twisted, loopback) whose ``/probe`` answers what the test set."""

    def __init__(self, tmp: Path) -> None:
        self._port = ReservedPort()
        self.port = self._port.port
        self.body = tmp / "probe-answer.json"
        self.body.write_text("{}")
        self.log = tmp / f"canned-{self.port}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CANNED, str(self.port), str(self.body)],
                stdout=out, stderr=subprocess.STDOUT)
        wait_http(f"{self.url}/health", self.proc, self.log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, body: str) -> CannedVerifier:
        self.body.write_text(body)
        return self

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._port.close()


@pytest.fixture(scope="module")
def canned(tmp_path_factory: pytest.TempPathFactory):
    server = CannedVerifier(tmp_path_factory.mktemp("canned"))
    yield server
    server.stop()


def _console() -> Console:
    return Console(stdin=io.StringIO(""), out=io.StringIO(), err=io.StringIO(),
                   interactive=False)


def _smtp_dialogue(port: int, lines: list[bytes]) -> list[bytes]:
    """Send each line and collect one reply line per line (after the banner)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        stream = sock.makefile("rwb")
        replies = [stream.readline()]
        for line in lines:
            stream.write(line + b"\r\n")
            stream.flush()
            replies.append(stream.readline())
        return replies


# --------------------------------------------------------------------------- the command

def test_portcheck_refuses_non_root():
    system = System(euid=lambda: 1000)
    with pytest.raises(CommandError) as err:
        portcheck(None, system, _console())
    assert str(err.value) == ROOT_REQUIRED


def test_portcheck_as_unprivileged_user_exits_1(test_users, instance_dirs):
    alice = test_users["alice"]
    result = run_aimx_as(alice, ["portcheck"], alice.env(), input="")
    assert result.returncode == 1
    assert "Error: `aimx portcheck` requires root. Run with: sudo aimx portcheck" in result.stderr


def test_portcheck_rejects_bad_verify_host():
    with pytest.raises(CommandError) as err:
        portcheck("ftp://check.example", System(euid=lambda: 0), _console())
    assert str(err.value) == ("verify-host must start with http:// or https:// "
                              "(got: ftp://check.example)")


def test_portcheck_passes_through_a_real_verifier(verifier, probe_port, instance_dirs):
    system = System(euid=lambda: 0, smtp_host="127.0.0.1", smtp_port=probe_port,
                    verify_smtp_port=verifier.smtp_port)
    console = _console()
    assert portcheck(verifier.url + "/", system, console) == 0
    out = console.out.getvalue()
    assert out.startswith("aimx portcheck - Port 25 connectivity check\n\n")
    assert "  Outbound port 25... [OK]\n  Inbound port 25... [OK]\n" in out
    assert out.endswith("Port 25 reachable. Ready for `aimx setup`.\n"
                        "Run `sudo aimx setup` to begin.\n")
    # The temporary listener is gone again.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", probe_port), timeout=1).close()


def test_portcheck_reports_blocked_outbound(verifier, probe_port, instance_dirs):
    with ReservedPort() as closed:  # nothing listens there
        system = System(euid=lambda: 0, smtp_host="127.0.0.1", smtp_port=probe_port,
                        verify_smtp_port=closed.port)
        console = _console()
        with pytest.raises(CommandError) as err:
            portcheck(verifier.url, system, console)
    assert str(err.value) == "Some checks failed. See details above."
    assert "  Outbound port 25... [FAIL]\n  Inbound port 25... [OK]\n" in console.out.getvalue()
    assert OUTBOUND_BLOCKED in console.err.getvalue()


def test_portcheck_names_the_process_occupying_the_port(verifier, instance_dirs):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        system = System(euid=lambda: 0, smtp_host="127.0.0.1",
                        smtp_port=holder.getsockname()[1], verify_smtp_port=verifier.smtp_port)
        console = _console()
        with pytest.raises(CommandError) as err:
            portcheck(verifier.url, system, console)
    finally:
        holder.close()
    name = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert str(err.value) == (f"Port 25 is occupied by `{name}`.\nStop or uninstall the "
                              "process and run `sudo aimx portcheck` again to check.")
    assert "  Outbound port 25... [OK]" in console.out.getvalue()


# --------------------------------------------------------------------------- the checks

def test_temporary_listener_speaks_just_enough_smtp():
    with TempListener(0, "127.0.0.1") as listener:
        replies = _smtp_dialogue(listener.port, [b"EHLO probe.example", b"HELO x",
                                                 b"MAIL FROM:<a@b>", b"QUIT"])
    assert replies == [b"220 localhost ESMTP aimx\r\n", b"250 localhost\r\n",
                       b"250 localhost\r\n", b"502 Not implemented\r\n", b"221 Bye\r\n"]


def test_temporary_listener_drops_idle_clients():
    listener = TempListener(0, "127.0.0.1", idle=0.3)
    try:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
            stream = sock.makefile("rb")
            assert stream.readline().startswith(b"220 ")
            assert stream.readline() == b""  # closed by the server after the idle time
    finally:
        listener.close()


@pytest.mark.parametrize("body", ['{"reachable":true,"ip":"127.0.0.1"}',
                                  '{ "reachable" : true , "ip" : "127.0.0.1" }'])
def test_probe_json_with_and_without_spaces_passes(canned, body):
    assert check_inbound(canned.answer(body).url) == "127.0.0.1"  # the address it saw


@pytest.mark.parametrize("body, message", [
    ('{"reachable": false, "ip": "127.0.0.1"}', INBOUND_UNREACHABLE),
    ('{"reachable": "true"}', INBOUND_UNREACHABLE),
    ("reachable", "Inbound port 25 check failed: invalid JSON from "),
])
def test_probe_negative_or_garbled_answers_fail(canned, body, message):
    with pytest.raises(CheckFailed) as err:
        check_inbound(canned.answer(body).url)
    assert str(err.value).startswith(message)


def test_outbound_check_against_a_non_smtp_server_fails_with_reason():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    import threading

    def greet_wrongly() -> None:
        conn, _ = server.accept()
        conn.sendall(b"554 go away\r\n")
        conn.close()

    thread = threading.Thread(target=greet_wrongly)
    thread.start()
    try:
        with pytest.raises(CheckFailed) as err:
            check_outbound("127.0.0.1", port)
    finally:
        thread.join(5)
        server.close()
    assert str(err.value) == ("Outbound port 25 check failed: unexpected greeting "
                              "'554 go away'")


# --------------------------------------------------------------------------- the verifier

def _get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_verifier_health(verifier):
    with urllib.request.urlopen(verifier.url + "/health", timeout=5) as response:
        assert response.read() == b'{"status":"ok","service":"aimx-verifier"}'
        assert response.headers["content-type"] == "application/json"


def test_verifier_probe_reaches_a_listening_caller(verifier, probe_port):
    with TempListener(probe_port, "127.0.0.1"):
        assert _get_json(verifier.url + "/probe") == (200, {"reachable": True,
                                                            "ip": "127.0.0.1"})


def test_verifier_probe_reports_unreachable_caller(verifier):
    assert _get_json(verifier.url + "/probe") == (200, {"reachable": False, "ip": "127.0.0.1"})


def test_verifier_honours_proxy_header_from_loopback(tmp_path):
    # The verifier probes the address the header names: the probe port is reserved
    # there (not on 127.0.0.1, where the shared probe port lives), so that no other
    # listener on the host can hold that number on 127.0.0.2 or on every address.
    with ReservedPort("127.0.0.2") as reserved:
        server = Verifier(tmp_path, probe_port=reserved.port)
        try:
            with TempListener(reserved.port, "127.0.0.2"):
                status, answer = _get_json(server.url + "/probe",
                                           {"X-AIMX-Client-IP": "127.0.0.2"})
        finally:
            server.stop()
    assert (status, answer) == (200, {"reachable": True, "ip": "127.0.0.2"})


def test_verifier_rejects_a_bad_proxy_header(verifier):
    status, answer = _get_json(verifier.url + "/probe", {"X-AIMX-Client-IP": "nope"})
    assert status == 400
    assert "X-AIMX-Client-IP" in answer["error"]


def test_verifier_never_probes_private_callers_by_default(tmp_path, probe_port):
    server = Verifier(tmp_path, probe_port=probe_port, allow_private=False)
    try:
        with TempListener(probe_port, "127.0.0.1"):
            assert _get_json(server.url + "/probe") == (200, {"reachable": False,
                                                              "ip": "127.0.0.1"})
    finally:
        server.stop()


def test_verifier_smtp_responder(verifier):
    replies = _smtp_dialogue(verifier.smtp_port, [b"EHLO aimx", b"RCPT TO:<x@y>", b"QUIT"])
    assert replies == [b"220 localhost ESMTP aimx\r\n", b"250 localhost\r\n",
                       b"502 Not implemented\r\n", b"221 Bye\r\n"]
