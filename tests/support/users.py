"""Real Linux users for ownership and authorization tests (root only)."""

from __future__ import annotations

import os
import pwd
import subprocess

import attrs
import pytest

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: creates Linux users and changes file ownership"
)


@attrs.frozen
class LinuxUser:
    __test__ = False  # not a pytest test class, whatever name a test module imports it under

    name: str
    uid: int
    gid: int
    home: str

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(base if base is not None else os.environ)
        env.update(HOME=self.home, USER=self.name, LOGNAME=self.name)
        return env

    def preexec(self):
        """A ``preexec_fn`` that drops to this user (groups, gid, then uid)."""
        name, uid, gid = self.name, self.uid, self.gid

        def drop() -> None:
            os.initgroups(name, gid)
            os.setgid(gid)
            os.setuid(uid)

        return drop


def ensure_user(name: str) -> LinuxUser:
    """Create ``name`` (with a home dir and its own group) unless it exists."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--user-group", "--shell", "/bin/sh", name],
            check=True, capture_output=True,
        )
        entry = pwd.getpwnam(name)
    return LinuxUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def remove_user(name: str) -> None:
    subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)


TestUser = LinuxUser  # older name, kept for test modules that import it
