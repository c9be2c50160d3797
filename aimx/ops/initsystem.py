"""The host aimx is installed on: init system, service files, users, ports.

Everything ``aimx setup``, ``uninstall``, ``logs`` and ``portcheck`` do to
the machine goes through one ``System`` object. The real one works on ``/``
and runs ``systemctl``, ``useradd`` and friends; tests build one over a temp
root with their own command runner, so the same code paths run end to end
without touching the host's services.

The service files are rendered from the templates ``aimx.service.in`` and
``aimx.openrc.in`` (``packaging/`` in the source tree, or
``aimx/data/packaging/`` in an installed package).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs

from aimx import paths
from aimx.fsutil import write_atomic

SYSTEMD = "systemd"
OPENRC = "openrc"
SERVICE = "aimx"
UNIT_PATH = "/etc/systemd/system/aimx.service"
OPENRC_PATH = "/etc/init.d/aimx"
OPENRC_LOG_DIR = "/var/log/aimx"
SYSLOG_FILE = "/var/log/messages"
CATCHALL_USER = "aimx-catchall"
CATCHALL_HOME = Path("/var/lib/aimx-catchall")
SYSTEMD_TEMPLATE = "aimx.service.in"
OPENRC_TEMPLATE = "aimx.openrc.in"

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class ServiceError(Exception):
    """A service-manager or user-management command failed; the text is for operators."""


# --------------------------------------------------------------------------- commands

def run_command(argv: Sequence[str], *, capture: bool = True,
                timeout: float | None = 60) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; a missing program becomes exit code 127 instead of an exception.

    ``capture=False`` lets the child write straight to our stdout/stderr (used
    for ``journalctl`` output, which may be long or endless).
    """
    try:
        return subprocess.run(list(argv), capture_output=capture, text=True, check=False,
                              timeout=None if not capture else timeout)
    except FileNotFoundError:
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", f"{argv[0]}: timed out")


def first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def aimx_executable() -> str:
    """The real path of the ``aimx`` console script running this code.

    Preference: the script we were started as, then the one installed next
    to this interpreter (the venv's), then whatever ``aimx`` is on PATH.
    """
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 and Path(argv0).name == "aimx" and os.path.isfile(argv0):
        return str(Path(argv0).resolve())
    beside = Path(sys.executable).parent / "aimx"
    if os.path.isfile(beside) and os.access(beside, os.X_OK):  # isfile: False if unreachable
        return str(beside.resolve())
    found = shutil.which("aimx")
    if found:
        return str(Path(found).resolve())
    raise ServiceError("cannot find the installed `aimx` executable "
                       "(is the package installed with pip?)")


# --------------------------------------------------------------------------- templates

