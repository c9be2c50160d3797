"""The daemon's side of its SMTP worker processes: start, watch, restart, reload, drain.

With ``smtp_workers`` of 2 or more the daemon binds port 25 once and starts
that many ``python -m aimx.daemon.smtpworker`` processes with
``reactor.spawnProcess``. Each gets the listening socket and one end of a
private socket pair as child descriptors; the kernel spreads connections over
the workers, and each worker talks AMP (``workerproto``) with the daemon over
its pair: it reports every stored email, the daemon fires the hooks.

A worker that dies is logged and started again after a back-off that grows
while it keeps dying young. Its journalled emails (hook markers written before
each 250) that it never reported are replayed by the daemon, so a wake-up is
never lost and, with the fired-once log, never doubled.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections import Counter
from typing import Any

from twisted.internet import defer, error, protocol, threads
from twisted.protocols import amp

from aimx.daemon.workerproto import (
    AdmitSession,
    Drain,
    MessageStored,
    ReloadConfig,
    SessionEnded,
    SetAccepting,
    stored_result,
)
from aimx.logs import kv, logger

log = logger("aimx::serve")

WORKER_MODULE = "aimx.daemon.smtpworker"
LISTEN_FD = 3
CONTROL_FD = 4
# A worker that lived less than this counts as a crash loop; its restart waits longer.
HEALTHY_SECS = 10.0
FIRST_BACKOFF_SECS = 0.5
MAX_BACKOFF_SECS = 30.0
# Beyond the drain budget, how long a worker may take to exit before it is killed.
EXIT_GRACE_SECS = 5.0


def restart_delay(quick_deaths: int) -> float:
    """Seconds before a restart, after ``quick_deaths`` deaths in a row soon after start."""
    return min(MAX_BACKOFF_SECS, FIRST_BACKOFF_SECS * 2 ** max(0, quick_deaths - 1))


class SessionLedger:
    """The open SMTP sessions of all workers, against the limits one process would apply."""

    def __init__(self) -> None:
        from aimx.smtp.server import Limits

        self.limits = Limits()
        self.per_source: Counter[str] = Counter()
        self._open: dict[int, dict[int, str]] = {}  # worker slot → session id → source

    def admit(self, slot: int, session: int, source: str) -> str:
        from aimx.smtp.server import R_TOO_MANY_CONNECTIONS, R_TOO_MANY_FROM_ADDRESS

        if sum(len(open_) for open_ in self._open.values()) >= self.limits.max_sessions:
            return R_TOO_MANY_CONNECTIONS
        if self.per_source[source] >= self.limits.max_per_ip:
            return R_TOO_MANY_FROM_ADDRESS
        self._open.setdefault(slot, {})[session] = source
        self.per_source[source] += 1
        return ""

    def end(self, slot: int, session: int) -> None:
        source = self._open.get(slot, {}).pop(session, None)
        if source is not None:
            self.per_source[source] -= 1
            if self.per_source[source] <= 0:
                del self.per_source[source]

    def forget_worker(self, slot: int) -> None:
        """A worker's connection to the daemon is gone, and with it all its sessions."""
        for session in list(self._open.get(slot, {})):
            self.end(slot, session)
        self._open.pop(slot, None)

    def open_sessions(self, slot: int) -> int:
        return len(self._open.get(slot, {}))


