"""README's first steps as a new user takes them: `make run`, then what it prints.

`make run` is ``python -m aimx.ops.devrun`` from the venv; these tests start that
module with a fresh directory and a free port (the developer's own ``.dev`` and
port 2525 stay untouched), then run the printed commands as printed: the
smtplib snippet, the ``export`` line with ``aimx doctor``, and, when the
instance has a mailbox, ``aimx send``. An agent registration made with the
printed environment is started the way an agent starts it (its command and
arguments, an environment of the agent's own) and must reach this instance.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from aimx.mail import frontmatter
from tests.support.daemon import REPO_ROOT
from tests.support.ports import ReservedPort
from tests.support.users import run_aimx_as

STOP_LINE = "Stop with Ctrl-C."
DROP_MARKER = b"----- AIMX TEST DROP -----\n"

class DevRun:
    """``python -m aimx.ops.devrun`` in a subprocess, and what it printed."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.reserved = ReservedPort()  # held while devrun runs; it binds the number
        self.port = self.reserved.port
        self.log = root.parent / f"{root.name}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aimx.ops.devrun", "--dir", str(root),
                 "--bind", f"127.0.0.1:{self.port}"],
                env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        lines = []
        assert self.process.stdout is not None
        for line in self.process.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == STOP_LINE:
                break
        self.printed = "\n".join(lines)
        assert STOP_LINE in self.printed, self.printed + self.log.read_text()
        # The daemon's log lines follow on stdout: keep reading them so it never blocks.
        self.output: list[str] = []
        self._drain = threading.Thread(target=self.output.extend, args=(self.process.stdout,),
                                       daemon=True)
        self._drain.start()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while not any("aimx daemon started" in line for line in self.output):
            assert self.process.poll() is None, "".join(self.output) + self.log.read_text()
            assert time.monotonic() < deadline, "".join(self.output) + self.log.read_text()
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._drain.join(timeout=10)
        self.reserved.close()

    def block_after(self, heading: str) -> list[str]:
        """The indented command lines printed after ``heading``, without the indent."""
        lines = self.printed.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(heading)) + 2
        block = []
        for line in lines[start:]:
            if not line.startswith("    "):
                break
            block.append(line[4:])
        return block


