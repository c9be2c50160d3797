"""One SMTP worker process: ``python -m aimx.daemon.smtpworker`` (started by the daemon).

The daemon binds port 25 and passes the listening socket in (``--listen-fd``)
with one end of a private socket pair (``--control-fd``). The worker adopts
the socket into its own reactor and serves the same ESMTP → ingest path as the
single-process daemon, journalling hooks before each 250 exactly as the daemon
does. After the 250 it reports the stored email to the daemon over AMP; the
daemon fires the hooks. It opens no other listener: no socket API, no DKIM key,
no sending.

Signals and control: ``ReloadConfig`` (and SIGHUP) re-reads ``config.toml``,
keeping the current config on error; ``Drain`` (and SIGTERM/SIGINT, or the
daemon going away) stops accepting, lets sessions finish within the drain
budget, then exits 0.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sys
from typing import Any

import attrs
from twisted.internet import defer, protocol, threads
from twisted.protocols import amp
from twisted.python import usage

from aimx import paths
from aimx.daemon.state import Daemon
from aimx.daemon.workerproto import (
    AdmitSession,
    Drain,
    MessageStored,
    ReloadConfig,
    SessionEnded,
    SetAccepting,
    encode_fields,
)
from aimx.logs import kv, logger, setup_logging

log = logger("aimx::smtp")

# Test seam: the report of a stored email waits this many seconds (to kill a worker
# between a 250 and its report).
REPORT_DELAY_ENV = "AIMX_TEST_WORKER_REPORT_DELAY"


class WorkerOptions(usage.Options):
    optParameters = [
        ["config-dir", None, None, "config dir holding config.toml"],
        ["data-dir", None, None, "data dir override"],
        ["tls-cert", None, None, "STARTTLS certificate"],
        ["tls-key", None, None, "STARTTLS private key"],
        ["listen-fd", None, None, "descriptor of the listening SMTP socket", int],
        ["listen-family", None, None, "its address family", int],
        ["control-fd", None, None, "descriptor of the daemon's control connection", int],
    ]

    def postOptions(self) -> None:  # noqa: N802 (Twisted's name)
        for name in ("listen-fd", "listen-family", "control-fd"):
            if self[name] is None:
                raise usage.UsageError(f"--{name} is required")


@attrs.define
class JournalOnly:
    """The worker's stand-in for the hook runner: the SMTP path only journals hooks
    (``pending``); firing them is the daemon's job."""

    pending: Any


class DaemonAdmission:
    """Session admission counted by the daemon over all workers (``SmtpFactory.admission``).

    Without a daemon to ask (it went away; the worker is stopping) the
    worker's own limits alone apply.
    """

    def __init__(self, daemon: WorkerDaemon) -> None:
        self.daemon = daemon
        self.port: Any = None  # the listening port, while serving
        self._ids: dict[Any, int] = {}
        self._next = itertools.count(1)

    def admit(self, session: Any) -> defer.Deferred[str | None]:
        from aimx.smtp.server import source_key

        control = self.daemon.control
        if control is None:
            return defer.succeed(None)
        # Leave the next connection to a less busy worker until the daemon says otherwise,
        # and take one connection per wake-up: a burst queued before any worker woke
        # would otherwise all go to the first one awake.
        self.set_accepting(False)
        self.daemon.reactor.callLater(0, self._one_accept_per_wakeup)
        session_id = self._ids[session] = next(self._next)
        d = control.callRemote(AdmitSession, session=session_id,
                               source=source_key(session.peer_ip))

        def answered(answer: dict[str, Any]) -> str | None:
            self.set_accepting(answer["accepting"])
            return answer["refusal"] or None

        def failed(failure: Any) -> None:
            self.set_accepting(True)
            return None

        return d.addCallbacks(answered, failed)

    def _one_accept_per_wakeup(self) -> None:
        if self.port is not None:
            self.port.numberAccepts = 1

    def set_accepting(self, accepting: bool) -> None:
        if self.port is None:
            return
        if accepting or self.daemon.control is None:
            self.port.startReading()
        else:
            self.port.stopReading()

    def release(self, session: Any) -> None:
        session_id = self._ids.pop(session, None)
        control = self.daemon.control
        if session_id is not None and control is not None:
            control.callRemote(SessionEnded, session=session_id)


class WorkerDaemon(Daemon):
    """The worker's runtime state: reports stored emails instead of firing hooks."""

    control: Any = None

    def inbound_stored(self, config: Any, results: list[Any]) -> None:
        for result in results:
            if getattr(result, "status", None) == "stored":
                self.track(self._report(result))

    def _report(self, result: Any) -> defer.Deferred[Any]:
        delay = float(os.environ.get(REPORT_DELAY_ENV) or 0)
        if delay > 0:
            from twisted.internet import task

            return task.deferLater(self.reactor, delay, self._send_report, result)
        return self._send_report(result)

    def _send_report(self, result: Any) -> defer.Deferred[Any]:
        control = self.control
        if control is None:
            log.warning("daemon unreachable: hooks of %s wait for the journal replay",
                        kv(str(result.path)))
            return defer.succeed(None)
        d = control.callRemote(MessageStored, mailbox=result.mailbox,
                               email_id=str(result.email_id or ""), path=str(result.path),
                               fields=encode_fields(dict(result.fields)))
        d.addErrback(lambda f: log.warning(
            "report of %s to the daemon failed (%s): hooks wait for the journal replay",
            kv(str(result.path)), f.getErrorMessage()))
        return d

    def reload_file(self) -> defer.Deferred[bool]:
        """Re-read ``config.toml``; keep the current config on error."""

        def load() -> Any:
            with self.config_lock:
                new = self.load_config_blocking()
                self.reactor.callFromThread(self.swap_config, new)
                return new

        def loaded(new: Any) -> bool:
            log.info("SMTP worker pid=%d: config reloaded: %d mailboxes", os.getpid(),
                     len(new.mailboxes))
            return True

        def failed(failure: Any) -> bool:
            log.warning("SMTP worker pid=%d: config reload failed: %s. Keeping previous "
                        "config.", os.getpid(), failure.getErrorMessage())
            return False

        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), load)
        return d.addCallbacks(loaded, failed)


