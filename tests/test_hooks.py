"""Hooks: real processes, real users, a real reactor (spec 40 §8, D20, D23).

Every scenario runs a small driver (this module run as ``python -m
tests.test_hooks <spec.json>``) in a subprocess: it starts a reactor, builds
a ``HookRunner``, fires what the spec lists and prints the outcomes as JSON
on stdout, with the daemon's log lines on stderr. Hooks are shell one-liners
that record what they saw into files the test then reads.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import pytest

from aimx.config import Config, Hook, Mailbox
from aimx.daemon.hooks import (
    AfterSendInfo,
    Owner,
    render_stderr_tail,
    systemd_run_argv,
    trampoline_argv,
)

REPO = Path(__file__).resolve().parent.parent
ME = pwd.getpwuid(os.geteuid()).pw_name
DOMAIN = "agents.example"
EMAIL = (b'+++\nid = "2026-01-01-120000-hello"\nmessage_id = "m1@example.com"\n'
         b'from = "Ann <ann@example.com>"\nto = "alice@agents.example"\n'
         b'subject = "Hello"\ntrusted = "true"\n+++\n\nBody \xe2\x9c\x93 line\n')
ENV_KEYS_RECEIVE = {"AIMX_HOOK_NAME", "AIMX_EVENT", "AIMX_MAILBOX", "AIMX_FROM", "AIMX_TO",
                    "AIMX_SUBJECT", "AIMX_FILEPATH", "AIMX_MESSAGE_ID", "AIMX_ID", "AIMX_DATE",
                    "PATH", "HOME", "USER", "LOGNAME"}


# --------------------------------------------------------------------------
# Config and ingest results, built from the JSON spec


def build_config(spec: dict[str, Any]) -> Config:
    mailboxes = []
    for name, box in spec["mailboxes"].items():
        hooks = [Hook(event=h["event"], cmd=h["cmd"], name=h.get("name"),
                      fire_on_untrusted=h.get("fire_on_untrusted", False),
                      fire_on_automatic=h.get("fire_on_automatic", False),
                      timeout_secs=h.get("timeout_secs", 60))
                 for h in box.get("hooks", ())]
        mailboxes.append(Mailbox(name=name, address=box.get("address", f"{name}@{DOMAIN}"),
                                 owner=box["owner"], hooks=hooks))
    limits = {key: spec[key] for key in ("hook_rate_limit", "hook_rate_window_secs")
              if key in spec}
    return Config(path="/nonexistent/config.toml", domain=spec.get("domain", DOMAIN),
                  mailboxes=mailboxes, **limits)


# --------------------------------------------------------------------------
# The driver (runs in a subprocess)


def _driver(spec_path: str) -> None:
    from twisted.internet import defer, task

    from aimx.daemon.hooks import HookRunner
    from aimx.logs import setup_logging
    from aimx.smtp.ingest import IngestResult

    setup_logging(sys.stderr)
    spec = json.loads(Path(spec_path).read_text())

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        config = build_config(spec["config"])
        runner = HookRunner(reactor, state_dir=Path(spec["state_dir"]),
                            max_running=spec.get("max_running", 16), sandbox="setuid")
        started = time.monotonic()
        pending, call_ms = [], []
        for fire in spec["fires"]:
            t0 = time.monotonic()
            if fire["kind"] == "receive":
                result = IngestResult(fire.get("status", "stored"), fire["mailbox"],
                                      fire.get("email_id") or None,
                                      Path(fire["path"]) if fire.get("path") else None,
                                      fire["fields"])
                d = runner.fire_on_receive(config, fire["mailbox"], result)
            else:
                d = runner.fire_after_send(config, fire["mailbox"], AfterSendInfo(**fire["info"]))
            call_ms.append((time.monotonic() - t0) * 1000)
            if spec.get("sequential"):
                d = defer.succeed((yield d))
            pending.append(d)
        results = yield defer.gatherResults(pending)
        yield runner.wait_idle()
        out = {"elapsed": time.monotonic() - started, "call_ms": call_ms, "fires": [
            [{**attrs.asdict(o, filter=lambda a, v: not isinstance(v, bytes)),
              "stdout_tail": base64.b64encode(o.stdout_tail).decode(),
              "stderr_tail": base64.b64encode(o.stderr_tail).decode()} for o in outcomes]
            for outcomes in results]}
        sys.stdout.write(json.dumps(out))

    task.react(main)


# --------------------------------------------------------------------------
# Test helpers


@attrs.define
class Run:
    fires: list[list[dict[str, Any]]]
    elapsed: float
    call_ms: list[float]
    log: list[str]

    def lines(self, needle: str) -> list[str]:
        """Log lines containing ``needle``; a ``*`` in it matches any run of non-spaces."""
        pattern = re.compile(r"\S*".join(re.escape(part) for part in needle.split("*")))
        return [line for line in self.log if pattern.search(line)]


def run_driver(tmp_path: Path, spec: dict[str, Any], timeout: float = 120) -> Run:
    spec.setdefault("state_dir", str(tmp_path / "state"))
    spec_file = tmp_path / f"spec-{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps(spec))
    # The daemon's PATH starts with a directory under root's home: hooks must not get it.
    env = dict(os.environ, DAEMON_ONLY_SECRET="must-not-leak",
               PATH=f"/root/.local/bin:{os.environ.get('PATH', '/usr/bin:/bin')}")
    proc = subprocess.run([sys.executable, "-m", "tests.test_hooks", str(spec_file)], cwd=REPO,
                          env=env, capture_output=True, timeout=timeout, check=False)
    log = proc.stderr.decode("utf-8", "replace").splitlines()
    assert proc.returncode == 0, "\n".join(log)
    data = json.loads(proc.stdout)
    for outcomes in data["fires"]:
        for o in outcomes:
            o["stdout_tail"] = base64.b64decode(o["stdout_tail"])
            o["stderr_tail"] = base64.b64decode(o["stderr_tail"])
    return Run(data["fires"], data["elapsed"], data["call_ms"], log)


def hook(cmd: str | list[str], **extra: Any) -> dict[str, Any]:
    argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else cmd
    return {"event": extra.pop("event", "on_receive"), "cmd": argv, **extra}


def receive(mailbox: str, *, message_id: str = "", trusted: str = "true", path: str = "",
            email_id: str = "", **fields: Any) -> dict[str, Any]:
    return {"kind": "receive", "mailbox": mailbox, "path": path, "email_id": email_id,
            "fields": {"message_id": message_id, "trusted": trusted, "from": "ann@example.com",
                       "to": f"{mailbox}@{DOMAIN}", "subject": "Hi",
                       "date": "2026-01-01T12:00:00Z", **fields}}


def shared_dir(path: Path) -> Path:
    """A directory every test user may write into (and reach)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    for parent in path.parents:
        if str(parent) in ("/", "/tmp"):
            break
        if os.geteuid() == 0:
            parent.chmod(parent.stat().st_mode | 0o011)
    return path


