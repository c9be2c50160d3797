"""Postfix for interop tests and the benchmark, and DKIM checks with OpenDKIM's tools.

``Postfix`` (the Debian package) runs from its own config directory in a temp
dir (``postfix -c <dir> start``), listens on one loopback address and port,
delivers its virtual domain into Maildirs through ``virtual(8)`` (Postfix fsyncs
the queue file before its 250 and the Maildir file before the queue entry is
removed; both are its defaults) and relays other domains through an optional
transport map, all without touching the system's Postfix configuration or
service, and without DNS: relay targets are IP literals and client name lookups
are off. ``SmtpSinkProgram`` is Postfix's ``smtp-sink``, which stores nothing.

``opendkim-testmsg`` verifies through the C library resolver, which only
reads ``/etc/resolv.conf``; ``opendkim_verify`` therefore runs it in a
private mount namespace whose ``resolv.conf`` names a ``DnsRelay`` on
port 53 of a loopback address, forwarding to the test's twisted.names
server. The host's own ``resolv.conf`` is never changed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from tests.support.dnsserver import ThreadedDnsEndpoint, recv_exactly
from tests.support.ports import ReservedPort
from tests.support.procs import child_pids

POSTFIX = "/usr/sbin/postfix"
SMTP_SINK = "/usr/sbin/smtp-sink"
# The files each Debian package brings that the tests and the benchmark run.
PACKAGE_FILES = {"postfix": (POSTFIX, SMTP_SINK),
                 "opendkim-tools": ("/usr/sbin/opendkim-testmsg",)}
DEBCONF = ("postfix postfix/main_mailer_type select No configuration\n"
           "postfix postfix/mailname string localhost\n")


def _missing(packages: tuple[str, ...]) -> list[str]:
    return [pkg for pkg in packages
            if not all(os.path.exists(path) for path in PACKAGE_FILES[pkg])]


def ensure_installed(*packages: str) -> str | None:
    """Install ``packages`` (default: Postfix) with apt when missing (root only); the
    reason to skip, or None.

    Postfix is preseeded with "No configuration": the system Postfix is installed
    but neither configured nor started.
    """
    packages = packages or ("postfix",)
    if not _missing(packages):
        return None
    missing = ", ".join(_missing(packages))
    if os.geteuid() != 0:
        return f"{missing} not installed, and installing needs root"
    if not shutil.which("apt-get"):
        return f"{missing} not installed, and apt-get is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["debconf-set-selections"], input=DEBCONF, text=True, env=env,
                   capture_output=True, check=False)
    install = ["apt-get", "install", "-y", "--no-install-recommends", *_missing(packages)]
    for attempt in range(2):
        if attempt:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False,
                           timeout=300)
        try:
            subprocess.run(install, env=env, capture_output=True, check=False, timeout=600)
        except subprocess.TimeoutExpired:
            continue
        if not _missing(packages):
            return None
    return f"could not install {', '.join(_missing(packages))} with apt-get"


def wait_for_banner(host: str, port: int, timeout: float = 20.0) -> None:
    """Until an SMTP server greets with 220 on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                sock.settimeout(5)
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answers SMTP on {host}:{port}")
        time.sleep(0.1)


