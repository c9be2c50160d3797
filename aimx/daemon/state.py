"""Runtime state shared by the SMTP server, the socket API, hooks and sending.

The daemon holds one immutable config snapshot. Handlers read ``daemon.config``
once at the start of a transaction or command and keep that object to the
end, so a swap (reload or API rewrite) never changes a config under their
feet. Swaps happen on the reactor thread only: a swap is one assignment.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads

from aimx.daemon.hookjournal import hook_state_dir
from aimx.daemon.sendkeys import SendKeyStore
from aimx.daemon.watch import WatchHub
from aimx.logs import kv, logger

log = logger("aimx::config")
inbound_log = logger("aimx::smtp")


def count_hooks(config: Any) -> int:
    return sum(len(mailbox.hooks) for mailbox in config.mailboxes.values())


class Daemon:
    """The live state of one running aimx instance."""

    def __init__(
        self,
        reactor: Any,
        config: Any,
        store: Any,
        *,
        data_dir_override: Path | None,
        dkim_key_pem: bytes,
        mail_drop: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.config_path = Path(config.path)
        self.store = store
        self.data_dir_override = data_dir_override
        # The key signs under its own selector, so a config snapshot that names a
        # selector whose key failed to load never pairs the wrong name with a key.
        self.dkim_selector: str = config.dkim_selector
        self.dkim_key_pem = dkim_key_pem
        self.mail_drop = mail_drop
        # Process-wide config write lock: taken after a mailbox lock, never before.
        self.config_lock = threading.Lock()
        self.hooks: Any = None
        # Set by the service when the listener is bound to one address (D25).
        self.bind_address: str | None = None
        self.tls_enabled = False
        self.draining = False
        self.in_flight: set[defer.Deferred[Any]] = set()
        # Idempotent sends: the 24 h record on disk, and the keyed sends under way.
        self.send_keys = SendKeyStore(hook_state_dir(config.data_dir))
        self.sends_in_flight: dict[tuple[int, str], Any] = {}
        self.watch = WatchHub()  # socket connections that sent WATCH
        # Told of every installed snapshot (the SMTP workers re-read the config then).
        self.config_listeners: list[Callable[[Any], None]] = []

    # -- config snapshots --------------------------------------------------

    def swap_config(self, new: Any) -> None:
        """Install a new snapshot (reactor thread only).

        The data dir cannot move while running: the store and its locks are
        bound to it, so a changed ``data_dir`` is pinned back and logged.
        """
        current = self.config
        if Path(new.data_dir) != Path(current.data_dir):
            log.warning("data_dir changed from %s to %s; restart aimx to apply",
                        kv(current.data_dir), kv(new.data_dir))
            new = new.with_data_dir(current.data_dir)
        self.config = new
        self.watch.config_swapped(current, new)
        for listener in list(self.config_listeners):
            try:
                listener(new)
            except Exception:
                log.exception("config listener failed")

    def load_config_blocking(self) -> Any:
        """Load and validate the config file again, honouring the data-dir override."""
        from aimx.config import load_config

        return load_config(self.config_path, self.data_dir_override)

    def load_signing_key_blocking(self, selector: str) -> bytes | None:
        """The private key of ``selector``, or ``None`` (logged) when it cannot be used."""
        from aimx import paths
        from aimx.daemon.service import StartupError, load_dkim_key

        try:
            return load_dkim_key(paths.dkim_key_paths(selector, selector)[0])
        except (StartupError, ValueError) as exc:
            log.warning("SIGHUP: DKIM key for selector %s not loaded: %s. Still signing with "
                        "selector %s.", kv(selector), exc, kv(self.dkim_selector))
            return None

    def swap_signing_key(self, selector: str, key_pem: bytes) -> None:
        """Sign with ``key_pem`` under ``selector`` from now on (reactor thread only)."""
        if selector != self.dkim_selector:
            log.info("DKIM: now signing with selector %s (was %s)", kv(selector),
                     kv(self.dkim_selector))
        self.dkim_selector, self.dkim_key_pem = selector, key_pem

    def reload(self) -> defer.Deferred[bool]:
        """SIGHUP: re-load in a thread under the config write lock; keep the old config on error.

        Fires with whether the new config was installed.
        """
        path = self.config_path

        def load() -> Any:
            with self.config_lock:
                new = self.load_config_blocking()
                key = self.load_signing_key_blocking(new.dkim_selector)
                # Queue the swap while the lock is held, so swaps land in the order the
                # rewrites and reloads happened (the API queues its swaps the same way).
                self.reactor.callFromThread(self.swap_config, new)
                if key is not None:
                    self.reactor.callFromThread(self.swap_signing_key, new.dkim_selector, key)
                return new

        def loaded(new: Any) -> bool:
            _log_config_warnings(new)
            log.info("SIGHUP: config reloaded from %s: %d mailboxes, %d hooks, 0 templates",
                     path, len(new.mailboxes), count_hooks(new))
            return True

        def failed(failure: Any) -> bool:
            log.warning("SIGHUP: config reload failed for %s: %s. Keeping previous config.",
                        path, failure.getErrorMessage())
            return False

        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), load)
        d.addCallbacks(loaded, failed)
        return d

    # -- inbound mail ----------------------------------------------------------

    def inbound_stored(self, config: Any, results: list[Any]) -> None:
        """Everything that follows the 250 of stored inbound emails, in this process.

        The one place the daemon learns of new inbound mail, whichever listener
        stored it: ``on_receive`` hooks fire from here, after the reply.
        """
        self.watch.inbound_stored(self.config, results)
        if self.hooks is None:
            return
        for result in results:
            if getattr(result, "status", None) != "stored":
                continue
            try:
                d = self.hooks.fire_on_receive(config, result.mailbox, result)
            except Exception:
                inbound_log.exception("on_receive hooks failed to start mailbox=%s",
                                      kv(result.mailbox))
                continue
            d.addErrback(lambda f: inbound_log.error("on_receive hooks failed: %s",
                                                     f.getTraceback()))

    # -- sending --------------------------------------------------------------

    def send(self, body: bytes, text_only: bool, html_body: bytes | None,
             caller_uid: int, *, caller_pid: int | None = None,
             idempotency_key: str | None = None) -> defer.Deferred[str]:
        """Run one SEND (checks, render, sign, deliver, sent copy); fires with the Message-ID.

        ``caller_pid`` (from SO_PEERCRED) tells a send from inside a hook run;
        ``idempotency_key`` makes a retry return the first outcome instead of sending.
        """
        from aimx.daemon import sending

        return sending.send(self, body, text_only, html_body, caller_uid,
                            caller_pid=caller_pid, idempotency_key=idempotency_key)

    # -- work in flight (for the SIGTERM drain) ------------------------------

    def track(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """Count ``d`` as in-flight work until it fires; returns ``d`` unchanged."""
        self.in_flight.add(d)

        def done(result: Any) -> Any:
            self.in_flight.discard(d)
            return result

        d.addBoth(done)
        return d

    def idle(self) -> bool:
        return not self.in_flight


def _log_config_warnings(config: Any) -> None:
    from aimx.config import log_warnings

    log_warnings(config)
