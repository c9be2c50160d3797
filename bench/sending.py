"""``aimx send`` against a bare smtplib script: wall time per message, same sink MX.

Both are measured the way a user meets them, as a fresh process per message:
``aimx send`` asks the running daemon over its socket, which renders the
Markdown, signs with DKIM, finds the MX through the bench DNS server, delivers
and stores the sent copy (fsync'd) before answering. The script composes the
same plain message with ``email.message`` and hands it to ``smtplib`` at the
sink's address directly (no MX lookup, no signing, no copy).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import attrs

from bench.targets import DOMAIN, MAILBOX, OWNER, aimx_config
from tests.support.daemon import REPO_ROOT, RunningDaemon
from tests.support.postfix import SmtpSinkProgram
from tests.support.users import as_user

PARTNER = "partner.bench"
RCPT = f"desk@{PARTNER}"
SUBJECT = "Quarterly numbers"
BODY = "Hi,\n\nthe **numbers** are in: revenue is up 4% and costs are flat.\n\n- Ann\n"

SMTPLIB_SCRIPT = """
import smtplib, sys
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
port, sender, rcpt, subject, body = sys.argv[1:6]
msg = EmailMessage()
msg["From"] = sender
msg["To"] = rcpt
msg["Subject"] = subject
msg["Date"] = formatdate()
msg["Message-ID"] = make_msgid(domain=sender.split("@")[1])
msg.set_content(body)
with smtplib.SMTP("127.0.0.1", int(port)) as client:
    client.send_message(msg)
"""


# The daemon's share of a send: the same SEND request, timed inside one client process
# after its imports, so CLI start-up is left out.
ROUNDTRIP_SCRIPT = """
import json, sys, time
from aimx.mail import compose
from aimx.daemon.client import Client
from aimx.daemon.protocol import Send
sender, rcpt, subject, body, runs = sys.argv[1:6]
times = []
for _ in range(int(runs)):
    started = time.perf_counter()
    message = compose.compose_message(from_addr=sender, to=rcpt, subject=subject, body=body,
                                      reply_to=None, references=None, attachments=[])
    Client().call(Send, body=message, text_only=None, html_body=None)
    times.append((time.perf_counter() - started) * 1000)
print(json.dumps(times))
"""

# What ``aimx send`` costs before it talks to the daemon: interpreter start and imports.
STARTUP_COMMAND = ["-m", "aimx.cli.main", "send", "--help"]


def partner_zone() -> dict[str, list[list[str]]]:
    return {PARTNER: [["MX", f"10 mx.{PARTNER}"]], f"mx.{PARTNER}": [["A", "127.0.0.1"]]}


@attrs.frozen
class SendResult:
    aimx_ms: list[float]
    smtplib_ms: list[float]
    roundtrip_ms: list[float]  # SEND request to reply, from a warm client
    startup_ms: list[float]  # ``aimx send --help``: interpreter plus CLI imports

    @property
    def aimx_median(self) -> float:
        return statistics.median(self.aimx_ms)

    @property
    def smtplib_median(self) -> float:
        return statistics.median(self.smtplib_ms)

    @property
    def ratio(self) -> float:
        return self.aimx_median / self.smtplib_median


def user_python() -> tuple[str, str]:
    """(interpreter, PYTHONPATH) a non-root user can run aimx with.

    The venv's interpreter may live under a home dir other users cannot enter;
    the system interpreter of the same minor version loads the venv's packages
    (same ABI), and both sides of the comparison use it.
    """
    site = next(p for p in sys.path if p.endswith("site-packages") and "venv" in p) \
        if any(p.endswith("site-packages") and "venv" in p for p in sys.path) else ""
    for candidate in (f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}",
                      "/usr/bin/python3"):
        if os.path.exists(candidate):
            probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True, check=False)
            if probe.stdout.strip() == str(tuple(sys.version_info[:2])):
                return candidate, os.pathsep.join(filter(None, [str(REPO_ROOT), site]))
    return sys.executable, str(REPO_ROOT)


def _aimx_command(python: str) -> list[str]:
    return [python, "-m", "aimx.cli.main", "send", "--from", f"{MAILBOX}@{DOMAIN}", "--to", RCPT,
            "--subject", SUBJECT, "--body", BODY]


def _as_owner() -> dict[str, Any]:
    """As the mailbox owner when root: sending is a per-user operation (never as root)."""
    return as_user(OWNER) if os.geteuid() == 0 else {}


def _timed(command: list[str], env: dict[str, str], *, as_owner: bool = False) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd="/",
                          timeout=60, check=False, **(_as_owner() if as_owner else {}))
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def measure(dns_address: str, runs: int = 15) -> SendResult:
    """Median wall time of ``runs`` sends each way, interleaved so drift hits both alike."""
    sink = SmtpSinkProgram()
    sink.start()
    daemon = RunningDaemon(aimx_config(dns_address),
                           env={"AIMX_TEST_SMTP_PORT": str(sink.port)})
    try:
        python, pythonpath = user_python()
        aimx_env = daemon.client_env()
        aimx_env["PYTHONPATH"] = pythonpath
        plain_env = dict(os.environ, PYTHONPATH=pythonpath)
        script = [python, "-c", SMTPLIB_SCRIPT, str(sink.port), f"{MAILBOX}@{DOMAIN}",
                  RCPT, SUBJECT, BODY]
        _timed(_aimx_command(python), aimx_env, as_owner=True)  # pays the daemon's lazy imports
        _timed(script, plain_env, as_owner=True)
        aimx_ms, plain_ms = [], []
        startup_ms = []
        for _ in range(runs):
            aimx_ms.append(_timed(_aimx_command(python), aimx_env, as_owner=True))
            plain_ms.append(_timed(script, plain_env, as_owner=True))
            startup_ms.append(_timed([python, *STARTUP_COMMAND], aimx_env, as_owner=True))
        done = subprocess.run(
            [python, "-c", ROUNDTRIP_SCRIPT, f"{MAILBOX}@{DOMAIN}", RCPT, SUBJECT, BODY,
             str(runs)], env=aimx_env, capture_output=True, text=True, cwd="/", timeout=120,
            check=True, **_as_owner())
        return SendResult(aimx_ms, plain_ms, json.loads(done.stdout), startup_ms)
    finally:
        daemon.close()
        sink.stop()
