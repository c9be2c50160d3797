"""Real Linux users for ownership and authorization tests (root only)."""

from __future__ import annotations

import itertools
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.support.locks import HostLock

REPO_ROOT = Path(__file__).resolve().parents[2]

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: creates Linux users and changes file ownership"
)


@attrs.frozen
class LinuxUser:
    __test__ = False  # not a pytest test class, whatever name a test module imports it under

    name: str
    uid: int
    gid: int
    home: str

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(base if base is not None else os.environ)
        env.update(HOME=self.home, USER=self.name, LOGNAME=self.name)
        return env


def ensure_user(name: str) -> LinuxUser:
    """Create ``name`` (with a home dir and its own group) unless it exists.

    Safe when several test workers or runs ask at once: creation happens under
    a host lock, and a ``useradd`` that loses a race with a run that does not
    take the lock (the user appeared, or /etc/passwd was locked) is retried.
    """
    with HostLock("useradd"):
        for attempt in itertools.count():
            try:
                entry = pwd.getpwnam(name)
                break
            except KeyError:
                pass
            done = subprocess.run(
                ["useradd", "--create-home", "--user-group", "--shell", "/bin/sh", name],
                check=False, capture_output=True, text=True,
            )
            if done.returncode != 0:
                if attempt >= 20:
                    raise RuntimeError(f"useradd {name} failed: {done.stderr.strip()}")
                time.sleep(0.1)
    return LinuxUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def remove_user(name: str) -> str | None:
    """``userdel --remove``; what went wrong, or None."""
    done = subprocess.run(["userdel", "--remove", name], capture_output=True, text=True,
                          check=False)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def checkout_blocker() -> Path | None:
    """The first directory on the way to this checkout or its ``aimx`` script that other
    users cannot traverse, or None.

    ``run_aimx_as`` loads the interpreter as root (it may live under a private home),
    but the command then still reaches into the checkout as the user: its own script
    path, ``.git`` for the version. A clone inside a ``mktemp -d`` dir (0700) blocks that.
    """
    for target in (REPO_ROOT, AIMX.parent):
        for path in (*reversed(target.parents), target):
            if not path.stat().st_mode & stat.S_IXOTH:
                return path
    return None


def skip_unless_users_reach_checkout() -> None:
    """Skip a test that runs this checkout's ``aimx`` as a test user where they cannot."""
    blocker = checkout_blocker()
    if blocker is not None:
        pytest.skip(f"test users cannot run this checkout's aimx: {blocker} is not "
                    f"traversable by other users (mode {stat.S_IMODE(blocker.stat().st_mode):o})")


