"""OpenDKIM's verdict on a message, with keys served by a real DNS server.

``opendkim-testmsg`` resolves through the C library, which only reads
``/etc/resolv.conf`` and port 53. So each check runs in a private network and
mount namespace (``unshare``, root only) where ``tests.support.dnsserver``
serves the given zone on 127.0.0.1:53 and resolv.conf points there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.daemon import REPO_ROOT


def opendkim_tool() -> str | None:
    """``opendkim-testmsg`` when it and the namespace tools are installed, else ``None``."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    return shutil.which("opendkim-testmsg")


def opendkim_verdict(tool: str, message: bytes, zone: dict[str, list[list[str]]],
                     work: Path) -> subprocess.CompletedProcess[str]:
    """Run ``tool`` on ``message`` against ``zone``; return code 0 means it verified."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "zone.json").write_text(json.dumps(zone))
    (work / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (work / "message.eml").write_bytes(message)
    script = f"""
ip link set lo up || exit 90
mount --bind {work}/resolv.conf /etc/resolv.conf || exit 91
{sys.executable} -m tests.support.dnsserver {work}/zone.json 53 > {work}/port &
dns=$!
for i in $(seq 1 200); do [ -s {work}/port ] && break; sleep 0.05; done
{tool} < {work}/message.eml
rc=$?
kill $dns
exit $rc
"""
    return subprocess.run(["unshare", "--mount", "--net", "sh", "-c", script], cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=60, check=False)
