"""Shared pytest set-up: the run's temp dir and workers, instance dirs, real Linux users,
a DNS server and the verifier."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.ports import ReservedPort
from tests.support.users import LinuxUser, ensure_user
from tests.support.verifier import Verifier

TEST_USER_NAMES = ("aimxt-alice", "aimxt-bob")
_OWN_BASETEMP: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """Give each run its own base temp dir under /tmp.

    Tests run clients and hooks as unprivileged users inside tmp_path, so its
    parents must stay traversable; pytest's shared /tmp/pytest-of-<user> is
    reset to 0700 by any other pytest run starting on the host.
    """
    if not config.option.basetemp:
        config.option.basetemp = tempfile.mkdtemp(prefix="aimx-tests-")
        os.chmod(config.option.basetemp, 0o711)  # xdist workers make theirs inside it
        _OWN_BASETEMP.append(config.option.basetemp)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: two workers per CPU, at most 8.

    Most tests spend their time waiting on subprocesses, timeouts and sockets,
    so one worker per CPU leaves the CPUs idle half the time.
    """
    return min(2 * len(os.sched_getaffinity(0)), 8)


def pytest_unconfigure(config: pytest.Config) -> None:
    for path in _OWN_BASETEMP:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _traversable_basetemp(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp_path_factory.getbasetemp().chmod(0o711)


@pytest.fixture
def instance_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Fresh config, data and runtime dirs, exported through the AIMX_* variables."""
    dirs = {name: tmp_path / name for name in ("config", "data", "run")}
    for path in dirs.values():
        path.mkdir()
        path.chmod(0o755)
    monkeypatch.setenv("AIMX_CONFIG_DIR", str(dirs["config"]))
    monkeypatch.setenv("AIMX_DATA_DIR", str(dirs["data"]))
    monkeypatch.setenv("AIMX_RUNTIME_DIR", str(dirs["run"]))
    # tmp_path's parents must be traversable by the unprivileged test users.
    for parent in (tmp_path, *tmp_path.parents):
        if str(parent) in ("/", "/tmp"):
            break
        if os.geteuid() == 0:
            parent.chmod(parent.stat().st_mode | 0o011)
    return dirs


@pytest.fixture(scope="session")
def test_users() -> dict[str, LinuxUser]:
    """Two real unprivileged users, ``alice`` and ``bob`` (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates Linux users with useradd")
    # The users are kept after the run: removing them would race with another test run
    # on the same host, and ensure_user() reuses them next time.
    return {short: ensure_user(name) for short, name in
            zip(("alice", "bob"), TEST_USER_NAMES, strict=True)}


@pytest.fixture
def users(test_users) -> dict[str, LinuxUser]:
    """The test users as they are now (re-created if something removed them meanwhile)."""
    return {short: ensure_user(user.name) for short, user in test_users.items()}


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    """A real DNS server with no records: lookups of the test domains find nothing."""
    with DnsServer({}) as server:
        yield server


@pytest.fixture(scope="module")
def probe_port() -> Iterator[int]:
    """Where the verifier probes callers; the code under test listens there by number."""
    with ReservedPort() as reserved:
        yield reserved.port


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory, probe_port: int) -> Iterator[Verifier]:
    """A real ``aimx-verifier`` probing back on ``probe_port``."""
    server = Verifier(tmp_path_factory.mktemp("verifier"), probe_port=probe_port)
    yield server
    server.stop()
