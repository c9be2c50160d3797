"""``aimx doctor``: print the health report and exit 1 when something is broken.

Reads ``config.toml``, so in practice it runs as root. Another user gets
what it can see, with NOT-CHECKED notes for the rest: the Service section
alone when the config is root-only (then exit 1), or a report whose counts
of other users' mailboxes are ``?``. Warnings and notes never change the
exit code; failing checks and mailboxes whose owner does not exist do.
"""

from __future__ import annotations

import argparse
from typing import Any

from aimx import paths
from aimx.cli.mailboxes import config_unreadable, load_config
from aimx.cli.main import CommandError, UsageError, describe
from aimx.ops import doctor, publicip


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "doctor", parents=parents,
        description=describe("doctor"),
        help="check configuration, service, mailboxes, ownership and DNS",
    )
    parser.add_argument("--public-ip", metavar="ADDR",
                        help="check the A and SPF records against this IPv4 address "
                             "(default: public_ip in config.toml, else this machine's "
                             "address, or the verifier's view of it when that is private)")
    return parser


def run(args: argparse.Namespace, probes: doctor.Probes | None = None) -> int:
    public_ip = getattr(args, "public_ip", None)
    problem = publicip.ipv4_problem(public_ip) if public_ip is not None else None
    if problem is not None:
        raise UsageError(problem)
    path = paths.config_path()
    if config_unreadable(path):
        # Not root: say what can be known without the config, then why the rest is not.
        print("\n".join(doctor.unreadable_config_report(path, probes).lines), flush=True)
    config = load_config(args)
    report = doctor.build_report(config, probes, public_ip)
    print("\n".join(report.lines), flush=True)
    if report.failure:
        raise CommandError(report.failure)
    return 0
