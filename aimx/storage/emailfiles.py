"""Finding and opening the email files of a mailbox dir, strictly.

An email is ``<id>.md`` or a bundle ``<id>/<id>.md``. Lookups never follow a
link, and a file is checked (regular, aimx's or the mailbox owner's, within the
size limit) before it is read. Blocking.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aimx.mail import frontmatter
from aimx.mail.naming import check_email_id
from aimx.storage import safefs
from aimx.storage.layout import open_mailbox_dir

FRONTMATTER_SCAN_LIMIT = 1024 * 1024
#: The largest email file aimx reads whole (MARK-READ, hook stdin). A stored email
#: comes from at most a 25 MiB message or a SEND of two 25 MiB bodies, plus its
#: frontmatter; anything bigger was not written by aimx and is refused, not loaded.
EMAIL_FILE_LIMIT = 64 * 1024 * 1024


def locate(mailbox_fd: int, email_id: str) -> str | None:
    """Where email ``email_id`` is inside the mailbox dir ``mailbox_fd``, without following links.

    ``<id>.md`` must be a regular file; if that name exists as anything else the
    lookup fails without trying the bundle. Otherwise ``<id>/<id>.md`` inside a
    real directory. Returns the path relative to the mailbox dir, or None.
    """
    if not check_email_id(email_id):
        return None
    flat = f"{email_id}.md"
    try:
        st = os.stat(flat, dir_fd=mailbox_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    except OSError:
        return None
    if st is not None:
        return flat if stat.S_ISREG(st.st_mode) else None
    try:
        with safefs.closing_fd(safefs.open_dir_at(mailbox_fd, email_id)) as bundle_fd:
            st = os.stat(flat, dir_fd=bundle_fd, follow_symlinks=False)
    except OSError:
        return None
    return f"{email_id}/{flat}" if stat.S_ISREG(st.st_mode) else None


def resolve_email_path(directory: str | os.PathLike[str], email_id: str) -> Path | None:
    """The ``.md`` of an email, or ``None``; symlinks and escapes never resolve.

    See :func:`locate` for the rules; the result is the path below ``directory``.
    """
    if not check_email_id(email_id):
        return None
    try:
        with safefs.closing_fd(open_mailbox_dir(directory)) as mailbox_fd:
            relative = locate(mailbox_fd, email_id)
    except OSError:
        return None
    return Path(directory) / relative if relative is not None else None


def open_stored_email(path: str | os.PathLike[str], folder: str, mailbox: str) -> int:
    """A checked read descriptor of the email file ``path`` of ``<folder>/<mailbox>``.

    When ``path`` lies in a dir named ``<folder>/<mailbox>`` (flat or in a bundle) it
    is walked from that dir's root-owned parent without following links; any other
    path (a file outside the data layout) is opened in its parent dir, which must be
    root's. The file must pass ``safefs.check_regular`` with the email file limit.
    Raises ``OSError``.
    """
    email = Path(path)
    for directory in (email.parent, email.parent.parent):
        if directory.name == mailbox and directory.parent.name == folder:
            with safefs.closing_fd(open_mailbox_dir(directory)) as mailbox_fd:
                relative = str(email.relative_to(directory))
                return open_email(mailbox_fd, relative, EMAIL_FILE_LIMIT, str(email))[0]
    with safefs.closing_fd(safefs.open_trusted_dir(email.parent)) as parent_fd:
        return open_email(parent_fd, email.name, EMAIL_FILE_LIMIT, str(email))[0]


def read_stored_email(fd: int) -> bytes:
    """The whole content of a descriptor from :func:`open_stored_email`, bounded by the limit."""
    return safefs.read_bounded(fd, EMAIL_FILE_LIMIT)


@contextlib.contextmanager
def mailbox_or_none(directory: str | os.PathLike[str]) -> Iterator[int | None]:
    """The mailbox dir's descriptor for reading, or None when it cannot be opened (missing)."""
    try:
        fd = open_mailbox_dir(directory)
    except OSError:
        yield None
        return
    with safefs.closing_fd(fd):
        yield fd


def email_entries_at(mailbox_fd: int | None) -> Iterator[tuple[str, str]]:
    """(id, path relative to the mailbox) of every email entry: regular ``*.md`` or a bundle
    dir ``<d>/<d>.md``."""
    if mailbox_fd is None:
        return
    for entry in list(os.scandir(mailbox_fd)):
        name = entry.name
        if name.startswith("."):
            continue
        try:
            if entry.is_symlink():
                continue
            if entry.is_file(follow_symlinks=False):
                if name.endswith(".md") and len(name) > 3:
                    yield name[:-3], name
            elif entry.is_dir(follow_symlinks=False):
                with safefs.closing_fd(safefs.open_dir_at(mailbox_fd, name)) as bundle_fd:
                    st = os.stat(f"{name}.md", dir_fd=bundle_fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    yield name, f"{name}/{name}.md"
        except OSError:
            continue


def _email_entries(directory: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """(id, .md path) of every email entry of a mailbox dir."""
    with mailbox_or_none(directory) as mailbox_fd:
        return [(email_id, Path(directory) / relative)
                for email_id, relative in email_entries_at(mailbox_fd)]


def list_email_ids(directory: str | os.PathLike[str]) -> list[str]:
    """Email ids in a mailbox dir, newest first (ids start with their UTC timestamp)."""
    return sorted((eid for eid, _ in _email_entries(directory)), reverse=True)


def open_email(mailbox_fd: int, relative: str, limit: int | None,
                label: str) -> tuple[int, os.stat_result]:
    """A checked read descriptor of an email file (see ``safefs.check_regular``) and its stat.

    The file may belong to this process or to the mailbox dir's owner only.
    """
    fd = safefs.open_file_at(mailbox_fd, relative)
    try:
        st = safefs.check_regular(fd, owners=safefs.owners_of(mailbox_fd), limit=limit,
                                  label=label)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def frontmatter_head(fd: int) -> bytes:
    """The start of a file holding its whole frontmatter: 16 KiB, more (to 1 MiB) when needed."""
    head = os.pread(fd, _HEAD_BYTES, 0)
    if len(head) == _HEAD_BYTES and not _has_frontmatter(head):
        head += os.pread(fd, FRONTMATTER_SCAN_LIMIT - _HEAD_BYTES, _HEAD_BYTES)
    return head


def _has_frontmatter(head: bytes) -> bool:
    opening = _CLOSING.search(head)
    return opening is not None and _CLOSING.search(head, opening.end()) is not None


_HEAD_BYTES = 16 * 1024
_CLOSING = re.compile(rb"^\+\+\+\r?\n", re.MULTILINE)


def read_entry_fields(mailbox_fd: int, relative: str) -> dict[str, Any] | None:
    """The whole frontmatter of an email file, or None when it cannot be read or parsed."""
    try:
        fd, _st = open_email(mailbox_fd, relative, None, relative)
        with safefs.closing_fd(fd):
            head = frontmatter_head(fd)
        return frontmatter.read_header_fields(head)
    except (OSError, frontmatter.FrontmatterError):
        return None
