"""Read state: the ``read = true`` line, and marking an email read or unread.

The rewrite changes only the ``read`` and ``read_at`` lines of the frontmatter
(``frontmatter.set_read_state``) and replaces the file atomically. Blocking.
"""

from __future__ import annotations

import datetime
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

from aimx.mail import frontmatter
from aimx.mail.headers import rfc3339_utc
from aimx.storage import safefs
from aimx.storage.atomic import publish_file
from aimx.storage.emailfiles import EMAIL_FILE_LIMIT, locate, mailbox_or_none, open_email
from aimx.storage.layout import StorageError

_READ_TRUE_LINE = re.compile(r"^\s*read\s*=\s*true\s*(#.*)?$")
_DELIMITER = "+++"


def has_read_line(head: bytes) -> bool:
    """Whether the frontmatter in ``head`` has a ``read = true`` line."""
    return any(_READ_TRUE_LINE.match(line) for line in _frontmatter_text_lines(head))


def _frontmatter_text_lines(data: bytes) -> Iterator[str]:
    """The lines between the first two ``+++`` lines of ``data``, decoded leniently."""
    opened = False
    for raw in io.BytesIO(data):  # split exactly as iterating the file does
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if line == _DELIMITER:
            if opened:
                return
            opened = True
            continue
        if opened:
            yield line


def rewrite_read_state(directory: Path, mailbox: str, email_id: str, read: bool,
                       ids: tuple[int, int] | None,
                       now: datetime.datetime | None = None) -> Path:
    """Flip ``read`` (and ``read_at``) of email ``email_id`` in the mailbox dir ``directory``.

    Call under the mailbox lock. Raises ``StorageError`` with ``NOTFOUND`` (no
    such email) or ``IO`` (bad frontmatter, read or write failure). Returns the
    rewritten path.
    """
    with mailbox_or_none(directory) as mailbox_fd:
        relative = None if mailbox_fd is None else locate(mailbox_fd, email_id)
        if relative is None:
            raise StorageError("NOTFOUND", f"email '{email_id}' not found in inbox/{mailbox}")
        path = directory / relative
        # The file is read, and its replacement renamed into place, through the
        # descriptor of the dir it was found in: swapping that dir (or any name on
        # the way) for a link moves neither the read nor the write elsewhere.
        bundle, _, name = relative.rpartition("/")
        try:
            parent_fd = safefs.open_dir_at(mailbox_fd, bundle) if bundle else os.dup(mailbox_fd)
        except OSError as exc:
            raise StorageError("IO", f"failed to read {path}: {exc}") from exc
        with safefs.closing_fd(parent_fd):
            try:
                fd, _st = open_email(parent_fd, name, EMAIL_FILE_LIMIT, str(path))
                with safefs.closing_fd(fd):
                    original = safefs.read_bounded(fd, EMAIL_FILE_LIMIT)
            except OSError as exc:
                raise StorageError("IO", f"failed to read {path}: {exc}") from exc
            try:
                updated = frontmatter.set_read_state(
                    original, read, rfc3339_utc(now or datetime.datetime.now(datetime.UTC)))
            except frontmatter.FrontmatterError as exc:
                if exc.__cause__ is None:  # no +++ block at all
                    raise StorageError("IO", f"malformed frontmatter in {path}") from exc
                raise StorageError(
                    "IO", f"failed to parse frontmatter in {path}: {exc.__cause__}") from exc
            try:
                publish_file(parent_fd, name, updated, ids, label=str(path))
            except OSError as exc:
                raise StorageError("IO", f"failed to write {path}: {exc}") from exc
        return path
