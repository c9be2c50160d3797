"""Entry point of the ``aimx`` command.

Each command group lives in its own module under ``aimx.cli`` and exposes
``add_parser(subparsers, parents)`` and ``run(args) -> int``. Only the module
of the command named on the command line is imported, so ``aimx send`` does not
pay for the daemon's (or any other command's) imports; the overview help is
built from the static table below without importing any command module.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from aimx import term

# (command, module, help group, aliases, one-line description). This table is the
# one place a command's description lives (modules take it with ``describe``), so
# choosing a command and printing the overview need no command module imported.
COMMANDS: list[tuple[str, str, str, tuple[str, ...], str]] = [
    ("send", "aimx.cli.send", "user", (),
     "Send an email (Markdown body) from a mailbox you own"),
    ("watch", "aimx.cli.watch", "user", (),
     "Print a line for each new email in a mailbox, as it arrives"),
    ("mailboxes", "aimx.cli.mailboxes", "user", ("mailbox",),
     "create, list, show and delete mailboxes"),
    ("hooks", "aimx.cli.hooks", "user", ("hook",), "list, create and delete mailbox hooks"),
    ("agents", "aimx.cli.agents", "user", (),
     "install the aimx skill and MCP server into your AI agents"),
    ("mcp", "aimx.cli.mcp", "user", (),
     "run the stdio MCP server for AI agents (stdout carries protocol only)"),
    ("setup", "aimx.cli.setup", "admin", (),
     "set up this server: port 25, DNS, TLS, trust policy and the service"),
    ("serve", "aimx.cli.serve", "admin", (),
     "Run the aimx daemon in the foreground (SMTP, socket API, hooks)"),
    ("doctor", "aimx.cli.doctor", "admin", (),
     "check configuration, service, mailboxes, ownership and DNS"),
    ("logs", "aimx.cli.logs", "admin", (), "show the aimx daemon's log"),
    ("dkim-keygen", "aimx.cli.dkim_keygen", "admin", (),
     "generate the DKIM key pair and print its DNS record"),
    ("dkim", "aimx.cli.dkim", "admin", (),
     "list DKIM keys, rotate to a new selector, retire an old one"),
    ("portcheck", "aimx.cli.portcheck", "admin", (),
     "check inbound and outbound port 25 through the verifier service"),
    ("uninstall", "aimx.cli.uninstall", "admin", (),
     "stop aimx and remove its service (config, data and package are kept)"),
    ("upgrade", "aimx.cli.upgrade", "admin", (),
     "print how to upgrade aimx with pip and restart the daemon"),
    ("ingest", "aimx.cli.ingest", "hidden", (),
     "Store a raw email read from stdin for <rcpt>, as an SMTP delivery would"),
]

_GROUP_TITLES = {
    "user": "Operations (as current user)",
    "admin": "Server administration",
}


def describe(command: str) -> str:
    """The one-line description of ``command``, for its module's ``add_parser``."""
    for name, _module, _group, _aliases, description in COMMANDS:
        if name == command:
            return description
    raise KeyError(command)


def import_all_commands() -> None:
    """Import every command module now.

    For a process that is about to drop privileges and may then be unable to
    read the installation (an interpreter under a root-only home, say).
    """
    for _name, module, *_rest in _available():
        importlib.import_module(module)


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


def _available() -> list[tuple[str, str, str, tuple[str, ...], str]]:
    """The table's commands whose module exists (a command may not be built yet)."""
    return [entry for entry in COMMANDS if importlib.util.find_spec(entry[1]) is not None]


def chosen_command(argv: list[str]) -> str | None:
    """The command named by ``argv`` (aliases resolved), or ``None``.

    Mirrors how argparse finds the subcommand: the first word that is neither an
    option nor the value of ``--data-dir``.
    """
    words = iter(argv)
    for word in words:
        if word == "--":
            word = next(words, None)
        elif word == "--data-dir":
            next(words, None)
            continue
        elif word.startswith("-"):
            continue
        for name, _module, _group, aliases, _description in COMMANDS:
            if word == name or word in aliases:
                return name
        return None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that command's module is imported.

    Without one, every command gets a placeholder parser from the static table:
    enough for ``aimx --help`` and argparse's "invalid choice" message.
    """
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
    for name, module_name, group, aliases, description in _available():
        if name == command:
            module = importlib.import_module(module_name)
            sp = module.add_parser(sub, [common])
            sp.set_defaults(_run=module.run)
        elif command is None:
            sub.add_parser(name, aliases=list(aliases), parents=[common],
                           description=description, add_help=False)
        if group in groups:
            groups[group].append(f"  {name:<14}{description}")
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
            from aimx.version import version_info

            print(version_info().banner())
            return 0
        if not word.startswith("-"):
            break
    if argv[:1] == ["help"]:
        argv = ["--help"] + argv[1:]
    parser = build_parser(chosen_command(argv))
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
