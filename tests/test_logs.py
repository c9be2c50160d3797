"""``aimx logs``: journalctl pass-through on systemd, log files on OpenRC."""

from __future__ import annotations

from pathlib import Path

import pytest

from aimx.cli.logs import OPENRC_FOLLOW_ERROR, show_logs, tail_lines
from aimx.cli.main import CommandError
from aimx.ops.initsystem import System


@pytest.fixture
def fake_journalctl(tmp_path, monkeypatch):
    """A ``journalctl`` on PATH that prints its arguments and exits with $FAKE_JOURNAL_EXIT."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "journalctl"
    script.write_text('#!/bin/sh\necho "journalctl $*"\nexit "${FAKE_JOURNAL_EXIT:-0}"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setenv("NO_COLOR", "1")
    return script


@pytest.fixture
def systemd(tmp_path) -> System:
    (tmp_path / "root/run/systemd/system").mkdir(parents=True)
    return System(root=tmp_path / "root")


@pytest.fixture
def openrc(tmp_path) -> System:
    root = tmp_path / "root"
    (root / "sbin").mkdir(parents=True)
    (root / "sbin/openrc").touch()
    return System(root=root)


def test_lines_are_passed_to_journalctl(fake_journalctl, systemd, capfd):
    assert show_logs(7, False, systemd) == 0
    assert capfd.readouterr().out == "journalctl -u aimx -n 7 --no-pager\n"


def test_follow_uses_journalctl_follow(fake_journalctl, systemd, capfd):
    assert show_logs(50, True, systemd) == 0
    assert capfd.readouterr().out == "journalctl -f -u aimx\n"


def test_journal_failure_prints_a_hint_before_the_error(fake_journalctl, systemd, capfd,
                                                        monkeypatch):
    monkeypatch.setenv("FAKE_JOURNAL_EXIT", "1")
    with pytest.raises(CommandError) as err:
        show_logs(50, False, systemd)
    assert str(err.value) == "journalctl exited with status 1"
    assert "systemd-journal" in capfd.readouterr().err


def test_openrc_follow_is_refused_with_the_syslog_hint(openrc, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    with pytest.raises(CommandError) as err:
        show_logs(50, True, openrc)
    assert str(err.value) == OPENRC_FOLLOW_ERROR == (
        "log follow is only supported on systemd; on OpenRC tail your syslog file directly "
        "(e.g. `tail -F /var/log/messages`)")
    assert capsys.readouterr().err.strip()  # the dim hint comes first


def test_openrc_prints_the_last_lines_of_the_aimx_log(openrc, capsys):
    log_dir = openrc.root / "var/log/aimx"
    log_dir.mkdir(parents=True)
    (log_dir / "aimx.log").write_text("".join(f"line {i}\n" for i in range(1, 501)))
    assert show_logs(3, False, openrc) == 0
    assert capsys.readouterr().out == "line 498\nline 499\nline 500\n"


def test_openrc_falls_back_to_aimx_lines_of_the_syslog(openrc, capsys):
    (openrc.root / "var/log").mkdir(parents=True)
    (openrc.root / "var/log/messages").write_text(
        "cron: tick\naimx: started\nsshd: login\naimx: stored mail\n")
    assert show_logs(50, False, openrc) == 0
    assert capsys.readouterr().out == "aimx: started\naimx: stored mail\n"


def test_no_init_system_is_an_error(tmp_path):
    with pytest.raises(CommandError) as err:
        show_logs(50, False, System(root=tmp_path))
    assert "no supported init system" in str(err.value)


def test_tail_reads_across_blocks(tmp_path):
    path = Path(tmp_path / "big.log")
    path.write_bytes(b"".join(b"%05d %s\n" % (i, b"x" * 90) for i in range(3000)))
    assert tail_lines(path, 2, block=100) == [f"{i:05d} {'x' * 90}" for i in (2998, 2999)]
    assert tail_lines(path, 0) == []