class _DaemonSide(amp.AMP):
    """The daemon's end of one worker's control connection."""

    def __init__(self, pool: SmtpWorkerPool, slot: int) -> None:
        super().__init__()
        self.pool = pool
        self.slot = slot
        self.lost: defer.Deferred[None] = defer.Deferred()  # every report read by then

    @MessageStored.responder
    def message_stored(self, mailbox: str, email_id: str, path: str,
                       fields: str) -> defer.Deferred[dict[str, Any]] | dict[str, Any]:
        daemon = self.pool.daemon
        if fields:
            daemon.inbound_stored(daemon.config,
                                  [stored_result(mailbox, email_id, path, json.loads(fields))])
            return {}
        from aimx.daemon.hooks import read_stored_result

        d = threads.deferToThreadPool(daemon.reactor, daemon.reactor.getThreadPool(),
                                      read_stored_result, mailbox, path)

        def fire(result: Any) -> dict[str, Any]:
            daemon.inbound_stored(daemon.config, [result])
            return {}

        def unreadable(failure: Any) -> dict[str, Any]:
            log.error("stored email %s cannot be read back for its hooks: %s", kv(path),
                      failure.getErrorMessage())
            return {}

        return d.addCallbacks(fire, unreadable)

    @AdmitSession.responder
    def admit_session(self, session: int, source: str) -> dict[str, Any]:
        refusal = self.pool.sessions.admit(self.slot, session, source)
        return {"refusal": refusal, "accepting": self.pool.rebalance(answering=self.slot)}

    @SessionEnded.responder
    def session_ended(self, session: int) -> dict[str, Any]:
        self.pool.sessions.end(self.slot, session)
        self.pool.rebalance()
        return {}

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        super().connectionMade()
        self.pool.control_made(self.slot, self)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        super().connectionLost(reason)
        self.pool.control_lost(self.slot, self)
        self.lost.callback(None)


