"""A real aimx daemon in a subprocess, for tests that talk to it over TCP and the socket.

Usage::

    with RunningDaemon({"domain": "test.local", "mailboxes": {...}}) as d:
        smtp = smtplib.SMTP("127.0.0.1", d.smtp_port)
        ...
        d.sighup(); d.stop(); d.restart()

The daemon runs ``python -m aimx.cli.main serve --bind 127.0.0.1:<port>``
with ``AIMX_CONFIG_DIR``, ``AIMX_DATA_DIR`` and ``AIMX_RUNTIME_DIR`` pointing
at fresh directories, so it needs no root unless the config does (mailbox
owners other than the current user). Its stdout and stderr go to a log
file readable through ``log_text()``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomlkit

from tests.support.dkimkeys import shared_key
from tests.support.ports import ReservedPort

REPO_ROOT = Path(__file__).resolve().parents[2]


def self_signed_cert(hostname: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for ``hostname``, valid for a day, SAN included."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class DaemonError(RuntimeError):
    """The daemon did not start or stop as expected; the message carries its log."""


class RunningDaemon:
    """An ``aimx serve`` subprocess with its own config, data and runtime dirs.

    ``config`` is TOML text or a dict (written with tomlkit). ``env`` adds
    variables (e.g. ``AIMX_TEST_INGEST_FAIL_FOR``, ``AIMX_SMTP_IDLE_TIMEOUT``).
    ``tls=True`` writes a self-signed pair and passes ``--tls-cert/--tls-key``;
    otherwise ``--no-tls``. ``base`` is where the dirs go (a fresh temp dir
    by default, removed on ``close``); the runtime dir always lives in a short
    temp path because Unix socket paths are limited to 107 bytes.
    """

    def __init__(
        self,
        config: str | Mapping[str, Any],
        *,
        base: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        tls: bool = False,
        dkim_key_pem: bytes | None = None,
        extra_args: tuple[str, ...] = (),
        start: bool = True,
        start_timeout: float = 30.0,
    ) -> None:
        self._own_base = base is None
        self.base = Path(base) if base is not None else Path(tempfile.mkdtemp(prefix="aimx-d-"))
        self.base.chmod(0o755)
        self.config_dir = self.base / "config"
        self.data_dir = self.base / "data"
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="aimx-r-"))
        self.runtime_dir.chmod(0o755)
        self._runtime_root = self.runtime_dir
        for path in (self.config_dir, self.data_dir):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o755)
        self.config_path = self.config_dir / "config.toml"
        self.dkim_key_path = self.config_dir / "dkim" / "private.key"
        self.log_path = self.base / "daemon.log"
        self.extra_env = dict(env or {})
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        # Held until close(): the port stays this daemon's across stop() and start().
        self._port = ReservedPort()
        self.smtp_port = self._port.port
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls_cert: Path | None = None
        self.tls_key: Path | None = None
        self.write_config(config)
        self.dkim_key_path.parent.mkdir(exist_ok=True)
        self.dkim_key_path.write_bytes(dkim_key_pem or shared_key("daemon").private_pem)
        self.dkim_key_path.chmod(0o600)
        if tls:
            cert, key = self_signed_cert(self.domain or "localhost")
            self.tls_cert = self.base / "tls" / "cert.pem"
            self.tls_key = self.base / "tls" / "key.pem"
            self.tls_cert.parent.mkdir(exist_ok=True)
            self.tls_cert.write_bytes(cert)
            self.tls_key.write_bytes(key)
        if start:
            self.start()

    # -- files ---------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / "aimx.sock"

    @property
    def pid_path(self) -> Path:
        return self.runtime_dir / "aimx.pid"

    @property
    def domain(self) -> str | None:
        match = re.search(r'^\s*domain\s*=\s*"([^"]*)"', self.config_path.read_text(), re.M)
        return match.group(1) if match else None

    def write_config(self, config: str | Mapping[str, Any]) -> None:
        """Replace ``config.toml``; a running daemon sees it after ``sighup()``."""
        text = config if isinstance(config, str) else tomlkit.dumps(dict(config))
        tmp = self.config_path.with_name(".config.toml.test-tmp")
        tmp.write_text(text)
        tmp.chmod(0o640)
        os.replace(tmp, self.config_path)

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment in which ``aimx`` commands talk to this daemon."""
        env = dict(base if base is not None else os.environ)
        env.update(
            AIMX_CONFIG_DIR=str(self.config_dir),
            AIMX_DATA_DIR=str(self.data_dir),
            AIMX_RUNTIME_DIR=str(self.runtime_dir),
        )
        return env

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> str:
        """Wait until the log matches ``pattern`` (a regex) ``count`` times; returns the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if len(re.findall(pattern, text)) >= count:
                return text
            if time.monotonic() > deadline:
                raise DaemonError(f"log never matched {pattern!r}:\n{text}")
            time.sleep(0.05)

    # -- process -------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "aimx.cli.main", "serve",
               "--bind", f"127.0.0.1:{self.smtp_port}"]
        if self.tls_cert and self.tls_key:
            cmd += ["--tls-cert", str(self.tls_cert), "--tls-key", str(self.tls_key)]
        else:
            cmd.append("--no-tls")
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIMX_")}
        env.update(self.client_env({}))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self, wait: bool = True) -> RunningDaemon:
        if self.proc is not None and self.proc.poll() is None:
            raise DaemonError("daemon already running")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=str(REPO_ROOT), env=self.environment(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DaemonError("daemon not started")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self) -> None:
        """Block until both the SMTP port and the Unix socket accept connections."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise DaemonError(f"daemon exited with {code} during start:\n{self.log_text()}")
            if self._accepts_tcp() and self._accepts_unix():
                return
            if time.monotonic() > deadline:
                raise DaemonError(f"daemon not ready after {self.start_timeout}s:\n"
                                  f"{self.log_text()}")
            time.sleep(0.05)

    def _accepts_tcp(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1) as sock:
                sock.settimeout(2)
                # Read the banner (or the 421 of a full house) so the session ends politely.
                sock.recv(512)
                sock.sendall(b"QUIT\r\n")
            return True
        except OSError:
            return False

    def _accepts_unix(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                sock.connect(str(self.socket_path))
            return True
        except OSError:
            return False

    def signal(self, signum: int) -> None:
        if self.proc is None:
            raise DaemonError("daemon not started")
        self.proc.send_signal(signum)

    def sighup(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Send SIGHUP; with ``wait``, return once the daemon logged the reload outcome."""
        before = len(re.findall(r"SIGHUP: config reload", self.log_text()))
        self.signal(signal.SIGHUP)
        if wait:
            self.wait_for_log(r"SIGHUP: config reload", timeout, count=before + 1)

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it was not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                self.proc.kill()
                self.proc.wait(5)
                raise DaemonError(f"daemon ignored SIGTERM for {timeout}s:\n"
                                  f"{self.log_text()}") from exc
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to the whole service, as a crash (or an init system killing what is
        left of it): the daemon and its SMTP workers die together, the socket and pid
        files stay behind. Returns once none of them is running."""
        if self.proc is not None and self.proc.poll() is None:
            group = os.getpgid(self.proc.pid)  # its own session: the daemon's pid
            os.killpg(group, signal.SIGKILL)
            self.proc.wait(10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.01)

    def restart(self) -> RunningDaemon:
        if self.running():
            self.stop()
        return self.start()

    def close(self) -> None:
        try:
            if self.running():
                try:
                    self.stop(timeout=40)
                except DaemonError:
                    pass
        finally:
            self._port.close()
            shutil.rmtree(self._runtime_root, ignore_errors=True)
            if self._own_base:
                shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> RunningDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SmtpWire:
    """A raw SMTP client over a real socket, for byte-exact wire tests.

    ``cmd("NOOP")`` sends one line and returns the reply (lines joined by
    ``\\n``, as sent, without CRLF); ``send`` writes raw bytes; ``reply``
    reads the next complete reply; ``eof`` tells whether the server closed.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", *, source: str | None = None,
                 timeout: float = 20.0, read_banner: bool = True) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout,
            source_address=(source, 0) if source else None)
        self.timeout = timeout
        self._buf = b""
        self.banner = self.reply() if read_banner else ""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> str:
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def _line(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"server closed the connection (pending {self._buf!r})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self, timeout: float | None = None) -> str:
        self.sock.settimeout(timeout or self.timeout)
        lines = []
        while True:
            line = self._line()
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def eof(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection (nothing more to read)."""
        if self._buf:
            return False
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def drain(self, timeout: float = 2.0) -> bytes:
        """Everything the server still sends until it closes or goes quiet."""
        data, self._buf = self._buf, b""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return data

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SmtpWire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stored_emails(data_dir: str | os.PathLike[str], mailbox: str,
                  folder: str = "inbox") -> list[Path]:
    """The ``.md`` files of a mailbox (flat and bundled), oldest name first."""
    root = Path(data_dir) / folder / mailbox
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            inner = entry / f"{entry.name}.md"
            if inner.is_file():
                found.append(inner)
        elif entry.suffix == ".md":
            found.append(entry)
    return found
