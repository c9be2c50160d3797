"""``aimx serve``: the daemon in the foreground, the very service ``twistd aimx`` runs (D24)."""

from __future__ import annotations

import argparse
from typing import Any

from aimx.cli.main import describe
from aimx.daemon.service import DEFAULT_BIND, DEFAULT_TLS_CERT, DEFAULT_TLS_KEY, run_foreground


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", parents=parents,
        description=describe("serve"),
        help="run the daemon in the foreground",
    )
    parser.add_argument("--bind", metavar="ADDR:PORT", default=DEFAULT_BIND,
                        help=f"SMTP listen address (default {DEFAULT_BIND})")
    parser.add_argument("--tls-cert", metavar="PEM",
                        help=f"STARTTLS certificate (default {DEFAULT_TLS_CERT})")
    parser.add_argument("--tls-key", metavar="PEM",
                        help=f"STARTTLS private key (default {DEFAULT_TLS_KEY})")
    parser.add_argument("--no-tls", action="store_true",
                        help="serve without STARTTLS even if the default pair exists")
    return parser


def service_args(args: argparse.Namespace) -> list[str]:
    """The ``twistd aimx`` options equivalent to these ``aimx serve`` arguments."""
    argv = ["--bind", args.bind]
    if getattr(args, "data_dir", None):
        argv += ["--data-dir", args.data_dir]
    if args.tls_cert:
        argv += ["--tls-cert", args.tls_cert]
    if args.tls_key:
        argv += ["--tls-key", args.tls_key]
    if args.no_tls:
        argv.append("--no-tls")
    return argv


def run(args: argparse.Namespace) -> int:
    return run_foreground(service_args(args))
