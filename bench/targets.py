"""The inbound targets the benchmark starts on loopback: aimx, the bare Twisted and
aiosmtpd baselines, and (in ``tests.support.postfix``) Postfix→Maildir and smtp-sink.

Every target has the same small surface: ``start()``, ``stop()``, ``host``/``port``,
``stored()`` (messages on disk), ``last_store_time()`` and ``pids()`` (the processes
whose trees are charged for CPU), so the runner treats them alike.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from bench import scratchfs
from tests.support.daemon import REPO_ROOT, RunningDaemon
from tests.support.ports import ReservedPort
from tests.support.postfix import terminate, wait_for_banner
from tests.support.procs import process_tree, stat_fields

DOMAIN = "aimx.bench"
MAILBOX = "agent"
RCPT = f"{MAILBOX}@{DOMAIN}"
OWNER = "nobody"


class Target(Protocol):
    name: str
    host: str
    port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def stored(self) -> int: ...
    def last_store_time(self) -> float | None: ...
    def pids(self) -> list[int]: ...


def aimx_config(dns_address: str, workers: int | None = None) -> dict[str, Any]:
    """DKIM, SPF and DMARC all checked against the bench DNS server; trust on.

    ``workers`` becomes ``smtp_workers`` (None: the config default, one per CPU).
    """
    config: dict[str, Any] = {
        "domain": DOMAIN,
        "trust": "verified",
        "trusted_senders": ["*@sender.bench"],
        "dns_resolvers": [dns_address],
        "mailboxes": {MAILBOX: {"address": RCPT, "owner": OWNER}},
    }
    if workers is not None:
        config["smtp_workers"] = workers
    return config


@contextlib.contextmanager
def run_directory(fresh_filesystem: bool = True) -> Iterator[tuple[Path, str]]:
    """One new directory that every target of a run keeps its files under, removed after.

    Yields the directory and a line saying which filesystem it is on. With
    ``fresh_filesystem``, that is a new ext4 image made for the run
    (``bench.scratchfs``: a file creation then costs the same for every target
    and every run); otherwise, or when no image can be mounted, the system temp
    directory. Even there the run keeps one parent: a new directory goes into its
    parent's ext4 block group when it can, so all targets share a neighbourhood.
    Temp dirs made in this process (``tempfile.tempdir``) and in its subprocesses
    (``TMPDIR``) go there.
    """
    with contextlib.ExitStack() as stack:
        base, where = None, "the system temp directory"
        if fresh_filesystem:
            try:
                base = stack.enter_context(scratchfs.scratch_filesystem())
                where = "a fresh ext4 filesystem (mkfs.ext4 defaults, on a loop device)"
            except scratchfs.Unavailable as exc:
                where += f" (no fresh filesystem: {exc})"
        parent = Path(tempfile.mkdtemp(prefix="aimx-bench-", dir=base))
        parent.chmod(0o755)  # Postfix's daemons and the mailbox owner work below it
        saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
        tempfile.tempdir = os.environ["TMPDIR"] = str(parent)
        try:
            yield parent, where
        finally:
            tempfile.tempdir = saved_tempdir
            if saved_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved_env
            shutil.rmtree(parent, ignore_errors=True)


def _md_files(directory: Path) -> list[os.DirEntry[str]]:
    try:
        return [e for e in os.scandir(directory)
                if not e.name.startswith(".") and e.name.endswith(".md")]
    except FileNotFoundError:
        return []


class AimxTarget:
    """``aimx serve`` (the very service ``twistd aimx`` runs) with a temp data dir."""

    name = "aimx"
    host = "127.0.0.1"

    def __init__(self, dns_address: str, env: dict[str, str] | None = None,
                 workers: int | None = None) -> None:
        self.dns_address = dns_address
        self.env = env or {}
        self.workers = workers
        self.daemon: RunningDaemon | None = None
        self.port = 0

    @property
    def config(self) -> dict[str, Any]:
        return aimx_config(self.dns_address, self.workers)

    def start(self) -> None:
        self.daemon = RunningDaemon(self.config, env=self.env)
        self.port = self.daemon.smtp_port

    @property
    def inbox(self) -> Path:
        assert self.daemon is not None
        return self.daemon.data_dir / "inbox" / MAILBOX

    def stored(self) -> int:
        return len(_md_files(self.inbox))

    def last_store_time(self) -> float | None:
        return max((e.stat().st_mtime for e in _md_files(self.inbox)), default=None)

    def sample_file(self) -> Path | None:
        files = _md_files(self.inbox)
        return Path(files[0].path) if files else None

    def pids(self) -> list[int]:
        """The daemon and every process under it (its SMTP workers, running hooks)."""
        if not self.daemon or not self.daemon.running():
            return []
        return process_tree([self.daemon.pid])

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.close()
            self.daemon = None


class BaselineTarget:
    """A baseline server module (``bench.baseline_twisted``, ``bench.baseline_aiosmtpd``)
    in a subprocess."""

    host = "127.0.0.1"

    def __init__(self, name: str, module: str) -> None:
        self.name = name
        self.module = module
        self._port = ReservedPort()  # held until stop(); the baseline binds it by number
        self.port = self._port.port
        self.dir = Path(tempfile.mkdtemp(prefix="aimx-bench-baseline-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--port", str(self.port),
             "--dir", str(self.dir / "store"), "--domain", DOMAIN],
            cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_banner(self.host, self.port)

    def _files(self) -> list[os.DirEntry[str]]:
        try:
            return list(os.scandir(self.dir / "store"))
        except FileNotFoundError:
            return []

    def stored(self) -> int:
        return len(self._files())

    def last_store_time(self) -> float | None:
        return max((e.stat().st_mtime for e in self._files()), default=None)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None
        self._port.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- process accounting ----------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_by_process(roots: list[int]) -> dict[int, float]:
    """user+system CPU seconds of each process in the trees of ``roots``.

    Each figure includes the children that process has waited for (cutime,
    cstime), so a worker that exited and was reaped stays counted in its parent,
    and summing the tree counts everything it ran exactly once.
    """
    out: dict[int, float] = {}
    for pid in process_tree(roots):
        fields = stat_fields(pid)
        if fields is not None:
            # utime, stime, cutime, cstime are fields 14-17 of stat(5); here shifted by 2.
            out[pid] = sum(int(value) for value in fields[11:15]) / _TICK
    return out


def cpu_seconds(roots: list[int]) -> float:
    """user+system CPU of the whole process trees of ``roots``."""
    return sum(cpu_by_process(roots).values())


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def wait_stored(target: Target, expected: int, timeout: float = 60.0) -> int:
    """Wait until ``expected`` messages are on disk (Postfix delivers after its 250)."""
    deadline = time.monotonic() + timeout
    while True:
        count = target.stored()
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)
