"""Processes of a server under test, found through /proc."""

from __future__ import annotations

import os
from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3 onwards of ``/proc/<pid>/stat`` (after the command name), or None
    once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` alive now (an aimx daemon's SMTP workers)."""
    return sorted(_children_by_parent().get(pid, ()))


def process_tree(roots: list[int]) -> list[int]:
    """``roots`` and every live descendant of them."""
    children = _children_by_parent()
    found: list[int] = []
    pending = list(roots)
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.append(pid)
            pending.extend(children.get(pid, ()))
    return found
