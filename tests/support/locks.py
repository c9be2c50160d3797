"""Host-wide locks for test resources that exist once per machine.

Test workers (pytest-xdist) and other test runs on the same host share the
Linux users, fixed addresses such as ``127.0.0.2:25`` and the loopback
blocks of ``LoopbackHosts``. A ``HostLock`` is an ``flock`` on a file in a
shared directory under ``/tmp``; the kernel drops it when the holder
exits, so a crashed run leaves nothing locked.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

# A fixed place, not the temp dir: every run on the host must find the same locks
# whatever its TMPDIR (the benchmark points TMPDIR at a directory of its own).
LOCK_DIR = Path("/tmp/aimx-test-locks")


class HostLock:
    """A lock named ``name``, held from ``acquire()`` to ``release()``: exclusive, or
    with ``shared`` held by any number of holders at once (and by no exclusive one)."""

    def __init__(self, name: str, *, shared: bool = False) -> None:
        self.path = LOCK_DIR / f"{name}.lock"
        self.mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; without ``blocking``, False at once when someone else holds it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this process")
        try:
            LOCK_DIR.mkdir()
            LOCK_DIR.chmod(0o1777)  # shared by every user's test runs, like /tmp
        except FileExistsError:
            pass
        # Read-only is enough for flock, so a lock file created by root serves any user.
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, self.mode | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> HostLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
