"""The daemon as a process: start-up checks, SIGTERM drain, SIGHUP reload, twistd, make run."""

from __future__ import annotations

import os
import pwd
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aimx.storage.layout import README_MARKER
from tests.support.daemon import REPO_ROOT, RunningDaemon, SmtpWire, stored_emails
from tests.support.ports import ReservedPort

DOMAIN = "test.local"


@pytest.fixture(scope="module")
def owner(request: pytest.FixtureRequest) -> str:
    if os.geteuid() == 0:
        return request.getfixturevalue("test_users")["alice"].name
    return pwd.getpwuid(os.getuid()).pw_name


def config_for(owner: str, *extra: str) -> dict:
    mailboxes = {"alice": {"address": f"alice@{DOMAIN}", "owner": owner}}
    for name in extra:
        mailboxes[name] = {"address": f"{name}@{DOMAIN}", "owner": owner}
    return {"domain": DOMAIN, "mailboxes": mailboxes}


def message(msg_id: str) -> bytes:
    return (f"From: b@example.com\r\nTo: alice@{DOMAIN}\r\nSubject: s\r\n"
            f"Message-ID: <{msg_id}>\r\n\r\nbody\r\n").encode()


def port_refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def run_once(daemon: RunningDaemon, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run the daemon's command (plus ``args``) expecting it to exit by itself."""
    return subprocess.run(daemon.command() + list(args), env=daemon.environment(),
                          cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=timeout)


# -- start-up -----------------------------------------------------------------------------


def test_startup_files_modes_and_readme(owner: str) -> None:
    with RunningDaemon(config_for(owner), start=False) as daemon:
        daemon.runtime_dir = daemon.runtime_dir / "fresh"  # must be created, 0755
        stale = daemon.data_dir / "inbox" / "alice" / ".2025-01-01-000000-x.md.tmp.abc123"
        stale.parent.mkdir(parents=True)
        stale.write_text("half a message")
        daemon.start()
        assert daemon.runtime_dir.stat().st_mode & 0o777 == 0o755
        assert daemon.socket_path.stat().st_mode & 0o777 == 0o666
        assert daemon.pid_path.read_text().strip() == str(daemon.pid)
        readme = daemon.data_dir / "README.md"
        assert readme.read_text().splitlines()[0] == README_MARKER
        assert not stale.exists()
        log = daemon.log_text()
        assert f"smtp=127.0.0.1:{daemon.smtp_port}" in log
        assert "tls=disabled" in log and str(daemon.socket_path) in log
        assert daemon.stop() == 0
        assert not daemon.socket_path.exists() and not daemon.pid_path.exists()


def test_missing_config_is_fatal(owner: str) -> None:
    with RunningDaemon(config_for(owner), start=False) as daemon:
        daemon.config_path.unlink()
        result = run_once(daemon)
    assert result.returncode == 1
    assert (f"Error: Config file not found at {daemon.config_path}. "
            "Run 'sudo aimx setup' first") in result.stderr


def test_invalid_config_is_fatal_with_the_loader_text(owner: str) -> None:
    with RunningDaemon('domain = "test.local"\ntrusted_sender = []\n', start=False) as daemon:
        result = run_once(daemon)
    assert result.returncode == 1
    assert (f"Error: {daemon.config_path}, line 2: unknown field 'trusted_sender' in top-level "
            "table") in result.stderr


def test_unreadable_dkim_key_is_fatal(owner: str) -> None:
    with RunningDaemon(config_for(owner), start=False) as daemon:
        daemon.dkim_key_path.unlink()
        result = run_once(daemon)
    assert result.returncode == 1
    assert f"Error: DKIM private key not readable at {daemon.dkim_key_path}" in result.stderr


def test_explicit_tls_files_that_do_not_exist_are_fatal(owner: str, tmp_path: Path) -> None:
    cert, key = tmp_path / "nope.pem", tmp_path / "nokey.pem"
    with RunningDaemon(config_for(owner), start=False) as daemon:
        cmd = [c for c in daemon.command() if c != "--no-tls"]
        result = subprocess.run(cmd + ["--tls-cert", str(cert), "--tls-key", str(key)],
                                env=daemon.environment(), cwd=str(REPO_ROOT),
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"Error: TLS cert/key not readable at {cert} / {key}" in result.stderr


def test_tls_files_that_do_not_parse_are_fatal(owner: str, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    with RunningDaemon(config_for(owner), start=False) as daemon:
        cmd = [c for c in daemon.command() if c != "--no-tls"]
        result = subprocess.run(cmd + ["--tls-cert", str(cert), "--tls-key", str(key)],
                                env=daemon.environment(), cwd=str(REPO_ROOT),
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"Error: TLS cert/key at {cert} / {key} could not be loaded" in result.stderr


@pytest.mark.skipif(Path("/etc/ssl/aimx/cert.pem").exists(), reason="default TLS pair present")
def test_missing_default_tls_pair_only_warns(owner: str) -> None:
    with RunningDaemon(config_for(owner), start=False) as daemon:
        daemon.extra_args = ()
        daemon.command = lambda: [c for c in RunningDaemon.command(daemon) if c != "--no-tls"]
        daemon.start()
        assert ("TLS cert/key not readable at /etc/ssl/aimx/cert.pem / /etc/ssl/aimx/key.pem"
                in daemon.log_text())
        with SmtpWire(daemon.smtp_port) as wire:
            assert "STARTTLS" not in wire.cmd("EHLO x")


def test_refuses_to_start_over_a_live_daemon(owner: str) -> None:
    with RunningDaemon(config_for(owner)) as daemon, ReservedPort() as second:
        daemon.smtp_port, first_port = second.port, daemon.smtp_port
        result = run_once(daemon)
        daemon.smtp_port = first_port
        assert result.returncode == 1
        assert "another aimx daemon is already running" in result.stderr
        # The first daemon is untouched.
        assert daemon.socket_path.exists()
        with SmtpWire(daemon.smtp_port) as wire:
            assert wire.cmd("NOOP") == "250 2.0.0 OK"


def test_refuses_to_start_when_the_port_is_taken(owner: str) -> None:
    with socket.socket() as holder, RunningDaemon(config_for(owner), start=False) as daemon:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        daemon.smtp_port = holder.getsockname()[1]
        result = run_once(daemon)
        assert result.returncode == 1
        assert f"Error: cannot bind SMTP listener 127.0.0.1:{daemon.smtp_port}" in result.stderr
        assert not daemon.socket_path.exists()


def test_stale_socket_after_a_crash_is_replaced(owner: str) -> None:
    with RunningDaemon(config_for(owner)) as daemon:
        daemon.kill()
        assert daemon.socket_path.exists()
        daemon.start()
        assert "removing stale socket" in daemon.log_text()
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as client:
            client.sendmail("b@example.com", [f"alice@{DOMAIN}"], message("after-crash@x"))


# -- SIGTERM (D15) -------------------------------------------------------------------------


def test_sigterm_mid_data_drains_then_exits_0(owner: str) -> None:
    with RunningDaemon(config_for(owner)) as daemon:
        idle = SmtpWire(daemon.smtp_port)
        busy = SmtpWire(daemon.smtp_port)
        busy.cmd("EHLO x")
        busy.cmd("MAIL FROM:<b@example.com>")
        busy.cmd(f"RCPT TO:<alice@{DOMAIN}>")
        assert busy.cmd("DATA").startswith("354")
        raw = message("drained@example.com")
        busy.send(raw[:20])
        daemon.signal(signal.SIGTERM)
        # Idle sessions are told at once; no new connections are taken.
        assert idle.reply() == "421 4.3.2 Service shutting down"
        assert idle.eof()
        deadline = time.monotonic() + 5
        while not port_refused(daemon.smtp_port):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert daemon.running()
        busy.send(raw[20:])
        assert busy.cmd(".") == "250 2.0.0 OK message accepted"
        assert busy.reply() == "421 4.3.2 Service shutting down"
        assert daemon.proc.wait(10) == 0
        assert [p for p in stored_emails(daemon.data_dir, "alice")
                if "drained@example.com" in p.read_text()]
        assert not daemon.socket_path.exists() and not daemon.pid_path.exists()


def test_sigterm_when_idle_exits_quickly(owner: str) -> None:
    with RunningDaemon(config_for(owner)) as daemon:
        started = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - started < 10
        assert port_refused(daemon.smtp_port)
        assert not daemon.socket_path.exists()
        assert "SIGTERM: shutting down" in daemon.log_text()


def test_ctrl_c_is_logged_as_sigint_and_drains_like_sigterm(owner: str) -> None:
    with RunningDaemon(config_for(owner)) as daemon:
        daemon.signal(signal.SIGINT)
        assert daemon.proc.wait(20) == 0
        log = daemon.log_text()
        assert "SIGINT: shutting down" in log and "SIGTERM" not in log
        assert "aimx daemon stopped" in log
        assert not daemon.socket_path.exists()


def test_drain_deadline_answers_421_to_stragglers(owner: str) -> None:
    with RunningDaemon(config_for(owner), env={"AIMX_DRAIN_TIMEOUT": "1"}) as daemon:
        wire = SmtpWire(daemon.smtp_port)
        wire.cmd("EHLO x")
        wire.cmd("MAIL FROM:<b@example.com>")
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert wire.reply() == "421 4.3.2 Service shutting down"
        assert 0.8 < time.monotonic() - started < 5
        assert daemon.proc.wait(10) == 0


# -- SIGHUP ----------------------------------------------------------------------------------


def test_sighup_keeps_the_old_config_on_error_and_applies_a_good_one(owner: str) -> None:
    with RunningDaemon(config_for(owner)) as daemon:
        daemon.write_config('domain = "test.local"\n[mailboxes.alice\n')
        daemon.sighup()
        log = daemon.log_text()
        assert f"WARN aimx::config: SIGHUP: config reload failed for {daemon.config_path}: " in log
        # That entry (which may span lines) ends the reload's report; other sessions' lines
        # may follow it in the log.
        entry = re.split(r"\n(?=\d{4}-\d\d-\d\dT)",
                         log[log.index("SIGHUP: config reload failed"):], maxsplit=1)[0]
        assert entry.rstrip().endswith(". Keeping previous config.")
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as client:
            client.sendmail("b@example.com", [f"alice@{DOMAIN}"], message("kept@example.com"))
        with SmtpWire(daemon.smtp_port) as wire:
            wire.cmd("EHLO x")
            wire.cmd("MAIL FROM:<b@example.com>")
            assert wire.cmd(f"RCPT TO:<bob@{DOMAIN}>").startswith("550 5.1.1")

        daemon.write_config(config_for(owner, "bob"))
        daemon.sighup()
        assert (f"SIGHUP: config reloaded from {daemon.config_path}: 2 mailboxes, 0 hooks, "
                "0 templates") in daemon.log_text()
        with SmtpWire(daemon.smtp_port) as wire:
            wire.cmd("EHLO x")
            wire.cmd("MAIL FROM:<b@example.com>")
            assert wire.cmd(f"RCPT TO:<bob@{DOMAIN}>") == "250 2.0.0 OK"
        assert daemon.running()


# -- twistd and the CLI ------------------------------------------------------------------------


def test_twistd_plugin_runs_the_same_service(owner: str) -> None:
    with RunningDaemon(config_for(owner), start=False) as daemon:
        twistd = Path(sys.executable).with_name("twistd")
        cmd = [str(twistd), "--nodaemon", "--pidfile=", "aimx", "--config-dir",
               str(daemon.config_dir), "--bind", f"127.0.0.1:{daemon.smtp_port}", "--no-tls"]
        env = daemon.environment()
        del env["AIMX_CONFIG_DIR"]  # --config-dir must be enough
        with open(daemon.log_path, "ab") as log:
            daemon.proc = subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT), stdout=log,
                                           stderr=subprocess.STDOUT)
        daemon.wait_ready()
        with SmtpWire(daemon.smtp_port) as wire:
            assert wire.banner == f"220 {DOMAIN} ESMTP aimx"
        assert daemon.stop() == 0


def test_serve_help_lists_the_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "aimx.cli.main", "serve", "--help"],
                            capture_output=True, text=True, timeout=30, cwd=str(REPO_ROOT))
    assert result.returncode == 0
    for flag in ("--bind", "--tls-cert", "--tls-key", "--data-dir"):
        assert flag in result.stdout


