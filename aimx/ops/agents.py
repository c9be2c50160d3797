"""Wiring aimx into AI agents: the registry, skill bundles and MCP registration.

``aimx agents`` copies a skill bundle (a ``SKILL.md`` the agent loads, plus
reference pages) into the agent's own directory and registers ``aimx mcp`` as
an MCP server where the agent has a way to do that from outside. Everything
here works on explicit paths (``Homes``) so the CLI decides whose home it
writes to, and tests can point it at a temporary one.

Pure apart from file writes and the agent CLIs run by ``register_with_cli``;
no Twisted.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs

BUNDLE_DIR = Path(__file__).parents[1] / "data" / "agents"
PRIMER_NAME = "aimx-primer.md"
REFERENCE_PAGES = ("frontmatter.md", "hooks.md", "mcp-tools.md", "troubleshooting.md",
                   "workflows.md")
GOOSE_RECIPE = "aimx.yaml"
SERVER_NAME = "aimx"
FILE_MODE = 0o644
DIR_MODE = 0o755
CLI_TIMEOUT_SECS = 60


class AgentsError(Exception):
    """An agents operation cannot go on; ``str(err)`` is the operator text."""


@attrs.frozen
class Agent:
    """One supported agent. ``wiring`` says how its MCP registration happens:
    ``cli`` (we run the agent's own CLI), ``mcp-json`` (we merge ``.mcp.json``),
    ``recipe`` (the goose recipe carries the server) or ``hint`` (we print what
    to add)."""

    name: str
    display: str
    refs: bool
    wiring: str


AGENTS: tuple[Agent, ...] = (
    Agent("claude-code", "Claude Code", refs=True, wiring="cli"),
    Agent("codex", "Codex CLI", refs=True, wiring="cli"),
    Agent("opencode", "OpenCode", refs=False, wiring="hint"),
    Agent("gemini", "Gemini CLI", refs=False, wiring="hint"),
    Agent("goose", "Goose", refs=False, wiring="recipe"),
    Agent("openclaw", "OpenClaw", refs=True, wiring="hint"),
    Agent("hermes", "Hermes", refs=True, wiring="hint"),
    Agent("nanoclaw", "NanoClaw", refs=True, wiring="mcp-json"),
)


def find_agent(name: str) -> Agent | None:
    return next((agent for agent in AGENTS if agent.name == name), None)


# --------------------------------------------------------------------------- homes

@attrs.frozen
class Homes:
    """The directories of the user being wired up."""

    home: Path
    xdg_config: Path
    nanoclaw: Path


def homes_for(env: Mapping[str, str], *, as_root: bool = False) -> Homes:
    """Where this user's agents live.

    As root (``--dangerously-allow-root``) the home is root's passwd entry and
    an ambient ``XDG_CONFIG_HOME`` is ignored: under ``sudo`` both usually
    still describe the invoking user, whose files root must not take over.
    ``NANOCLAW_HOME`` names a checkout, so it is honoured either way.
    """
    if as_root:
        try:
            home = Path(pwd.getpwuid(0).pw_dir or "/root")
        except KeyError:
            home = Path("/root")
        xdg = home / ".config"
    else:
        value = env.get("HOME")
        if not value:
            raise AgentsError("HOME is not set; agents setup writes to the user's home directory")
        home = Path(value)
        xdg = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    nanoclaw = Path(env["NANOCLAW_HOME"]) if env.get("NANOCLAW_HOME") else home / "nanoclaw"
    return Homes(home=home, xdg_config=xdg, nanoclaw=nanoclaw)


def agent_root(agent: Agent, homes: Homes) -> Path:
    """The directory whose existence means the agent is installed for this user."""
    return {
        "claude-code": homes.home / ".claude",
        "codex": homes.home / ".codex",
        "opencode": homes.xdg_config / "opencode",
        "gemini": homes.home / ".gemini",
        "goose": homes.xdg_config / "goose",
        "openclaw": homes.home / ".openclaw",
        "hermes": homes.home / ".hermes",
        "nanoclaw": homes.nanoclaw,
    }[agent.name]


def destination(agent: Agent, homes: Homes) -> Path:
    """Where the bundle goes: a ``skills/aimx`` dir, or goose's recipes dir."""
    if agent.name == "goose":
        return agent_root(agent, homes) / "recipes"
    return agent_root(agent, homes) / "skills" / "aimx"


def installed_path(agent: Agent, homes: Homes) -> Path:
    """What ``remove`` deletes: the skill dir, or goose's one recipe file."""
    dest = destination(agent, homes)
    return dest / GOOSE_RECIPE if agent.name == "goose" else dest


def legacy_plugin_dir(homes: Homes) -> Path:
    """Where older releases put the Claude Code plugin; install and remove clean it up."""
    return homes.home / ".claude" / "plugins" / "aimx"


def mcp_json_path(homes: Homes) -> Path:
    return homes.nanoclaw / ".mcp.json"


# --------------------------------------------------------------------------- the MCP command

def aimx_executable() -> str:
    """The real path of the ``aimx`` command, for agents that start ``aimx mcp`` later.

    Agents start MCP servers with their own PATH (often a minimal one), so the
    registration names an absolute path: the ``aimx`` running this code (not
    another one that happens to be on PATH), else the script we were started as.
    """
    from aimx.ops.initsystem import ServiceError
    from aimx.ops.initsystem import aimx_executable as installed

    try:
        return installed()
    except ServiceError:
        return str(Path(sys.argv[0]).resolve())


INSTANCE_ENV = ("AIMX_CONFIG_DIR", "AIMX_RUNTIME_DIR")
"""The variables that locate an instance besides its data dir: the config and the
socket. The agent starts ``aimx mcp`` later with an environment of its own."""


def instance_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The instance-locating variables set in ``environ``, as absolute paths."""
    return {name: os.path.abspath(environ[name]) for name in INSTANCE_ENV if environ.get(name)}


def mcp_argv(aimx: str, data_dir: str | os.PathLike[str] | None = None,
             env: Mapping[str, str] | None = None) -> list[str]:
    """``[env K=V…] aimx [--data-dir D] mcp`` as an argv list.

    ``env`` (see ``instance_env``) is set through ``env(1)``: the one form every
    agent's registration (a command and its arguments) can carry.
    """
    argv = []
    if env:
        argv += [str(Path(shutil.which("env") or "/usr/bin/env").resolve()),
                 *(f"{name}={value}" for name, value in sorted(env.items()))]
    argv.append(aimx)
    if data_dir:
        argv += ["--data-dir", os.path.abspath(data_dir)]
    return argv + ["mcp"]


def cli_commands(agent: Agent, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(remove, add) argv of an agent CLI that registers MCP servers itself."""
    if agent.name == "claude-code":
        return (["claude", "mcp", "remove", "--scope", "user", SERVER_NAME],
                ["claude", "mcp", "add", "--scope", "user", SERVER_NAME, "--", *argv])
    if agent.name == "codex":
        return (["codex", "mcp", "remove", SERVER_NAME],
                ["codex", "mcp", "add", SERVER_NAME, "--", *argv])
    raise ValueError(f"{agent.name} has no MCP registration command")


def mcp_server_entry(argv: Sequence[str]) -> dict[str, object]:
    """The ``mcpServers.aimx`` value of JSON-configured agents."""
    return {"command": argv[0], "args": list(argv[1:])}


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def activation_hint(agent: Agent, argv: Sequence[str], homes: Homes) -> str:
    """What the user does (or what we do) to switch the MCP server on, possibly multi-line."""
    if agent.wiring == "cli":
        _remove, add = cli_commands(agent, argv)
        return f"run: {shlex.join(add)}"
    if agent.name == "opencode":
        snippet = {"mcp": {SERVER_NAME: {"type": "local", "command": list(argv),
                                         "enabled": True}}}
        return (f"add to {homes.xdg_config / 'opencode' / 'opencode.json'}: "
                f"{_compact(snippet)}")
    if agent.name == "gemini":
        snippet = {"mcpServers": {SERVER_NAME: mcp_server_entry(argv)}}
        return f"add to {homes.home / '.gemini' / 'settings.json'}: {_compact(snippet)}"
    if agent.name == "goose":
        return "goose run --recipe aimx"
    if agent.name == "openclaw":
        return f"openclaw mcp set {SERVER_NAME} {shlex.quote(_compact(mcp_server_entry(argv)))}"
    if agent.name == "hermes":
        args = ", ".join(json.dumps(arg) for arg in argv[1:])
        return (f"add under mcp_servers: in {homes.home / '.hermes' / 'config.yaml'}, "
                "then run /reload-mcp:\n"
                f"mcp_servers:\n  {SERVER_NAME}:\n    command: {json.dumps(argv[0])}\n"
                f"    args: [{args}]")
    # nanoclaw
    return f"aimx agents setup merges mcpServers.aimx into {mcp_json_path(homes)}"


def registration_hint(agent: Agent, argv: Sequence[str], homes: Homes) -> str:
    """The manual fallback printed when automatic registration did not happen."""
    if agent.wiring == "cli":
        _remove, add = cli_commands(agent, argv)
        return f"Register it yourself with: {shlex.join(add)}"
    return activation_hint(agent, argv, homes)


def removal_hint(agent: Agent) -> str:
    """Printed after ``agents remove``: registrations are left for the user to drop."""
    return {
        "claude-code": "Run `claude mcp remove --scope user aimx` to also unregister the MCP "
                       "server from Claude Code.",
        "codex": "Run `codex mcp remove aimx` to also unregister the MCP server from Codex CLI.",
        "opencode": "Remove the `aimx` entry under `mcp` in your opencode.json to also "
                    "unregister the MCP server from OpenCode.",
        "gemini": "Remove `mcpServers.aimx` from ~/.gemini/settings.json to also unregister "
                  "the MCP server from Gemini CLI.",
        "goose": "Other goose recipes were left in place; the aimx extension lived only in "
                 "the recipe.",
        "openclaw": "Run `openclaw mcp unset aimx` to also unregister the MCP server from "
                    "OpenClaw.",
        "hermes": "Remove `aimx` under `mcp_servers:` in ~/.hermes/config.yaml, then run "
                  "/reload-mcp, to also unregister the MCP server from Hermes.",
        "nanoclaw": "Remove `mcpServers.aimx` from your NanoClaw fork's .mcp.json to also "
                    "unregister the MCP server from NanoClaw.",
    }[agent.name]


# --------------------------------------------------------------------------- bundles

def _read_source(relative: str) -> str:
    return (BUNDLE_DIR / relative).read_text(encoding="utf-8")


def _indent(text: str, prefix: str) -> str:
    """Indent non-empty lines (a YAML block scalar needs nothing on empty ones)."""
    return "".join(prefix + line if line.strip() else line
                   for line in text.splitlines(keepends=True))


def bundle_files(agent: Agent, argv: Sequence[str]) -> list[tuple[str, str]]:
    """(path relative to the destination, content) of every file to install, in order."""
    primer = _read_source(PRIMER_NAME)
    if agent.name == "goose":
        header = _read_source("goose/recipe.yaml.header")
        header = header.replace("{{AIMX_CMD}}", json.dumps(argv[0]))
        header = header.replace("{{AIMX_ARGS}}", json.dumps(list(argv[1:])))
        if not header.endswith("\n"):
            header += "\n"
        return [(GOOSE_RECIPE, header + _indent(primer, "  "))]
    parts = [_read_source(f"{agent.name}/SKILL.md.header"), primer]
    footer = BUNDLE_DIR / agent.name / "SKILL.md.footer"
    if footer.is_file():
        parts.append(footer.read_text(encoding="utf-8"))
    skill = "\n".join(part.rstrip("\n") + "\n" for part in parts)
    files = [("SKILL.md", skill)]
    if agent.refs:
        files += [(f"references/{page}", _read_source(f"references/{page}"))
                  for page in REFERENCE_PAGES]
    return files


def agent_state(agent: Agent, homes: Homes) -> str:
    """``wired`` (our files are there), ``detected`` (the agent is) or ``absent``."""
    dest = destination(agent, homes)
    if dest.is_dir():
        if agent.name == "goose":
            if (dest / GOOSE_RECIPE).is_file():
                return "wired"
        elif _mentions_aimx(dest):
            return "wired"
    return "detected" if agent_root(agent, homes).is_dir() else "absent"


def _mentions_aimx(directory: Path) -> bool:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return False
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                with open(entry.path, "rb") as handle:
                    if b"aimx" in handle.read(1 << 20):
                        return True
        except OSError:
            continue
    return False


def existing_files(agent: Agent, homes: Homes) -> list[Path]:
    """Files an install would replace: the recipe, or everything under the skill dir."""
    dest = destination(agent, homes)
    if agent.name == "goose":
        recipe = dest / GOOSE_RECIPE
        return [recipe] if recipe.exists() or recipe.is_symlink() else []
    if not dest.is_dir():
        return []
    return sorted(path for path in dest.rglob("*") if not path.is_dir() or path.is_symlink())


def _write_file(path: Path, content: str) -> None:
    """Write via a temp file and rename, 0644 whatever the umask."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.chmod(temp, FILE_MODE)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _make_dirs(path: Path) -> None:
    """mkdir -p with 0755 on every directory created (the umask may be 077)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir()
        os.chmod(directory, DIR_MODE)


def install_bundle(agent: Agent, homes: Homes, files: Sequence[tuple[str, str]]) -> Path:
    """Put the bundle in place and return the destination.

    A skill dir is built next to the destination and swapped in whole, so
    files a previous release installed and this one no longer ships do not
    linger. Goose's recipes dir is shared with other recipes: only
    ``aimx.yaml`` is written there.
    """
    dest = destination(agent, homes)
    if agent.name == "claude-code":
        shutil.rmtree(legacy_plugin_dir(homes), ignore_errors=True)
    if agent.name == "goose":
        _make_dirs(dest)
        for relative, content in files:
            _write_file(dest / relative, content)
        return dest
    _make_dirs(dest.parent)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".aimx-new-"))
    try:
        os.chmod(staging, DIR_MODE)
        for relative, content in files:
            target = staging / relative
            _make_dirs(target.parent)
            _write_file(target, content)
        old = None
        if dest.exists() or dest.is_symlink():
            old = dest.parent / f".aimx-old-{os.getpid()}"
            os.rename(dest, old)
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return dest


