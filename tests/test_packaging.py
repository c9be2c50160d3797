"""Service files (systemd unit, OpenRC script), their install/removal, uninstall and upgrade."""

from __future__ import annotations

import io
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import aimx
from aimx.cli.main import CommandError, main
from aimx.cli.uninstall import ROOT_REQUIRED, uninstall
from aimx.ops.console import Console
from aimx.ops.initsystem import (
    OPENRC,
    SYSTEMD,
    System,
    aimx_executable,
    render_openrc_script,
    render_systemd_unit,
)

EXE = aimx_executable()


class Recorder:
    """Takes the service manager's place: records each command and reports success."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv, *, capture: bool = True, timeout: float | None = 60):
        self.calls.append(list(argv))
        return subprocess.CompletedProcess(list(argv), 0, "", "")


def unit_directives(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def _systemd_root(tmp_path: Path) -> Path:
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    return tmp_path


def _openrc_root(tmp_path: Path) -> Path:
    (tmp_path / "sbin").mkdir(parents=True)
    (tmp_path / "sbin/openrc").touch()
    return tmp_path


# --------------------------------------------------------------------------- systemd

def test_unit_has_every_directive():
    unit = unit_directives(render_systemd_unit(EXE, "/var/lib/aimx", environment={},
                                               config_dir="/etc/aimx"))
    assert unit["Unit"] == {
        "Description": ["aimx SMTP server"],
        "After": ["network-online.target nss-lookup.target"],
        "Wants": ["network-online.target"],
        "StartLimitBurst": ["5"],
        "StartLimitIntervalSec": ["60s"],
    }
    service = unit["Service"]
    expected = {
        "Type": "simple", "User": "root", "ExecStart": f"{EXE} serve --data-dir /var/lib/aimx",
        "ExecReload": "/bin/kill -HUP $MAINPID", "Restart": "on-failure", "RestartSec": "5s",
        "LimitNOFILE": "65536", "TasksMax": "4096", "RuntimeDirectory": "aimx",
        "RuntimeDirectoryMode": "0755", "StandardOutput": "journal",
        "StandardError": "journal", "ReadWritePaths": "/var/lib/aimx /etc/aimx",
        "ProtectSystem": "full", "PrivateTmp": "no",
    }
    for key, value in expected.items():
        assert service[key] == [value], key
    assert "Environment" not in service
    assert not any(key.startswith(("Capability", "AmbientCapabilities")) for key in service)
    assert unit["Install"] == {"WantedBy": ["multi-user.target"]}


def test_unit_quotes_paths_and_carries_path_overrides():
    text = render_systemd_unit(EXE, "/srv/mail box/100%", serve_args=["--bind", "0.0.0.0:2525"],
                               environment={"AIMX_CONFIG_DIR": "/opt/aimx conf"},
                               config_dir="/opt/aimx conf")
    service = unit_directives(text)["Service"]
    assert service["ExecStart"] == [
        f'{EXE} serve --data-dir "/srv/mail box/100%%" --bind 0.0.0.0:2525']
    assert service["Environment"] == ['"AIMX_CONFIG_DIR=/opt/aimx conf"']
    assert service["ReadWritePaths"] == ['"/srv/mail box/100%%" "/opt/aimx conf"']


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize("data_dir", ["/var/lib/aimx", "/srv/mail box"])
def test_systemd_analyze_accepts_the_unit(tmp_path, data_dir):
    unit = tmp_path / "aimx.service"
    unit.write_text(render_systemd_unit(EXE, data_dir, environment={"AIMX_CONFIG_DIR": "/x y"}))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Settings systemd ignores are reported as "<file>:<line>: ..." but still exit 0.
    assert str(unit) not in result.stderr


def test_install_and_remove_systemd_service(tmp_path):
    runner = Recorder()
    system = System(root=_systemd_root(tmp_path), run=runner)
    assert system.init_system() == SYSTEMD
    target = system.install_service(SYSTEMD, "[Unit]\n")
    assert target == tmp_path / "etc/systemd/system/aimx.service"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert runner.calls == [["systemctl", "daemon-reload"], ["systemctl", "enable", "aimx"],
                            ["systemctl", "reset-failed", "aimx"],
                            ["systemctl", "restart", "aimx"]]
    runner.calls.clear()
    assert system.remove_service() == [str(target)]
    assert not target.exists()
    assert runner.calls == [["systemctl", "stop", "aimx"], ["systemctl", "disable", "aimx"],
                            ["systemctl", "daemon-reload"],
                            ["systemctl", "reset-failed", "aimx"]]


def test_a_failing_service_command_is_reported(tmp_path):
    def failing(argv, **_kw):
        code = 1 if argv[:2] == ["systemctl", "enable"] else 0
        return subprocess.CompletedProcess(argv, code, "", "Failed to enable unit: boom\n")

    system = System(root=_systemd_root(tmp_path), run=failing)
    with pytest.raises(Exception) as err:
        system.install_service(SYSTEMD, "[Unit]\n")
    assert str(err.value) == "`systemctl enable aimx` failed (exit 1): Failed to enable unit: boom"


# --------------------------------------------------------------------------- OpenRC

def test_openrc_script_has_every_directive_and_parses():
    text = render_openrc_script(EXE, "/var/lib/aimx", environment={})
    lines = text.splitlines()
    assert lines[0] == "#!/sbin/openrc-run"
    for line in ('description="aimx SMTP server"', f'command="{EXE}"',
                 'command_args="serve --data-dir /var/lib/aimx"',
                 "supervisor=supervise-daemon", "\tafter net",
                 "\tcheckpath -d -m 0755 -o root:root /run/aimx || return 1"):
        assert line in lines, line
    assert "depend() {" in lines and "start_pre() {" in lines
    subprocess.run(["sh", "-n"], input=text, text=True, check=True)


def test_openrc_arguments_survive_the_shell(tmp_path):
    odd = "/srv/it's a \"box\" $HOME"
    script = tmp_path / "aimx"
    script.write_text(render_openrc_script("/opt/my aimx/bin/aimx", odd,
                                           environment={"AIMX_CONFIG_DIR": "/c d"}))
    # openrc-run sources the script and eval's command_args, exactly like this:
    shown = subprocess.run(
        ["sh", "-c", '. "$1"; eval "set -- $command $command_args"; printf "%s\\n" "$@" '
         '"$AIMX_CONFIG_DIR"', "sh", str(script)],
        capture_output=True, text=True, check=True).stdout.splitlines()
    assert shown == ["/opt/my aimx/bin/aimx", "serve", "--data-dir", odd, "/c d"]


def test_install_and_remove_openrc_service(tmp_path):
    runner = Recorder()
    system = System(root=_openrc_root(tmp_path), run=runner)
    assert system.init_system() == OPENRC
    target = system.install_service(OPENRC, "#!/sbin/openrc-run\n")
    assert target == tmp_path / "etc/init.d/aimx"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert runner.calls == [["rc-update", "add", "aimx", "default"],
                            ["rc-service", "aimx", "restart"]]
    runner.calls.clear()
    system.remove_service()
    assert not target.exists()
    assert runner.calls == [["rc-service", "aimx", "stop"],
                            ["rc-update", "del", "aimx", "default"]]


def test_no_init_system_detected(tmp_path):
    assert System(root=tmp_path).init_system() is None


# --------------------------------------------------------------------------- uninstall

def _console(stdin: str) -> Console:
    return Console(stdin=io.StringIO(stdin), out=io.StringIO(), err=io.StringIO())


@pytest.mark.parametrize("answer", ["n\n", "\n", ""])
def test_uninstall_cancel_exits_1_and_keeps_the_service(tmp_path, instance_dirs, answer):
    runner = Recorder()
    system = System(root=_systemd_root(tmp_path), run=runner, euid=lambda: 0)
    system.install_service(SYSTEMD, "[Unit]\n")
    runner.calls.clear()
    console = _console(answer)
    with pytest.raises(CommandError) as err:
        uninstall(False, None, system, console)
    assert (str(err.value), err.value.exit_code) == ("Uninstall cancelled.", 1)
    assert "Proceed with uninstall? (y/N) " in console.out.getvalue()
    assert system.unit_path.exists() and runner.calls == []


def test_uninstall_removes_the_service_but_not_the_package(tmp_path, instance_dirs):
    runner = Recorder()
    system = System(root=_systemd_root(tmp_path), run=runner, euid=lambda: 0)
    system.install_service(SYSTEMD, "[Unit]\n")
    console = _console("y\n")
    assert uninstall(False, None, system, console) == 0
    out = console.out.getvalue()
    assert not system.unit_path.exists()
    assert "Uninstall complete.\n" in out
    assert f"Removed service file: {system.unit_path}\n" in out
    assert "pip uninstall aimx" in out
    assert (f"To wipe config and data manually: sudo rm -rf {instance_dirs['config']} "
            f"{instance_dirs['data']}") in out
    assert Path(EXE).is_file() and Path(aimx.__file__).is_file()


def test_uninstall_refuses_non_root(tmp_path):
    with pytest.raises(CommandError) as err:
        uninstall(True, None, System(root=tmp_path, euid=lambda: 1000), _console(""))
    assert str(err.value) == ROOT_REQUIRED


# --------------------------------------------------------------------------- upgrade

def test_upgrade_prints_the_pip_command(capsys):
    assert main(["upgrade", "--version", "v9.9.9"]) == 0
    out = capsys.readouterr().out
    # The command names the interpreter of this very installation (its venv).
    assert f"  {sys.executable} -m pip install --upgrade aimx==9.9.9\n" in out
    assert "sudo systemctl restart aimx" in out


# --------------------------------------------------------------------------- dev install

def test_editable_install_builds_without_warnings_and_keeps_the_twistd_plugin(tmp_path):
    """`make install` builds the editable wheel the way pip does; any warning fails here,
    and the wheel must put the checkout root on sys.path (Twisted scans it for plugins)."""
    checkout = Path(aimx.__file__).resolve().parent.parent
    build = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "import sys; from setuptools import build_meta; "
         "print(build_meta.build_editable(sys.argv[1]))", str(tmp_path)],
        cwd=checkout, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    assert "Warning" not in build.stderr
    import zipfile

    with zipfile.ZipFile(tmp_path / build.stdout.split()[-1]) as wheel:
        [pth] = [name for name in wheel.namelist() if name.endswith(".pth")]
        assert wheel.read(pth).decode().split() == [str(checkout)]
    twistd = Path(sys.executable).parent / "twistd"
    listed = subprocess.run([str(twistd), "--help"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert any(line.split()[:1] == ["aimx"] for line in listed.stdout.splitlines()), \
        listed.stdout
