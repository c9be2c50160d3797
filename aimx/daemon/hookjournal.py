"""Hook bookkeeping on disk: which emails still wait for their hooks, which already fired.

Two directories of small marker files under ``<data>/.aimx``, shared by the
daemon and ``aimx ingest``: ``hooks-pending`` (an email stored with hooks to
run, written before its 250 so a crash cannot lose the wake-up) and
``hooks-fired`` (``on_receive`` fires at most once per mailbox and Message-ID
in 24 h). Blocking: the daemon calls it off the reactor thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from aimx.config import ON_RECEIVE
from aimx.fsutil import write_atomic

DEDUP_WINDOW_SECS = 24 * 3600
PRUNE_EVERY_SECS = 3600


class FiredLog:
    """Which (mailbox, Message-ID) pairs already fired ``on_receive``, for 24 h.

    One empty marker file per pair under ``<state_dir>/hooks-fired``, named by
    a hash of the pair; its mtime is the fire time. Creating it with
    ``O_EXCL`` is the claim, so two processes sharing the state dir (the
    daemon and ``aimx ingest``) cannot both fire. Blocking: call off the
    reactor thread.
    """

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "hooks-fired"
        self._last_prune = 0.0

    def _marker(self, mailbox: str, message_id: str) -> Path:
        digest = hashlib.sha256(f"{mailbox}\0{message_id}".encode()).hexdigest()
        return self.dir / digest

    def claim(self, mailbox: str, message_id: str, now: float | None = None) -> bool:
        """True when this pair has not fired within the window (and is now recorded)."""
        now = time.time() if now is None else now
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if now - self._last_prune >= PRUNE_EVERY_SECS:
            self.prune(now)
        marker = self._marker(mailbox, message_id)
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            try:
                fired_at = marker.stat().st_mtime
            except FileNotFoundError:
                fired_at = 0.0
            if now - fired_at < DEDUP_WINDOW_SECS:
                return False
            os.utime(marker, (now, now))
            return True
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.utime(marker, (now, now))
        return True

    def prune(self, now: float | None = None) -> int:
        """Drop markers older than the window; returns how many went."""
        now = time.time() if now is None else now
        self._last_prune = now
        removed = 0
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if now - entry.stat().st_mtime >= DEDUP_WINDOW_SECS:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        return removed


class PendingHooks:
    """Stored emails whose ``on_receive`` hooks have not been claimed yet.

    The SMTP path records one small fsync'd marker per stored email that has
    hooks to run, before its 250; the runner removes it once it has decided
    (fired or skipped). Markers still present at start-up are emails a crash
    stored but never woke anyone for, and the daemon fires them then. The
    fired-once log keeps that replay from firing anything twice. Blocking.

    ``origin`` tags the markers this journal writes (an SMTP worker uses its
    pid), so that when one worker dies the daemon replays that worker's
    emails alone, not those other workers are still about to acknowledge.
    """

    def __init__(self, state_dir: Path, origin: str = "") -> None:
        self.dir = Path(state_dir) / "hooks-pending"
        self.origin = origin

    def _marker(self, path: str) -> Path:
        return self.dir / hashlib.sha256(path.encode()).hexdigest()

    @staticmethod
    def wanted(config: Any, mailbox_name: str, fields: Any) -> bool:
        """Whether a stored email needs a marker: it will run an ``on_receive`` hook.

        Asked by the SMTP server through the journal it was handed, so the SMTP
        layer needs no knowledge of hooks.
        """
        return has_receive_hooks(config, mailbox_name, fields)

    def add(self, mailbox: str, path: str) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = {"mailbox": mailbox, "path": path}
        if self.origin:
            record["origin"] = self.origin
        write_atomic(self._marker(path), json.dumps(record).encode(), 0o600)

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._marker(path))

    def entries(self, origin: str | None = None) -> list[tuple[str, str]]:
        """(mailbox, path) of every pending email, or of those ``origin`` journalled;
        unreadable markers are dropped."""
        found = []
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        for name in names:
            if name.startswith("."):
                continue  # a marker still being written (or one a crash cut short)
            marker = self.dir / name
            try:
                data = json.loads(marker.read_text())
                if origin is not None and data.get("origin", "") != origin:
                    continue
                found.append((str(data["mailbox"]), str(data["path"])))
            except (OSError, ValueError, KeyError, TypeError):
                with contextlib.suppress(OSError):
                    marker.unlink()
        return found


def receive_skip_reason(hook: Any, fields: Any) -> str | None:
    """Why an ``on_receive`` hook does not wake for a stored email (the trust gate, then
    the loop guard's automatic-mail rule), or None when it does."""
    trusted = str(fields.get("trusted") or "none")
    if trusted != "true" and not hook.fire_on_untrusted:
        return f"trusted={trusted} fire_on_untrusted=false"  # spec 40's wording
    automatic = fields.get("automatic")
    if automatic and not hook.fire_on_automatic:
        return f"automatic={automatic} fire_on_automatic=false"
    return None


def has_receive_hooks(config: Any, mailbox_name: str, fields: Any) -> bool:
    """Whether a stored email will run at least one ``on_receive`` hook (trust gate and
    automatic-mail rule applied; the firing cap is decided when the hooks fire)."""
    mailbox = config.mailboxes.get(mailbox_name)
    if mailbox is None or mailbox.is_catchall(config.domain):
        return False
    return any(hook.event == ON_RECEIVE and receive_skip_reason(hook, fields) is None
               for hook in mailbox.hooks)


def hook_state_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Where the daemon and ``aimx ingest`` share hook bookkeeping (fired-once markers)."""
    return Path(data_dir) / ".aimx"