def pid_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")



# --------------------------------------------------------------------------
# Identity, environment, stdin


@pytest.fixture
def alice_with_extra_group(test_users):
    """alice, plus membership of one extra group, so initgroups is observable."""
    group = "aimxt-hookgrp"
    subprocess.run(["groupadd", "-f", group], check=True, capture_output=True)
    subprocess.run(["usermod", "-aG", group, test_users["alice"].name], check=True,
                   capture_output=True)
    yield test_users["alice"], grp.getgrnam(group).gr_gid
    subprocess.run(["gpasswd", "-d", test_users["alice"].name, group], capture_output=True)
    subprocess.run(["groupdel", group], capture_output=True)


def test_hook_runs_as_owner_with_clean_env_cwd_stdin_and_own_session(
        tmp_path, alice_with_extra_group):
    alice, extra_gid = alice_with_extra_group
    out = shared_dir(tmp_path / "out")
    email = tmp_path / "mail.md"
    email.write_bytes(EMAIL)
    email.chmod(0o600)  # root-only: the hook gets it through stdin, not by opening it
    script = (f"id -u > {out}/uid; id -G > {out}/groups; cat /proc/$$/environ > {out}/environ;"
              f" readlink /proc/$$/cwd > {out}/cwd; cut -d' ' -f5,6 /proc/$$/stat > {out}/ids;"
              f" echo $$ > {out}/pid; grep SigIgn /proc/$$/status > {out}/sigign;"
              f" cat > {out}/stdin")
    config = {"mailboxes": {"alice": {"owner": alice.name,
                                      "hooks": [hook(script, name="probe")]}}}
    run = run_driver(tmp_path, {"config": config, "fires": [
        receive("alice", message_id="m1@example.com", path=str(email),
                email_id="2026-01-01-120000-hello", subject="Hello",
                **{"from": "Ann <ann@example.com>"})]})

    [[outcome]] = run.fires
    assert outcome["exit_code"] == 0 and outcome["sandbox"] == "setuid"
    assert int((out / "uid").read_text()) == alice.uid
    groups = {int(g) for g in (out / "groups").read_text().split()}
    assert groups == set(os.getgrouplist(alice.name, alice.gid))
    assert extra_gid in groups and 0 not in groups
    environ = dict(item.split("=", 1) for item in
                   (out / "environ").read_bytes().decode().split("\0") if item)
    assert set(environ) == ENV_KEYS_RECEIVE
    assert environ["HOME"] == alice.home
    assert environ["USER"] == environ["LOGNAME"] == alice.name
    assert environ["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert environ["AIMX_HOOK_NAME"] == "probe" and environ["AIMX_EVENT"] == "on_receive"
    assert environ["AIMX_MAILBOX"] == "alice"
    assert environ["AIMX_FROM"] == "Ann <ann@example.com>"
    assert environ["AIMX_TO"] == f"alice@{DOMAIN}"
    assert environ["AIMX_SUBJECT"] == "Hello"
    assert environ["AIMX_FILEPATH"] == str(email)
    assert environ["AIMX_MESSAGE_ID"] == "m1@example.com"
    assert environ["AIMX_ID"] == "2026-01-01-120000-hello"
    assert environ["AIMX_DATE"] == "2026-01-01T12:00:00Z"
    assert (out / "cwd").read_text().strip() == "/"
    pid = (out / "pid").read_text().strip()
    assert (out / "ids").read_text().split() == [pid, pid]  # group leader and session leader
    # No standard signal ignored (posix_spawn in libc leaves its internal 32 and 33 so).
    assert int((out / "sigign").read_text().split()[1], 16) & 0x7FFFFFFF == 0  # signals 1-31
    assert (out / "stdin").read_bytes() == EMAIL
    assert run.lines("firing hook_name=probe event=on_receive mailbox=alice "
                     f"owner={alice.name}")
    [after] = run.lines("hook_name=probe event=on_receive mailbox=alice owner=* sandbox=")
    assert (f"owner={alice.name} sandbox=setuid email_id=2026-01-01-120000-hello exit_code=0 "
            "duration_ms=") in after
    assert after.endswith('timed_out=false stderr_tail=""')


def test_after_send_env_and_deferred_send_with_empty_path(tmp_path, test_users):
    alice = test_users["alice"]
    out = shared_dir(tmp_path / "out")
    sent = tmp_path / "sent.md"
    sent.write_bytes(b"+++\nid = \"s1\"\n+++\n\nsent body\n")
    script = (f"cat /proc/$$/environ > {out}/env-$AIMX_SEND_STATUS;"
              f" cat > {out}/stdin-$AIMX_SEND_STATUS; id -u > {out}/uid")
    config = {"mailboxes": {"alice": {"owner": alice.name, "hooks": [
        hook(script, event="after_send", name="sent-probe"),
        hook(f"touch {out}/receive-hook-ran", name="receive-only")]}}}
    delivered = dict(from_header="Alice <alice@agents.example>",
                     to_header="a@x.example, b@y.example", subject="Re: plan",
                     filepath=str(sent), email_id="s1", message_id="<s1@agents.example>",
                     status="delivered")
    deferred = dict(delivered, filepath="", email_id="", status="deferred")
    run = run_driver(tmp_path, {"config": config, "sequential": True, "fires": [
        {"kind": "send", "mailbox": "alice", "info": delivered},
        {"kind": "send", "mailbox": "alice", "info": deferred}]})

    assert [[o["hook_name"] for o in f] for f in run.fires] == [["sent-probe"], ["sent-probe"]]
    assert not (out / "receive-hook-ran").exists()
    assert int((out / "uid").read_text()) == alice.uid

    def env_of(status):
        raw = (out / f"env-{status}").read_bytes().decode().split("\0")
        return dict(item.split("=", 1) for item in raw if item)

    env = env_of("delivered")
    assert set(env) == ENV_KEYS_RECEIVE | {"AIMX_SEND_STATUS"}
    assert env["AIMX_EVENT"] == "after_send" and env["AIMX_SEND_STATUS"] == "delivered"
    assert env["AIMX_FROM"] == "Alice <alice@agents.example>"
    assert env["AIMX_TO"] == "a@x.example, b@y.example"
    assert env["AIMX_SUBJECT"] == "Re: plan"
    assert env["AIMX_MESSAGE_ID"] == "<s1@agents.example>"
    assert env["AIMX_FILEPATH"] == str(sent) and env["AIMX_ID"] == "s1"
    assert env["AIMX_DATE"].endswith("Z") and env["AIMX_DATE"][:2] == "20"
    assert (out / "stdin-delivered").read_bytes() == sent.read_bytes()
    env = env_of("deferred")
    assert env["AIMX_SEND_STATUS"] == "deferred"
    assert env["AIMX_FILEPATH"] == "" and env["AIMX_ID"] == ""
    assert (out / "stdin-deferred").read_bytes() == b""
    assert len(run.lines("message_id=<s1@agents.example> exit_code=0")) == 1


def test_unknown_owner_runs_nothing_and_logs_user_not_found(tmp_path):
    marker = tmp_path / "ran"
    config = {"mailboxes": {"ghost": {"owner": "aimxt-nobody-here",
                                      "hooks": [hook(f"touch {marker}", name="ghost-hook")]}}}
    run = run_driver(tmp_path, {"config": config, "fires": [
        receive("ghost", message_id="g1@example.com", email_id="e1")]})

    [[outcome]] = run.fires
    assert not marker.exists()
    assert outcome["exit_code"] == -1 and outcome["error_kind"] == "user-not-found"
    [after] = run.lines("hook_name=ghost-hook event=on_receive mailbox=ghost owner=* sandbox")
    assert "owner=aimxt-nobody-here sandbox=- email_id=e1 exit_code=-1 " in after
    [warn] = run.lines(" WARN aimx::hook: ")
    assert warn.endswith("hook_name=ghost-hook exec error (user-not-found): "
                         "user 'aimxt-nobody-here' not found on this host")


def test_missing_program_is_a_spawn_error_not_a_crash(tmp_path):
    config = {"mailboxes": {"box": {"owner": ME, "hooks": [
        hook(["/nonexistent/hook-binary", "x"], name="missing")]}}}
    run = run_driver(tmp_path, {"config": config, "fires": [receive("box", email_id="e2")]})

    [[outcome]] = run.fires
    assert outcome["exit_code"] == -1 and outcome["error_kind"] == "spawn-failed"
    assert "/nonexistent/hook-binary" in outcome["error"]
    [warn] = run.lines("exec error (spawn-failed)")
    assert "No such file or directory" in warn


def test_blocking_fire_for_aimx_ingest_waits_for_the_hooks(tmp_path):
    marker = tmp_path / "done"
    script = f"""
import sys
from pathlib import Path
from aimx.config import Config, Hook, Mailbox
from aimx.daemon.hooks import run_on_receive_blocking
from aimx.smtp.ingest import IngestResult
hook = Hook(event="on_receive", cmd=["/bin/sh", "-c", "sleep 1; cat > {marker}"], name="slow")
config = Config(path="/x", domain="{DOMAIN}",
                mailboxes=[Mailbox(name="a", address="a@{DOMAIN}", owner="{ME}", hooks=[hook])])
mail = Path("{tmp_path}") / "mail.md"
mail.write_bytes(b"stored bytes")
result = IngestResult("stored", "a", "e1", mail, {{"message_id": "b@x", "trusted": "true"}})
outcomes = run_on_receive_blocking(config, "a", result, state_dir=Path("{tmp_path}/state"))
print(Path("{marker}").read_bytes().decode(), [(o.hook_name, o.exit_code) for o in outcomes])
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "stored bytes [('slow', 0)]"


# --------------------------------------------------------------------------
# Trust gate, catchall, dedup


def test_trust_gate_over_trusted_values_and_fire_on_untrusted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mailboxes, fires = {}, []
    for flag in (False, True):
        for trusted in ("true", "false", "none"):
            box = f"b-{trusted}-{int(flag)}"
            mailboxes[box] = {"owner": ME, "hooks": [
                hook(f"touch {out}/{box}", name=f"h-{box}", fire_on_untrusted=flag)]}
            fires.append(receive(box, trusted=trusted, message_id=f"{box}@example.com"))
    run = run_driver(tmp_path, {"config": {"mailboxes": mailboxes}, "fires": fires})

    ran = {p.name for p in out.iterdir()}
    assert ran == {"b-true-0", "b-true-1", "b-false-1", "b-none-1"}
    for trusted in ("false", "none"):
        box = f"b-{trusted}-0"
        [skip] = run.lines(f"hook_name=h-{box} event=on_receive mailbox={box} skipped:")
        assert skip.endswith(f"skipped: trusted={trusted} fire_on_untrusted=false")
        assert " INFO aimx::hook: " in skip
    assert len(run.lines("skipped: trusted=")) == 2


def test_catchall_hooks_refused_and_no_hooks_logged(tmp_path):
    marker = tmp_path / "ran"
    config = {"mailboxes": {
        "catchall": {"address": f"*@{DOMAIN}", "owner": ME,
                     "hooks": [hook(f"touch {marker}", name="c1"),
                               hook(f"touch {marker}", name="c2", event="after_send")]},
        "quiet": {"owner": ME}}}
    run = run_driver(tmp_path, {"config": config, "fires": [
        receive("catchall", message_id="c@example.com"), receive("quiet")]})

    assert run.fires == [[], []] and not marker.exists()
    assert run.lines("WARN aimx::hook: catchall mailbox 'catchall' has 2 configured hook(s) "
                     "but catchall hooks are forbidden; refusing to fire")
    assert run.lines("INFO aimx::hook: No hooks found for event=on_receive mailbox=quiet")


def test_fires_once_per_mailbox_and_message_id_also_after_restart(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    record = hook(f'echo "$AIMX_MAILBOX $AIMX_MESSAGE_ID" >> {out}/fired', name="rec")
    config = {"mailboxes": {"a": {"owner": ME, "hooks": [record]},
                            "b": {"owner": ME, "hooks": [dict(record, name="rec-b")]}}}
    twice = [receive("a", message_id="dup@example.com"),
             receive("a", message_id="<dup@example.com>"),
             receive("b", message_id="dup@example.com"),
             receive("a", message_id=""), receive("a", message_id="")]
    run_driver(tmp_path, {"config": config, "sequential": True, "fires": twice})
    # A new runner on the same state dir, as after a daemon restart.
    run = run_driver(tmp_path, {"config": config, "fires": twice[:1]})

    assert run.fires == [[]]
    assert run.lines("mailbox=a message_id=dup@example.com skipped: hooks already fired")
    fired = (out / "fired").read_text().splitlines()
    assert sorted(fired) == sorted(["a dup@example.com", "b dup@example.com", "a ", "a "])

    # Past the 24 h window the same Message-ID fires again.
    day_ago = time.time() - 24 * 3600 - 60
    for marker in (tmp_path / "state").rglob("*"):
        if marker.is_file():
            os.utime(marker, (day_ago, day_ago))
    run_driver(tmp_path, {"config": config, "fires": twice[:1]})
    assert (out / "fired").read_text().splitlines().count("a dup@example.com") == 2


def test_duplicate_ingest_result_fires_nothing(tmp_path):
    marker = tmp_path / "ran"
    config = {"mailboxes": {"a": {"owner": ME, "hooks": [hook(f"touch {marker}")]}}}
    fire = dict(receive("a", message_id="d@example.com"), status="duplicate")
    run = run_driver(tmp_path, {"config": config, "fires": [fire]})
    assert run.fires == [[]] and not marker.exists()


# --------------------------------------------------------------------------
# Order and concurrency


def test_hooks_of_one_email_run_in_order_without_overlap(tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    def timed(tag: str, pause: str) -> dict[str, Any]:
        return hook(f"echo start {tag} $(date +%s.%N) >> {out}/log; sleep {pause};"
                    f" echo end {tag} $(date +%s.%N) >> {out}/log", name=f"step-{tag}")

    config = {"mailboxes": {"a": {"owner": ME, "hooks": [timed("1", "1"), timed("2", "0.2"),
                                                          timed("3", "0")]}}}
    run = run_driver(tmp_path, {"config": config, "fires": [receive("a", message_id="o@x")]})

    assert [o["hook_name"] for o in run.fires[0]] == ["step-1", "step-2", "step-3"]
    events = [line.split() for line in (out / "log").read_text().splitlines()]
    assert [(e[0], e[1]) for e in events] == [
        ("start", "1"), ("end", "1"), ("start", "2"), ("end", "2"), ("start", "3"), ("end", "3")]
    stamps = [float(e[2]) for e in events]
    assert stamps == sorted(stamps)


def test_200_emails_run_once_each_never_more_than_the_bound(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = {"mailboxes": {"a": {"owner": ME, "hooks": [hook(
        f"echo $AIMX_ID start $(date +%s.%N) >> {out}/log; sleep 1;"
        f" echo $AIMX_ID end $(date +%s.%N) >> {out}/log", name="busy")]}},
        "hook_rate_limit": 0}  # one sender, 200 emails: this test is about the bound
    fires = [receive("a", message_id=f"n{i}@example.com", email_id=f"e{i:03d}")
             for i in range(200)]
    run = run_driver(tmp_path, {"config": config, "max_running": 16, "fires": fires},
                     timeout=180)

    assert all(len(f) == 1 and f[0]["exit_code"] == 0 for f in run.fires)
    assert max(run.call_ms) < 100  # firing never waits for hooks
    events = [line.split() for line in (out / "log").read_text().splitlines()]
    starts = sorted(e[0] for e in events if e[1] == "start")
    assert starts == sorted(f"e{i:03d}" for i in range(200))
    assert sorted(e[0] for e in events if e[1] == "end") == starts
    timeline = sorted((float(e[2]), 1 if e[1] == "start" else -1) for e in events)
    running = peak = 0
    for _, step in sorted(timeline, key=lambda t: (t[0], t[1])):
        running += step
        peak = max(peak, running)
    assert peak == 16
    # 200 runs of 1 s with 16 slots need at least 13 rounds.
    assert 1 * 200 / 16 <= run.elapsed < 90


# --------------------------------------------------------------------------
# Timeouts, pipes, output capture


def test_timeouts_grandchildren_and_output_tails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    big = "head -c 100000 /dev/zero | tr '\\0' x; printf END-OF-OUTPUT"
    config = {"mailboxes": {
        "ignore-term": {"owner": ME, "hooks": [hook(
            "trap '' TERM; sleep 30", name="stubborn", timeout_secs=1)]},
        "exit-42": {"owner": ME, "hooks": [hook(
            "trap 'exit 42' TERM; sleep 30 & wait", name="polite", timeout_secs=1)]},
        "grandchild": {"owner": ME, "hooks": [hook(
            f"(trap '' TERM; sleep 30) & echo $! > {out}/gc; echo started", name="gc",
            timeout_secs=1)]},
        "escaped": {"owner": ME, "hooks": [hook(
            f"setsid sh -c 'echo $$ > {out}/esc; exec sleep 30' & sleep 0.3; exit 3",
            name="esc", timeout_secs=1)]},
        "loud": {"owner": ME, "hooks": [hook(big, name="loud")]},
        "stderr": {"owner": ME, "hooks": [hook(
            "printf 'first line\\nsecond \"quoted\"\\n' >&2;"
            " head -c 3000 /dev/zero | tr '\\0' e >&2; printf 'TAIL-END\\n' >&2; exit 7",
            name="noisy")]},
    }}
    run = run_driver(tmp_path, {"config": config, "fires": [
        receive(box, message_id=f"{box}@t", email_id=f"id-{box}") for box in config["mailboxes"]
    ]})
    try:
        by_name = {f[0]["hook_name"]: f[0] for f in run.fires}

        stubborn = by_name["stubborn"]
        assert stubborn["timed_out"] is True and stubborn["exit_code"] == -1
        assert 5500 <= stubborn["duration_ms"] < 9000
        assert run.lines("hook_name=stubborn timed out after 1000ms")
        [line] = run.lines("hook_name=stubborn event=on_receive mailbox=* owner=* sandbox=")
        assert "exit_code=-1 " in line and "timed_out=true" in line

        polite = by_name["polite"]
        assert polite["exit_code"] == 42 and polite["timed_out"] is True
        assert polite["duration_ms"] < 4000

        gc = by_name["gc"]  # the child exits at once; its grandchild holds the pipes
        assert gc["stdout_tail"] == b"started\n" and gc["exit_code"] == 0
        assert gc["timed_out"] is True and 5500 <= gc["duration_ms"] < 9000
        assert pid_gone(int((out / "gc").read_text()))

        esc = by_name["esc"]  # escaped the group: the runner closes the pipes and moves on
        assert esc["exit_code"] == 3 and esc["duration_ms"] < 12000

        loud = by_name["loud"]
        assert len(loud["stdout_tail"]) == 65536
        assert loud["stdout_tail"].endswith(b"x" * 100 + b"END-OF-OUTPUT")
        assert not run.lines("xxxxxxxxxx")  # stdout is never logged

        noisy = by_name["noisy"]
        assert noisy["exit_code"] == 7 and noisy["stderr_tail"].endswith(b"TAIL-END\n")
        [line] = run.lines("hook_name=noisy event=on_receive mailbox=* owner=* sandbox=")
        tail = line.split(" stderr_tail=", 1)[1]
        assert tail.startswith('"first line\\nsecond \\"quoted\\"\\neee')
        assert tail.endswith('eee' + 'TAIL-END\\n"')
        head, rest = tail[1:-1].split("...", 1)
        assert json.loads(f'"{head}"') == ("first line\nsecond \"quoted\"\n" + "e" * 3000)[:512]
        assert json.loads(f'"{rest}"') == ("e" * 3000 + "TAIL-END\n")[-504:]
        assert run.lines("hook_name=noisy exited with code 7: first line\\nsecond")
    finally:
        for name in ("gc", "esc"):
            try:
                os.kill(int((out / name).read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass


# --------------------------------------------------------------------------
# Pure helpers


def test_stderr_tail_rendering():
    assert render_stderr_tail(b"") == '""'
    assert render_stderr_tail(b"a\nb\t\"c\"\x01") == '"a\\nb\\t\\"c\\"\\u0001"'
    assert render_stderr_tail(b"bad \xff byte") == '"bad \ufffd byte"'
    exact = b"y" * 1024
    assert render_stderr_tail(exact) == '"' + "y" * 1024 + '"'
    long = b"h" * 600 + b"m" * 1000 + b"t" * 504
    assert render_stderr_tail(long) == '"' + "h" * 512 + "..." + "t" * 504 + '"'
    # A cut inside a multi-byte character does not leave garbage at the seam.
    multi = b"a" * 1100 + "\u00e9".encode() * 300
    rendered = render_stderr_tail(multi)
    assert rendered.endswith("\u00e9" * 252 + '"') and "\ufffd" not in rendered


def test_systemd_run_argv():
    alice = Owner("alice", 1001, 1500, "/home/alice", "staff")
    env = {"AIMX_EVENT": "on_receive", "HOME": "/home/alice"}
    argv = systemd_run_argv("/usr/bin/systemd-run", ["/usr/bin/agent", "--wake"], owner=alice,
                            timeout_secs=30, env=env)
    assert argv == [
        "/usr/bin/systemd-run", "--quiet", "--pipe", "--wait", "--collect",
        "--uid=alice", "--gid=staff",
        "--property=ProtectSystem=strict", "--property=PrivateDevices=yes",
        "--property=NoNewPrivileges=yes", "--property=MemoryMax=256M",
        "--property=RuntimeMaxSec=30", "--property=ReadWritePaths=/home/alice /tmp",
        "--setenv=AIMX_EVENT=on_receive", "--setenv=HOME=/home/alice",
        "--", "/usr/bin/agent", "--wake"]
    root = Owner("root", 0, 0, "/root", "root")
    argv = systemd_run_argv("systemd-run", ["/bin/true"], owner=root, timeout_secs=5, env={})
    assert not any(a.startswith(("--uid", "--gid")) for a in argv)
    assert argv[-2:] == ["--", "/bin/true"]


def test_trampoline_argv_switches_identity_only_when_asked():
    alice = Owner("alice", 1001, 1500, "/home/alice", "staff")
    assert trampoline_argv(["/bin/x", "a b"], alice)[-7:] == [
        "switch", "alice", "1001", "1500", "--", "/bin/x", "a b"]
    assert trampoline_argv(["/bin/x"], None)[-3:] == ["keep", "--", "/bin/x"]

if __name__ == "__main__":
    _driver(sys.argv[1])
