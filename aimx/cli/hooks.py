"""``aimx hooks list|create|delete`` (alias ``hook``).

Hooks are managed over the daemon socket, where ownership is checked from the
caller's uid. With the daemon down only root can act (by editing
``config.toml`` directly, effective at the next start).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from aimx import paths, term
from aimx.cli.mailboxes import (
    call,
    compact_cmd,
    config_unreadable,
    confirm,
    is_root,
    load_config,
    visible_mailbox,
)
from aimx.cli.main import CommandError, UsageError, describe
from aimx.daemon.client import DaemonDown
from aimx.daemon.protocol import ApiError, HookCreate, HookDelete, HookList, error

HOOK_NAME_PATTERN = "[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127}"
DEFAULT_TIMEOUT = 60
_OFFLINE_NOTE = ("Note: aimx serve is not running. The change will take effect on the next "
                 "start (`sudo systemctl start aimx`).")


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "hooks", aliases=["hook"], parents=parents,
        description=describe("hooks"),
        help="list, create and delete mailbox hooks",
    )
    sub = parser.add_subparsers(dest="hooks_command", metavar="<command>", required=True)

    listing = sub.add_parser("list", parents=parents, help="list the hooks of your mailboxes",
                             description="list hooks")
    listing.add_argument("--mailbox", metavar="NAME", help="only hooks of this mailbox")

    create = sub.add_parser("create", parents=parents, help="attach a hook to a mailbox",
                            description="attach a hook to a mailbox")
    create.add_argument("--mailbox", required=True, metavar="NAME")
    create.add_argument("--event", required=True, choices=("on_receive", "after_send"))
    create.add_argument("--cmd", required=True, metavar="JSON",
                        help='argv as a JSON array, e.g. \'["/bin/echo","hi"]\'')
    create.add_argument("--name", help=f"hook name ({HOOK_NAME_PATTERN}); derived if absent")
    create.add_argument("--timeout-secs", type=int, default=DEFAULT_TIMEOUT, metavar="N",
                        help="kill the hook after N seconds (1-600, default 60)")
    create.add_argument("--fire-on-untrusted", action="store_true",
                        help="on_receive only: also fire for mail that is not trusted")

    delete = sub.add_parser("delete", parents=parents, help="delete a hook by name",
                            description="delete a hook by name")
    delete.add_argument("name")
    delete.add_argument("--mailbox", metavar="NAME",
                        help="the hook's mailbox, when the name is on mailboxes of several owners")
    delete.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    return parser


def run(args: argparse.Namespace) -> int:
    action = {"list": _list, "create": _create, "delete": _delete}[args.hooks_command]
    return action(args)


def requires_root(verb: str) -> CommandError:
    return CommandError(
        f"not authorized: aimx hooks {verb} requires root (run with sudo)\n"
        "hint: if the daemon is running, hook CRUD over UDS would handle this without sudo.",
        1,
    )


def _offline_config(args: argparse.Namespace, verb: str) -> Any:
    """Daemon down: root reads the config itself; anyone else is refused."""
    if not is_root():
        raise requires_root(verb)
    return load_config(args)


# -- list -------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    try:
        rows = call(HookList)["rows"]
    except DaemonDown:
        from aimx.daemon import admin

        config = _offline_config(args, "list")
        rows = admin.hook_rows(config, admin.Caller(0, 0, 0))
    if args.mailbox:
        rows = [row for row in rows if row["mailbox"] == args.mailbox]
    if not rows:
        print("No hooks.")
        return 0
    for line in format_hook_rows(rows):
        print(line)
    return 0


def format_hook_rows(rows: list[dict[str, Any]]) -> list[str]:
    """NAME (28), MAILBOX (20), EVENT (11), TIMEOUT (right, 7), CMD (JSON, 60 max)."""
    header = f"{'NAME':<28} {'MAILBOX':<20} {'EVENT':<11} {'TIMEOUT':>7} CMD"
    lines = [term.style(header, "bold")]
    for row in rows:
        lines.append(f"{term.pad(row['name'], 28)} {term.pad(row['mailbox'], 20)} "
                     f"{term.pad(row['event'], 11)} {str(row['timeout_secs']):>7} "
                     f"{compact_cmd(row['cmd'])}")
    return lines


# -- create -----------------------------------------------------------------------


def parse_cmd(text: str) -> list[str]:
    if not text.strip():
        raise UsageError("--cmd must not be empty")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--cmd must be a JSON array of strings: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise UsageError("--cmd must be a JSON array of strings, e.g. '[\"/bin/echo\",\"hi\"]'")
    if not value:
        raise UsageError("--cmd must be a non-empty JSON array of strings")
    return value


def _precheck_with_config(args: argparse.Namespace) -> None:
    """When this process can read the config, the mailbox must exist and be the caller's."""
    path = paths.config_path()
    if config_unreadable(path) or not os.path.isfile(path):
        return
    try:
        config = load_config(args)
    except CommandError:
        return  # the daemon has the last word on a config this process cannot load
    visible_mailbox(config, args.mailbox)


