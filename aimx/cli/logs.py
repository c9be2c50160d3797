"""``aimx logs [-n N] [-f]``: the daemon's log, from journald or OpenRC's log files."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aimx import term
from aimx.cli.main import CommandError, describe
from aimx.ops.initsystem import OPENRC, OPENRC_LOG_DIR, SERVICE, SYSLOG_FILE, SYSTEMD, System

OPENRC_FOLLOW_ERROR = (
    "log follow is only supported on systemd; on OpenRC tail your syslog file directly "
    "(e.g. `tail -F /var/log/messages`)"
)
JOURNAL_HINT = ("Reading the journal needs root or membership in the systemd-journal (or adm) "
                "group; try `sudo aimx logs`.")


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "logs", parents=parents, description=describe("logs"),
        help="show the daemon's log",
    )
    parser.add_argument("-n", "--lines", type=int, default=50, metavar="N",
                        help="number of lines (default 50)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    return parser


def tail_lines(path: Path, count: int, block: int = 65536) -> list[str]:
    """The last ``count`` lines of ``path``, reading backwards from the end."""
    if count <= 0:
        return []
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        position = handle.tell()
        data = b""
        while position > 0 and data.count(b"\n") <= count:
            step = min(block, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    return [line.decode("utf-8", "replace") for line in data.splitlines()[-count:]]


def _openrc_lines(system: System, count: int) -> Iterable[str]:
    log_dir = system.path(OPENRC_LOG_DIR)
    files = sorted(log_dir.glob("*.log"), key=lambda p: p.stat().st_mtime) \
        if log_dir.is_dir() else []
    if files:
        lines: list[str] = []
        for path in files:
            lines += tail_lines(path, count)
        return lines[-count:]
    syslog = system.path(SYSLOG_FILE)
    if syslog.is_file():
        # The syslog is shared with every other service: keep aimx's lines only.
        lines = [line for line in tail_lines(syslog, count * 20) if SERVICE in line]
        return lines[-count:]
    raise CommandError(f"no aimx log found: {log_dir}/*.log and {syslog} are missing")


def show_logs(lines: int, follow: bool, system: System) -> int:
    if lines < 0:
        raise CommandError("--lines must not be negative")
    init = system.init_system()
    if init == SYSTEMD:
        argv = ["journalctl", "-f", "-u", SERVICE] if follow else \
            ["journalctl", "-u", SERVICE, "-n", str(lines), "--no-pager"]
        sys.stdout.flush()
        result = system.run(argv, capture=False)
        if result.returncode == 127:
            term.hint("journalctl is not installed or not on PATH.")
            raise CommandError("cannot read the journal: journalctl not found")
        if result.returncode not in (0, 130):  # 130: Ctrl-C while following
            term.hint(JOURNAL_HINT)
            raise CommandError(f"journalctl exited with status {result.returncode}")
        return 0
    if init == OPENRC:
        if follow:
            term.hint("OpenRC keeps aimx's output in /var/log/aimx/aimx.log.")
            raise CommandError(OPENRC_FOLLOW_ERROR)
        try:
            for line in _openrc_lines(system, lines):
                print(line)
        except PermissionError as exc:
            term.hint("The log files are readable by root only; try `sudo aimx logs`.")
            raise CommandError(f"cannot read {exc.filename}: permission denied") from None
        return 0
    term.hint("A daemon started by hand with `aimx serve` logs to its own stdout.")
    raise CommandError("no supported init system found (systemd or OpenRC)")


def run(args: argparse.Namespace) -> int:
    return show_logs(args.lines, args.follow, System())
