"""The aimx daemon as a Twisted service: ``twistd aimx`` and ``aimx serve`` (D24).

``makeService`` does everything that can fail on bad input (config, DKIM key,
TLS material) before anything is bound, so a broken install fails fast with
one ``Error:`` line. ``AimxService`` then binds the SMTP port and the API
socket in ``privilegedStartService`` (before twistd would drop privileges or
daemonize), and on SIGTERM drains sessions and socket requests for up to
30 s before answering ``421`` to whatever is left (D15).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, task
from twisted.logger import ILogObserver, LogLevel, formatEvent
from twisted.python import usage
from zope.interface import provider

from aimx import paths
from aimx.logs import kv, logger, setup_logging

log = logger("aimx::serve")

DEFAULT_BIND = "0.0.0.0:25"
DEFAULT_TLS_CERT = "/etc/ssl/aimx/cert.pem"
DEFAULT_TLS_KEY = "/etc/ssl/aimx/key.pem"
MAIL_DROP_ENV = "AIMX_TEST_MAIL_DROP"
DRAIN_SECS = 30.0
DRAIN_ENV = "AIMX_DRAIN_TIMEOUT"
THREAD_POOL_SIZE = 32


class StartupError(Exception):
    """The daemon cannot start; the text is shown as ``Error: <text>``."""


class Options(usage.Options):
    synopsis = "[--config-dir DIR] [--data-dir DIR] [--bind ADDR:PORT] [--tls-cert PEM] " \
               "[--tls-key PEM]"
    longdesc = "Run the aimx mail daemon: inbound SMTP, the socket API, hooks and sending."
    optParameters = [
        ["config-dir", None, None, "config dir holding config.toml and dkim/ "
                                   "(env AIMX_CONFIG_DIR; default /etc/aimx)"],
        ["data-dir", None, None, "data dir (env AIMX_DATA_DIR; default: config data_dir)"],
        ["bind", None, DEFAULT_BIND, "SMTP listen address"],
        ["tls-cert", None, None, f"STARTTLS certificate (default {DEFAULT_TLS_CERT})"],
        ["tls-key", None, None, f"STARTTLS private key (default {DEFAULT_TLS_KEY})"],
    ]
    optFlags = [["no-tls", None, "serve without STARTTLS even if the default pair exists"]]

    def postOptions(self) -> None:  # noqa: N802 (Twisted's name)
        try:
            parse_bind(self["bind"])
        except ValueError as exc:
            raise usage.UsageError(str(exc)) from exc


def parse_bind(text: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts in brackets) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid bind address '{text}': expected <addr>:<port>")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


# -- start-up steps (blocking, before the reactor runs) ------------------------------


def load_tls(cert: str, key: str, explicit: bool) -> Any:
    """A TLS server context, or None when the default pair is absent (warning, no STARTTLS)."""
    from OpenSSL import crypto
    from twisted.internet import ssl

    try:
        cert_pem = Path(cert).read_bytes()
        key_pem = Path(key).read_bytes()
    except OSError as exc:
        if explicit:
            raise StartupError(f"TLS cert/key not readable at {cert} / {key}") from exc
        log.warning("TLS cert/key not readable at %s / %s; STARTTLS disabled", cert, key)
        return None
    try:
        blocks = [b"-----BEGIN CERTIFICATE-----" + part
                  for part in cert_pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
        if not blocks:
            raise ValueError("no certificate found")
        chain = [ssl.Certificate.loadPEM(block) for block in blocks]
        private = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
        return ssl.CertificateOptions(
            privateKey=private.original, certificate=chain[0].original,
            extraCertChain=[c.original for c in chain[1:]],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
    except Exception as exc:
        raise StartupError(f"TLS cert/key at {cert} / {key} could not be loaded: {exc}") from exc


def load_dkim_key(path: Path) -> bytes:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise StartupError(f"DKIM private key not readable at {path}: "
                           f"{exc.strerror or exc}") from exc
    try:
        load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise StartupError(f"DKIM private key at {path} is not a valid PEM key: {exc}") from exc
    return pem


def ensure_runtime_dir(path: Path) -> None:
    """Create the runtime dir 0755 (never 0700: non-root clients must reach the socket)."""
    if not path.is_dir():
        try:
            path.mkdir(parents=True, mode=0o755)
            path.chmod(0o755)
        except OSError as exc:
            raise StartupError(f"cannot create runtime dir {path}: {exc.strerror}") from exc


def check_no_live_daemon(sock_path: Path) -> None:
    """Refuse to start over a live daemon; a socket nobody answers is stale and removed."""
    if not os.path.lexists(sock_path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(sock_path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", sock_path)
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        return
    except OSError as exc:
        raise StartupError(f"cannot check socket {sock_path}: {exc.strerror or exc}") from exc
    finally:
        probe.close()
    raise StartupError(f"another aimx daemon is already running (socket {sock_path} answers)")


def _fatal(message: str) -> None:
    """Log the reason, print ``Error: <message>`` on the real stderr and exit 1.

    twistd has redirected ``sys.stderr`` into its log by the time the
    listeners bind, hence ``sys.__stderr__``.
    """
    log.error("%s", message)
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"Error: {message}\n")
    stream.flush()
    raise SystemExit(1)


# -- the service ------------------------------------------------------------------


class AimxService(service.Service):
    """Binds the listeners, handles signals and drains on shutdown."""

    name = "aimx"

    def __init__(self, reactor: Any, daemon: Any, *, bind: str, tls_context: Any,
                 tls_cert: str | None, smtp_workers: int = 1,
                 worker_args: tuple[str, ...] = ()) -> None:
        from aimx.smtp.proxyproto import smtp_listener_factory

        self.reactor = reactor
        self.daemon = daemon
        self.bind = bind
        self.tls_cert = tls_cert
        self.smtp_workers = smtp_workers
        self.worker_args = worker_args
        # In-process SMTP only with one worker; otherwise the workers build their own.
        self.smtp_factory = (build_smtp_factory(daemon, tls_context) if smtp_workers == 1
                             else None)
        # What the port listens with: the sessions, behind the PROXY-protocol check.
        self.smtp_listener = (smtp_listener_factory(self.smtp_factory)
                              if self.smtp_factory is not None else None)
        self.tls_enabled = tls_context is not None
        self.socket_path = paths.socket_path()
        self.pid_path = paths.pid_path()
        self._smtp_port: Any = None
        self._smtp_socket: socket.socket | None = None  # bound for the workers, never read
        self.workers: Any = None
        self._unix_port: Any = None
        self._stopping: defer.Deferred[None] | None = None

    def privilegedStartService(self) -> None:  # noqa: N802 (Twisted's name)
        try:
            self._bind_all()
        except StartupError as exc:
            self._unbind()
            _fatal(str(exc))
        super().privilegedStartService()

    def _bind_all(self) -> None:
        from aimx.daemon.api import ApiFactory
        from aimx.storage.atomic import cleanup_temp_files
        from aimx.storage.layout import README_NAME, write_readme

        ensure_runtime_dir(self.socket_path.parent)
        check_no_live_daemon(self.socket_path)
        data_dir = Path(self.daemon.config.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        # Before the port opens: nothing can be mid-write yet, so every temp file is debris.
        removed = cleanup_temp_files(data_dir)
        if removed:
            log.info("removed %d temp files left by an earlier crash", removed)
        try:
            if write_readme(data_dir):
                log.info("wrote %s", data_dir / README_NAME)
        except OSError as exc:
            log.warning("cannot write %s: %s", data_dir / README_NAME, exc)
        host, port = parse_bind(self.bind)
        if self.smtp_factory is None:
            try:
                self._smtp_socket = listening_socket(host, port)
            except OSError as exc:
                raise StartupError(f"cannot bind SMTP listener {self.bind}: "
                                   f"{exc.strerror or exc}") from exc
        else:
            try:
                self._smtp_port = self.reactor.listenTCP(port, self.smtp_listener, backlog=128,
                                                         interface=host)
            except error.CannotListenError as exc:
                reason = (exc.socketError.strerror if hasattr(exc.socketError, "strerror")
                          else exc)
                raise StartupError(f"cannot bind SMTP listener {self.bind}: {reason}") from exc
        if not is_wildcard(host):
            self.daemon.bind_address = host  # outbound mail leaves from this address (D25)
        try:
            self._unix_port = self.reactor.listenUNIX(str(self.socket_path),
                                                      ApiFactory(self.daemon), backlog=128,
                                                      mode=0o666)
            os.chmod(self.socket_path, 0o666)
        except (error.CannotListenError, OSError) as exc:
            raise StartupError(f"cannot bind socket {self.socket_path}: {exc}") from exc

    def _unbind(self) -> None:
        for port in (self._smtp_port, self._unix_port):
            if port is not None:
                port.stopListening()
        self._smtp_port = self._unix_port = None
        if self._smtp_socket is not None:
            self._smtp_socket.close()
            self._smtp_socket = None

    def startService(self) -> None:  # noqa: N802 (Twisted's name)
        super().startService()
        try:
            self.pid_path.write_text(f"{os.getpid()}\n")
            self.pid_path.chmod(0o644)
        except OSError as exc:
            log.warning("cannot write pid file %s: %s", self.pid_path, exc.strerror)
        # After the reactor's own handlers, which it installs as it starts running.
        self.reactor.callWhenRunning(self._install_signal_handlers)
        self.reactor.callWhenRunning(release_startup_memory)
        self.reactor.callWhenRunning(self._start_inbound)
        config = self.daemon.config
        log.info("aimx daemon started pid=%d domain=%s smtp=%s tls=%s socket=%s data_dir=%s "
                 "smtp_workers=%d", os.getpid(), kv(config.domain), kv(self.bind),
                 "enabled" if self.tls_enabled else "disabled",
                 kv(str(self.socket_path)), kv(str(config.data_dir)), self.smtp_workers)

    def _start_inbound(self) -> None:
        """Replay the hooks a crash left pending, then (in worker mode) start the workers.

        The workers start only once the replay has read the journal, so it can
        never pick up the marker of an email a live worker is about to acknowledge.
        """
        replayed: defer.Deferred[Any] = defer.succeed(0)
        if self.daemon.hooks is not None:
            # Emails a crash stored before their hooks were claimed get them now.
            replayed = self.daemon.track(self.daemon.hooks.replay_pending(self.daemon.config))
        if self._smtp_socket is None:
            return
        from aimx.daemon.workerpool import SmtpWorkerPool

        self.workers = SmtpWorkerPool(self.reactor, self.daemon, count=self.smtp_workers,
                                      listening=self._smtp_socket,
                                      worker_args=self.worker_args)
        replayed.addBoth(lambda _: None if self.daemon.draining else self.workers.start())

    def _install_signal_handlers(self) -> None:
        # Our own SIGTERM/SIGINT: the reactor's would re-raise the signal at exit,
        # and a drained shutdown must exit 0 (D15).
        def later(handler: Any) -> Any:
            return lambda signum, frame: self.reactor.callFromThread(handler)

        def terminate(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self._terminate, signal.Signals(signum).name)

        signal.signal(signal.SIGHUP, later(self.daemon.reload))
        signal.signal(signal.SIGTERM, terminate)
        signal.signal(signal.SIGINT, terminate)

    def _terminate(self, signal_name: str) -> None:
        """Stop on SIGTERM (service manager) or SIGINT (Ctrl-C), logging which one came."""
        if self.reactor.running:
            log.info("%s: shutting down", signal_name)
            self.reactor.stop()

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802 (Twisted's name)
        if self._stopping is None:
            super().stopService()
            self._stopping = defer.ensureDeferred(self._drain())
        return self._stopping

    async def _drain(self) -> None:
        self.daemon.draining = True
        ports = [p for p in (self._smtp_port, self._unix_port) if p is not None]
        self._smtp_port = self._unix_port = None
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        grace = drain_seconds()
        if self.smtp_factory is not None:
            await drain_smtp(self.reactor, self.smtp_factory, self.daemon, grace)
        else:
            workers_done = (self.workers.stop(grace) if self.workers is not None
                            else defer.succeed(None))
            if self._smtp_socket is not None:
                self._smtp_socket.close()  # the workers hold their own copies until drained
                self._smtp_socket = None
            await wait_until_idle(self.reactor, self.daemon, grace)
            await workers_done
        for path in (self.socket_path, self.pid_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("cannot remove %s: %s", path, exc.strerror)
        log.info("aimx daemon stopped")


def build_smtp_factory(daemon: Any, tls_context: Any, admission: Any = None) -> Any:
    """The factory of inbound SMTP sessions: the one the daemon listens with in
    single-process mode and each SMTP worker adopts the shared socket with
    (``admission``: the workers' session limits counted over all of them)."""
    from aimx.mail.authresults import load_suffix_list
    from aimx.smtp.server import SmtpFactory
    from aimx.storage import index

    load_suffix_list()  # at start-up, not in the first message's reply time
    reactor = daemon.reactor
    # Index rows are written by another pool thread, started through the reactor,
    # not by the storing job: no 250 waits for SQLite's commit.
    index.run_flushes_with(lambda flush: reactor.callFromThread(reactor.callInThread, flush))
    return SmtpFactory(daemon, tls_context=tls_context, admission=admission)


def listening_socket(host: str, port: int) -> socket.socket:
    """The SMTP listening socket, bound and listening, for the workers to share.

    The daemon never accepts on it; it passes it to each worker process.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def wait_until_idle(reactor: Any, daemon: Any, grace: float,
                          factory: Any = None) -> bool:
    """Wait up to ``grace`` seconds for the open sessions (of ``factory``) and the
    daemon's work in flight to finish; returns whether they did."""
    deadline = time.monotonic() + grace

    def busy() -> bool:
        return bool(factory is not None and factory.sessions) or not daemon.idle()

    while busy() and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.1, lambda: None)
    return not busy()


