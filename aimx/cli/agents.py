"""``aimx agents setup|list|remove``: wire aimx into the AI agents of one user.

A per-user operation: skill files land in the caller's home and MCP
registrations belong to the caller's agent config, so root is refused unless
it explicitly means its own agents (``--dangerously-allow-root``). With no
agent named, a terminal gets a small picker on stderr; anything else gets
the registry.
"""

from __future__ import annotations

import argparse
import os
import pwd
import select
import sys
from collections.abc import Sequence
from typing import Any

from aimx import paths, term
from aimx.cli.main import CommandError, describe
from aimx.ops import agents
from aimx.ops.agents import AGENTS, Agent, AgentsError, Homes

_LABEL_WIDTH = 17  # "    destination: " — continuation lines of the registry align here


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "agents", parents=parents,
        description=describe("agents"),
        help="install the aimx skill and MCP server into your AI agents",
    )
    sub = parser.add_subparsers(dest="agents_command", metavar="<command>", required=True)

    setup = sub.add_parser("setup", parents=parents,
                           help="install the aimx skill and MCP wiring for an agent",
                           description="install the aimx skill bundle and MCP wiring for an agent")
    setup.add_argument("agent", nargs="?", help="agent name (see `aimx agents list`)")
    setup.add_argument("--list", action="store_true", help="list supported agents and exit")
    setup.add_argument("--force", action="store_true",
                       help="overwrite existing files and a conflicting MCP entry")
    setup.add_argument("--print", dest="print_only", action="store_true",
                       help="print the files and activation step instead of writing anything")
    setup.add_argument("--no-interactive", action="store_true",
                       help="never open the agent picker")
    setup.add_argument("--dangerously-allow-root", action="store_true",
                       help="allow running as root (installs into root's own home)")

    sub.add_parser("list", parents=parents, help="list supported agents",
                   description="list supported agents")

    remove = sub.add_parser("remove", parents=parents,
                            help="remove the aimx skill from an agent",
                            description="remove the aimx skill bundle from an agent")
    remove.add_argument("agent")
    remove.add_argument("--dangerously-allow-root", action="store_true",
                        help="allow running as root (removes from root's own home)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.agents_command == "list":
        return _list(args)
    if args.agents_command == "remove":
        return _remove(args)
    return _setup(args)


# -- shared -------------------------------------------------------------------------


def _is_root() -> bool:
    return os.geteuid() == 0


def _root_gate(args: argparse.Namespace, verb: str) -> None:
    if _is_root() and not args.dangerously_allow_root:
        user = os.environ.get("SUDO_USER") or "<user>"
        raise CommandError(
            f"`aimx agents {verb}` is a per-user operation: it writes to your home directory "
            f"and your agents' config, not root's. Re-run it as that user (e.g. `sudo -u {user} "
            f"aimx agents {verb}`), or pass --dangerously-allow-root on a single-user root VPS."
        )


def _homes() -> Homes:
    try:
        return agents.homes_for(os.environ, as_root=_is_root())
    except AgentsError as exc:
        raise CommandError(str(exc)) from None


def _mcp_argv(args: argparse.Namespace) -> list[str]:
    data_dir = paths.data_dir_override(getattr(args, "data_dir", None))
    return agents.mcp_argv(agents.aimx_executable(), data_dir, agents.instance_env(os.environ))


def _lookup(name: str, message: str) -> Agent:
    agent = agents.find_agent(name)
    if agent is None:
        raise CommandError(message)
    return agent


def _print_registry(homes: Homes, argv: Sequence[str]) -> None:
    print("Supported agents:")
    continuation = "\n" + " " * _LABEL_WIDTH
    for agent in AGENTS:
        hint = agents.activation_hint(agent, argv, homes).replace("\n", continuation)
        print(f"  {agent.name}")
        print(f"    destination: {agents.destination(agent, homes)}")
        print(f"    install:     aimx agents setup {agent.name}")
        print(f"    activation:  {hint}")


def _list(args: argparse.Namespace) -> int:
    _print_registry(_homes(), _mcp_argv(args))
    return 0


# -- setup --------------------------------------------------------------------------


def _setup(args: argparse.Namespace) -> int:
    if args.list:
        return _list(args)
    _root_gate(args, "setup")
    homes = _homes()
    argv = _mcp_argv(args)
    if args.agent is None:
        interactive = sys.stdin.isatty() and sys.stderr.isatty()
        if args.no_interactive or args.print_only or not interactive:
            _print_registry(homes, argv)
            print()
            if args.print_only:
                print("Run `aimx agents setup --print claude-code` (or another agent) to see "
                      "what would be installed.")
            else:
                print("Run `aimx agents setup <agent>` to install one.")
            return 0
        return _interactive(homes, argv)
    agent = _lookup(args.agent, f"unknown agent '{args.agent}'; run `aimx agents list` to see "
                                "supported agents")
    if args.print_only:
        for relative, content in agents.bundle_files(agent, argv):
            print(f"=== {relative} ===")
            sys.stdout.write(content if content.endswith("\n") else content + "\n")
        print("=== activation ===")
        print(agents.activation_hint(agent, argv, homes))
        return 0
    _install(agent, homes, argv, force=args.force, ask=sys.stdin.isatty())
    return 0


def _confirm_overwrite(existing: Sequence[Any]) -> bool:
    print("These files already exist and will be replaced:")
    for path in existing:
        print(f"  {path}")
    sys.stdout.write("Overwrite? [y/N] ")
    sys.stdout.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _install(agent: Agent, homes: Homes, argv: Sequence[str], *, force: bool,
             ask: bool, force_mcp: bool | None = None) -> None:
    """Install one agent's bundle and wiring; raises ``CommandError`` when it cannot."""
    if agent.name == "nanoclaw" and not homes.nanoclaw.is_dir():
        raise CommandError(
            f"NanoClaw checkout not found at {homes.nanoclaw}; clone your NanoClaw fork there "
            "(e.g. `git clone <your fork> ~/nanoclaw`) or set NANOCLAW_HOME to its directory"
        )
    dest = agents.destination(agent, homes)
    existing = agents.existing_files(agent, homes)
    if existing and not force:
        if not ask:
            raise CommandError(
                f"destination files already exist under {dest}; pass --force to overwrite")
        if not _confirm_overwrite(existing):
            raise CommandError("aborted by user")
    try:
        agents.install_bundle(agent, homes, agents.bundle_files(agent, argv))
    except OSError as exc:
        raise CommandError(f"failed to install into {dest}: {exc}") from None
    print(f"Installed {dest}")
    _wire(agent, homes, argv, force=force if force_mcp is None else force_mcp)


def _wire(agent: Agent, homes: Homes, argv: Sequence[str], *, force: bool) -> None:
    if agent.wiring == "cli":
        outcome = agents.register_with_cli(agent, argv)
        if outcome.status == "ok":
            print(f"{term.mark('ok')} MCP server registered with {agent.display}.")
            return
        if outcome.status == "absent":
            program = agents.cli_commands(agent, argv)[1][0]
            print(f"`{program}` is not on PATH, so the MCP server was not registered.")
        else:
            print(f"{term.mark('warn')} MCP auto-registration failed: {outcome.detail} "
                  f"(exit {outcome.exit_code})")
        print(agents.registration_hint(agent, argv, homes))
        return
    if agent.wiring == "mcp-json":
        path = agents.mcp_json_path(homes)
        try:
            outcome_text = agents.merge_mcp_json(path, agents.mcp_server_entry(argv), force=force)
        except (AgentsError, OSError) as exc:
            print(f"{term.mark('warn')} could not update {path}: {exc}")
            return
        ok = term.mark("ok")
        print({
            "created": f"{ok} Created {path} with mcpServers.aimx.",
            "merged": f"{ok} Added mcpServers.aimx to {path}.",
            "updated": f"{ok} Replaced mcpServers.aimx in {path}.",
            "unchanged": f"{ok} mcpServers.aimx in {path} is already up to date.",
            "conflict": f"{term.mark('warn')} mcpServers.aimx already exists in {path}; "
                        "pass --force to overwrite",
        }[outcome_text])
        return
    print("To activate:")
    for line in agents.activation_hint(agent, argv, homes).splitlines():
        print(f"  {line}")


# -- remove -------------------------------------------------------------------------


def _remove(args: argparse.Namespace) -> int:
    _root_gate(args, "remove")
    agent = _lookup(args.agent, f"Unknown agent '{args.agent}'. Run `aimx agents list` to see "
                                "supported agents.")
    homes = _homes()
    target = agents.installed_path(agent, homes)
    try:
        removed = agents.remove_bundle(agent, homes)
    except OSError as exc:
        raise CommandError(f"failed to remove {target}: {exc}") from None
    if target in removed:
        print(f"Removed {target}")
    else:
        print(f"Plugin: {target} (already absent)")
        print(f"{term.mark('warn')} no plugin files were present at {target} (already removed?)")
    for extra in removed:
        if extra != target:
            print(f"Removed {extra}")
    print(agents.removal_hint(agent))
    return 0


# -- interactive picker ---------------------------------------------------------------


class _Cancelled(Exception):
    pass


def _read_key(fd: int) -> str:
    """One key press: ``up``, ``down``, ``space``, ``enter``, ``quit`` or the character."""
    char = os.read(fd, 1)
    if char == b"\x1b":
        ready, _, _ = select.select([fd], [], [], 0.05)
        if not ready:
            return "quit"
        rest = os.read(fd, 2)
        if rest in (b"[A", b"OA"):
            return "up"
        if rest in (b"[B", b"OB"):
            return "down"
        return "other"
    if char in (b"\r", b"\n"):
        return "enter"
    if char == b" ":
        return "space"
    if char in (b"q", b"Q", b"\x03", b""):
        return "quit"
    if char == b"k":
        return "up"
    if char == b"j":
        return "down"
    return "other"


def _draw(rows: list[tuple[Agent, str]], selected: set[str], cursor: int, user: str,
          previous_lines: int) -> int:
    out = sys.stderr
    colour = term.color_enabled()
    if previous_lines and colour:
        out.write(f"\x1b[{previous_lines}A\x1b[J")
    elif previous_lines:
        out.write("\n")
    lines = [term.style(f"Setting up MCP integration for AI agents for `{user}`.", "bold"), ""]
    for index, (agent, state) in enumerate(rows):
        pointer = "❯" if colour else ">"
        lead = f"{pointer} " if index == cursor else "  "
        if state == "absent":
            lines.append(lead + term.style(f"[-] {agent.display}  (not detected)", "dim"))
            continue
        box = "[x]" if agent.name in selected else "[ ]"
        suffix = "  (AIMX MCP wired)" if state == "wired" else ""
        lines.append(f"{lead}{box} {agent.display}{suffix}")
    lines += ["", f"{term.mark('prompt')} Space toggles, Enter confirms, q cancels."]
    out.write("\n".join(lines) + "\n")
    out.flush()
    return len(lines)


def _pick(rows: list[tuple[Agent, str]], selected: set[str], user: str) -> list[Agent]:
    """Run the picker until Enter; raises ``_Cancelled`` on q, Esc or Ctrl-C."""
    import termios
    import tty

    choosable = [i for i, (_agent, state) in enumerate(rows) if state != "absent"]
    cursor = choosable[0]
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    drawn = 0
    try:
        tty.setcbreak(fd)
        while True:
            drawn = _draw(rows, selected, cursor, user, drawn)
            key = _read_key(fd)
            if key == "quit":
                raise _Cancelled
            if key in ("up", "down"):
                position = choosable.index(cursor) + (1 if key == "down" else -1)
                cursor = choosable[position % len(choosable)]
            elif key == "space":
                name = rows[cursor][0].name
                selected.symmetric_difference_update({name})
            elif key == "enter":
                return [agent for agent, _state in rows if agent.name in selected]
    except KeyboardInterrupt:
        raise _Cancelled from None
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _interactive(homes: Homes, argv: Sequence[str]) -> int:
    rows = [(agent, agents.agent_state(agent, homes)) for agent in AGENTS]
    if all(state == "absent" for _agent, state in rows):
        print("No supported agent was detected for this user.", file=sys.stderr)
        _print_registry(homes, argv)
        return 0
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    selected = {agent.name for agent, state in rows if state == "detected"}
    states = dict((agent.name, state) for agent, state in rows)
    while True:
        try:
            chosen = _pick(rows, selected, user)
        except _Cancelled:
            print("Cancelled. No agents were wired.", file=sys.stderr)
            return 0
        if not chosen:
            print("Cancelled. No agents were wired.", file=sys.stderr)
            return 0
        print("\nTasks to perform:", file=sys.stderr)
        for agent in chosen:
            if states[agent.name] == "wired":
                print(f"  Re-install AIMX MCP for {agent.display} (refresh files)",
                      file=sys.stderr)
            else:
                print(f"  Install AIMX MCP for {agent.display}", file=sys.stderr)
        sys.stderr.write("Confirm? [Y/n] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() in ("", "y", "yes"):
            break
    results = []
    for agent in chosen:
        print(f"\n==> {agent.display}")
        try:
            _install(agent, homes, argv, force=True, ask=False, force_mcp=False)
            results.append((agent, True))
        except CommandError as exc:
            term.error(str(exc))
            results.append((agent, False))
    _print_summary(results, homes)
    return 0 if all(ok for _agent, ok in results) else 1


def _print_summary(results: Sequence[tuple[Agent, bool]], homes: Homes) -> None:
    table = [("Agent", "Status", "Destination")]
    for agent, ok in results:
        status = f"{term.mark('ok')} ok" if ok else f"{term.mark('fail')} failed"
        table.append((agent.display, status, str(agents.destination(agent, homes))))
    widths = [max(term.visible_width(row[i]) for row in table) for i in range(2)]
    print("\nSummary")
    for index, (name, status, dest) in enumerate(table):
        line = f"  {term.pad(name, widths[0])}  {term.pad(status, widths[1])}  {dest}"
        print(term.style(line, "bold") if index == 0 else line)