def shell(script: str, **kwargs) -> subprocess.CompletedProcess[str]:
    """``script`` in bash from an unrelated directory, with a plain user environment."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8", "NO_COLOR": "1"}
    return subprocess.run(["bash", "-c", script], env=env, cwd="/", capture_output=True,
                          text=True, timeout=120, **kwargs)


@pytest.fixture
def dev_root() -> Iterator[Path]:
    """A fresh directory for the dev files (short: the socket path has a length limit)."""
    base = Path(tempfile.mkdtemp(prefix="aimx-dev-"))
    base.chmod(0o755)
    yield base / "dev"
    shutil.rmtree(base, ignore_errors=True)


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("AIMX_") and key != "SUDO_USER"}
    env.update(extra)
    return env


def inbox_fields(root: Path, mailbox: str) -> list[dict]:
    inbox = root / "data" / "inbox" / mailbox
    return [frontmatter.parse(path.read_bytes()) for path in sorted(inbox.glob("*.md"))]


async def _mailbox_names(command: str, args: list[str]) -> list[str]:
    # An agent starts the server with an environment of its own: no AIMX_* variables.
    params = StdioServerParameters(command=command, args=args, cwd="/",
                                   env={"PATH": "/usr/bin:/bin", "HOME": "/root"})
    with tempfile.TemporaryFile("w+") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("mailbox_list", {})
    text = result.content[0].text
    assert not result.is_error, text
    return [row["name"] for row in json.loads(text)]


def registered_server(listing: str) -> tuple[str, list[str]]:
    """(command, args) of the MCP server `aimx agents list` registers for JSON agents."""
    found = re.search(r"settings\.json: (\{.*\})$", listing, re.MULTILINE)
    assert found, listing
    server = json.loads(found.group(1))["mcpServers"]["aimx"]
    return server["command"], server["args"]


# -- the tests ---------------------------------------------------------------------------------


def test_readme_first_steps_work_as_printed(dev_root):
    """make run, the printed snippet, the printed CLI commands, doctor, an agent."""
    run = DevRun(dev_root, clean_env())
    try:
        printed = run.printed
        assert "env AIMX_" not in printed  # the old hint named an `aimx` not on PATH
        mailbox = "catchall" if os.geteuid() == 0 else None
        config = (dev_root / "config" / "config.toml").read_text()
        if mailbox is None:
            mailbox = re.search(r"^\[mailboxes\.(?!catchall\])([^\]]+)\]", config, re.M).group(1)

        snippet = "\n".join(run.block_after("Send it a message"))
        for _ in range(2):  # twice: the same message, no Message-ID, sent again
            sent = shell(snippet)
            assert sent.returncode == 0, sent.stderr
        landing = re.search(r"It lands in (\S+)/ as a Markdown file", printed).group(1)
        stored = inbox_fields(dev_root, Path(landing).name)
        assert len(stored) == 2 and all(not fields["message_id"] for fields in stored)
        assert stored[0]["thread_id"] != stored[1]["thread_id"]  # two threads, not one

        cli = run.block_after("Use the CLI against this instance")
        export, doctor_line = cli[0], cli[1]
        assert export.startswith("export ") and doctor_line.endswith(" doctor")
        aimx = shlex.split(doctor_line)[0]
        assert os.path.isabs(aimx) and os.access(aimx, os.X_OK)
        doctor = shell(f"{export}\n{doctor_line}")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "  SMTP server:      running" in doctor.stdout
        checks = doctor.stdout.split("\nChecks\n", 1)[1]
        assert "[FAIL]" not in checks and "[WARN]" not in checks, checks

        sends = [line for line in cli if " send " in line]
        if os.geteuid() == 0:
            assert not sends
            assert "aimx send refuses root" in printed and "sudo make run" in printed
        else:
            [send_line] = sends
            done = shell(f"{export}\n{send_line}")
            assert done.returncode == 0, done.stderr
            assert "Email sent." in done.stderr
            assert (dev_root / "outbox.txt").read_bytes().startswith(DROP_MARKER)

        listing = shell(f"{export}\n{aimx} agents list")
        assert listing.returncode == 0, listing.stderr
        command, args = registered_server(listing.stdout)
        names = anyio.run(_mailbox_names, command, args)
        assert mailbox in names
    finally:
        run.stop()


def test_sudo_make_run_gives_the_invoking_user_a_mailbox_that_sends(dev_root, test_users):
    """Through sudo the mailboxes belong to the user who ran it, and the printed send
    command works for that user."""
    alice = test_users["alice"]
    run = DevRun(dev_root, clean_env(SUDO_USER=alice.name))
    try:
        cli = run.block_after("Use the CLI against this instance")
        export = cli[0]
        [send_line] = [line for line in cli if " send " in line]
        assert f"--from {alice.name}@aimx.localhost" in send_line
        assert f"as {alice.name} (your own shell, not sudo)" in run.printed

        doctor = shell(f"{export}\n{cli[1]}")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "All checks passed." in doctor.stdout

        env = {"PATH": "/usr/bin:/bin", "HOME": alice.home, "USER": alice.name,
               "LOGNAME": alice.name, "NO_COLOR": "1"}
        env.update(dict(item.split("=", 1) for item in shlex.split(export)[1:]))
        done = run_aimx_as(alice, shlex.split(send_line)[1:], env)
        assert done.returncode == 0, done.stderr
        assert "Email sent." in done.stderr
        assert (dev_root / "outbox.txt").read_bytes().startswith(DROP_MARKER)
        sent = dev_root / "data" / "sent" / alice.name
        [copy] = list(sent.glob("*.md"))
        assert copy.stat().st_uid == alice.uid
    finally:
        run.stop()