def test_data_dir_flag_overrides_config(owner: str, tmp_path: Path) -> None:
    other = Path(tmp_path) / "elsewhere"
    with RunningDaemon(config_for(owner), start=False,
                       extra_args=("--data-dir", str(other))) as daemon:
        daemon.start()
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as client:
            client.sendmail("b@example.com", [f"alice@{DOMAIN}"], message("moved@example.com"))
        assert stored_emails(other, "alice")
        assert not stored_emails(daemon.data_dir, "alice")


# -- make run ------------------------------------------------------------------------------------


def test_devrun_serves_mail_into_the_dev_mailbox(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    with ReservedPort() as reserved:  # devrun binds it by number
        port = reserved.port
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIMX_")}
        env["PYTHONUNBUFFERED"] = "1"
        log_path = tmp_path / "devrun.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "aimx.ops.devrun", "--dir", str(dev),
                                     "--bind", f"127.0.0.1:{port}"], env=env, cwd=str(REPO_ROOT),
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not (dev / "run" / "aimx.sock").exists() or port_refused(port):
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            printed = log_path.read_text()
            assert "smtplib" in printed and str(dev / "data" / "inbox") in printed
            address = next(word.strip("',") for word in printed.split()
                           if word.strip("',").endswith("@aimx.localhost"))
            with smtplib.SMTP("127.0.0.1", port) as client:
                assert "STARTTLS" in client.ehlo()[1].decode()
                client.sendmail("you@example.com", [address], message("devrun@example.com"))
            landed = [p for p in (dev / "data" / "inbox").rglob("*.md")
                      if "devrun@example.com" in p.read_text()]
            assert len(landed) == 1
            assert (dev / "config" / "dkim" / "private.key").stat().st_mode & 0o777 == 0o600
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        key_before = (dev / "config" / "dkim" / "private.key").read_bytes()
        from aimx.ops.devrun import prepare

        prepare(dev, f"127.0.0.1:{port}")  # a re-run keeps what exists
        assert (dev / "config" / "dkim" / "private.key").read_bytes() == key_before
