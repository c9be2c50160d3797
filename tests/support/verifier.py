"""The real ``twistd aimx-verifier`` in a subprocess, on reserved loopback ports."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.daemon import REPO_ROOT
from tests.support.ports import ReservedPort


def wait_http(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Wait until ``url`` answers anything over HTTP, or fail with the server's log."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not come up:\n{log.read_text()}")


class Verifier:
    """``twistd aimx-verifier`` probing callers on ``probe_port``."""

    def __init__(self, tmp: Path, *, probe_port: int, allow_private: bool = True) -> None:
        self._ports = (ReservedPort(), ReservedPort())
        self.http_port, self.smtp_port = (port.port for port in self._ports)
        self.probe_port = probe_port
        self.log = tmp / f"verifier-{self.http_port}.log"
        argv = [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=",
                "aimx-verifier", "--interface", "127.0.0.1", "--port", str(self.http_port),
                "--smtp-port", str(self.smtp_port), "--probe-port", str(probe_port),
                "--probe-timeout", "5"]
        if allow_private:
            argv.append("--allow-private")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=REPO_ROOT)
        try:
            wait_http(f"{self.url}/health", self.proc, self.log)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        for port in self._ports:
            port.close()
