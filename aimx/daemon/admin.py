"""Mailbox and hook administration, without Twisted: who asks, what they may do, and the work.

``Caller.authorize`` is the one authorization predicate of every socket verb.
The request checks, the mailbox directories, the ``config.toml`` rewrites and
the listings are blocking code that both sides run: the daemon's socket verbs
in its thread pool (``aimx.daemon.api``), and the CLI itself when the daemon is
down, which then need not import Twisted.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from aimx import config as configmod
from aimx import configedit
from aimx.daemon.protocol import ApiError, error
from aimx.logs import logger
from aimx.storage.index import count_emails
from aimx.storage.layout import FOLDERS, mailbox_dir

log = logger("aimx::uds")


# -- the caller and the authorization predicate ------------------------------


def username_of(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def owner_uid(owner: str) -> int | None:
    ids = configmod.owner_ids(owner)
    return ids[0] if ids is not None else None


def quoted(value: object) -> str:
    """A value as a JSON string, for log lines and messages that quote user input."""
    return json.dumps(str(value), ensure_ascii=False)


@attrs.define
class Caller:
    """The peer of one connection, as the kernel reported it at accept."""

    uid: int
    gid: int
    pid: int

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def username(self) -> str:
        return username_of(self.uid) or "?"

    def owns(self, mailbox: Any) -> bool:
        """Non-root ownership: the owner resolves (``root`` → 0) to the caller's uid."""
        return mailbox is not None and owner_uid(mailbox.owner) == self.uid

    def authorize(self, verb: str, name: str, mailbox: Any, *, open_to_all: bool = False) -> bool:
        """The one authorization predicate of every verb, with its ``uds authz`` log line.

        Root bypasses (INFO); otherwise the caller must own ``mailbox``
        (``open_to_all`` for verbs any user may run, like MAILBOX-CREATE).
        """
        head = (f"verb={quoted(verb)} caller_uid={self.uid} "
                f"caller_username={quoted(self.username)} mailbox={quoted(name)}")
        if self.is_root:
            log.info("uds authz root_bypass %s decision=\"root_bypass\"", head)
            return True
        if open_to_all or self.owns(mailbox):
            log.debug("uds authz accept %s decision=\"accept\"", head)
            return True
        if mailbox is None:
            detail = f"mailbox '{name}' does not exist"
        else:
            detail = (f"caller {self.username} (uid {self.uid}) does not own mailbox "
                      f"'{name}' (owner {mailbox.owner})")
        log.warning("uds authz reject %s decision=\"reject\" reason=%s", head, quoted(detail))
        return False


def mailbox_not_found(name: str) -> ApiError:
    """What a caller hears about a mailbox that is missing *or* someone else's.

    One code and one text for both, so no verb tells another user's mailbox
    from a name nobody has taken.
    """
    return error("ENOENT", f"mailbox '{name}' does not exist")


def hook_not_found(name: str) -> ApiError:
    return error("ENOENT", f"hook '{name}' not found")


# -- pure request checks -----------------------------------------------------


def check_owner_value(owner: str) -> None:
    """An owner a request names must at least look like a Linux user name."""
    if not configmod.is_valid_username(owner):
        raise error("MALFORMED", f"invalid owner value: {quoted(owner)} "
                                 f"(must match {configmod.USERNAME_RE.pattern})")


def check_mailbox_name(name: str) -> None:
    problem = configmod.validate_mailbox_name(name)
    if problem:
        raise error("VALIDATION", problem)


def check_hook_fields(event: str, cmd: list[str], hook_type: str,
                      fire_on_untrusted: bool, timeout_secs: int) -> None:
    """HOOK-CREATE's field checks (spec 40 §7), first failure wins."""
    if not cmd:
        raise error("VALIDATION", "hook has empty `cmd`: must be a non-empty argv array, "
                                  "e.g. `[\"/bin/echo\", \"hi\"]`")
    if not cmd[0].strip():
        raise error("VALIDATION", "hook has blank `cmd[0]`")
    if not cmd[0].startswith("/"):
        raise error("VALIDATION",
                    f"hook has non-absolute `cmd[0]` '{cmd[0]}': {configmod.HOOK_CMD_ABSOLUTE}")
    if hook_type != "cmd":
        raise error("VALIDATION",
                    f"hook has unsupported type '{hook_type}': only `cmd` is supported")
    if fire_on_untrusted and event != "on_receive":
        raise error("VALIDATION", "`fire_on_untrusted = true` is `on_receive` only")
    if timeout_secs <= 0:
        raise error("VALIDATION", f"`timeout_secs = {timeout_secs}`: must be > 0")
    limit = configmod.MAX_HOOK_TIMEOUT
    if timeout_secs > limit:
        raise error("VALIDATION", f"`timeout_secs = {timeout_secs}` exceeds the max of {limit}")


# -- blocking helpers (run in the thread pool) -------------------------------


