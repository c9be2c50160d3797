"""Entry point of the ``aimx`` command.

Each command group lives in its own module under ``aimx.cli`` and exposes
``add_parser(subparsers, parents)`` and ``run(args) -> int``. Modules are
imported lazily so ``aimx send`` does not pay for the daemon's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from aimx.cli import term
from aimx.version import version_info

# (command, module, help group); aliases are declared by the modules.
COMMANDS: list[tuple[str, str, str]] = [
    ("send", "aimx.cli.send", "user"),
    ("mailboxes", "aimx.cli.mailboxes", "user"),
    ("hooks", "aimx.cli.hooks", "user"),
    ("agents", "aimx.cli.agents", "user"),
    ("mcp", "aimx.cli.mcp", "user"),
    ("setup", "aimx.cli.setup", "admin"),
    ("serve", "aimx.cli.serve", "admin"),
    ("doctor", "aimx.cli.doctor", "admin"),
    ("logs", "aimx.cli.logs", "admin"),
    ("dkim-keygen", "aimx.cli.dkim_keygen", "admin"),
    ("portcheck", "aimx.cli.portcheck", "admin"),
    ("uninstall", "aimx.cli.uninstall", "admin"),
    ("upgrade", "aimx.cli.upgrade", "admin"),
    ("ingest", "aimx.cli.ingest", "hidden"),
]

_GROUP_TITLES = {
    "user": "Operations (as current user)",
    "admin": "Server administration",
}


class UsageError(Exception):
    """A command-line mistake: printed as ``Error: ...`` with exit code 2."""


class CommandError(Exception):
    """A command failed: printed as ``Error: ...`` with the given exit code (default 1)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--data-dir", metavar="PATH", default=default,
        help="data directory (env AIMX_DATA_DIR; default /var/lib/aimx)",
    )


def _available_modules() -> list[tuple[str, object, str]]:
    loaded = []
    for name, module_name, group in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # command not built yet
            raise
        loaded.append((name, module, group))
    return loaded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aimx",
        description="aimx: self-hosted email for AI agents (SMTP in, Markdown on disk, MCP out)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, suppress=False)
    parser.add_argument("-V", "--version", action="store_true", help="print version and exit")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    groups: dict[str, list[str]] = {"user": [], "admin": []}
    for name, module, group in _available_modules():
        sp = module.add_parser(sub, [common])
        sp.set_defaults(_run=module.run)
        if group in groups:
            groups[group].append(f"  {name:<14}{sp.description or ''}")
    epilog = []
    for group, lines in groups.items():
        if lines:
            epilog.append(f"{_GROUP_TITLES[group]}:\n" + "\n".join(lines))
    epilog.append("  help          show this help (also: aimx <command> --help)")
    parser.epilog = "\n\n".join(epilog)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --version / -V count only before the first non-flag word.
    for word in argv:
        if word in ("-V", "--version"):
            print(version_info().banner())
            return 0
        if not word.startswith("-"):
            break
    if argv[:1] == ["help"]:
        argv = ["--help"] + argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_usage(sys.stderr)
        print("aimx: error: a command is required", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        term.error(str(exc))
        return 2
    except CommandError as exc:
        term.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run through the package module so command modules and this entry point share one
    # ``CommandError`` class (``python -m`` would otherwise load this file twice).
    from aimx.cli.main import main as package_main

    sys.exit(package_main())