class WorkerSide(amp.AMP):
    """The worker's end of its control connection to the daemon."""

    def __init__(self, worker: SmtpWorker) -> None:
        super().__init__()
        self.worker = worker

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        super().connectionMade()
        self.worker.daemon.control = self

    @SetAccepting.responder
    def set_accepting(self, accepting: bool) -> dict[str, Any]:
        self.worker.factory.admission.set_accepting(accepting)
        return {}

    @ReloadConfig.responder
    def reload_config(self) -> defer.Deferred[dict[str, bool]]:
        return self.worker.daemon.reload_file().addCallback(lambda ok: {"installed": ok})

    @Drain.responder
    def drain(self, seconds: float) -> dict[str, Any]:
        self.worker.reactor.callLater(0, self.worker.shut_down, "drain requested", seconds)
        return {}

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        super().connectionLost(reason)
        self.worker.daemon.control = None
        self.worker.factory.admission.set_accepting(True)
        # Without the daemon nobody fires hooks or restarts anything: stop now (421 to
        # open sessions) rather than keep serving; a new daemon may already be starting.
        self.worker.shut_down("the daemon went away", grace=0.0)


class SmtpWorker:
    """The reactor-side life of one worker: serve, reload, drain, exit."""

    def __init__(self, reactor: Any, daemon: WorkerDaemon, factory: Any) -> None:
        self.reactor = reactor
        self.daemon = daemon
        self.factory = factory
        self.port: Any = None
        self._stopping: defer.Deferred[None] | None = None

    def shut_down(self, why: str, grace: float | None = None) -> None:
        if self._stopping is not None:
            return
        from aimx.daemon.service import drain_seconds

        log.info("SMTP worker pid=%d draining: %s", os.getpid(), why)
        self._stopping = defer.ensureDeferred(
            self._drain(drain_seconds() if grace is None else grace))

    async def _drain(self, grace: float) -> None:
        from aimx.daemon.service import drain_smtp

        self.daemon.draining = True
        self.factory.admission.port = None
        if self.port is not None:
            port, self.port = self.port, None
            await defer.maybeDeferred(port.stopListening)
        try:
            await drain_smtp(self.reactor, self.factory, self.daemon, grace)
        finally:
            log.info("SMTP worker pid=%d stopped", os.getpid())
            self.reactor.stop()

    def install_signal_handlers(self) -> None:
        def later(handler: Any, *args: Any) -> Any:
            return lambda signum, frame: self.reactor.callFromThread(handler, *args)

        signal.signal(signal.SIGHUP, later(self.daemon.reload_file))
        signal.signal(signal.SIGTERM, later(self.shut_down, "SIGTERM"))
        signal.signal(signal.SIGINT, later(self.shut_down, "SIGINT"))


def run(argv: list[str]) -> int:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from aimx.config import ConfigError, load_config
    from aimx.daemon.hookjournal import PendingHooks, hook_state_dir
    from aimx.daemon.service import (
        THREAD_POOL_SIZE,
        StartupError,
        build_smtp_factory,
        load_tls,
        log_observer,
        release_startup_memory,
    )
    from aimx.smtp.proxyproto import smtp_listener_factory
    from aimx.storage.mailstore import MailStore

    options = WorkerOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 2
    os.umask(0o077)
    setup_logging()
    globalLogBeginner.beginLoggingTo([log_observer()], redirectStandardIO=False)
    if options["config-dir"]:
        os.environ["AIMX_CONFIG_DIR"] = options["config-dir"]
    override = paths.data_dir_override(options["data-dir"])
    try:
        config = load_config(paths.config_path(), override)
        tls_context = (load_tls(options["tls-cert"], options["tls-key"], True)
                       if options["tls-cert"] else None)
    except (ConfigError, StartupError) as exc:
        log.error("SMTP worker pid=%d cannot start: %s", os.getpid(), exc)
        return 1
    reactor.suggestThreadPoolSize(THREAD_POOL_SIZE)
    daemon = WorkerDaemon(reactor, config, MailStore(config.data_dir),
                          data_dir_override=override, dkim_key_pem=b"")
    daemon.tls_enabled = tls_context is not None
    daemon.hooks = JournalOnly(PendingHooks(hook_state_dir(config.data_dir),
                                            origin=str(os.getpid())))
    factory = build_smtp_factory(daemon, tls_context, admission=DaemonAdmission(daemon))
    worker = SmtpWorker(reactor, daemon, factory)

    control_factory = protocol.Factory.forProtocol(lambda: WorkerSide(worker))
    os.set_blocking(options["control-fd"], False)
    reactor.adoptStreamConnection(options["control-fd"], socket.AF_UNIX, control_factory)
    os.close(options["control-fd"])
    # Behind the same PROXY-protocol check as the single-process listener.
    worker.port = reactor.adoptStreamPort(options["listen-fd"], options["listen-family"],
                                          smtp_listener_factory(factory))
    factory.admission.port = worker.port
    worker.port.numberAccepts = 1
    os.close(options["listen-fd"])
    # After the reactor's own handlers, which it installs as it starts running.
    reactor.callWhenRunning(worker.install_signal_handlers)
    reactor.callWhenRunning(release_startup_memory)
    log.info("SMTP worker pid=%d serving", os.getpid())
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