def prepare_mailbox_dirs(data_dir: Path, name: str, uid: int, gid: int, *,
                         private: bool = False) -> list[Path]:
    """Create or adopt ``inbox/<name>`` and ``sent/<name>`` as ``uid:gid`` 0700.

    Returns the directories this call created, so a later failure can remove
    exactly those and nothing that was there before. ``private`` (a non-root
    caller) keeps another user's ids out of the conflict message.
    """
    targets = [mailbox_dir(data_dir, folder, name) for folder in FOLDERS]
    missing = []
    for path in targets:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            missing.append(path)
            continue
        except OSError as exc:
            raise error("IO", f"stat {path} failed: {exc}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise error("ECONFLICT", f"{path} exists but is not a directory; "
                                     "remove it before creating the mailbox")
        if private and st.st_uid != uid:
            raise error("ECONFLICT", f"{path} already exists and is not yours; "
                                     "ask root to remove it, or to create the mailbox")
        if (st.st_uid, st.st_gid) != (uid, gid):
            raise error("ECONFLICT", f"{path} already exists with owner {st.st_uid}:{st.st_gid}, "
                                     f"expected {uid}:{gid}; run `chown -R {uid}:{gid} {path}` "
                                     "(and the matching sibling) and retry")
    created: list[Path] = []
    try:
        for path in missing:
            _ensure_parent(path.parent)
            try:
                path.mkdir(mode=0o700)
            except OSError as exc:
                raise error("IO", f"failed to create {path}: {exc}") from None
            created.append(path)
        for path in targets:
            try:
                st = os.lstat(path)
                if (st.st_uid, st.st_gid) != (uid, gid):
                    os.chown(path, uid, gid, follow_symlinks=False)
            except OSError as exc:
                raise error("IO", f"failed to chown {path}: {exc}") from None
            try:
                os.chmod(path, 0o700)
            except OSError as exc:
                raise error("IO", f"failed to create {path}: {exc}") from None
    except BaseException:
        remove_dirs(created)
        raise
    return created


def _ensure_parent(folder_root: Path) -> None:
    """``<data>/inbox`` and ``<data>/sent`` are 0755 whatever the daemon's umask."""
    for path in (folder_root.parent, folder_root):
        if not path.is_dir():
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise error("IO", f"failed to create {path}: {exc}") from None
            os.chmod(path, 0o755)


def remove_dirs(paths: list[Path]) -> None:
    for path in reversed(paths):
        try:
            path.rmdir()
        except OSError as exc:
            log.warning("rollback: could not remove %s: %s", path, exc)


def wipe_dir(path: Path) -> None:
    """Remove every entry of ``path`` (dotfiles, symlinks, bundles) but keep ``path``."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def count_entries(path: Path) -> int:
    """Raw top-level entries of a mailbox dir (a missing dir counts 0)."""
    try:
        return len(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return 0


# -- the rewrites -------------------------------------------------------------
# Callers hold the mailbox lock and then the config lock (the CLI: the mailbox
# lock only, as the sole writer). Each re-reads the file on disk, so edits made
# by hand since the last reload survive.


def _edit(edit: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return edit(*args, **kwargs)
    except configedit.ConfigEditError as exc:
        raise error(exc.code, exc.reason) from None


def _on_disk(config_path: Path) -> tuple[str, dict[str, Any]]:
    """(domain, raw mailbox tables) of the file as it is now, for the pre-checks."""
    try:
        with open(config_path, "rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error("IO", f"failed to parse {config_path}: {exc}") from None
    mailboxes = data.get("mailboxes")
    domain = data.get("domain")
    return (domain if isinstance(domain, str) else "",
            mailboxes if isinstance(mailboxes, dict) else {})


def create_mailbox(config_path: Path, data_dir: Path, name: str, owner: str,
                   data_dir_override: Path | None = None, *,
                   owner_limit: int | None = None) -> Any:
    """MAILBOX-CREATE after the request checks: dirs (§4), then the rewrite (§3).

    ``owner_limit`` is set for a non-root caller: the most mailboxes the owner
    may hold, counted in the file under the lock so parallel creates cannot
    overshoot; it also keeps other users' ids out of conflict messages.
    """
    domain, mailboxes = _on_disk(config_path)
    if name in mailboxes:
        raise error("MAILBOX", f"mailbox '{name}' already exists")
    ids = configmod.owner_ids(owner)
    if ids is None:
        raise error("VALIDATION", f"unknown owner '{owner}'")
    owned = count_owned(mailboxes, ids[0])
    if owner_limit is not None and owned >= owner_limit:
        raise error("EACCES", f"user '{owner}' owns {owned} mailboxes and may not create more "
                              f"(max_mailboxes_per_user = {owner_limit}); ask root")
    created = prepare_mailbox_dirs(data_dir, name, *ids, private=owner_limit is not None)
    try:
        return _edit(configedit.add_mailbox, config_path, name, f"{name}@{domain}", owner,
                     data_dir_override=data_dir_override)
    except BaseException:
        remove_dirs(created)
        raise


def count_owned(mailboxes: dict[str, Any], uid: int) -> int:
    """How many raw ``[mailboxes.*]`` tables have an owner resolving to ``uid``."""
    owners = (table.get("owner") for table in mailboxes.values() if isinstance(table, dict))
    return sum(1 for owner in owners if isinstance(owner, str) and owner_uid(owner) == uid)


def delete_mailbox(config_path: Path, data_dir: Path, name: str, force: bool,
                   data_dir_override: Path | None = None) -> Any:
    """MAILBOX-DELETE after authorization: catchall, existence, wipe, count, rewrite."""
    domain, mailboxes = _on_disk(config_path)
    table = mailboxes.get(name)
    address = table.get("address") if isinstance(table, dict) else None
    if isinstance(address, str) and address.lower() == f"*@{domain.lower()}":
        raise error("MAILBOX", "cannot delete the catchall mailbox")
    if table is None:
        raise error("MAILBOX", f"mailbox '{name}' does not exist")
    dirs = [mailbox_dir(data_dir, folder, name) for folder in FOLDERS]
    if force:
        try:
            for path in dirs:
                wipe_dir(path)
        except OSError as exc:
            raise error("IO", f"failed to wipe mailbox '{name}': {exc}") from None
    inbox, sent = (count_entries(path) for path in dirs)
    if inbox + sent:
        raise error("NONEMPTY", f"mailbox '{name}' has {inbox + sent} files "
                                f"({inbox} in inbox, {sent} in sent); "
                                "archive or remove them first")
    return _edit(configedit.remove_mailbox, config_path, name,
                 data_dir_override=data_dir_override)


def create_hook(config_path: Path, mailbox: str, hook: Any,
                data_dir_override: Path | None = None) -> Any:
    """HOOK-CREATE under the locks: append, validate (uniqueness too), write.

    A mailbox deleted meanwhile is ``ENOENT`` (race with MAILBOX-DELETE).
    """
    return _edit(configedit.add_hook, config_path, mailbox, hook,
                 data_dir_override=data_dir_override)


def delete_hook(config_path: Path, name: str, mailbox: str,
                data_dir_override: Path | None = None) -> Any:
    """HOOK-DELETE under the locks: the mailbox's first hook with that effective name."""
    return _edit(configedit.remove_hook, config_path, mailbox, name,
                 data_dir_override=data_dir_override)