def system_python_path(directory: Path) -> Path:
    """``directory`` filled with a copy of this checkout's ``aimx`` package and the one
    third-party package ``aimx send`` imports (idna): a PYTHONPATH on which the system
    ``python3`` runs ``aimx send`` as any user (hooks run as mailbox owners). A copy,
    not links: the users may not reach the checkout or the venv."""
    import idna

    for package in (REPO_ROOT / "aimx", Path(idna.__file__).parent):
        shutil.copytree(package, directory / package.name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for root, _dirs, files in os.walk(directory):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return directory


# Runs Python code as another user. The interpreter may live where only root can read,
# so the child runs ``prepare`` (imports) while still root, then drops to the user
# (groups, gid, uid), then runs ``code``; both see the JSON ``spec`` as ``spec``. A
# child that already is that user skips both steps.
_LAUNCHER = r"""
import json, os, sys
spec = json.loads(sys.argv[1])
who = spec.pop("_as_user")
if who is not None and who["uid"] != os.geteuid():
{prepare}
    if who["name"]:
        os.initgroups(who["name"], who["gid"])
    else:
        os.setgroups([])
    os.setgid(who["gid"])
    os.setuid(who["uid"])
{code}
"""


def python_as_command(user: LinuxUser | None, code: str, spec: dict[str, Any] | None = None,
                      *, prepare: str = "", uid: int | None = None) -> list[str]:
    """The command line that runs ``code`` as ``user`` (or a bare ``uid``; neither: as
    this process), after ``prepare`` ran as root. Both see ``spec`` as ``spec``."""
    if user is not None:
        who = {"uid": user.uid, "gid": user.gid, "name": user.name}
    elif uid is not None:
        who = {"uid": uid, "gid": uid, "name": None}
    else:
        who = None
    script = _LAUNCHER.format(
        prepare=textwrap.indent(textwrap.dedent(prepare).strip() or "pass", "    "),
        code=textwrap.dedent(code).strip())
    return [sys.executable, "-c", script, json.dumps({**(spec or {}), "_as_user": who})]


def as_user(name: str) -> dict[str, Any]:
    """``subprocess`` arguments that run a program as user ``name`` (its groups, gid,
    uid), switched in the child just before exec: nothing runs in between, so a timed
    program is timed alone."""
    entry = pwd.getpwnam(name)
    return {"user": entry.pw_uid, "group": entry.pw_gid,
            "extra_groups": os.getgrouplist(name, entry.pw_gid)}


def run_program_as(user: LinuxUser, argv: list[str], **kwargs: Any,
                   ) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run(argv, **kwargs)`` with the program running as ``user``."""
    return subprocess.run(argv, **as_user(user.name), **kwargs)


# The console script a user runs; the CLI launcher presents itself as it (sys.argv[0]).
AIMX = Path(sys.executable).parent / "aimx"

# Everything an ``aimx`` command can import, prompts on a terminal included. Run as
# itself, the CLI imports lazily like a real ``aimx``.
_AIMX_PREPARE = """
import base64, email.header, email.utils, mimetypes, select, sqlite3, termios, tty, uuid
import aimx.cli.main, aimx.config, aimx.configedit, aimx.term, aimx.ops.agents
import aimx.mail.compose, aimx.daemon.api, aimx.daemon.client, aimx.daemon.protocol
import aimx.storage.mailstore
aimx.cli.main.import_all_commands()
mimetypes.init()
"""

_AIMX_RUN = """
import aimx.cli.main
sys.argv = [spec["argv0"], *spec["argv"]]
sys.exit(aimx.cli.main.main(spec["argv"]))
"""


def aimx_as_command(user: LinuxUser | None, argv: list[str], *, prepare: str = "",
                    ) -> list[str]:
    """The command line that runs ``aimx <argv>`` as ``user`` (None: as this process);
    ``prepare`` adds what to load as root beyond what every command needs (say, the
    MCP server's imports)."""
    return python_as_command(user, _AIMX_RUN, {"argv0": str(AIMX), "argv": list(argv)},
                             prepare=_AIMX_PREPARE + textwrap.dedent(prepare))


def run_aimx_as(user: LinuxUser | None, argv: list[str], env: dict[str, str], *,
                input: str | None = None, timeout: float = 120, wait: bool = True,
                ) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    """``aimx <argv>`` as ``user`` (None: as this process) with ``env``; with
    ``wait=False`` the running process (stdout and stderr piped)."""
    command = aimx_as_command(user, argv)
    if not wait:
        return subprocess.Popen(command, env=env, cwd=str(REPO_ROOT), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, cwd=str(REPO_ROOT), input=input,
                          capture_output=True, text=True, timeout=timeout)


# One call to the daemon socket, connecting after the drop so the daemon's SO_PEERCRED
# sees the user. Prints the answer as JSON: {"ok": ...}, {"error": [code, reason]}, or
# the raw reply box.
_API_CALL_PREPARE = """
import socket
from aimx.daemon import client, protocol
"""

_API_CALL = r"""
import socket
from aimx.daemon.client import Client, read_box
from aimx.daemon import protocol
command = protocol.COMMANDS[spec["verb"].encode()]
args = {key: value.encode("utf-8", "surrogateescape") if key in spec["byte_args"] else value
        for key, value in spec["args"].items()}
if spec["raw"]:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(spec["socket"])
    sock.sendall(protocol.request_box(command, args, b"1").serialize())
    print(json.dumps({"raw": sorted((k.hex(), v.hex()) for k, v in read_box(sock).items())}))
    sys.exit(0)
try:
    print(json.dumps({"ok": Client(spec["socket"]).call(command, **args)}))
except protocol.ApiError as exc:
    print(json.dumps({"error": [exc.code, exc.reason]}))
"""


def call_api_as(user: LinuxUser | None, socket_path: os.PathLike[str] | str, verb: str,
                args: dict[str, Any], env: dict[str, str], *, raw: bool = False,
                uid: int | None = None, timeout: float = 60) -> dict[str, Any]:
    """One socket call ``verb(**args)`` as ``user`` (or a bare ``uid``; neither: root).

    ``bytes`` values in ``args`` are passed as bytes. The result is ``{"ok": ...}`` or
    ``{"error": [code, reason]}`` (with ``raw``, the reply box as hex pairs).
    """
    if user is not None:
        env = user.env(env)
    byte_args = [key for key, value in args.items() if isinstance(value, bytes)]
    spec = {"verb": verb, "socket": str(socket_path), "raw": raw, "byte_args": byte_args,
            "args": {key: value.decode("utf-8", "surrogateescape") if key in byte_args
                     else value for key, value in args.items()}}
    command = python_as_command(user, _API_CALL, spec, prepare=_API_CALL_PREPARE, uid=uid)
    proc = subprocess.run(command, env=env, cwd=str(REPO_ROOT), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
