"""``aimx mailboxes create|list|show|delete`` (alias ``mailbox``).

Everything goes through the daemon socket, so unprivileged users can manage
their own mailboxes without reading the root-only config. When the daemon is
down, root falls back to editing ``config.toml`` directly with the daemon's
own checks; anyone else is told to start the daemon (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import sys
from pathlib import Path
from typing import Any

from aimx import paths, term
from aimx.cli.main import CommandError, UsageError, describe
from aimx.daemon.client import Client, ConnectFailed, DaemonDown, MalformedReply
from aimx.daemon.protocol import ApiError, MailboxCreate, MailboxDelete, MailboxList

DAEMON_DOWN_TEXT = (
    "daemon must be running for non-root mailbox CRUD; start `aimx serve` or run with sudo "
    "to fall back to direct config edit."
)
OWNER_ATTEMPTS = 5
_CMD_WIDTH = 60


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "mailboxes", aliases=["mailbox"], parents=parents,
        description=describe("mailboxes"),
        help="create, list, show and delete mailboxes",
    )
    sub = parser.add_subparsers(dest="mailboxes_command", metavar="<command>", required=True)

    create = sub.add_parser("create", parents=parents, help="create a mailbox",
                            description="create a mailbox")
    create.add_argument("name", help="mailbox name (the local part of its address)")
    create.add_argument("--owner", metavar="USER",
                        help="Linux user owning the mailbox (honoured for root only)")

    listing = sub.add_parser("list", parents=parents, help="list your mailboxes (root: all)",
                             description="list mailboxes")
    listing.add_argument("--all", action="store_true",
                         help="every mailbox (root only; root always sees all)")

    show = sub.add_parser("show", parents=parents,
                          help="show one mailbox's settings, hooks and counts",
                          description="show one mailbox's settings, hooks and counts")
    show.add_argument("name")

    delete = sub.add_parser("delete", parents=parents, help="delete a mailbox",
                            description="delete an empty mailbox")
    delete.add_argument("name")
    delete.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    delete.add_argument("--force", action="store_true",
                        help="remove every email of the mailbox first")
    return parser


def run(args: argparse.Namespace) -> int:
    action = {
        "create": _create, "list": _list, "show": _show, "delete": _delete,
    }[args.mailboxes_command]
    return action(args)


# -- shared helpers (also used by ``aimx hooks``) ------------------------------


def is_root() -> bool:
    return os.geteuid() == 0


def noninteractive() -> bool:
    return os.environ.get("AIMX_NONINTERACTIVE", "").strip().lower() in ("1", "true", "yes")


def call(command: Any, **arguments: Any) -> dict[str, Any]:
    """One socket call; daemon errors become ``Error: [CODE] reason`` (``DaemonDown`` escapes)."""
    try:
        return Client().call(command, **arguments)
    except ApiError as exc:
        raise CommandError(str(exc)) from None
    except (ConnectFailed, MalformedReply) as exc:
        raise CommandError(str(exc)) from None


def api_to_command(exc: ApiError) -> CommandError:
    return CommandError(str(exc))


def config_unreadable(path: Path) -> bool:
    """Whether ``path`` exists but this user may not read it (or may not even look)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return not os.access(path, os.R_OK)


def load_config(args: argparse.Namespace) -> Any:
    """The on-disk config with this process's data-dir override (root paths only)."""
    from aimx.config import ConfigError
    from aimx.config import load_config as load

    path = paths.config_path()
    if config_unreadable(path):
        raise CommandError(f"this command needs to read {path} (root-owned). Re-run with sudo, "
                           "or use a UDS-backed alternative.")
    try:
        return load(path, paths.data_dir_override(getattr(args, "data_dir", None)))
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    except PermissionError:
        raise CommandError(f"this command needs to read {path} (root-owned). Re-run with sudo, "
                           "or use a UDS-backed alternative.") from None


def visible_mailbox(config: Any, name: str) -> Any:
    """``name``'s mailbox if this user may see it (root: any; else only their own).

    Another user's mailbox is refused exactly like a missing one, as the
    daemon does, so the CLI does not tell who has which mailbox.
    """
    from aimx.daemon import admin

    mailbox = config.mailboxes.get(name)
    caller = admin.Caller(os.geteuid(), os.getegid(), os.getpid())
    if mailbox is None or not (caller.is_root or caller.owns(mailbox)):
        raise CommandError(f"Mailbox '{name}' does not exist")
    return mailbox


