"""MCP resources for ``aimx mcp``: mailboxes and emails as ``aimx://`` URIs, with push.

URI scheme (documented in docs/mcp.md):

- ``aimx://mailbox/<name>/inbox`` and ``aimx://mailbox/<name>/sent``: the
  folder's listing, a JSON array of ``email_list`` rows, newest first (at
  most ``MAX_LIMIT``). These are what ``resources/list`` shows, two per
  mailbox the caller may read, and what clients subscribe to.
- ``aimx://mailbox/<name>/<folder>/<id>``: one email, its stored Markdown
  (the ``email_read`` text); the template of ``resources/templates/list``.

Reading goes through the same ``AimxTools`` bodies as the tools, so
authorization is the listing's (SO_PEERCRED at the daemon plus the kernel's
file permissions). Push comes from one WATCH connection to the daemon
(``MailFeed``), opened the first time the client touches resources and
reopened whenever the daemon restarts; after a reopen every subscription is
told to re-read, since events may have been missed while it was down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
from mcp import types
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
)
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from aimx.daemon.client import ConnectFailed, DaemonDown, MalformedReply, WatchEnded
from aimx.daemon.protocol import ApiError
from aimx.logs import logger

log = logger("aimx::mcp")

SCHEME = "aimx://mailbox/"
FOLDERS = ("inbox", "sent")
MESSAGE_TEMPLATE = SCHEME + "{mailbox}/{folder}/{id}"
LISTING_MIME = "application/json"
MESSAGE_MIME = "text/markdown"
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0)  # seconds between WATCH attempts; the last repeats
FIRST_OPEN_WAIT = 10.0  # seconds a resource request waits for the first WATCH attempt


def listing_uri(mailbox: str, folder: str) -> str:
    return f"{SCHEME}{mailbox}/{folder}"


def message_uri(mailbox: str, folder: str, email_id: str) -> str:
    return f"{SCHEME}{mailbox}/{folder}/{email_id}"


def parse_uri(uri: str) -> tuple[str, str, str | None] | None:
    """``(mailbox, folder, id or None)`` of an ``aimx://`` URI, or ``None`` if it is not one.

    Names and ids are checked for shape by the tool bodies that use them.
    """
    if not uri.startswith(SCHEME):
        return None
    parts = uri[len(SCHEME):].split("/")
    if len(parts) not in (2, 3) or not all(parts) or parts[1] not in FOLDERS:
        return None
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def event_uris(event: dict[str, Any]) -> list[str]:
    """The resources a daemon WATCH-EVENT changes (empty for mailbox events)."""
    mailbox, folder, email_id = event.get("mailbox"), event.get("folder"), event.get("id")
    if not mailbox or folder not in FOLDERS:
        return []
    uris = [listing_uri(mailbox, folder)]
    if email_id and event.get("event") in ("read", "unread"):
        uris.append(message_uri(mailbox, folder, email_id))
    return uris


def unknown_resource(uri: str) -> MCPError:
    return MCPError(code=types.INVALID_PARAMS, message=f"Unknown resource: {uri}")


class MailFeed:
    """The one WATCH connection of this server and the subscriptions it serves.

    Handshake-era clients subscribe with ``resources/subscribe`` and are told
    through the session of their requests; ``subscriptions/listen`` clients
    get the same events through the SDK's bus. Runs in the server's lifespan
    task group; the blocking WATCH reader runs in a worker thread.
    """

    def __init__(self, open_watch: Callable[[], Any]) -> None:
        self.open_watch = open_watch
        self.subscriptions: set[str] = set()
        self.bus = InMemorySubscriptionBus()
        self.listen = ListenHandler(self.bus)
        self._session: Any = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._started = False
        self._tried = anyio.Event()  # the first WATCH attempt is over
        self._stopping = False
        self._stream: Any = None

    @asynccontextmanager
    async def lifespan(self, server: Any) -> AsyncIterator[dict[str, Any]]:
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            try:
                yield {}
            finally:
                self._stopping = True
                self.listen.close()
                stream = self._stream
                if stream is not None:
                    stream.close()  # wakes the reader thread, so the process can exit
                tasks.cancel_scope.cancel()

    async def start(self, ctx: Any) -> None:
        """Note ``ctx``'s session for notifications; return once the WATCH was tried once.

        So a client that subscribed (or listed) hears of mail stored right after
        the answer. If the daemon is down the feed keeps retrying in the background.
        Only a handshake-era session is told directly: 2026-07-28 clients hear
        through their ``subscriptions/listen`` streams alone.
        """
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            self._session = ctx.session
        if not self._started and self._tasks is not None:
            self._started = True
            self._tasks.start_soon(self._run)
        with anyio.move_on_after(FIRST_OPEN_WAIT):
            await self._tried.wait()

    # -- the WATCH connection --------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        opened_before = False
        while not self._stopping:
            stream = await anyio.to_thread.run_sync(self._open)
            self._tried.set()
            if stream is None:
                failures += 1
            else:
                failures = 0
                self._stream = stream
                if opened_before:  # events may have come and gone meanwhile
                    await self._resync()
                opened_before = True
                try:
                    await anyio.to_thread.run_sync(self._read, stream, abandon_on_cancel=True)
                finally:
                    self._stream = None
            if self._stopping:
                return
            await anyio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)])

    def _open(self) -> Any:
        """(worker thread) A new WATCH on every mailbox the caller may read, or ``None``."""
        try:
            return self.open_watch()
        except (DaemonDown, ConnectFailed, MalformedReply, ApiError) as exc:
            log.debug("daemon watch not open: %s", exc)
            return None

    def _read(self, stream: Any) -> None:
        """(worker thread) Pass the stream's events to the event loop until it ends."""
        try:
            for event in stream:
                anyio.from_thread.run(self._deliver, event)
        except WatchEnded as exc:
            if not self._stopping:
                log.info("daemon watch ended (%s); reconnecting", exc)
        except RuntimeError:  # the event loop is gone: the server is shutting down
            stream.close()

    # -- notifications ---------------------------------------------------------------

    async def _deliver(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind in ("created", "deleted"):
            await self._publish(ResourcesListChanged())
            if kind == "deleted":
                prefix = f"{SCHEME}{event.get('mailbox')}/"
                for uri in sorted(self.subscriptions):
                    if uri.startswith(prefix):
                        await self._publish(ResourceUpdated(uri))
            return
        for uri in event_uris(event):
            await self._publish(ResourceUpdated(uri))

    async def _resync(self) -> None:
        await self._publish(ResourcesListChanged())
        for uri in sorted(self.subscriptions):
            await self._publish(ResourceUpdated(uri))

    async def _publish(self, event: ServerEvent) -> None:
        await self.bus.publish(event)
        session = self._session
        if session is None:
            return
        try:
            if isinstance(event, ResourcesListChanged):
                await session.send_resource_list_changed()
            elif event.uri in self.subscriptions:
                await session.send_resource_updated(event.uri)
        except Exception as exc:  # noqa: BLE001 (a notification is best effort)
            log.debug("notification not sent: %s", exc)


def build_resource_handlers(tools: Any, feed: MailFeed) -> dict[str, Any]:
    """The ``Server`` keyword arguments of the resource handlers, over ``tools``' bodies."""
    from aimx.mcp.server import MAX_LIMIT, ToolFailure  # here: the server imports this module

    async def blocking(handler: Callable[[dict[str, Any]], Any], arguments: dict[str, Any]
                       ) -> Any:
        try:
            return await anyio.to_thread.run_sync(handler, arguments)
        except ToolFailure as failure:
            raise MCPError(code=types.INVALID_PARAMS, message=failure.text) from None

    async def list_resources(ctx: Any, params: Any) -> types.ListResourcesResult:
        await feed.start(ctx)
        rows = await blocking(lambda _: tools.mailbox_rows(), {})
        resources = []
        for row in rows:
            name = row.get("name")
            if not isinstance(name, str):
                continue
            for folder in FOLDERS:
                resources.append(types.Resource(
                    uri=listing_uri(name, folder), name=f"{name}/{folder}",
                    title=f"{folder.capitalize()} of mailbox {name}",
                    description=f"The {folder} emails of mailbox '{name}' "
                                f"({row.get('address') or 'unregistered'}), newest first, "
                                f"as email_list rows (at most {MAX_LIMIT}). Subscribe to "
                                "hear when one arrives.",
                    mime_type=LISTING_MIME))
        return types.ListResourcesResult(resources=resources)

    async def list_templates(ctx: Any, params: Any) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=[types.ResourceTemplate(
            uri_template=MESSAGE_TEMPLATE, name="email", title="One email",
            description="One stored email as Markdown with TOML frontmatter (what email_read "
                        "returns); folder is inbox or sent, id as in the folder listing.",
            mime_type=MESSAGE_MIME)])

    async def read_resource(ctx: Any, params: types.ReadResourceRequestParams
                            ) -> types.ReadResourceResult:
        uri = str(params.uri)
        parsed = parse_uri(uri)
        if parsed is None:
            raise unknown_resource(uri)
        mailbox, folder, email_id = parsed
        if email_id is None:
            text = await blocking(tools.email_list, {"mailbox": mailbox, "folder": folder,
                                                     "limit": MAX_LIMIT})
            mime = LISTING_MIME
        else:
            text = await blocking(tools.email_read, {"mailbox": mailbox, "folder": folder,
                                                     "id": email_id})
            mime = MESSAGE_MIME
        return types.ReadResourceResult(
            contents=[types.TextResourceContents(uri=uri, mime_type=mime, text=text)])

    async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        uri = str(params.uri)
        parsed = parse_uri(uri)
        if parsed is None:
            raise unknown_resource(uri)
        await blocking(lambda _: tools.lookup(parsed[0]), {})  # the caller's own only
        feed.subscriptions.add(uri)
        await feed.start(ctx)
        return types.EmptyResult()

    async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams
                          ) -> types.EmptyResult:
        feed.subscriptions.discard(str(params.uri))
        return types.EmptyResult()

    async def listen(ctx: Any, params: Any) -> Any:
        await feed.start(ctx)
        return await feed.listen(ctx, params)

    return {
        "on_list_resources": list_resources,
        "on_list_resource_templates": list_templates,
        "on_read_resource": read_resource,
        "on_subscribe_resource": subscribe,
        "on_unsubscribe_resource": unsubscribe,
        "on_subscriptions_listen": listen,
        "lifespan": feed.lifespan,
    }
