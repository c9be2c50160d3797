"""Exec trampoline between the daemon and a hook's own argv.

Run by ``aimx.daemon.hooks`` as a fresh interpreter (``python -I -S <this file>``),
never imported. Twisted's ``spawnProcess`` forks and execs but cannot make
the child a session leader, and doing the passwd/group lookups of
``initgroups`` in a child forked from a multi-threaded daemon can deadlock on
libc locks. A freshly exec'd, single-threaded interpreter can do both safely:

    setsid -> [initgroups, setgid, setuid] -> chdir / -> reset ignored signals -> execv

Usage: ``hooktrampoline.py [--unset=NAME]... keep -- <cmd...>`` (no identity
change) or ``hooktrampoline.py [--unset=NAME]... switch <user> <uid> <gid> --
<cmd...>``. ``--unset`` names variables to remove before the exec: the
interpreter itself adds ``LC_CTYPE`` when started in the C locale (PEP 538),
and a hook's environment must be exactly what the daemon chose.

Any failure before the hook's exec is reported as one line of text on file
descriptor 3, which the daemon opens as a pipe; fd 3 is close-on-exec, so an
empty EOF there means the hook's program really started. Standard library
only, no aimx imports: this file runs without the package on ``sys.path``.
"""

import os
import signal
import sys

REPORT_FD = 3
EXEC_FAILED_STATUS = 127


def _report(message: str) -> None:
    try:
        os.write(REPORT_FD, message.encode("utf-8", "replace"))
    except OSError:
        pass


def main(argv: list[str]) -> None:
    try:
        os.set_inheritable(REPORT_FD, False)
    except OSError:
        pass
    stage = "arguments"
    try:
        split = argv.index("--")
        unset = [a.split("=", 1)[1] for a in argv[:split] if a.startswith("--unset=")]
        head = [a for a in argv[:split] if not a.startswith("--unset=")]
        mode, identity, cmd = head[0], head[1:], argv[split + 1:]
        if not cmd or mode not in ("keep", "switch"):
            raise ValueError("bad trampoline arguments")
        # Own session and process group, so a timeout can signal every
        # process the hook started (its pgid is its pid).
        stage = "setsid"
        os.setsid()
        if mode == "switch":
            user, uid, gid = identity[0], int(identity[1]), int(identity[2])
            stage = f"initgroups({user})"
            os.initgroups(user, gid)
            stage = f"setgid({gid})"
            os.setgid(gid)
            stage = f"setuid({uid})"
            os.setuid(uid)
        stage = "chdir(/)"
        os.chdir("/")
        # The interpreter ignores SIGPIPE and SIGXFSZ, and ignored signals
        # stay ignored across exec; a hook's pipelines expect the defaults.
        for number in range(1, 32):
            if number in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                if signal.getsignal(number) == signal.SIG_IGN:
                    signal.signal(number, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        env = dict(os.environ)
        for name in unset:
            env.pop(name, None)
        stage = f"exec {cmd[0]}"
        os.execve(cmd[0], cmd, env)
    except OSError as exc:
        _report(f"{stage} failed: {exc.strerror or exc}")
    except Exception as exc:
        _report(f"{stage} failed: {exc}")
    os._exit(EXEC_FAILED_STATUS)


if __name__ == "__main__":
    main(sys.argv[1:])
