"""Whether a socket caller runs inside one of the daemon's hook runs.

Mail sent from a hook is automatic and must say so (``Auto-Submitted``), or
two agents whose hooks answer each other loop forever. The client's own word
(``AIMX_EVENT`` in its environment) is easy to lose, so the daemon also checks
for itself, from the pid the kernel reported for the connection: the caller is
inside a hook run when its session is a hook's (the trampoline makes every hook
a session leader, and only descendants can be born into a session) or when a
hook process is among its ancestors. Blocking (reads ``/proc``): call it off
the reactor thread.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

PROC = Path("/proc")
MAX_DEPTH = 64  # ancestors walked at most


def _stat_fields(pid: int, proc: Path) -> tuple[int, int] | None:
    """(parent pid, session id) of ``pid``, or None when it is gone or unreadable."""
    try:
        data = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[1]), int(fields[3])
    except (IndexError, ValueError):
        return None


def inside_hook_run(pid: int | None, hook_pids: Collection[int], *,
                    proc: Path = PROC) -> bool:
    """True when ``pid`` is a hook process or descends from one still running."""
    if not pid or pid <= 0 or not hook_pids:
        return False
    current = pid
    for _ in range(MAX_DEPTH):
        if current in hook_pids:
            return True
        fields = _stat_fields(current, proc)
        if fields is None:
            return False
        parent, session = fields
        if session in hook_pids:
            return True
        if parent <= 1:
            return False
        current = parent
    return False
