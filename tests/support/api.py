"""A test instance with two user mailboxes and a root catch-all, and calls to its daemon:
as root from the test process, as a test user through ``tests.support.users``, and
mail over SMTP."""

from __future__ import annotations

import smtplib
import time
import tomllib
from typing import Any

from aimx.daemon import protocol
from aimx.daemon.client import Client
from aimx.daemon.protocol import ApiError
from tests.support.daemon import RunningDaemon
from tests.support.dnsserver import DnsServer
from tests.support.users import LinuxUser, call_api_as

CONFIG = """\
# operator note: this comment must survive every rewrite
domain = "test.local"
dns_resolvers = ["{dns}"]

[mailboxes.fallback]
address = "*@test.local"
owner = "root"
allow_root_catchall = true

[mailboxes.alice]
address = "alice@test.local"
owner = "{alice}"

[mailboxes.bob]
address = "bob@test.local"
owner = "{bob}"

# an unrelated table the API must never touch
[upgrade]
release_manifest_url = "https://example.invalid/manifest.json"
"""


def config_text(dns: DnsServer, users: dict[str, LinuxUser]) -> str:
    return CONFIG.format(dns=dns.address, alice=users["alice"].name, bob=users["bob"].name)


def call(d: RunningDaemon, command: type[protocol.ApiCommand], **args: Any) -> dict[str, Any]:
    """A call as root (this process)."""
    return Client(d.socket_path, timeout=30).call(command, **args)


def outcome(d: RunningDaemon, command, **args: Any) -> dict[str, Any]:
    """A root call's result as ``{"ok": ...}`` or ``{"error": [code, reason]}``."""
    try:
        return {"ok": call(d, command, **args)}
    except ApiError as exc:
        return {"error": [exc.code, exc.reason]}


def run_as(user: LinuxUser | None, d: RunningDaemon, command, *, raw: bool = False,
           uid: int | None = None, **args: Any) -> dict[str, Any]:
    """One call from a process running as ``user`` (or as a bare ``uid``)."""
    return call_api_as(user, d.socket_path, command.commandName.decode(), args,
                       d.client_env(), raw=raw, uid=uid)


def deliver(d: RunningDaemon, rcpt: str, count: int = 1, tag: str = "m") -> None:
    with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=30) as smtp:
        for i in range(count):
            smtp.sendmail("ann@example.com", [rcpt],
                          f"From: ann@example.com\r\nTo: {rcpt}\r\nSubject: {tag} {i}\r\n"
                          f"Message-ID: <{tag}-{i}-{time.monotonic_ns()}@example.com>\r\n"
                          "\r\nhello\r\n")


def on_disk(d: RunningDaemon) -> dict[str, Any]:
    return tomllib.loads(d.config_path.read_text())