# -- listings (pure over a snapshot, plus directory counts) ------------------


def find_hook(config: Any, name: str, caller: Caller, mailbox: str | None = None) -> str:
    """The mailbox holding the caller's hook whose effective name is ``name``.

    Names are unique per owner, so for a non-root caller there is one match at
    most among its own mailboxes; other users' hooks are never looked at, and
    a miss is ``ENOENT`` whoever holds the name. Root sees every mailbox and,
    when owners share a name, must say which ``mailbox`` it means.
    """
    found = [box.name for box in config.mailboxes.values()
             if (mailbox is None or box.name == mailbox)
             and (caller.is_root or caller.owns(box))
             and any(hook.effective_name == name for hook in box.hooks)]
    if not found:
        raise hook_not_found(name)
    if len(found) > 1 and caller.is_root:
        listed = ", ".join(f"'{box}'" for box in found)
        raise error("VALIDATION", f"hook name '{name}' is used on mailboxes {listed}; "
                                  "name the mailbox to delete one")
    return found[0]


def hook_rows(config: Any, caller: Caller) -> list[dict[str, Any]]:
    rows = []
    for mailbox in config.mailboxes.values():
        if not (caller.is_root or caller.owns(mailbox)):
            continue
        for hook in mailbox.hooks:
            rows.append({
                "name": hook.effective_name, "mailbox": mailbox.name, "event": hook.event,
                "cmd": list(hook.cmd), "fire_on_untrusted": hook.fire_on_untrusted,
                "timeout_secs": hook.timeout_secs,
            })
    rows.sort(key=lambda r: (r["mailbox"], r["event"], r["name"]))
    return rows


def mailbox_rows(config: Any, data_dir: Path, caller: Caller) -> dict[str, Any]:
    """MAILBOX-LIST: configured mailboxes ∪ dirs under ``inbox/``, filtered for the caller."""
    names: dict[str, Any] = {}
    for name, mailbox in config.mailboxes.items():
        if caller.is_root or caller.owns(mailbox):
            names[name] = mailbox
    inbox_root = data_dir / "inbox"
    try:
        entries = list(os.scandir(inbox_root))
    except OSError:
        entries = []
    for entry in entries:
        if entry.name.startswith(".") or entry.name in config.mailboxes:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        if caller.is_root or st.st_uid == caller.uid:
            names[entry.name] = None
    rows = []
    for name in sorted(names):
        mailbox = names[name]
        inbox = mailbox_dir(data_dir, "inbox", name)
        sent = mailbox_dir(data_dir, "sent", name)
        total, unread = count_emails(inbox)
        sent_count, _ = count_emails(sent)
        rows.append({
            "name": name, "address": mailbox.address if mailbox is not None else None,
            "inbox_path": str(inbox), "sent_path": str(sent), "total": total,
            "unread": unread, "sent_count": sent_count, "registered": mailbox is not None,
        })
    return {"rows": rows}
