"""``aimx upgrade``: explain how to upgrade; aimx never downloads executables itself.

The package comes from pip (or pipx), so the package manager that installed
it is the one that should replace it, with its own integrity checks. This
command prints the exact command for this installation and how to restart
the daemon afterwards.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from aimx import __version__
from aimx.cli.main import describe


def _in_pipx() -> bool:
    return "/pipx/venvs/" in sys.prefix.replace("\\", "/")


def _pip() -> str:
    return f"{shlex.quote(sys.executable)} -m pip"


def upgrade_command(spec: str = "aimx", force: bool = False) -> str:
    """The command that upgrades the installation running this code."""
    if _in_pipx():
        if force or spec != "aimx":
            return f"pipx install --force {shlex.quote(spec)}"
        return "pipx upgrade aimx"
    extra = " --force-reinstall" if force else ""
    return f"{_pip()} install --upgrade{extra} {shlex.quote(spec)}"


def uninstall_command() -> str:
    """The command that removes the installation running this code."""
    return "pipx uninstall aimx" if _in_pipx() else f"{_pip()} uninstall aimx"


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "upgrade", parents=parents,
        description=describe("upgrade"),
        help="print the upgrade command",
    )
    parser.add_argument("--version", dest="target_version", metavar="TAG",
                        help="the release to install (default: the latest)")
    parser.add_argument("--dry-run", action="store_true",
                        help="accepted for compatibility; nothing is ever changed")
    parser.add_argument("--force", action="store_true",
                        help="reinstall even when the version is unchanged")
    return parser


def run(args: argparse.Namespace) -> int:
    spec = f"aimx=={args.target_version.lstrip('v')}" if args.target_version else "aimx"
    print(f"aimx {__version__} is installed in {sys.prefix}.")
    print("aimx does not download executables itself; upgrade the package with:")
    print(f"  {upgrade_command(spec, args.force)}")
    print("then restart the daemon so it runs the new code:")
    print("  sudo systemctl restart aimx    (OpenRC: sudo rc-service aimx restart)")
    print("`aimx doctor` shows the client and server versions afterwards.")
    return 0