def terminate(proc: subprocess.Popen) -> None:
    """Stop a server process: TERM, then KILL if it has not gone within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# The listener names its address here rather than in ``inet_interfaces``: Postfix
# refuses an ``inet_interfaces`` address that no interface carries, and loopback
# aliases such as 127.0.0.4 are routed to ``lo`` without being configured on it.
MASTER_CF = """\
{host}:{port} inet n     -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """One private Postfix: ``host:port``, Maildirs for ``domain``, relays by ``transports``.

    ``users`` are the local parts that have a Maildir (delivered as ``uid``/``gid``);
    ``transports`` maps a domain to a host (an IP literal) reached on port 25 from
    ``host``. Without ``port``, a free one is reserved until ``stop()``. As a
    benchmark target it counts what reached the Maildirs (``stored()``).
    """

    name = "postfix"

    def __init__(self, *, domain: str, users: tuple[str, ...], uid: int, gid: int,
                 host: str = "127.0.0.1", port: int | None = None,
                 transports: Mapping[str, str] | None = None) -> None:
        self.host = host
        # Held until stop(); Postfix binds it by number.
        self._reserved = ReservedPort(host) if port is None else None
        self.port = self._reserved.port if self._reserved is not None else port
        self.domain = domain
        self.users = users
        self.transports = dict(transports or {})
        self.uid, self.gid = uid, gid
        self.base = Path(tempfile.mkdtemp(prefix="aimx-postfix-"))
        self.base.chmod(0o755)
        self.config_dir = self.base / "etc"
        self.vmail = self.base / "vmail"
        self.log_path = self.base / "maillog"
        self.started = False

    def _write_config(self) -> None:
        self.config_dir.mkdir()
        self.vmail.mkdir()
        os.chown(self.vmail, self.uid, self.gid)
        (self.base / "data").mkdir()
        os.chown(self.base / "data", pwd.getpwnam("postfix").pw_uid, 0)
        (self.config_dir / "vmailbox").write_text(
            "".join(f"{user}@{self.domain} {user}/Maildir/\n" for user in self.users))
        (self.config_dir / "transport").write_text(
            "".join(f"{domain} smtp:[{host}]:25\n" for domain, host in self.transports.items()))
        (self.base / "queue").mkdir(mode=0o755)  # postfix-script fills it in
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(host=self.host,
                                                                    port=self.port))
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.base / "queue"),
            "data_directory": str(self.base / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": f"mx.{self.domain}",
            "mydomain": self.domain,
            "myorigin": self.domain,
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtp_bind_address": self.host,
            "smtp_helo_name": f"mx.{self.domain}",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": str(self.vmail),
            "virtual_mailbox_maps": f"texthash:{self.config_dir / 'vmailbox'}",
            "virtual_uid_maps": f"static:{self.uid}",
            "virtual_gid_maps": f"static:{self.gid}",
            "virtual_minimum_uid": "1",
            "transport_maps": f"texthash:{self.config_dir / 'transport'}",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "append_dot_mydomain": "no",
            "biff": "no",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.base),
            "smtp_tls_security_level": "may",
            "smtpd_tls_security_level": "none",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        (self.config_dir / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in settings.items()))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.config_dir), *args],
                              capture_output=True, text=True, check=False, timeout=60)

    def start(self) -> Postfix:
        self._write_config()
        done = self._postfix("start")
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {done.stdout}{done.stderr}\n"
                               f"{self.log_text()}")
        self.started = True
        try:
            wait_for_banner(self.host, self.port)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.log_text()}") from None
        return self

    def stop(self) -> None:
        if self.started:
            self._postfix("stop")
            # master waits for its children; make sure nothing lingers on the address.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _listening(self.host, self.port):
                time.sleep(0.2)
            if _listening(self.host, self.port):
                self._postfix("abort")
            self.started = False
        if self._reserved is not None:
            self._reserved.close()
        shutil.rmtree(self.base, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def maildir_messages(self, user: str) -> list[Path]:
        new = self.vmail / user / "Maildir" / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def wait_for_message(self, user: str, needle: bytes, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            for path in self.maildir_messages(user):
                data = path.read_bytes()
                if needle in data:
                    return data
            if time.monotonic() > deadline:
                raise AssertionError(f"no Maildir message with {needle!r} for {user}:\n"
                                     f"{self.log_text()[-4000:]}")
            time.sleep(0.2)

    def stored(self) -> int:
        """Messages delivered into the Maildirs so far."""
        count = 0
        for user in self.users:
            try:
                count += sum(1 for _ in os.scandir(self.vmail / user / "Maildir" / "new"))
            except FileNotFoundError:
                pass
        return count

    def last_store_time(self) -> float | None:
        """Wall-clock time the newest Maildir file was written."""
        return max((path.stat().st_mtime for user in self.users
                    for path in self.maildir_messages(user)), default=None)

    def pids(self) -> list[int]:
        """Every Postfix process of this instance (master and its children)."""
        for pid_file in (self.base / "data" / "master.lock",
                         self.base / "queue" / "pid" / "master.pid"):
            try:
                master = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if master:
                return [master, *child_pids(master)]
        return []

    def __enter__(self) -> Postfix:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SmtpSinkProgram:
    """Postfix's ``smtp-sink`` on a reserved loopback port: answers every command and
    stores nothing (a benchmark target)."""

    name = "smtp-sink"

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self._port = ReservedPort(self.host)  # held until stop(); smtp-sink binds it by number
        self.port = self._port.port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [SMTP_SINK, "-u", "nobody", "-h", "sink.bench", f"{self.host}:{self.port}",
                   "256"]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for_banner(self.host, self.port)

    def stored(self) -> int:
        return 0

    def last_store_time(self) -> float | None:
        return None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None
        self._port.close()


class DnsRelay(ThreadedDnsEndpoint):
    """Forward DNS from ``address:53`` (UDP and TCP) to a test server on 127.0.0.1."""

    def __init__(self, address: str, upstream_port: int) -> None:
        self.address = address
        self.upstream = ("127.0.0.1", upstream_port)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((address, 53))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((address, 53))
        tcp.listen(8)
        super().__init__(udp, tcp)

    def answer(self, query: bytes) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.settimeout(3)
            up.sendto(query, self.upstream)
            return up.recvfrom(65535)[0]

    def serve_stream(self, conn: socket.socket) -> None:
        with socket.create_connection(self.upstream, timeout=3) as up:
            head = recv_exactly(conn, 2)
            up.sendall(head + recv_exactly(conn, int.from_bytes(head, "big")))
            head = recv_exactly(up, 2)
            conn.sendall(head + recv_exactly(up, int.from_bytes(head, "big")))


def opendkim_verify(message: bytes, *, nameserver: str) -> tuple[int, str]:
    """``opendkim-testmsg`` in verify mode, resolving through ``nameserver`` (port 53).

    Returns (exit code, output); 0 with no output means every signature verified.
    """
    with tempfile.TemporaryDirectory(prefix="aimx-odkim-") as tmp:
        resolv = Path(tmp) / "resolv.conf"
        resolv.write_text(f"nameserver {nameserver}\noptions attempts:2 timeout:2\n")
        script = 'mount --bind "$1" /etc/resolv.conf && exec opendkim-testmsg -t "$2"'
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             str(resolv), tmp],
            input=message, capture_output=True, timeout=60, check=False)
        return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")
