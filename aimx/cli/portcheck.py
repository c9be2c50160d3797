"""``aimx portcheck [--verify-host URL]``: can mail reach this server, and leave it, on port 25?"""

from __future__ import annotations

import argparse
from typing import Any

from aimx import paths, term
from aimx.cli.main import CommandError, describe
from aimx.config import Config, ConfigError, load_config
from aimx.ops.console import Console, SetupError
from aimx.ops.initsystem import System
from aimx.ops.portcheck import (
    CheckFailed,
    check_outbound,
    normalise_verify_host,
    resolve_verify_host,
    run_port_checks,
    verify_smtp_host,
)

ROOT_REQUIRED = "`aimx portcheck` requires root. Run with: sudo aimx portcheck"


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "portcheck", parents=parents,
        description=describe("portcheck"),
        help="check port 25 connectivity (root)",
    )
    parser.add_argument("--verify-host", metavar="URL",
                        help="verifier service (default: config verify_host, "
                             "else https://check.aimx.email)")
    return parser


def _optional_config() -> Config | None:
    try:
        return load_config(paths.config_path())
    except ConfigError:
        return None  # portcheck is useful before setup, with no config at all


def portcheck(verify_flag: str | None, system: System, console: Console) -> int:
    """The whole command, with the machine and the terminal passed in."""
    if system.euid() != 0:
        raise CommandError(ROOT_REQUIRED)
    try:
        if verify_flag is not None:
            normalise_verify_host(verify_flag)
        verify_host = resolve_verify_host(verify_flag, _optional_config())
    except SetupError as exc:
        raise CommandError(str(exc)) from None
    console.say(term.style("aimx portcheck - Port 25 connectivity check", "bold"))
    console.say()
    holder = system.port_holder()
    if holder is not None and not holder.is_aimx:
        console.out.write("  Outbound port 25... ")
        console.out.flush()
        try:
            check_outbound(verify_smtp_host(verify_host), system.verify_smtp_port)
            console.say(term.mark("ok"))
        except CheckFailed as exc:
            console.say(term.mark("fail"))
            console.problem(str(exc))
        console.say()
        raise CommandError(f"Port 25 is occupied by `{holder.name}`.\n"
                           "Stop or uninstall the process and run `sudo aimx portcheck` "
                           "again to check.")
    try:
        outbound, inbound, _seen = run_port_checks(console, system, verify_host,
                                                   listen=holder is None)
    except SetupError as exc:
        raise CommandError(str(exc)) from None
    console.say()
    if outbound or inbound:
        raise CommandError("Some checks failed. See details above.")
    console.say(term.style("Port 25 reachable. Ready for `aimx setup`.", "green"))
    console.say("Run `sudo aimx setup` to begin.")
    return 0


def run(args: argparse.Namespace) -> int:
    return portcheck(args.verify_host, System(), Console())