async def drain_smtp(reactor: Any, factory: Any, daemon: Any, grace: float) -> None:
    """The SMTP part of a drain (D15), once the listener is closed: idle sessions get
    421 now, busy ones after their transaction; whatever is left after ``grace``
    seconds is closed with 421."""
    factory.begin_drain()
    if await wait_until_idle(reactor, daemon, grace, factory):
        return
    log.warning("drain: %d SMTP sessions and %d requests still open after %.0fs; "
                "closing them", len(factory.sessions), len(daemon.in_flight), grace)
    factory.close_all()
    # Give the 421s a moment to reach the wire before the reactor stops.
    closed = factory.wait_idle()
    closed.addTimeout(2, reactor)
    try:
        await closed
    except defer.TimeoutError:
        pass


def smtp_worker_count(config: Any) -> int:
    """``smtp_workers`` as a number of processes: 0 means one per CPU we may run on."""
    if config.smtp_workers:
        return int(config.smtp_workers)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def release_startup_memory() -> None:
    """Hand the heap left over from start-up (imports, config parsing) back to the OS.

    Worth a few MB of resident memory on an idle daemon; glibc only, skipped elsewhere.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def drain_seconds() -> float:
    value = os.environ.get(DRAIN_ENV)
    try:
        return float(value) if value else DRAIN_SECS
    except ValueError:
        return DRAIN_SECS


def build(options: Options) -> AimxService:
    """Everything ``makeService`` does, raising ``StartupError`` instead of exiting."""
    from twisted.internet import reactor

    from aimx.config import ConfigError, load_config, log_warnings
    from aimx.daemon.hookjournal import hook_state_dir
    from aimx.daemon.hooks import HookRunner
    from aimx.daemon.state import Daemon
    from aimx.storage.mailstore import MailStore

    if options["config-dir"]:
        os.environ["AIMX_CONFIG_DIR"] = options["config-dir"]
    override = paths.data_dir_override(options["data-dir"])
    try:
        config = load_config(paths.config_path(), override)
    except ConfigError as exc:
        raise StartupError(str(exc)) from exc
    log_warnings(config)
    dkim_key = load_dkim_key(paths.dkim_key_paths(config.dkim_selector, config.dkim_selector)[0])
    if options["no-tls"]:
        tls_context, cert = None, None
    else:
        explicit = bool(options["tls-cert"] or options["tls-key"])
        cert = options["tls-cert"] or DEFAULT_TLS_CERT
        key = options["tls-key"] or DEFAULT_TLS_KEY
        tls_context = load_tls(cert, key, explicit)
    mail_drop = os.environ.get(MAIL_DROP_ENV) or None
    if mail_drop:
        log.warning("%s is set: outbound mail is NOT delivered, it is appended to %s. "
                    "Never use this outside tests.", MAIL_DROP_ENV, mail_drop)
    reactor.suggestThreadPoolSize(THREAD_POOL_SIZE)
    daemon = Daemon(reactor, config, MailStore(config.data_dir), data_dir_override=override,
                    dkim_key_pem=dkim_key, mail_drop=mail_drop)
    daemon.tls_enabled = tls_context is not None
    daemon.hooks = HookRunner(reactor, state_dir=hook_state_dir(config.data_dir))
    worker_args: list[str] = ["--config-dir", str(paths.config_dir())]
    if override is not None:
        worker_args += ["--data-dir", str(override)]
    if tls_context is not None:
        worker_args += ["--tls-cert", cert, "--tls-key", key]
    return AimxService(reactor, daemon, bind=options["bind"], tls_context=tls_context,
                       tls_cert=cert if tls_context is not None else None,
                       smtp_workers=smtp_worker_count(config),
                       worker_args=tuple(worker_args))


def makeService(options: Options) -> AimxService:  # noqa: N802 (twistd's name)
    os.umask(0o077)
    setup_logging()
    try:
        return build(options)
    except StartupError as exc:
        _fatal(str(exc))
        raise  # unreachable


# -- twistd glue for ``aimx serve`` ---------------------------------------------------

_reentry = False


@provider(ILogObserver)
def _forward_twisted_event(event: dict[str, Any]) -> None:
    """Route Twisted's own warnings and errors into the aimx log shape; drop its chatter."""
    global _reentry
    if _reentry:
        return
    level = event.get("log_level", LogLevel.info)
    failure = event.get("log_failure")
    if failure is None and level < LogLevel.warn:
        return
    _reentry = True
    try:
        text = formatEvent(event) or ""
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}".strip()
        target = logger("aimx::twisted")
        if level >= LogLevel.error or failure is not None:
            target.error("%s", text)
        else:
            target.warning("%s", text)
    finally:
        _reentry = False


def log_observer() -> Any:
    """``twistd --logger`` factory: Twisted's events in the aimx log line shape."""
    return _forward_twisted_event


def run_foreground(service_args: list[str]) -> int:
    """Run exactly the ``twistd aimx`` service in the foreground; returns the exit code."""
    from twisted.application.service import ServiceMaker
    from twisted.scripts import twistd

    maker = ServiceMaker("aimx", "aimx.daemon.service", Options.longdesc, "aimx")

    class _Options(twistd.ServerOptions):
        @staticmethod
        def _getPlugins(interface: Any) -> list[Any]:  # noqa: N802 (Twisted's name)
            return [maker]

    config = _Options()
    argv = ["--nodaemon", "--pidfile=", "--logger=aimx.daemon.service.log_observer", "aimx",
            *service_args]
    try:
        config.parseOptions(argv)
    except usage.UsageError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 2
    try:
        twistd.runApp(config)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0
