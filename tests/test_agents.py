"""``aimx agents setup|list|remove`` with a fake home, fake agent CLIs and real users.

Agent setup refuses root, so when the suite runs as root the command runs as
the unprivileged test user ``alice`` with a home in a temp dir; otherwise as
the current user, through the launcher the other CLI tests use
(``tests.support.users.aimx_as_command``). The ``aimx`` script on PATH is the real console script.
"""

from __future__ import annotations

import json
import os
import pty
import pwd
import select
import stat
import subprocess
import time
from pathlib import Path

import pytest

from aimx.ops import agents
from tests.support.users import (
    AIMX,
    REPO_ROOT,
    LinuxUser,
    aimx_as_command,
    skip_unless_users_reach_checkout,
)

AIMX_REAL = str(AIMX.resolve())
REFERENCE_FILES = sorted(f"references/{page}" for page in agents.REFERENCE_PAGES)


class Runner:
    """Runs ``aimx`` as the agent user with a controlled environment."""

    def __init__(self, home: Path, bindir: Path, who: tuple[int, int, str]) -> None:
        self.home = home
        self.bindir = bindir
        self.uid, self.gid, self.name = who

    def argv(self, args, *, as_root: bool = False) -> list[str]:
        if not as_root and self.uid != os.geteuid():
            skip_unless_users_reach_checkout()
        user = None if as_root else LinuxUser(self.name, self.uid, self.gid, str(self.home))
        return aimx_as_command(user, list(args))

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": f"{self.bindir}:{AIMX.parent}:/usr/bin:/bin", "HOME": str(self.home),
               "LANG": "C.UTF-8"}
        env.update(extra)
        return {key: value for key, value in env.items() if value is not None}

    def __call__(self, *args: str, env: dict[str, str] | None = None, stdin=subprocess.DEVNULL,
                 as_root: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(args, as_root=as_root), env=env or self.env(),
                              stdin=stdin, capture_output=True, text=True, timeout=60,
                              cwd=REPO_ROOT)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, d) for d in dirs),
                     *(os.path.join(root, f) for f in files)]:
            os.chown(name, uid, gid)


@pytest.fixture
def user(request, tmp_path) -> tuple[int, int, str]:
    """(uid, gid, name) of the user agents setup runs as."""
    if os.geteuid() == 0:
        alice = request.getfixturevalue("test_users")["alice"]
        for parent in (tmp_path, *tmp_path.parents):
            if str(parent) in ("/", "/tmp"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
        return alice.uid, alice.gid, alice.name
    return os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def run(tmp_path, user) -> Runner:
    home = tmp_path / "home"
    bindir = tmp_path / "bin"
    home.mkdir()
    bindir.mkdir()
    for path in (home, bindir):
        os.chown(path, user[0], user[1])
    return Runner(home, bindir, user)


def fake_cli(run: Runner, name: str, *, fail_add: bool = False) -> Path:
    """An agent CLI (plain sh) that logs each call's argv, one line per call."""
    log = run.home / f"{name}-calls.log"
    failing = ('if [ "$2" = add ]; then echo "boom: add refused" >&2; echo second >&2; exit 3; fi'
               if fail_add else "")
    script = run.bindir / name
    script.write_text(
        "#!/bin/sh\n"
        f'for arg in "$@"; do printf \'%s\\037\' "$arg"; done >> "{log}"\n'
        f'printf \'\\n\' >> "{log}"\n{failing}\nexit 0\n')
    script.chmod(0o755)
    return log


def calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- claude-code

def test_setup_claude_code_installs_bundle_and_registers(run):
    log = fake_cli(run, "claude")
    done = run("agents", "setup", "claude-code")
    dest = run.home / ".claude" / "skills" / "aimx"
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"Installed {dest}",
        "[OK] MCP server registered with Claude Code.",
    ]
    assert tree(dest) == ["SKILL.md", *REFERENCE_FILES]
    assert calls(log) == [
        ["mcp", "remove", "--scope", "user", "aimx"],
        ["mcp", "add", "--scope", "user", "aimx", "--", AIMX_REAL, "mcp"],
    ]
    skill = (dest / "SKILL.md").read_text()
    assert skill.startswith("---\nname: aimx\ndescription: ")
    assert "## Wiring yourself up as a mailbox hook" in skill
    assert "# Using aimx" in skill  # the primer follows the header
    for path in [dest, *dest.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), path
        assert path.stat().st_uid == run.uid