def _create(args: argparse.Namespace) -> int:
    from aimx.config import HOOK_NAME_RE

    if args.name is not None and not HOOK_NAME_RE.fullmatch(args.name):
        raise UsageError(f"invalid hook name '{args.name}': must match {HOOK_NAME_PATTERN}")
    _precheck_with_config(args)
    if args.fire_on_untrusted and args.event != "on_receive":
        raise UsageError("--fire-on-untrusted is on_receive only")
    cmd = parse_cmd(args.cmd)
    fields = {
        "mailbox": args.mailbox, "event": args.event, "name": args.name, "cmd": cmd,
        "fire_on_untrusted": True if args.fire_on_untrusted else None,
        "timeout_secs": args.timeout_secs if args.timeout_secs != DEFAULT_TIMEOUT else None,
    }
    try:
        reply = call(HookCreate, **fields)
    except DaemonDown:
        name = _create_offline(args, fields)
        print(f"{term.mark('ok')} Hook '{name}' created on mailbox '{args.mailbox}'.")
        print(_OFFLINE_NOTE)
        return 0
    print(f"{term.mark('ok')} Hook '{reply['name']}' created on mailbox '{args.mailbox}'.")
    return 0


def _create_offline(args: argparse.Namespace, fields: dict[str, Any]) -> str:
    """The daemon's HOOK-CREATE checks and rewrite, run as root in this process."""
    from aimx import config as configmod
    from aimx.daemon import admin
    from aimx.storage.mailstore import MailStore

    config = _offline_config(args, "create")
    mailbox = fields["mailbox"]
    timeout = fields["timeout_secs"] or DEFAULT_TIMEOUT
    flag = bool(fields["fire_on_untrusted"])
    try:
        target = config.mailboxes.get(mailbox)
        if target is None:
            raise error("ENOENT", f"mailbox '{mailbox}' does not exist")
        if target.is_catchall(config.domain):
            raise error("MAILBOX", f"mailbox '{mailbox}' is the catchall; "
                                   "hooks on the catchall are forbidden")
        admin.check_hook_fields(fields["event"], fields["cmd"], "cmd", flag, timeout)
        hook = configmod.Hook(event=fields["event"], cmd=tuple(fields["cmd"]),
                              name=fields["name"], fire_on_untrusted=flag, timeout_secs=timeout)
        with MailStore(Path(config.data_dir)).mailbox_lock(mailbox):
            admin.create_hook(Path(config.path), mailbox, hook,
                              paths.data_dir_override(args.data_dir))
    except ApiError as exc:
        raise CommandError(str(exc)) from None
    return hook.effective_name


# -- delete -----------------------------------------------------------------------


def _delete(args: argparse.Namespace) -> int:
    name = args.name
    offline_config = None
    try:
        rows = call(HookList)["rows"]
    except DaemonDown:
        from aimx.daemon import admin

        offline_config = _offline_config(args, "delete")
        rows = admin.hook_rows(offline_config, admin.Caller(0, 0, 0))
    matches = [r for r in rows if r["name"] == name and args.mailbox in (None, r["mailbox"])]
    row = matches[0] if len(matches) == 1 else None  # several: the daemon asks for --mailbox
    if row is not None and not args.yes:
        print("About to delete hook:")
        print(f"  name:    {row['name']}")
        print(f"  mailbox: {row['mailbox']}")
        print(f"  event:   {row['event']}")
        print(f"  timeout: {row['timeout_secs']}s")
        print(f"  cmd:     {compact_cmd(row['cmd'])}")
        if not confirm("Continue? [y/N] "):
            print("Cancelled.")
            return 0
    if offline_config is None:
        try:
            call(HookDelete, name=name, mailbox=args.mailbox)
        except DaemonDown:
            offline_config = _offline_config(args, "delete")
        else:
            print(f"{term.mark('ok')} Hook '{name}' deleted.")
            return 0
    _delete_offline(args, offline_config, name)
    print(f"{term.mark('ok')} Hook '{name}' deleted.")
    print(_OFFLINE_NOTE)
    return 0


def _delete_offline(args: argparse.Namespace, config: Any, name: str) -> None:
    from aimx.daemon import admin
    from aimx.storage.mailstore import MailStore

    try:
        mailbox = admin.find_hook(config, name, admin.Caller(0, 0, 0), args.mailbox)
        with MailStore(Path(config.data_dir)).mailbox_lock(mailbox):
            admin.delete_hook(Path(config.path), name, mailbox,
                              paths.data_dir_override(args.data_dir))
    except ApiError as exc:
        raise CommandError(str(exc)) from None
