"""``aimx uninstall [-y]``: remove the aimx service; config, data and package stay.

The package belongs to pip, so it is pip that removes it: this command only
undoes what ``aimx setup`` installed into the init system, then prints the
pip command and the paths an operator may wipe by hand.
"""

from __future__ import annotations

import argparse
from typing import Any

from aimx import paths
from aimx.cli.main import CommandError, describe
from aimx.cli.upgrade import uninstall_command
from aimx.config import ConfigError, load_config
from aimx.ops.console import Console
from aimx.ops.initsystem import ServiceError, System

ROOT_REQUIRED = "`aimx uninstall` requires root. Run with: sudo aimx uninstall"


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "uninstall", parents=parents,
        description=describe("uninstall"),
        help="remove the aimx service (root)",
    )
    parser.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    return parser


def _data_dir(flag: str | None) -> str:
    override = paths.data_dir_override(flag)
    if override is not None:
        return str(override)
    try:
        return str(load_config(paths.config_path()).data_dir)
    except ConfigError:
        return str(paths.DEFAULT_DATA_DIR)


def uninstall(yes: bool, data_dir_flag: str | None, system: System, console: Console) -> int:
    if system.euid() != 0:
        raise CommandError(ROOT_REQUIRED)
    service_file = system.service_file()
    console.say("This will:")
    console.say("  - stop the aimx daemon")
    console.say(f"  - remove its service file ({service_file or 'no init system found'})")
    console.say(f"It keeps the config ({paths.config_dir()}), the mail data and the aimx "
                "package itself.")
    console.say()
    if not yes:
        answer = console.ask("Proceed with uninstall? (y/N) ")
        if (answer or "").strip().lower() not in ("y", "yes"):
            raise CommandError("Uninstall cancelled.")
    try:
        removed = system.remove_service()
    except ServiceError as exc:
        raise CommandError(str(exc)) from None
    console.say("Uninstall complete.")
    for path in removed:
        console.say(f"Removed service file: {path}")
    if not removed:
        console.say("No service file was installed.")
    console.say(f"To remove the package too: {uninstall_command()}")
    console.say("To wipe config and data manually: "
                f"sudo rm -rf {paths.config_dir()} {_data_dir(data_dir_flag)}")
    return 0


def run(args: argparse.Namespace) -> int:
    return uninstall(args.yes, getattr(args, "data_dir", None), System(), Console())