def test_claude_registration_carries_the_data_dir(run):
    log = fake_cli(run, "claude")
    done = run("--data-dir", "/srv/aimx data", "agents", "setup", "claude-code")
    assert done.returncode == 0, done.stderr
    assert calls(log)[1] == ["mcp", "add", "--scope", "user", "aimx", "--", AIMX_REAL,
                             "--data-dir", "/srv/aimx data", "mcp"]


def test_registration_carries_the_instance_it_was_made_for(run):
    """A non-default instance is found by its socket and config dirs, not only its data
    dir: the agent starts `aimx mcp` later with its own environment."""
    log = fake_cli(run, "claude")
    env = run.env(AIMX_CONFIG_DIR="/srv/dev/config", AIMX_RUNTIME_DIR="/srv/dev/run",
                  AIMX_DATA_DIR="/srv/dev/data")
    done = run("agents", "setup", "claude-code", env=env)
    assert done.returncode == 0, done.stderr
    assert calls(log)[1][6:] == ["/usr/bin/env", "AIMX_CONFIG_DIR=/srv/dev/config",
                                 "AIMX_RUNTIME_DIR=/srv/dev/run", AIMX_REAL,
                                 "--data-dir", "/srv/dev/data", "mcp"]
    listed = run("agents", "list", env=env)
    assert ("activation:  run: codex mcp add aimx -- /usr/bin/env AIMX_CONFIG_DIR=/srv/dev/config "
            f"AIMX_RUNTIME_DIR=/srv/dev/run {AIMX_REAL} --data-dir /srv/dev/data mcp"
            ) in listed.stdout


def test_claude_legacy_plugin_dir_is_removed(run):
    fake_cli(run, "claude")
    legacy = run.home / ".claude" / "plugins" / "aimx"
    legacy.mkdir(parents=True)
    (legacy / "plugin.json").write_text("{}")
    _chown_tree(run.home, run.uid, run.gid)
    assert run("agents", "setup", "claude-code").returncode == 0
    assert not legacy.exists()


def test_failed_registration_warns_with_the_first_stderr_line(run):
    fake_cli(run, "claude", fail_add=True)
    done = run("agents", "setup", "claude-code")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[1] == "[WARN] MCP auto-registration failed: boom: add refused (exit 3)"
    assert lines[2] == ("Register it yourself with: claude mcp add --scope user aimx -- "
                        f"{AIMX_REAL} mcp")


def test_missing_claude_cli_prints_the_manual_command(run):
    done = run("agents", "setup", "claude-code")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == [
        "`claude` is not on PATH, so the MCP server was not registered.",
        f"Register it yourself with: claude mcp add --scope user aimx -- {AIMX_REAL} mcp",
    ]


def test_codex_registration_argv(run):
    log = fake_cli(run, "codex")
    done = run("agents", "setup", "codex")
    assert done.returncode == 0, done.stderr
    assert calls(log) == [["mcp", "remove", "aimx"],
                          ["mcp", "add", "aimx", "--", AIMX_REAL, "mcp"]]
    assert "[OK] MCP server registered with Codex CLI." in done.stdout


def test_print_writes_nothing_and_runs_no_cli(run):
    log = fake_cli(run, "claude")
    before = tree(run.home)
    done = run("agents", "setup", "--print", "claude-code")
    assert done.returncode == 0, done.stderr
    assert tree(run.home) == before
    assert calls(log) == []
    headers = [line for line in done.stdout.splitlines() if line.startswith("=== ")]
    assert headers == ["=== SKILL.md ===", *(f"=== {name} ===" for name in
                       [f"references/{p}" for p in agents.REFERENCE_PAGES]),
                       "=== activation ==="]
    assert done.stdout.rstrip().endswith(
        f"run: claude mcp add --scope user aimx -- {AIMX_REAL} mcp")


