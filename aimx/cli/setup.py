"""``aimx setup [domain] [--verify-host URL] [--public-ip ADDR]``: the install wizard (root)."""

from __future__ import annotations

import argparse
from typing import Any

from aimx.cli.main import CommandError, describe
from aimx.ops.console import SetupError
from aimx.ops.setup import run_setup


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "setup", parents=parents, usage="aimx setup [--verify-host URL] [--public-ip ADDR]",
        description=describe("setup"),
        help="set up this server (root)",
    )
    parser.add_argument("domain", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--verify-host", metavar="URL",
                        help="port-25 verifier service (default: config verify_host, "
                             "else https://check.aimx.email)")
    parser.add_argument("--public-ip", metavar="ADDR",
                        help="the IPv4 address the internet reaches this server at, when it "
                             "is behind NAT (saved as public_ip; default: learned from the "
                             "verifier when this machine's address is private)")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        return run_setup(args.domain, verify_host=args.verify_host,
                         data_dir=getattr(args, "data_dir", None), public_ip=args.public_ip)
    except SetupError as exc:
        raise CommandError(str(exc)) from None
