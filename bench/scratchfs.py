"""A freshly made ext4 filesystem for one benchmark run, so the disk starts equal.

Creating a file costs the kernel more or less depending on what the filesystem
went through before the run. On ext4 without a journal (some VM images) every
new inode is checked against the inodes deleted in the last minutes and skipped
if recently freed: after a test run or a target's cleanup, one ``open(O_CREAT)``
can scan thousands of them. That charges hundreds of microseconds per file to
whichever target runs next, and most of all to Postfix, whose own queue-file
deletions feed the scan. A loop-mounted image made with ``mkfs.ext4``'s defaults
(journal on, as on a typical VPS root filesystem) has no such history, so every
target of the run meets the same disk and runs repeat.

It needs root, ``mkfs.ext4`` and a loop device; without them the run falls back
to the system temp directory and says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Sparse: only the blocks the run writes take space (the memory part writes
#: about 1 GB, the listing part 100,000 small files).
IMAGE_BYTES = 16 * 1024**3


class Unavailable(Exception):
    """No scratch filesystem can be made here; the text says why."""


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise Unavailable(f"{argv[0]} failed: {done.stderr.strip() or done.returncode}")


@contextlib.contextmanager
def scratch_filesystem() -> Iterator[Path]:
    """Mount a new ext4 image, yield its root (mode 1777), unmount and delete it after.

    Raises ``Unavailable`` before yielding when it cannot be made.
    """
    if os.geteuid() != 0:
        raise Unavailable("not root")
    if shutil.which("mkfs.ext4") is None or shutil.which("mount") is None:
        raise Unavailable("mkfs.ext4 or mount not found")
    work = Path(tempfile.mkdtemp(prefix="aimx-bench-fs-", dir="/var/tmp"))
    work.chmod(0o755)  # Postfix's daemons and the mailbox owner work below it
    image, mountpoint = work / "image.ext4", work / "mnt"
    mountpoint.mkdir()
    mounted = False
    try:
        with image.open("wb") as f:
            f.truncate(IMAGE_BYTES)
        _run(["mkfs.ext4", "-q", "-F", "-L", "aimx-bench", str(image)])
        _run(["mount", "-o", "loop", str(image), str(mountpoint)])
        mounted = True
        mountpoint.chmod(0o1777)
        yield mountpoint
    finally:
        if mounted:
            # Lazily, so a straggling process cannot keep the image alive for ever.
            subprocess.run(["umount", "--lazy", str(mountpoint)], capture_output=True,
                           timeout=120)
        shutil.rmtree(work, ignore_errors=True)