def test_remove_reverses_setup(run):
    fake_cli(run, "claude")
    assert run("agents", "setup", "claude-code").returncode == 0
    dest = run.home / ".claude" / "skills" / "aimx"
    done = run("agents", "remove", "claude-code")
    assert done.returncode == 0, done.stderr
    assert not dest.exists()
    assert done.stdout.splitlines() == [
        f"Removed {dest}",
        "Run `claude mcp remove --scope user aimx` to also unregister the MCP server from "
        "Claude Code.",
    ]
    again = run("agents", "remove", "claude-code")
    assert again.returncode == 0
    assert again.stdout.splitlines()[:2] == [
        f"Plugin: {dest} (already absent)",
        f"[WARN] no plugin files were present at {dest} (already removed?)",
    ]


# --------------------------------------------------------------------------- overwrite

def test_existing_files_need_force_when_stdin_is_not_a_terminal(run):
    assert run("agents", "setup", "gemini").returncode == 0
    dest = run.home / ".gemini" / "skills" / "aimx"
    (dest / "SKILL.md").write_text("edited by hand\n")
    (dest / "stale.md").write_text("from an old release\n")
    done = run("agents", "setup", "gemini")
    assert done.returncode == 1
    assert done.stderr == (f"Error: destination files already exist under {dest}; pass --force "
                           "to overwrite\n")
    assert (dest / "SKILL.md").read_text() == "edited by hand\n"
    forced = run("agents", "setup", "--force", "gemini")
    assert forced.returncode == 0, forced.stderr
    assert tree(dest) == ["SKILL.md"]  # refs only for refs agents; stale file gone
    assert (dest / "SKILL.md").read_text().startswith("---\nname: aimx\n")