def restart_hint() -> None:
    term.hint("Hint: Restart the daemon for the change to take effect:", sys.stdout)
    if not Path("/run/systemd/system").is_dir() and shutil.which("rc-service"):
        term.hint("  sudo rc-service aimx restart", sys.stdout)
    else:
        term.hint("  sudo systemctl restart aimx", sys.stdout)


def confirm(question: str) -> bool:
    """Ask ``question``; only ``y``/``Y`` is a yes.

    No answer at all (stdin closed, as under cron or a pipe that is empty) is a
    usage error naming ``-y``, not a silent "Cancelled.": a script that forgot
    the flag should fail, not appear to have run.
    """
    sys.stdout.write(question)
    sys.stdout.flush()
    answer = sys.stdin.readline()
    if not answer:
        sys.stdout.write("\n")
        raise UsageError("no answer to the confirmation prompt (standard input is closed); "
                         "pass -y to confirm without a prompt")
    return answer.strip() in ("y", "Y")


def compact_cmd(cmd: list[str], width: int = _CMD_WIDTH) -> str:
    """The argv as compact JSON, cut to ``width`` characters with ``…``."""
    text = json.dumps(list(cmd), ensure_ascii=False, separators=(",", ":"))
    if len(text) > width:
        text = text[:width - 1] + "…"
    return text


# -- create ---------------------------------------------------------------------


def _user_exists(name: str) -> bool:
    if name == "root":
        return True
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def prompt_owner(name: str, domain: str) -> str:
    """Root without ``--owner``: ask who owns ``<name>@<domain>`` (spec 50 §2.3)."""
    default = name if _user_exists(name) else None
    if noninteractive():
        if default is None:
            raise CommandError(f"no owner for mailbox '{name}': pass --owner <user> "
                               f"(AIMX_NONINTERACTIVE is set and user '{name}' does not exist)")
        return default
    question = f"Which Linux user should own `{name}@{domain}`? "
    if default is not None:
        question += f"[{default}]: "
    for _ in range(OWNER_ATTEMPTS):
        sys.stdout.write(question)
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            sys.stdout.write("\n")
            raise CommandError("no owner given: pass --owner <user>")
        answer = line.strip() or default
        if not answer:
            term.warn("An owner is required: type the name of an existing Linux user.")
            continue
        if _user_exists(answer):
            return answer
        term.warn(f"User '{answer}' does not exist on this host. Create it first with "
                  f"`sudo useradd --create-home {answer}`, or choose another user.")
    raise CommandError(f"no valid owner after {OWNER_ATTEMPTS} attempts")


def _create(args: argparse.Namespace) -> int:
    name = args.name
    if args.owner is not None and not args.owner.strip():
        raise UsageError("--owner value cannot be empty")
    root = is_root()
    owner = args.owner if root else None
    config = None
    if root and owner is None:
        config = load_config(args)
        owner = prompt_owner(name, config.domain)
    try:
        reply = call(MailboxCreate, name=name, owner=owner)
    except DaemonDown:
        if not root:
            raise CommandError(DAEMON_DOWN_TEXT, 2) from None
        reply = _create_offline(args, config, name, owner)
        _report_created(name, reply)
        restart_hint()
        return 0
    _report_created(name, reply)
    return 0


def _report_created(name: str, reply: dict[str, Any]) -> None:
    print(f"{term.mark('ok')} Mailbox '{name}' created: {reply['address']} "
          f"(owner {reply['owner']})")


def _create_offline(args: argparse.Namespace, config: Any, name: str, owner: str) -> dict:
    """Daemon down, root: the daemon's checks and rewrite, run in this process."""
    from aimx.daemon import admin
    from aimx.storage.mailstore import MailStore

    config = config or load_config(args)
    try:
        admin.check_owner_value(owner)
        admin.check_mailbox_name(name)
        data_dir = Path(config.data_dir)
        with MailStore(data_dir).mailbox_lock(name):
            new = admin.create_mailbox(Path(config.path), data_dir, name, owner,
                                       paths.data_dir_override(args.data_dir))
    except ApiError as exc:
        raise api_to_command(exc) from None
    return {"address": new.mailboxes[name].address, "owner": owner}


# -- delete ---------------------------------------------------------------------