class _ControlFactory(protocol.Factory):
    def __init__(self, pool: SmtpWorkerPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot

    def buildProtocol(self, addr: Any) -> _DaemonSide:  # noqa: N802 (Twisted's name)
        return _DaemonSide(self.pool, self.slot)


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, pool: SmtpWorkerPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.started = time.monotonic()
        self.pid = 0

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        self.pid = self.transport.pid

    def processEnded(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        self.pool.worker_ended(self.slot, self, reason)


class SmtpWorkerPool:
    """``count`` SMTP worker processes sharing the ``listening`` socket."""

    def __init__(self, reactor: Any, daemon: Any, *, count: int, listening: socket.socket,
                 worker_args: tuple[str, ...]) -> None:
        self.reactor = reactor
        self.daemon = daemon
        self.count = count
        self.listening = listening
        self.worker_args = worker_args
        self.stopping = False
        self.sessions = SessionLedger()
        self._accepting: dict[int, bool] = {}  # what each worker was last told
        self._processes: dict[int, _WorkerProcess] = {}
        self._controls: dict[int, _DaemonSide] = {}
        self._quick_deaths: dict[int, int] = {}
        self._restarts: dict[int, Any] = {}
        self._all_ended: list[defer.Deferred[None]] = []

    # -- processes -------------------------------------------------------------

    def start(self) -> None:
        self.daemon.config_listeners.append(self._config_swapped)
        for slot in range(self.count):
            self._spawn(slot)

    def pids(self) -> list[int]:
        return [process.pid for process in self._processes.values() if process.pid]

    def _spawn(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        if self.stopping:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = _WorkerProcess(self, slot)
            args = [sys.executable, "-m", WORKER_MODULE, *self.worker_args,
                    "--listen-fd", str(LISTEN_FD),
                    "--listen-family", str(int(self.listening.family)),
                    "--control-fd", str(CONTROL_FD)]
            env = dict(os.environ)
            self.reactor.spawnProcess(process, sys.executable, args, env=env,
                                      childFDs={0: 0, 1: 1, 2: 2,
                                                LISTEN_FD: self.listening.fileno(),
                                                CONTROL_FD: theirs.fileno()})
            self._processes[slot] = process
            ours.setblocking(False)
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                               _ControlFactory(self, slot))
        except Exception as exc:
            log.error("cannot start SMTP worker %d: %s", slot, exc)
            self._schedule_restart(slot, quick=True)
        finally:
            ours.close()
            theirs.close()
        if slot in self._processes:
            log.info("SMTP worker %d started pid=%d", slot, self._processes[slot].pid)

    def worker_ended(self, slot: int, process: _WorkerProcess, reason: Any) -> None:
        if self._processes.get(slot) is process:
            del self._processes[slot]
        status = reason.value
        if self.stopping:
            log.info("SMTP worker %d pid=%d exited", slot, process.pid)
            self._check_all_ended()
            return
        how = (f"signal {status.signal}" if getattr(status, "signal", None)
               else f"exit code {getattr(status, 'exitCode', '?')}")
        quick = time.monotonic() - process.started < HEALTHY_SECS
        log.warning("SMTP worker %d pid=%d died (%s)", slot, process.pid, how)
        if self.daemon.hooks is not None:
            # Emails it acknowledged but never reported still get their hooks: once
            # every report it did send has been read (its end of the pair is closed).
            control = self._controls.get(slot)
            reports_read = control.lost if control is not None else defer.succeed(None)
            hooks, origin = self.daemon.hooks, str(process.pid)
            self.daemon.track(reports_read.addCallback(
                lambda _: hooks.replay_pending(self.daemon.config, origin=origin)))
        self._schedule_restart(slot, quick=quick)

    def _schedule_restart(self, slot: int, *, quick: bool) -> None:
        deaths = self._quick_deaths.get(slot, 0) + 1 if quick else 1
        self._quick_deaths[slot] = deaths if quick else 0
        delay = restart_delay(deaths)
        log.info("restarting SMTP worker %d in %.1fs", slot, delay)
        self._restarts[slot] = self.reactor.callLater(delay, self._spawn, slot)

    def control_lost(self, slot: int, control: _DaemonSide) -> None:
        if self._controls.get(slot) is control:
            del self._controls[slot]
        self.sessions.forget_worker(slot)
        self._accepting.pop(slot, None)
        self.rebalance()

    def control_made(self, slot: int, control: _DaemonSide) -> None:
        self._controls[slot] = control
        self._accepting[slot] = True  # a new worker accepts from the start
        self.rebalance()

    def rebalance(self, answering: int | None = None) -> bool:
        """Let only the workers with the fewest open sessions accept; tell those whose
        state changed. Returns the state of ``answering`` (told in the reply instead,
        because it paused itself when it accepted)."""
        counts = {slot: self.sessions.open_sessions(slot) for slot in self._controls}
        fewest = min(counts.values(), default=0)
        answer = False
        for slot, control in self._controls.items():
            accepting = counts[slot] <= fewest
            if slot == answering:
                answer = accepting
            elif self._accepting.get(slot) != accepting:
                control.callRemote(SetAccepting, accepting=accepting)
            self._accepting[slot] = accepting
        return answer

    # -- config ----------------------------------------------------------------

    def _config_swapped(self, config: Any) -> None:
        """A new config is installed (SIGHUP or a socket API rewrite): workers re-read it."""
        from aimx.daemon.service import smtp_worker_count

        wanted = smtp_worker_count(config)
        if wanted != self.count:
            log.warning("smtp_workers changed from %d to %d; restart aimx to apply",
                        self.count, wanted)
        for slot, control in list(self._controls.items()):
            d = control.callRemote(ReloadConfig)
            d.addErrback(lambda f, slot=slot: log.warning(
                "SMTP worker %d did not reload its config: %s", slot, f.getErrorMessage()))

    # -- shutdown ----------------------------------------------------------------

    def stop(self, grace: float) -> defer.Deferred[None]:
        """Drain every worker within ``grace`` seconds; fires once all have exited
        (those still alive ``EXIT_GRACE_SECS`` later are killed)."""
        self.stopping = True
        if self._config_swapped in self.daemon.config_listeners:
            self.daemon.config_listeners.remove(self._config_swapped)
        for pending in self._restarts.values():
            if pending.active():
                pending.cancel()
        self._restarts.clear()
        for control in list(self._controls.values()):
            control.callRemote(Drain, seconds=grace).addErrback(lambda f: None)
        ended: defer.Deferred[None] = defer.Deferred()
        self._all_ended.append(ended)
        killer = self.reactor.callLater(grace + EXIT_GRACE_SECS, self._kill_stragglers)
        ended.addBoth(lambda result: (killer.cancel() if killer.active() else None, result)[1])
        self._check_all_ended()
        return ended

    def _kill_stragglers(self) -> None:
        for slot, process in list(self._processes.items()):
            log.warning("SMTP worker %d pid=%d still running after the drain; killing it",
                        slot, process.pid)
            try:
                process.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

    def _check_all_ended(self) -> None:
        if self._processes:
            return
        waiters, self._all_ended = self._all_ended, []
        for waiter in waiters:
            waiter.callback(None)
