"""Postfix for the benchmark: a private instance delivering to a Maildir, and smtp-sink.

The instance runs from its own ``-c`` config dir in a temp dir, listens on one
loopback port, accepts only the bench domain and hands each message to
``virtual(8)``, which writes it into ``<base>/vmail/<user>/Maildir`` (Postfix
fsyncs the queue file before its 250 and the Maildir file before the queue
entry is removed; both are its defaults). No DNS is used: client name lookups
are off and nothing is relayed. The system's own Postfix configuration and
service are never touched.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.ports import ReservedPort

POSTFIX = "/usr/sbin/postfix"
SMTP_SINK = "/usr/sbin/smtp-sink"
DEBCONF = ("postfix postfix/main_mailer_type select No configuration\n"
           "postfix postfix/mailname string localhost\n")

_MASTER_CF = """\
{port}    inet  n       -       n       -       -       smtpd
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
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def ensure_postfix() -> str | None:
    """Install the Debian package when missing (root only); the reason to skip, or None.

    The package is preseeded with "No configuration", so the system Postfix
    is installed but neither configured nor started.
    """
    if os.path.exists(POSTFIX) and os.path.exists(SMTP_SINK):
        return None
    if os.geteuid() != 0:
        return "Postfix is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "Postfix is not installed and apt-get is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["debconf-set-selections"], input=DEBCONF, text=True, env=env,
                   capture_output=True, check=False)
    install = ["apt-get", "install", "-y", "--no-install-recommends", "postfix"]
    for attempt in range(2):
        if attempt:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False,
                           timeout=300)
        try:
            subprocess.run(install, env=env, capture_output=True, check=False, timeout=600)
        except subprocess.TimeoutExpired:
            continue
        if os.path.exists(POSTFIX) and os.path.exists(SMTP_SINK):
            return None
    return "apt-get could not install postfix"


def wait_for_banner(host: str, port: int, timeout: float = 20.0) -> None:
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


class PostfixMaildir:
    """A private Postfix accepting ``<user>@<domain>`` into a Maildir owned by ``owner``."""

    name = "postfix"

    def __init__(self, *, domain: str, user: str, owner: str = "nobody") -> None:
        self.host = "127.0.0.1"
        self._port = ReservedPort(self.host)  # held until stop(); Postfix binds it by number
        self.port = self._port.port
        self.domain = domain
        self.user = user
        entry = pwd.getpwnam(owner)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        self.base = Path(tempfile.mkdtemp(prefix="aimx-bench-postfix-"))
        self.base.chmod(0o755)
        self.config_dir = self.base / "etc"
        self.vmail = self.base / "vmail"
        self.started = False

    @property
    def maildir_new(self) -> Path:
        return self.vmail / self.user / "Maildir" / "new"

    def _write_config(self) -> None:
        self.config_dir.mkdir()
        self.vmail.mkdir()
        os.chown(self.vmail, self.uid, self.gid)
        (self.base / "queue").mkdir(mode=0o755)  # postfix-script fills it in
        data = self.base / "data"
        data.mkdir()
        os.chown(data, pwd.getpwnam("postfix").pw_uid, 0)
        (self.config_dir / "vmailbox").write_text(
            f"{self.user}@{self.domain} {self.user}/Maildir/\n")
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(port=self.port))
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.base / "queue"),
            "data_directory": str(data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": f"mx.{self.domain}",
            "mydomain": self.domain,
            "myorigin": self.domain,
            "mydestination": "",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": str(self.vmail),
            "virtual_mailbox_maps": f"texthash:{self.config_dir / 'vmailbox'}",
            "virtual_uid_maps": f"static:{self.uid}",
            "virtual_gid_maps": f"static:{self.gid}",
            "virtual_minimum_uid": "1",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "append_dot_mydomain": "no",
            "biff": "no",
            "maillog_file_prefixes": str(self.base),
            "maillog_file": str(self.base / "maillog"),
            "smtpd_tls_security_level": "none",
        }
        (self.config_dir / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in settings.items()))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.config_dir), *args],
                              capture_output=True, text=True, check=False, timeout=60)

    def start(self) -> None:
        self._write_config()
        done = self._postfix("start")
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {done.stdout}{done.stderr}")
        self.started = True
        wait_for_banner(self.host, self.port)

    def stored(self) -> int:
        try:
            return sum(1 for _ in os.scandir(self.maildir_new))
        except FileNotFoundError:
            return 0

    def last_store_time(self) -> float | None:
        """Wall-clock time the newest Maildir file was written."""
        try:
            return max((entry.stat().st_mtime for entry in os.scandir(self.maildir_new)),
                       default=None)
        except FileNotFoundError:
            return None

    def pids(self) -> list[int]:
        """Every Postfix process of this instance (master and its children)."""
        try:
            master = int((self.base / "data" / "master.lock").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            master = 0
        if not master:
            pid_file = self.base / "queue" / "pid" / "master.pid"
            try:
                master = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return []
        return [master, *_children(master)]

    def stop(self) -> None:
        if self.started:
            self._postfix("stop")
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _listening(self.host, self.port):
                time.sleep(0.2)
            if _listening(self.host, self.port):
                self._postfix("abort")
            self.started = False
        self._port.close()
        shutil.rmtree(self.base, ignore_errors=True)


class SmtpSink:
    """Postfix's ``smtp-sink``: answers every command and stores nothing."""

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
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        self._port.close()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