def _run_on_pty(run: Runner, args: list[str], keys: list[bytes], *, env=None,
                timeout: float = 30) -> tuple[int, str]:
    """Run aimx with stdin/stdout/stderr on a pseudo-terminal, typing ``keys`` one by one
    each time the output goes quiet; returns (exit code, everything written)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(run.argv(args), env=env or run.env(TERM="xterm"), stdin=slave,
                            stdout=slave, stderr=slave, cwd=REPO_ROOT)
    os.close(slave)
    output = b""
    pending = list(keys)
    seen_at_last_key = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.3)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
            continue
        if proc.poll() is not None:
            break
        # Type the next key once the program has answered the previous one and gone quiet.
        if pending and len(output) > seen_at_last_key:
            seen_at_last_key = len(output)
            os.write(master, pending.pop(0))
    os.close(master)
    code = proc.wait(10)
    return code, output.decode("utf-8", "replace").replace("\r\n", "\n")


def test_existing_files_on_a_terminal_ask_before_overwriting(run):
    assert run("agents", "setup", "opencode").returncode == 0
    skill = run.home / ".config" / "opencode" / "skills" / "aimx" / "SKILL.md"
    skill.write_text("mine\n")
    code, out = _run_on_pty(run, ["agents", "setup", "opencode"], [b"n\n"])
    assert "Overwrite? [y/N] " in out
    assert str(skill) in out
    assert "Error: aborted by user" in out
    assert code == 1
    assert skill.read_text() == "mine\n"
    code, out = _run_on_pty(run, ["agents", "setup", "opencode"], [b"y\n"])
    assert code == 0, out
    assert skill.read_text().startswith("---\nname: aimx\n")


# --------------------------------------------------------------------------- goose, nanoclaw

def test_goose_recipe_gets_the_data_dir_and_remove_keeps_other_recipes(run):
    xdg = run.home / "xdg"
    env = run.env(XDG_CONFIG_HOME=str(xdg))
    recipes = xdg / "goose" / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "other.yaml").write_text("title: other\n")
    _chown_tree(run.home, run.uid, run.gid)
    done = run("--data-dir", "/srv/mail", "agents", "setup", "goose", env=env)
    assert done.returncode == 0, done.stderr
    recipe = (recipes / "aimx.yaml").read_text()
    assert f"    cmd: {json.dumps(AIMX_REAL)}\n" in recipe
    assert '    args: ["--data-dir", "/srv/mail", "mcp"]\n' in recipe
    assert "twelve tools" in recipe and "Nine" not in recipe
    prompt = recipe.split("prompt: |\n", 1)[1]
    assert prompt.startswith("  # Using aimx\n")
    assert all(line == "" or line.startswith("  ") for line in prompt.splitlines())
    assert "goose run --recipe aimx" in done.stdout

    removed = run("agents", "remove", "goose", env=env)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines()[0] == f"Removed {recipes / 'aimx.yaml'}"
    assert tree(recipes) == ["other.yaml"]


def test_nanoclaw_needs_its_checkout(run):
    done = run("agents", "setup", "nanoclaw")
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"Error: NanoClaw checkout not found at {run.home / 'nanoclaw'}; clone your NanoClaw "
        "fork there")


def test_nanoclaw_mcp_json_create_merge_and_conflict(run):
    fork = run.home / "claw"
    fork.mkdir()
    os.chown(fork, run.uid, run.gid)
    env = run.env(NANOCLAW_HOME=str(fork))
    mcp_json = fork / ".mcp.json"
    entry = {"command": AIMX_REAL, "args": ["mcp"]}

    created = run("agents", "setup", "nanoclaw", env=env)
    assert created.returncode == 0, created.stderr
    assert f"[OK] Created {mcp_json} with mcpServers.aimx." in created.stdout
    assert json.loads(mcp_json.read_text()) == {"mcpServers": {"aimx": entry}}
    assert tree(fork / "skills" / "aimx") == ["SKILL.md", *REFERENCE_FILES]

    mcp_json.write_text(json.dumps({"mcpServers": {"other": {"command": "/bin/other"}},
                                    "keep": 1}))
    merged = run("agents", "setup", "--force", "nanoclaw", env=env)
    assert f"[OK] Added mcpServers.aimx to {mcp_json}." in merged.stdout
    assert json.loads(mcp_json.read_text()) == {
        "mcpServers": {"other": {"command": "/bin/other"}, "aimx": entry}, "keep": 1}

    mine = {"command": "/opt/custom/aimx", "args": ["mcp"]}
    mcp_json.write_text(json.dumps({"mcpServers": {"aimx": mine}}))
    conflict = run("agents", "setup", "--force", "--data-dir", "/d", "nanoclaw", env=env)
    assert conflict.returncode == 0
    assert "[OK] Replaced mcpServers.aimx" in conflict.stdout  # --force overwrites
    mcp_json.write_text(json.dumps({"mcpServers": {"aimx": mine}}))
    (fork / "skills" / "aimx").rename(fork / "skills" / "old")  # no file conflict this time
    kept = run("agents", "setup", "nanoclaw", env=env)
    assert kept.returncode == 0, kept.stderr
    assert (f"[WARN] mcpServers.aimx already exists in {mcp_json}; pass --force to overwrite"
            in kept.stdout)
    assert json.loads(mcp_json.read_text()) == {"mcpServers": {"aimx": mine}}


def test_hint_agents_get_no_references(run):
    done = run("agents", "setup", "opencode")
    assert done.returncode == 0, done.stderr
    assert tree(run.home / ".config" / "opencode" / "skills" / "aimx") == ["SKILL.md"]
    hint = json.dumps({"mcp": {"aimx": {"type": "local", "command": [AIMX_REAL, "mcp"],
                                        "enabled": True}}}, separators=(",", ":"))
    assert done.stdout.splitlines()[-2:] == [
        "To activate:",
        f"  add to {run.home / '.config' / 'opencode' / 'opencode.json'}: {hint}"]


# --------------------------------------------------------------------------- registry, errors

def test_list_shows_every_agent(run):
    done = run("agents", "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Supported agents:"
    names = [line.strip() for line in lines if line.startswith("  ") and
             not line.startswith("    ")]
    assert names == [agent.name for agent in agents.AGENTS]
    assert lines[1:5] == [
        "  claude-code",
        f"    destination: {run.home / '.claude' / 'skills' / 'aimx'}",
        "    install:     aimx agents setup claude-code",
        f"    activation:  run: claude mcp add --scope user aimx -- {AIMX_REAL} mcp",
    ]
    hermes = lines.index("  hermes")
    assert lines[hermes + 4:hermes + 8] == [
        "                 mcp_servers:",
        "                   aimx:",
        f"                     command: {json.dumps(AIMX_REAL)}",
        '                     args: ["mcp"]',
    ]


def test_no_agent_without_a_terminal_dumps_the_registry(run):
    done = run("agents", "setup")
    assert done.returncode == 0
    assert done.stdout.startswith("Supported agents:\n")
    assert done.stdout.endswith("\nRun `aimx agents setup <agent>` to install one.\n")
    printed = run("agents", "setup", "--print")
    assert "aimx agents setup --print claude-code" in printed.stdout.splitlines()[-1]


def test_unknown_agent_and_missing_home(run):
    done = run("agents", "setup", "vim")
    assert done.returncode == 1
    assert done.stderr == ("Error: unknown agent 'vim'; run `aimx agents list` to see "
                           "supported agents\n")
    gone = run("agents", "remove", "vim")
    assert gone.stderr == ("Error: Unknown agent 'vim'. Run `aimx agents list` to see "
                           "supported agents.\n")
    env = run.env()
    del env["HOME"]
    homeless = run("agents", "setup", "gemini", env=env)
    assert homeless.returncode == 1
    assert homeless.stderr == ("Error: HOME is not set; agents setup writes to the user's home "
                               "directory\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: checks the root refusal")
def test_root_is_refused_but_may_list(run):
    env = run.env(SUDO_USER="alice")
    for argv in (["agents", "setup", "claude-code"], ["agents", "remove", "claude-code"],
                 ["agents", "setup"]):
        done = run(*argv, env=env, as_root=True)
        assert done.returncode == 1
        assert done.stderr.startswith(f"Error: `aimx agents {argv[1]}` is a per-user operation")
        assert f"sudo -u alice aimx agents {argv[1]}" in done.stderr
        assert "--dangerously-allow-root" in done.stderr
    assert tree(run.home) == []
    listed = run("agents", "setup", "--list", env=env, as_root=True)
    assert listed.returncode == 0
    assert listed.stdout.startswith("Supported agents:\n")
    root_home = Path(__import__("pwd").getpwuid(0).pw_dir)
    assert f"    destination: {root_home / '.claude' / 'skills' / 'aimx'}" in listed.stdout


# --------------------------------------------------------------------------- picker

def test_picker_installs_the_detected_agents(run):
    (run.home / ".gemini").mkdir()
    (run.home / ".codex").mkdir()
    _chown_tree(run.home, run.uid, run.gid)
    log = fake_cli(run, "codex")
    # Both detected agents start selected: unselect Codex (the first row the cursor
    # can reach), confirm the picker, then the task list.
    code, out = _run_on_pty(run, ["agents", "setup"], [b" ", b"\r", b"y\n"],
                            env=run.env(TERM="xterm", NO_COLOR="1"))
    assert "Setting up MCP integration for AI agents for `" in out
    assert "[-] Claude Code  (not detected)" in out
    assert "> [x] Codex CLI" in out and "> [ ] Codex CLI" in out
    assert "Space toggles, Enter confirms, q cancels." in out
    assert "Tasks to perform:\n  Install AIMX MCP for Gemini CLI\nConfirm? [Y/n]" in out
    assert "==> Gemini CLI" in out and "==> Codex CLI" not in out
    assert "\x1b" not in out
    assert code == 0, out
    assert (run.home / ".gemini" / "skills" / "aimx" / "SKILL.md").is_file()
    assert not (run.home / ".codex" / "skills").exists()
    assert calls(log) == []
    summary = out.split("Summary\n", 1)[1].splitlines()
    assert summary[0].split() == ["Agent", "Status", "Destination"]
    assert summary[1].split() == ["Gemini", "CLI", "[OK]", "ok",
                                  str(run.home / ".gemini" / "skills" / "aimx")]


def test_picker_q_cancels(run):
    (run.home / ".gemini").mkdir()
    _chown_tree(run.home, run.uid, run.gid)
    code, out = _run_on_pty(run, ["agents", "setup"], [b"q"],
                            env=run.env(TERM="xterm", NO_COLOR="1"))
    assert "Cancelled. No agents were wired." in out
    assert code == 0
    assert not (run.home / ".gemini" / "skills").exists()