def remove_bundle(agent: Agent, homes: Homes) -> list[Path]:
    """Delete what ``install_bundle`` wrote; returns the paths that existed."""
    removed = []
    targets = [installed_path(agent, homes)]
    if agent.name == "claude-code":
        targets.append(legacy_plugin_dir(homes))
    for target in targets:
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        else:
            continue
        removed.append(target)
    return removed


# --------------------------------------------------------------------------- registration

@attrs.frozen
class Registration:
    """Outcome of an automatic MCP registration.

    ``status``: ``ok``, ``absent`` (the agent CLI is not on PATH) or ``failed``
    (``detail`` = its first stderr line, ``exit_code`` = its status).
    """

    status: str
    detail: str = ""
    exit_code: int = 0


def register_with_cli(agent: Agent, argv: Sequence[str], env: Mapping[str, str] | None = None,
                      runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                      ) -> Registration:
    """Drop any old ``aimx`` registration, then add the current one.

    The remove runs first so a re-install replaces a stale path (the add
    refuses a name that exists); its failure (nothing to remove) is expected.
    """
    remove, add = cli_commands(agent, argv)
    env = dict(os.environ if env is None else env)
    program = shutil.which(add[0], path=env.get("PATH"))
    if program is None:
        return Registration("absent")
    remove[0] = add[0] = program
    try:
        runner(remove, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_SECS,
               stdin=subprocess.DEVNULL, check=False)
        done = runner(add, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_SECS,
                      stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return Registration("failed", f"timed out after {CLI_TIMEOUT_SECS}s", -1)
    except OSError as exc:
        return Registration("failed", str(exc), -1)
    if done.returncode != 0:
        text = (done.stderr or "").strip() or (done.stdout or "").strip() or "no output"
        return Registration("failed", text.splitlines()[0], done.returncode)
    return Registration("ok")


def merge_mcp_json(path: Path, entry: Mapping[str, object], *, force: bool = False) -> str:
    """Set ``mcpServers.aimx`` in a ``.mcp.json``, keeping every other server.

    Returns ``created``, ``merged`` (added to an existing file), ``unchanged``,
    ``updated`` (replaced with ``force``) or ``conflict`` (a different entry
    exists and ``force`` is off; nothing written). The file is replaced
    atomically and keeps its mode. Raises ``AgentsError`` for unreadable or
    non-object JSON rather than guessing.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = None
    except OSError as exc:
        raise AgentsError(f"cannot read {path}: {exc.strerror or exc}") from None
    if text is None:
        document: dict[str, object] = {}
    else:
        try:
            document = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise AgentsError(f"{path} is not valid JSON ({exc}); fix it and retry") from None
        if not isinstance(document, dict):
            raise AgentsError(f"{path} does not hold a JSON object; fix it and retry")
    servers = document.setdefault("mcpServers", {})
    if not isinstance(servers, dict):
        raise AgentsError(f"mcpServers in {path} is not a JSON object; fix it and retry")
    wanted = dict(entry)
    if SERVER_NAME in servers:
        if servers[SERVER_NAME] == wanted:
            return "unchanged"
        if not force:
            return "conflict"
        outcome = "updated"
    else:
        outcome = "created" if text is None else "merged"
    servers[SERVER_NAME] = wanted
    mode = path.stat().st_mode & 0o7777 if text is not None else FILE_MODE
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".mcp.json.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return outcome