def template_path(name: str) -> Path:
    """Where a service template lives: the source tree, else a wheel's shared data."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "packaging" / name,
                      Path(sys.prefix) / "share" / "aimx" / "packaging" / name):
        if candidate.is_file():
            return candidate
    raise ServiceError(f"service template {name} is missing from this aimx installation")


_SYSTEMD_PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def systemd_quote(word: str) -> str:
    """One word of a unit-file command line or list, safe from splitting and expansion."""
    escaped = word.replace("%", "%%").replace("$", "$$")
    if _SYSTEMD_PLAIN.fullmatch(word):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _shell_double_quoted(text: str) -> str:
    """``text`` made safe inside a shell double-quoted string."""
    return re.sub(r'(["\\$`])', r"\\\1", text)


def serve_argv(exe: str, data_dir: os.PathLike[str] | str,
               extra: Sequence[str] = ()) -> list[str]:
    return [exe, "serve", "--data-dir", str(data_dir), *extra]


def service_environment() -> dict[str, str]:
    """Path overrides the daemon must inherit: only the ones that differ from defaults."""
    env = {}
    if paths.config_dir() != paths.DEFAULT_CONFIG_DIR:
        env["AIMX_CONFIG_DIR"] = str(paths.config_dir())
    if paths.runtime_dir() != paths.DEFAULT_RUNTIME_DIR:
        env["AIMX_RUNTIME_DIR"] = str(paths.runtime_dir())
    return env


def render_systemd_unit(exe: str, data_dir: os.PathLike[str] | str, *,
                        serve_args: Sequence[str] = (),
                        environment: Mapping[str, str] | None = None,
                        config_dir: os.PathLike[str] | str | None = None) -> str:
    """The unit for ``<exe> serve --data-dir <data_dir> [serve_args]``."""
    env = service_environment() if environment is None else dict(environment)
    writable = [str(data_dir), str(config_dir or paths.config_dir())]
    env_lines = "".join(f"Environment={systemd_quote(f'{k}={v}')}\n" for k, v in env.items())
    text = template_path(SYSTEMD_TEMPLATE).read_text(encoding="utf-8")
    return (text.replace("@ENVIRONMENT@", env_lines)
            .replace("@EXEC_START@", " ".join(
                systemd_quote(w) for w in serve_argv(exe, data_dir, serve_args)))
            .replace("@READ_WRITE_PATHS@", " ".join(systemd_quote(p) for p in writable)))


def render_openrc_script(exe: str, data_dir: os.PathLike[str] | str, *,
                         serve_args: Sequence[str] = (),
                         environment: Mapping[str, str] | None = None) -> str:
    """The ``/etc/init.d/aimx`` script for the same command line."""
    env = service_environment() if environment is None else dict(environment)
    args = " ".join(shlex.quote(w) for w in serve_argv(exe, data_dir, serve_args)[1:])
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    text = template_path(OPENRC_TEMPLATE).read_text(encoding="utf-8")
    # openrc-run eval's "$command -- $command_args", so both hold shell-quoted words.
    return (text.replace("@COMMAND@", f'"{_shell_double_quoted(shlex.quote(exe))}"')
            .replace("@COMMAND_ARGS@", _shell_double_quoted(args))
            .replace("@EXPORTS@", exports))


# --------------------------------------------------------------------------- the host

@attrs.frozen
class PortHolder:
    """The process listening on the SMTP port, as ``ss`` reports it."""

    name: str
    pid: int | None = None
    is_aimx: bool = False


def _holder_is_aimx(name: str, pid: int | None) -> bool:
    if name == "aimx":
        return True
    if pid is None:
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    args = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
    if any(Path(a).name == "aimx" for a in args[:3]):
        return True
    # The daemon's SMTP workers hold the port-25 socket too (``-m aimx.daemon.smtpworker``).
    return ("aimx.cli.main" in args or "aimx.daemon.smtpworker" in args
            or ("aimx" in args and any("twistd" in a for a in args)))


_SS_USER = re.compile(r'users:\(\("([^"]*)",pid=(\d+)')


@attrs.frozen
class System:
    """The machine, as seen by setup and the other operations commands."""

    root: Path = attrs.field(default=Path("/"), converter=Path)
    run: Runner = run_command
    euid: Callable[[], int] = os.geteuid
    smtp_host: str = "0.0.0.0"  # where the daemon (or the preflight listener) takes mail
    smtp_port: int = 25
    verify_smtp_port: int = 25  # the verifier host's SMTP port for the outbound check
    catchall_user: str = CATCHALL_USER
    catchall_home: Path = attrs.field(default=CATCHALL_HOME, converter=Path)
    dns_resolvers: tuple[str, ...] | None = None  # None: the config's dns_resolvers
    bind_wait_seconds: float = 5.0
    addresses: Callable[[], list[str]] | None = None  # None: `hostname -I`
    executable: Callable[[], str] = aimx_executable

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    # -- init system

    def init_system(self) -> str | None:
        """``systemd`` when it is PID 1, else ``openrc`` when installed, else ``None``."""
        if self.path("/run/systemd/system").is_dir():
            return SYSTEMD
        if self.path("/sbin/openrc").exists():
            return OPENRC
        return None

    @property
    def unit_path(self) -> Path:
        return self.path(UNIT_PATH)

    @property
    def openrc_path(self) -> Path:
        return self.path(OPENRC_PATH)

    def service_file(self, init: str | None = None) -> Path | None:
        init = init or self.init_system()
        return {SYSTEMD: self.unit_path, OPENRC: self.openrc_path}.get(init or "")

    def service_running(self) -> bool:
        init = self.init_system()
        if init == SYSTEMD:
            return self.run(["systemctl", "is-active", "--quiet", SERVICE]).returncode == 0
        if init == OPENRC:
            return self.run(["rc-service", SERVICE, "status"]).returncode == 0
        return False

    def _must(self, argv: Sequence[str]) -> None:
        result = self.run(list(argv))
        if result.returncode != 0:
            detail = first_line(result.stderr) or first_line(result.stdout)
            raise ServiceError(f"`{' '.join(argv)}` failed (exit {result.returncode})"
                               + (f": {detail}" if detail else ""))

    def install_service(self, init: str, text: str) -> Path:
        """Write the unit/script, enable it and (re)start the daemon."""
        if init == SYSTEMD:
            target = self.unit_path
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, text.encode("utf-8"), 0o644)
            self._must(["systemctl", "daemon-reload"])
            self._must(["systemctl", "enable", SERVICE])
            self.run(["systemctl", "reset-failed", SERVICE])  # clears a start-limit lockout
            self._must(["systemctl", "restart", SERVICE])
        elif init == OPENRC:
            target = self.openrc_path
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, text.encode("utf-8"), 0o755)
            self._must(["rc-update", "add", SERVICE, "default"])
            self._must(["rc-service", SERVICE, "restart"])
        else:
            raise ServiceError(f"unknown init system {init!r}")
        return target

    def reload_service(self) -> bool:
        """Ask the running daemon to re-read its config (SIGHUP); returns success."""
        init = self.init_system()
        if init == SYSTEMD:
            argv = ["systemctl", "reload", SERVICE]
        elif init == OPENRC:
            argv = ["rc-service", SERVICE, "reload"]
        else:
            return False
        return self.run(argv).returncode == 0

    def reload_daemon(self) -> str | None:
        """SIGHUP the daemon; returns how it was reached, or ``None`` when none was found.

        Through the service manager when it runs the service, else (``aimx serve``
        started by hand) through the pid file, but only while the daemon's socket
        answers: a pid file left by a crash may name an unrelated process by now.
        """
        if self.service_running() and self.reload_service():
            if self.init_system() == SYSTEMD:
                return f"`systemctl reload {SERVICE}`"
            return f"`rc-service {SERVICE} reload`"
        from aimx.daemon.client import Client
        from aimx.daemon.protocol import Version

        try:
            pid = int(paths.pid_path().read_text().strip())
            Client(paths.socket_path(), timeout=5).call(Version)
            os.kill(pid, signal.SIGHUP)
        except Exception:  # noqa: BLE001 - no pid file, no daemon, no such process
            return None
        return f"SIGHUP to pid {pid}"

    def remove_service(self) -> list[str]:
        """Stop, disable and delete the service; returns what was removed.

        Best effort: a service that is already stopped or disabled is fine.
        """
        init = self.init_system()
        removed = []
        if init == SYSTEMD:
            self.run(["systemctl", "stop", SERVICE])
            self.run(["systemctl", "disable", SERVICE])
            if self.unit_path.exists():
                self.unit_path.unlink()
                removed.append(str(self.unit_path))
            self.run(["systemctl", "daemon-reload"])
            self.run(["systemctl", "reset-failed", SERVICE])
        elif init == OPENRC:
            self.run(["rc-service", SERVICE, "stop"])
            self.run(["rc-update", "del", SERVICE, "default"])
            if self.openrc_path.exists():
                self.openrc_path.unlink()
                removed.append(str(self.openrc_path))
        else:
            raise ServiceError("no supported init system found (systemd or OpenRC); "
                               "nothing to uninstall")
        return removed

    # -- network

    def port_holder(self) -> PortHolder | None:
        """Who listens on the SMTP port, or ``None`` when it is free."""
        result = self.run(["ss", "-tlnpH", f"sport = :{self.smtp_port}"])
        if result.returncode == 127:
            return PortHolder("unknown") if self.port_answers() else None
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        if result.returncode != 0 or not lines:
            return None
        for line in lines:
            found = _SS_USER.search(line)
            if found:
                pid = int(found.group(2))
                name = found.group(1)
                return PortHolder(name, pid, _holder_is_aimx(name, pid))
        return PortHolder("unknown")

    def port_answers(self) -> bool:
        host = "127.0.0.1" if self.smtp_host in ("0.0.0.0", "") else self.smtp_host
        try:
            with socket.create_connection((host, self.smtp_port), timeout=1):
                return True
        except OSError:
            return False

    def wait_for_port(self, interval: float = 0.5) -> bool:
        """Poll the SMTP port until it accepts or ``bind_wait_seconds`` pass."""
        deadline = time.monotonic() + self.bind_wait_seconds
        while True:
            if self.port_answers():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def ip_addresses(self) -> tuple[str | None, str | None]:
        """(first IPv4, first global IPv6) of this host, from ``hostname -I``."""
        if self.addresses is not None:
            words = self.addresses()
        else:
            words = self.run(["hostname", "-I"]).stdout.split()
        v4 = v6 = None
        for word in words:
            try:
                address = ipaddress.ip_address(word.split("%")[0])
            except ValueError:
                continue
            if address.version == 4 and v4 is None:
                v4 = str(address)
            elif address.version == 6 and v6 is None and address.is_global:
                v6 = str(address)
        return v4, v6

    # -- users

    def ensure_system_user(self, name: str, home: Path) -> bool:
        """Create a no-login system user with its own group; returns whether it was new.

        The home dir is created 0700 and owned by the user: nothing lives
        there, but tools that ``cd ~`` get a directory they may enter.
        """
        import pwd

        created = False
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            entry = None
        if entry is None:
            argv = ["useradd", "--system", "--no-create-home", "--home-dir", str(home),
                    "--shell", "/usr/sbin/nologin", "--user-group", name]
            result = self.run(argv)
            if result.returncode == 127:  # BusyBox (Alpine) has adduser only
                argv = ["adduser", "-S", "-H", "-h", str(home), "-s", "/sbin/nologin", name]
                result = self.run(argv)
            if result.returncode != 0:
                detail = first_line(result.stderr) or first_line(result.stdout)
                raise ServiceError(f"could not create system user '{name}': "
                                   f"`{' '.join(argv)}` exited {result.returncode}"
                                   + (f": {detail}" if detail else ""))
            entry = pwd.getpwnam(name)
            created = True
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        os.chmod(home, 0o700)
        return created


def real_system() -> System:
    return System()
