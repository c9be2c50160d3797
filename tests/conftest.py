"""Shared pytest set-up: the run's temp dir and workers, instance dirs, real Linux users
(removed at the end of the run that created them), a DNS server and the verifier."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.locks import HostLock
from tests.support.ports import ReservedPort
from tests.support.users import LinuxUser, ensure_user, remove_user, user_exists
from tests.support.verifier import Verifier

TEST_USER_NAMES = ("aimxt-alice", "aimxt-bob")
_OWN_BASETEMP: list[str] = []
# Every run on the host that may use the test users holds this lock shared, from start
# to end; users are removed only by a run that then gets it alone.
USERS_IN_USE = "test-users-in-use"
_USERS_IN_USE: list[HostLock] = []
_USERS_BEFORE_RUN: set[str] = set()


def pytest_configure(config: pytest.Config) -> None:
    """Give each run its own base temp dir under /tmp, and note which test users
    exist before it (see ``pytest_sessionfinish``).

    Tests run clients and hooks as unprivileged users inside tmp_path, so its
    parents must stay traversable; pytest's shared /tmp/pytest-of-<user> is
    reset to 0700 by any other pytest run starting on the host.
    """
    if not config.option.basetemp:
        config.option.basetemp = tempfile.mkdtemp(prefix="aimx-tests-")
        os.chmod(config.option.basetemp, 0o711)  # xdist workers make theirs inside it
        _OWN_BASETEMP.append(config.option.basetemp)
    if _is_controller(config) and os.geteuid() == 0:
        in_use = HostLock(USERS_IN_USE, shared=True)
        in_use.acquire()
        _USERS_IN_USE.append(in_use)
        _USERS_BEFORE_RUN.update(name for name in TEST_USER_NAMES if user_exists(name))


def _is_controller(config: pytest.Config) -> bool:
    """This process runs the session as a whole (the xdist controller, or no xdist)."""
    return not hasattr(config, "workerinput")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Remove the test users this run created, once, unless another run still uses them.

    Users that existed before the run are left alone: another run may be using them.
    """
    if not _USERS_IN_USE or not _is_controller(session.config):
        return
    in_use = _USERS_IN_USE.pop()
    created = [name for name in TEST_USER_NAMES
               if name not in _USERS_BEFORE_RUN and user_exists(name)]
    with HostLock("useradd"):  # no worker of another run is creating them meanwhile
        in_use.release()
        alone = HostLock(USERS_IN_USE)
        if not alone.acquire(blocking=False):
            if created:
                _warn(session, f"kept test users {', '.join(created)}: another test run "
                               "on this host is using them")
            return
        try:
            for name in created:
                problem = remove_user(name)
                if problem:
                    _warn(session, f"could not remove test user {name}: {problem}")
        finally:
            alone.release()


def _warn(session: pytest.Session, text: str) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"warning: {text}", yellow=True)
    else:
        warnings.warn(text, stacklevel=1)


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
def _traversable_basetemp(request: pytest.FixtureRequest,
                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """The test users can traverse the run's temp dirs. An xdist worker's base sits in
    the run's, which the controller re-creates 0700 after ``pytest_configure``."""
    base = tmp_path_factory.getbasetemp()
    for path in [base] if _is_controller(request.config) else [base, base.parent]:
        path.chmod(0o711)


@pytest.fixture
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh directory every user may write: hooks and clients running as the test users
    record there. It lives in the run's temp dir (parents traversable), removed with it."""
    path = tmp_path_factory.mktemp("shared")
    path.chmod(0o777)
    return path


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
    # Removed at the end of the run if it created them (pytest_sessionfinish).
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
