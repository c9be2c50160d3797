"""Processes of a server under test: its children, found through /proc."""

from __future__ import annotations

import os
from pathlib import Path


def parent_pid(pid: int) -> int | None:
    """``pid``'s parent, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` alive now (an aimx daemon's SMTP workers)."""
    return sorted(int(entry) for entry in os.listdir("/proc")
                  if entry.isdigit() and parent_pid(int(entry)) == pid)