def _delete(args: argparse.Namespace) -> int:
    name = args.name
    if not args.yes:
        extra = " and every email in it" if args.force else ""
        if not confirm(f"Delete mailbox '{name}'{extra}? [y/N] "):
            print("Cancelled.")
            return 0
    try:
        call(MailboxDelete, name=name, force=True if args.force else None)
    except DaemonDown:
        if not is_root():
            raise CommandError(DAEMON_DOWN_TEXT, 2) from None
        _delete_offline(args, name)
        print(f"{term.mark('ok')} Mailbox '{name}' deleted.")
        restart_hint()
        return 0
    print(f"{term.mark('ok')} Mailbox '{name}' deleted.")
    return 0


def _delete_offline(args: argparse.Namespace, name: str) -> None:
    from aimx.daemon import admin
    from aimx.storage.mailstore import MailStore

    config = load_config(args)
    try:
        admin.check_mailbox_name(name)
        data_dir = Path(config.data_dir)
        with MailStore(data_dir).mailbox_lock(name):
            admin.delete_mailbox(Path(config.path), data_dir, name, args.force,
                                 paths.data_dir_override(args.data_dir))
    except ApiError as exc:
        raise api_to_command(exc) from None


# -- list -----------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    root = is_root()
    if args.all and not root:
        raise CommandError("--all requires root (run with sudo)")
    try:
        rows = call(MailboxList)["rows"]
    except DaemonDown:
        if not root:
            raise CommandError(DAEMON_DOWN_TEXT, 2) from None
        from aimx.daemon import admin

        config = load_config(args)
        rows = admin.mailbox_rows(config, Path(config.data_dir), admin.Caller(0, 0, 0))["rows"]
    if not rows:
        print("No mailboxes.")
        return 0
    for line in format_mailbox_rows(rows):
        print(line)
    return 0


def format_mailbox_rows(rows: list[dict[str, Any]]) -> list[str]:
    """A header, then ``name`` in 20 columns, inbox total in 8, sent count and an
    ``(unregistered)`` marker."""
    lines = [term.style(f"{'MAILBOX':<20} {'INBOX':<8} SENT", "bold")]
    for row in rows:
        line = f"{term.pad(row['name'], 20)} {term.pad(str(row['total']), 8)} {row['sent_count']}"
        if not row.get("registered", True):
            line += term.style(" (unregistered)", "yellow")
        lines.append(line)
    return lines


# -- show -----------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    from aimx.storage.index import count_emails
    from aimx.storage.layout import mailbox_dir

    config = load_config(args)
    mailbox = visible_mailbox(config, args.name)
    data_dir = Path(config.data_dir)
    inbox_total, inbox_unread = count_emails(
        mailbox_dir(data_dir, "inbox", mailbox.name))
    sent_total, _ = count_emails(mailbox_dir(data_dir, "sent", mailbox.name))
    senders = list(config.effective_senders(mailbox))
    print(show_text(mailbox, config.effective_trust(mailbox), senders,
                    (inbox_total, inbox_unread, sent_total)), end="")
    return 0


def show_text(mailbox: Any, trust: str, senders: list[str],
              counts: tuple[int, int, int]) -> str:
    """The ``mailboxes show`` block (spec 50 §2.3)."""
    out = [f"{term.style('Mailbox:', 'bold')} {mailbox.name}",
           f"  Address: {mailbox.address}",
           f"  Trust:   {trust}"]
    if senders:
        out.append("  Trusted senders:")
        out.extend(f"    - {sender}" for sender in senders)
    else:
        out.append("  Trusted senders: (none)")
    out += ["", term.style("Hooks", "bold")]
    if not mailbox.hooks:
        out.append("  (none)")
    for event in ("on_receive", "after_send"):
        hooks = [hook for hook in mailbox.hooks if hook.event == event]
        if not hooks:
            continue
        out.append(f"  {event}")
        for hook in hooks:
            line = f"    - {hook.effective_name}  cmd: {compact_cmd(list(hook.cmd))}"
            if hook.fire_on_untrusted:
                line += "   [fire_on_untrusted=true]"
            if hook.fire_on_automatic:
                line += "   [fire_on_automatic=true]"
            out.append(line)
    inbox_total, inbox_unread, sent_total = counts
    out += ["", term.style("Messages", "bold"),
            f"  inbox: {inbox_total} ({inbox_unread} unread)",
            f"  sent:  {sent_total}"]
    return "\n".join(out) + "\n"
