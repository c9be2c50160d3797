"""``aimx`` as users run it, against a test instance: the real CLI in a subprocess as
root or as a test user (``tests.support.users.run_aimx_as``), colour off so output
compares as text."""

from __future__ import annotations

import subprocess

from tests.support.daemon import RunningDaemon
from tests.support.users import LinuxUser, run_aimx_as

NO_ANSWER = ("Error: no answer to the confirmation prompt (standard input is closed); "
             "pass -y to confirm without a prompt\n")


def aimx(d: RunningDaemon, *argv: str, user: LinuxUser | None = None, input: str = "",
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = d.client_env()
    environment.update({"NO_COLOR": "1", **(env or {})})
    if user is not None:
        environment = user.env(environment)
    return run_aimx_as(user, list(argv), environment, input=input, timeout=60)
