"""Version facts shared by ``aimx --version`` and the daemon's VERSION verb."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import attrs

from aimx import __version__


@attrs.frozen
class VersionInfo:
    tag: str
    git_hash: str
    target: str
    build_date: str

    def banner(self) -> str:
        return (
            f"AIMX (AI Mail Exchange) version {self.tag} ({self.git_hash}) "
            f"{self.target} built {self.build_date}"
        )


def _git_hash() -> str:
    checkout = Path(__file__).resolve().parent.parent
    if not os.path.exists(checkout / ".git"):  # False, not an error, when unreachable
        return "unknown"
    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short=8", "HEAD"],
            capture_output=True, text=True, timeout=2, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _build_date() -> str:
    """The package's install date stands in for a build date."""
    try:
        mtime = os.stat(__file__).st_mtime
    except OSError:
        return "unknown"
    return datetime.datetime.fromtimestamp(mtime, datetime.UTC).strftime("%Y-%m-%d")


def version_info() -> VersionInfo:
    return VersionInfo(
        tag=__version__,
        git_hash=_git_hash(),
        target=f"{platform.machine() or 'unknown'}-{platform.system().lower() or 'unknown'}",
        build_date=_build_date(),
    )
