"""The stdio MCP server (``aimx mcp``): twelve tools for an agent's own mail.

Its mailboxes are resources too, with push on new mail: see ``aimx.mcp.resources``.

One process per agent, running as the agent's Linux user. Everything that
needs authority goes through the daemon socket, where ``SO_PEERCRED`` tells
the daemon who is asking: each mailbox tool first asks MAILBOX-LIST (which
only returns the caller's own mailboxes, so "unknown" and "not yours" look the
same) and then the verb. Reading mail needs no daemon round trip beyond that:
the mailbox directories are ``owner 0700``, so the kernel already limits this
process to the agent's own files, and the strict path rules keep a planted
symlink from leaking anything else.

The SDK's low-level server is used rather than its decorator layer so the
input schemas (property order, ``additionalProperties``), the invalid-params
errors and the exact failure texts (``isError`` results, never prefixed) are
ours. The daemon client blocks, so every tool body runs in a worker thread
and the event loop stays free to answer pings and other calls.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
from mcp import types
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

from aimx import __version__
from aimx.daemon import protocol
from aimx.daemon.client import Client, ConnectFailed, DaemonDown, MalformedReply
from aimx.logs import logger, setup_logging
from aimx.mail import compose, frontmatter, naming, sendoptions
from aimx.mcp import resources
from aimx.storage.emailfiles import resolve_email_path
from aimx.storage.index import iter_listing, list_page

log = logger("aimx::mcp")

SERVER_NAME = "aimx"
INSTRUCTIONS = "aimx email server. Manage mailboxes and emails for AI agents"

DAEMON_DOWN = "aimx daemon not running. Start with 'sudo systemctl start aimx'"
CATCHALL_REASON = "catchall mailbox has no valid sender address. Use a named mailbox."

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
FOLDERS = ("inbox", "sent")


class ToolFailure(Exception):
    """A tool failed; ``text`` is exactly what the agent sees (``isError: true``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def invalid_params(message: str) -> MCPError:
    return MCPError(code=types.INVALID_PARAMS, message=message)


# --------------------------------------------------------------------------- tool schemas

_MARKDOWN_BODY = (
    "Message body in Markdown (CommonMark plus GitHub tables, task lists, strikethrough, "
    "footnotes and autolinks). It is sent as styled HTML with the Markdown source as the "
    "plain-text part, so write ordinary Markdown: headings, lists, links, tables."
)
_TEXT_ONLY = (
    "Send the body as plain text with no HTML part. NEVER set this for prose, reports, "
    "summaries or any body with Markdown in it: the recipient would see raw `#`, `**` and "
    "`-` markers. Only for short unformatted one-liners such as a verification code or a "
    "one-line confirmation. Cannot be combined with html_body."
)
_HTML_BODY = (
    "Your own finished HTML, sent verbatim as the HTML part; body becomes the plain-text "
    "part. Cannot be combined with text_only."
)
_REPLY_TO_ADDRESS = (
    "Address that answers should go to (the Reply-To header), one bare address such as "
    "desk@example.com. Not the same as reply_to, which names the message being answered.")
_MESSAGE_ID = (
    "Message-ID to send under instead of a generated one: <unique-part@domain>, where "
    "domain is this server's mail domain (or a subdomain of it) and the unique part has at "
    "least 8 characters. Set it when you need to know the id before sending.")
_IDEMPOTENCY_KEY = (
    "Makes the send safe to retry: within 24 hours, a second call with the same key and "
    "the same message returns the first call's result and sends nothing; the same key with "
    "a different message fails with [ECONFLICT]. Letters, digits and . _ : - (at most 128); "
    "a UUID per message works. A temporary failure ([TEMP]) may be retried with the same "
    "key; a permanent one ([DELIVERY]) is returned again.")
_AUTO_SUBMITTED = (
    "Mark the email as sent by an automatic process (Auto-Submitted: auto-generated) so "
    "other systems do not auto-reply to it. Set it for notifications and reports you send "
    "on your own; a hook run marks its mail auto-replied without it.")
_EMAIL_ID = "Email id as listed by email_list (e.g. 2025-06-15-120000-hello)."
_FOLDER = 'Folder: "inbox" (default) or "sent".'


def _string(description: str) -> dict[str, Any]:
    return {"type": "string", "description": description}


def _boolean(description: str) -> dict[str, Any]:
    return {"type": "boolean", "description": description}


def _uint(description: str) -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, "description": description}


def _strings(description: str) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string"}, "description": description}


@attrs.frozen
class ToolSpec:
    """One tool as advertised: its schema is also what arguments are checked against."""

    name: str
    description: str
    properties: Mapping[str, Mapping[str, Any]]
    required: tuple[str, ...] = ()
    closed: bool = False  # unknown argument keys are invalid params

    def input_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "object",
                                  "properties": {k: dict(v) for k, v in self.properties.items()}}
        if self.required:
            schema["required"] = list(self.required)
        if self.closed:
            schema["additionalProperties"] = False
        return schema

    def as_tool(self) -> types.Tool:
        return types.Tool(name=self.name, description=self.description,
                          input_schema=self.input_schema())


TOOL_SPECS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "mailbox_list",
        "List the mailboxes you own as a JSON array of {name, address, inbox_path, sent_path, "
        "total, unread, sent_count, registered}. Mailboxes of other users are not shown "
        "(root sees all).",
        {},
    ),
    ToolSpec(
        "mailbox_create",
        "Create a new mailbox owned by you: the daemon takes the owner from your Linux user, "
        "so there is no owner parameter. Returns the new address. A name that already exists "
        "fails with [MAILBOX]; creating is not idempotent.",
        {"name": _string(
            "Mailbox name, which becomes the local part of the address: lower-case letters, "
            "digits, '.', '_' and '-', no leading or trailing dot and no '..'. The names "
            "'catchall' and 'aimx-catchall' are reserved.")},
        required=("name",), closed=True,
    ),
    ToolSpec(
        "mailbox_delete",
        "Delete a mailbox you own. Without force the daemon refuses a mailbox that still "
        "holds mail ([NONEMPTY]); with force its inbox and sent mail are erased first. The "
        "catchall mailbox cannot be deleted.",
        {"name": _string("Name of the mailbox to delete."),
         "force": _boolean("Also erase all stored mail of the mailbox (cannot be undone). "
                           "Default false.")},
        required=("name",), closed=True,
    ),
    ToolSpec(
        "email_list",
        "List the emails of a mailbox you own, newest first, as a JSON array. Inbox rows are "
        "{id, from, to, subject, date, read}; sent rows are {id, from, to, subject, date, "
        "delivery_status}. The optional filters unread, from, subject and since are applied "
        "before paging: use them instead of paging through everything.",
        {"mailbox": _string("Mailbox name."),
         "folder": _string(_FOLDER),
         "limit": _uint("Page size: default 50, at most 200 (larger values are capped); "
                        "0 returns an empty page."),
         "offset": _uint("Number of (filtered) rows to skip. Default 0."),
         "unread": _boolean("true: only unread emails; false: only read ones. "
                            "Omit to get both."),
         "from": _string("Only emails whose From contains this text (case-insensitive)."),
         "subject": _string("Only emails whose Subject contains this text "
                            "(case-insensitive)."),
         "since": {"type": "string", "format": "date-time",
                   "description": "Only emails received (inbox) or sent (sent folder) at or "
                                  "after this RFC 3339 time, e.g. 2025-06-15T09:00:00Z."}},
        required=("mailbox",),
    ),
    ToolSpec(
        "email_read",
        "Read one email: the whole stored Markdown file, a TOML frontmatter block (headers, "
        "DKIM/SPF/DMARC results, trusted and trust_reason (why it is or is not trusted), "
        "automatic (set for auto-replies, list mail and bounces), read state, attachments) "
        "followed by the body.",
        {"mailbox": _string("Mailbox name."),
         "id": _string(_EMAIL_ID),
         "folder": _string(_FOLDER)},
        required=("mailbox", "id"),
    ),
    ToolSpec(
        "email_mark_read",
        "Mark an inbox email as read. Only inbox mail has a read state.",
        {"mailbox": _string("Mailbox name."), "id": _string(_EMAIL_ID)},
        required=("mailbox", "id"), closed=True,
    ),
    ToolSpec(
        "email_mark_unread",
        "Mark an inbox email as unread. Only inbox mail has a read state.",
        {"mailbox": _string("Mailbox name."), "id": _string(_EMAIL_ID)},
        required=("mailbox", "id"), closed=True,
    ),
    ToolSpec(
        "email_send",
        "Send an email from a mailbox you own; the daemon signs it with DKIM and delivers it "
        "itself. The body is Markdown and goes out as styled HTML plus a plain-text part, so "
        "write normal Markdown. Leave text_only unset for anything but short unformatted "
        "one-liners (codes, confirmations). One recipient per email. To answer a stored "
        "email, email_reply sets the threading headers for you.",
        {"from_mailbox": _string("Name of your mailbox to send from (a name, not an address)."),
         "to": _string("Recipient address (exactly one)."),
         "subject": _string("Subject line."),
         "reply_to": _string(
             "Message-ID of the email being answered. Sets In-Reply-To (it is not a Reply-To "
             "address) and, unless references is given, References, so the reply threads. "
             "Without it no threading headers are sent and references is ignored."),
         "body": _string(_MARKDOWN_BODY),
         "attachments": _strings("Paths of files to attach; you must be able to read them."),
         "references": _string(
             "Full References chain (space-separated Message-IDs). Only used together with "
             "reply_to; ignored without it."),
         "text_only": _boolean(_TEXT_ONLY),
         "html_body": _string(_HTML_BODY),
         "reply_to_address": _string(_REPLY_TO_ADDRESS),
         "message_id": _string(_MESSAGE_ID),
         "idempotency_key": _string(_IDEMPOTENCY_KEY),
         "auto_submitted": _boolean(_AUTO_SUBMITTED)},
        required=("from_mailbox", "to", "subject", "body"),
    ),
    ToolSpec(
        "email_reply",
        "Reply to an email in your inbox with correct threading (In-Reply-To, References). "
        "The reply goes to the original's Reply-To address when it has one, else to its "
        "sender, from your mailbox's address; the subject gets 'Re: ' unless it already has "
        "it. The body is Markdown sent as styled HTML plus plain text: leave text_only unset "
        "for prose.",
        {"mailbox": _string("Mailbox holding the email; the reply is sent from its address."),
         "id": _string("Id of the inbox email to answer (as listed by email_list)."),
         "body": _string(_MARKDOWN_BODY),
         "text_only": _boolean(_TEXT_ONLY),
         "html_body": _string(_HTML_BODY),
         "reply_to_address": _string(_REPLY_TO_ADDRESS),
         "message_id": _string(_MESSAGE_ID),
         "idempotency_key": _string(_IDEMPOTENCY_KEY),
         "auto_submitted": _boolean(_AUTO_SUBMITTED)},
        required=("mailbox", "id", "body"),
    ),
    ToolSpec(
        "hook_create",
        "Attach a hook to a mailbox you own: a command run as your Linux user when mail "
        "arrives (on_receive) or after a send (after_send), with the email on stdin and "
        "AIMX_* environment variables describing it. An on_receive hook fires only for "
        "trusted mail (sender allow-listed by the operator and DKIM aligned) unless "
        "fire_on_untrusted is set; after creating one, tell the user which mail will "
        "trigger it.",
        {"mailbox": _string("Mailbox you own."),
         "event": _string('When the hook fires: "on_receive" or "after_send".'),
         "cmd": _strings(
             "Command as an argv array, run without a shell; cmd[0] must be an absolute "
             'path. Write ["/bin/sh", "-c", "..."] when shell features are needed.'),
         "name": _string(
             "Optional hook name matching [a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127}. When omitted a "
             "stable name is derived from event, cmd and fire_on_untrusted."),
         "timeout_secs": _uint("Seconds before the command is killed. Default 60, "
                               "maximum 600."),
         "fire_on_untrusted": _boolean(
             "Default false. Do NOT set true unless the user explicitly asks for the hook to "
             "run on mail from untrusted senders: then any outside sender, forged From "
             "addresses included, can trigger the command. on_receive only.")},
        required=("mailbox", "event", "cmd"),
    ),
    ToolSpec(
        "hook_list",
        "List the hooks on mailboxes you own as a JSON array of {name, mailbox, event, cmd, "
        "fire_on_untrusted, timeout_secs}.",
        {"mailbox": _string("Only list the hooks of this mailbox.")},
    ),
    ToolSpec(
        "hook_delete",
        "Delete a hook by name (as shown by hook_list). Only hooks on your own mailboxes can "
        "be deleted.",
        {"name": _string("Hook name.")},
        required=("name",),
    ),
)

SPECS_BY_NAME: dict[str, ToolSpec] = {spec.name: spec for spec in TOOL_SPECS}


def _type_ok(schema: Mapping[str, Any], value: Any) -> bool:
    kind = schema.get("type")
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "array":
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return True


_TYPE_WORDS = {"string": "a string", "boolean": "a boolean",
               "integer": "a non-negative integer", "array": "an array of strings"}


def check_arguments(spec: ToolSpec, arguments: Mapping[str, Any] | None) -> dict[str, Any]:
    """The call's arguments, checked against the tool's schema; ``null`` counts as absent.

    Missing or mistyped arguments (and unknown ones on closed tools) are protocol
    errors, as they would be for a typed function signature.
    """
    given = dict(arguments or {})
    if spec.closed:
        unknown = [key for key in given if key not in spec.properties]
        if unknown:
            expected = ", ".join(f"`{key}`" for key in spec.properties)
            raise invalid_params(f"unknown field `{unknown[0]}`, expected one of {expected}")
    checked: dict[str, Any] = {}
    for key, schema in spec.properties.items():
        value = given.get(key)
        if value is None:
            if key in spec.required:
                raise invalid_params(f"missing field `{key}`")
            continue
        if not _type_ok(schema, value):
            raise invalid_params(f"invalid type for `{key}`: expected "
                                 f"{_TYPE_WORDS.get(schema.get('type'), 'a value')}")
        checked[key] = value
    return checked


# --------------------------------------------------------------------------- email listing


@attrs.frozen
class ListFilters:
    """``email_list``'s optional filters; all given ones must match."""

    unread: bool | None = None
    sender: str | None = None  # lower-cased substring of ``from``
    subject: str | None = None  # lower-cased substring of ``subject``
    since: datetime.datetime | None = None

    @property
    def active(self) -> bool:
        return (self.unread is not None or self.sender is not None
                or self.subject is not None or self.since is not None)


def parse_since(text: str) -> datetime.datetime | None:
    """An RFC 3339 instant (a bare date or a time without offset counts as UTC)."""
    value = text.strip()
    if not value:
        return None
    if value[-1] in "zZ":
        value = value[:-1] + "+00:00"
    try:
        instant = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=datetime.UTC)
    return instant


def parse_instant(value: object) -> datetime.datetime | None:
    """A stored timestamp: RFC 3339 (``received_at``, our ``date``) or RFC 2822 (``date``)."""
    if isinstance(value, datetime.datetime):
        instant = value
    elif isinstance(value, datetime.date):
        instant = datetime.datetime(value.year, value.month, value.day)
    elif isinstance(value, str) and value.strip():
        instant = parse_since(value)
        if instant is None:
            try:
                instant = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
    else:
        return None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=datetime.UTC)
    return instant


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return ", ".join(_text(item) for item in value)
    return str(value)


def list_row(email_id: str, summary: Mapping[str, Any], folder: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": email_id,
        "from": _text(summary.get("from")),
        "to": _text(summary.get("to")),
        "subject": _text(summary.get("subject")),
        "date": _text(summary.get("date")),
    }
    if folder == "sent":
        row["delivery_status"] = _text(summary.get("delivery_status"))
    else:
        row["read"] = summary.get("read") is True
    return row


def matches(summary: Mapping[str, Any], folder: str, filters: ListFilters) -> bool:
    if filters.unread is not None and (summary.get("read") is True) == filters.unread:
        return False
    if filters.sender is not None and filters.sender not in _text(summary.get("from")).lower():
        return False
    if filters.subject is not None and \
            filters.subject not in _text(summary.get("subject")).lower():
        return False
    if filters.since is not None:
        stamp = summary.get("received_at") if folder == "inbox" else None
        instant = parse_instant(stamp) if stamp is not None else None
        if instant is None:
            instant = parse_instant(summary.get("date"))
        if instant is None or instant < filters.since:
            return False
    return True


_STEM_TIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})-(\d{2})(\d{2})(\d{2})")
# Ids start with the UTC time the file was stored; the stored timestamps sit within
# seconds of it. A day of slack keeps the shortcut safe for odd clocks.
_STEM_SLACK = datetime.timedelta(days=1)


def stem_time(email_id: str) -> datetime.datetime | None:
    match = _STEM_TIME.match(email_id)
    if match is None:
        return None
    try:
        return datetime.datetime(*(int(part) for part in match.groups()), tzinfo=datetime.UTC)
    except ValueError:
        return None


def _stored_since(since: datetime.datetime) -> Callable[[str], bool]:
    """An id test for the ``since`` filter: drops ids stored well before ``since``
    without opening their files (ids that carry no time are kept for the full check)."""
    floor = since - _STEM_SLACK

    def keep(email_id: str) -> bool:
        stored = stem_time(email_id)
        return stored is None or stored >= floor

    return keep


def list_emails(directory: str | os.PathLike[str], folder: str, *, limit: int, offset: int,
                filters: ListFilters = ListFilters()) -> list[dict[str, Any]]:
    """One ``email_list`` page: rows newest first, filters applied before paging.

    Rows come from the mailbox's listing index (``storage``), which answers as
    a scan of the files would and falls back to one when this process may not
    trust or cannot read the index. Without filters the page is cut first and
    an entry whose file is gone or has no readable frontmatter is then dropped
    (no back-filling). With filters the walk stops as soon as the page is full.
    """
    limit = min(limit, MAX_LIMIT)
    if limit <= 0 or not os.fspath(directory):  # no path: nothing stored yet
        return []
    if not filters.active:
        return [list_row(entry.id, entry.summary, folder)
                for entry in list_page(directory, offset, limit)
                if entry.summary is not None]
    keep = _stored_since(filters.since) if filters.since is not None else None
    rows: list[dict[str, Any]] = []
    skipped = 0
    for entry in iter_listing(directory, keep=keep):
        if entry.summary is None or not matches(entry.summary, folder, filters):
            continue
        if skipped < offset:
            skipped += 1
            continue
        rows.append(list_row(entry.id, entry.summary, folder))
        if len(rows) >= limit:
            break
    return rows


# --------------------------------------------------------------------------- the tools


def check_email_id(email_id: str) -> None:
    if not email_id:
        raise ToolFailure("Email ID cannot be empty.")
    if not naming.check_email_id(email_id):
        raise ToolFailure("Email ID contains invalid characters.")


def check_folder(folder: str | None) -> str:
    chosen = "inbox" if folder is None else folder
    if chosen not in FOLDERS:
        raise ToolFailure(f'Invalid folder \'{chosen}\': expected "inbox" or "sent".')
    return chosen


def check_exclusive(arguments: Mapping[str, Any]) -> None:
    if arguments.get("text_only") is True and arguments.get("html_body") is not None:
        raise ToolFailure(compose.MUTUALLY_EXCLUSIVE)


def is_catchall(row: Mapping[str, Any]) -> bool:
    address = row.get("address")
    return isinstance(address, str) and address.startswith("*")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class AimxTools:
    """The tool bodies. Each is blocking, takes checked arguments and returns the
    success text or raises ``ToolFailure`` with the failure text."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None) -> None:
        self.client = Client(socket_path)
        self.handlers: dict[str, Callable[[dict[str, Any]], str]] = {
            "mailbox_list": self.mailbox_list,
            "mailbox_create": self.mailbox_create,
            "mailbox_delete": self.mailbox_delete,
            "email_list": self.email_list,
            "email_read": self.email_read,
            "email_mark_read": self.email_mark_read,
            "email_mark_unread": self.email_mark_unread,
            "email_send": self.email_send,
            "email_reply": self.email_reply,
            "hook_create": self.hook_create,
            "hook_list": self.hook_list,
            "hook_delete": self.hook_delete,
        }

    # -- the daemon ------------------------------------------------------------

    def call(self, command: type[protocol.ApiCommand], **arguments: Any) -> dict[str, Any]:
        """One socket call, with every failure turned into the agent-facing text."""
        try:
            return self.client.call(command, **arguments)
        except protocol.ApiError as exc:
            raise ToolFailure(f"[{exc.code}] {exc.reason}") from None
        except DaemonDown:
            raise ToolFailure(DAEMON_DOWN) from None
        except (ConnectFailed, MalformedReply) as exc:
            raise ToolFailure(str(exc)) from None

    def mailbox_rows(self) -> list[dict[str, Any]]:
        rows = self.call(protocol.MailboxList)["rows"]
        if not isinstance(rows, list):
            raise ToolFailure("Malformed response from aimx daemon: MAILBOX-LIST rows "
                              "is not a list")
        return [row for row in rows if isinstance(row, dict)]

    def lookup(self, name: str) -> dict[str, Any]:
        """The caller's own mailbox row; unknown and unowned look the same."""
        for row in self.mailbox_rows():
            if row.get("name") == name:
                return row
        raise ToolFailure(f"Mailbox '{name}' does not exist.")

    def send(self, message: bytes, arguments: Mapping[str, Any], to: str) -> str:
        html_body = arguments.get("html_body")
        reply = self.call(
            protocol.Send, body=message,
            text_only=True if arguments.get("text_only") else None,
            html_body=(compose.normalize_crlf(html_body).encode("utf-8")
                       if html_body is not None else None),
            idempotency_key=arguments.get("idempotency_key"),
        )
        return f"Email sent to {to}. Message-ID: {reply['message_id']}"

    # -- mailboxes ---------------------------------------------------------------

    def mailbox_list(self, arguments: dict[str, Any]) -> str:
        return _json(self.mailbox_rows())

    def mailbox_create(self, arguments: dict[str, Any]) -> str:
        name = arguments["name"]
        reply = self.call(protocol.MailboxCreate, name=name)
        address = reply.get("address")
        if not address:
            try:
                address = self.lookup(name).get("address")
            except ToolFailure:
                address = None
        return address if address else f"Mailbox '{name}' created."

    def mailbox_delete(self, arguments: dict[str, Any]) -> str:
        name = arguments["name"]
        force = arguments.get("force") is True
        if force and name == "catchall":
            raise ToolFailure("Cannot delete the catchall mailbox")
        row = self.lookup(name)
        if force and is_catchall(row):
            raise ToolFailure("Cannot delete the catchall mailbox")
        self.call(protocol.MailboxDelete, name=name, force=True if force else None)
        return f"Mailbox '{name}' deleted."

    # -- reading -------------------------------------------------------------------

    def email_list(self, arguments: dict[str, Any]) -> str:
        row = self.lookup(arguments["mailbox"])
        folder = check_folder(arguments.get("folder"))
        since = None
        if "since" in arguments:
            since = parse_since(arguments["since"])
            if since is None:
                raise ToolFailure(f"Invalid since '{arguments['since']}': expected an RFC 3339 "
                                  "timestamp such as 2025-06-15T09:00:00Z.")
        sender = arguments.get("from")
        subject = arguments.get("subject")
        filters = ListFilters(
            unread=arguments.get("unread"),
            sender=sender.lower() if sender is not None else None,
            subject=subject.lower() if subject is not None else None,
            since=since,
        )
        directory = row.get(f"{folder}_path") or ""
        try:
            rows = list_emails(directory, folder,
                               limit=arguments.get("limit", DEFAULT_LIMIT),
                               offset=arguments.get("offset", 0),
                               filters=filters)
        except OSError as exc:
            raise ToolFailure(f"Failed to list emails: {exc}") from None
        return _json(rows)

    def _email_path(self, row: Mapping[str, Any], folder: str, email_id: str,
                    mailbox: str) -> Path:
        directory = row.get(f"{folder}_path") or ""
        path = resolve_email_path(directory, email_id) if directory else None
        if path is None:
            raise ToolFailure(f"Email '{email_id}' not found in mailbox '{mailbox}'.")
        return path

    @staticmethod
    def _read_text(path: Path) -> str:
        try:
            return path.read_bytes().decode("utf-8", "replace")
        except OSError as exc:
            raise ToolFailure(f"Failed to read email: {exc}") from None

    def email_read(self, arguments: dict[str, Any]) -> str:
        mailbox, email_id = arguments["mailbox"], arguments["id"]
        check_email_id(email_id)
        row = self.lookup(mailbox)
        folder = check_folder(arguments.get("folder"))
        return self._read_text(self._email_path(row, folder, email_id, mailbox))

    def _mark(self, arguments: dict[str, Any], command: type[protocol.ApiCommand],
              state: str) -> str:
        mailbox, email_id = arguments["mailbox"], arguments["id"]
        check_email_id(email_id)
        self.lookup(mailbox)
        self.call(command, mailbox=mailbox, id=email_id)
        return f"Email '{email_id}' marked as {state}."

    def email_mark_read(self, arguments: dict[str, Any]) -> str:
        return self._mark(arguments, protocol.MarkRead, "read")

    def email_mark_unread(self, arguments: dict[str, Any]) -> str:
        return self._mark(arguments, protocol.MarkUnread, "unread")

    # -- sending ---------------------------------------------------------------------

    @staticmethod
    def _sender_address(row: Mapping[str, Any], mailbox: str, verb: str) -> str:
        address = row.get("address")
        if not isinstance(address, str) or not address:
            raise ToolFailure(f"Mailbox '{mailbox}' is not registered.")
        if address.startswith("*"):
            raise ToolFailure(f"Cannot {verb} from '{mailbox}': {CATCHALL_REASON}")
        return address

    @staticmethod
    def _send_options(arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The optional headers of email_send and email_reply, for ``compose_message``."""
        key = arguments.get("idempotency_key")
        if key is not None:
            problem = sendoptions.idempotency_key_problem(key)
            if problem is not None:
                raise ToolFailure(f"Invalid idempotency key '{key}': {problem}")
        return {
            "message_id": arguments.get("message_id"),
            "reply_to_address": arguments.get("reply_to_address"),
            "auto_submitted": sendoptions.requested_auto_submitted(
                arguments.get("auto_submitted") is True, os.environ),
        }

    def email_send(self, arguments: dict[str, Any]) -> str:
        check_exclusive(arguments)
        options = self._send_options(arguments)
        mailbox = arguments["from_mailbox"]
        address = self._sender_address(self.lookup(mailbox), mailbox, "send")
        to = arguments["to"]
        try:
            message = compose.compose_message(
                from_addr=address, to=to, subject=arguments["subject"],
                body=arguments["body"], reply_to=arguments.get("reply_to"),
                references=arguments.get("references"),
                attachments=arguments.get("attachments") or (), **options,
            )
        except compose.ComposeError as exc:
            raise ToolFailure(str(exc)) from None
        return self.send(message, arguments, to)

    def email_reply(self, arguments: dict[str, Any]) -> str:
        check_exclusive(arguments)
        options = self._send_options(arguments)
        mailbox, email_id = arguments["mailbox"], arguments["id"]
        check_email_id(email_id)
        row = self.lookup(mailbox)
        text = self._read_text(self._email_path(row, "inbox", email_id, mailbox))
        try:
            original = frontmatter.parse(text)
        except (frontmatter.FrontmatterError, ValueError):
            raise ToolFailure("Failed to parse email frontmatter.") from None
        address = self._sender_address(row, mailbox, "reply")
        to = compose.reply_recipient(original) or _text(original.get("from")).strip()
        subject = compose.reply_subject(_text(original.get("subject")))
        in_reply_to, references = compose.reply_threading(
            _text(original.get("message_id")), _text(original.get("references")))
        try:
            message = compose.compose_message(
                from_addr=address, to=to, subject=subject, body=arguments["body"],
                reply_to=in_reply_to, references=references, **options,
            )
        except compose.ComposeError as exc:
            raise ToolFailure(str(exc)) from None
        return self.send(message, arguments, to)

    # -- hooks -------------------------------------------------------------------------

    def hook_create(self, arguments: dict[str, Any]) -> str:
        mailbox = arguments["mailbox"]
        self.lookup(mailbox)
        if not arguments["cmd"]:
            raise ToolFailure("cmd must not be empty")
        self.call(
            protocol.HookCreate, mailbox=mailbox, event=arguments["event"],
            name=arguments.get("name"), cmd=list(arguments["cmd"]),
            fire_on_untrusted=arguments.get("fire_on_untrusted") is True, type="cmd",
            timeout_secs=arguments.get("timeout_secs"),
        )
        return f"Hook created on mailbox '{mailbox}'."

    def hook_list(self, arguments: dict[str, Any]) -> str:
        mailbox = arguments.get("mailbox")
        if mailbox is not None:
            self.lookup(mailbox)
        rows = self.call(protocol.HookList)["rows"]
        if not isinstance(rows, list):
            raise ToolFailure("Malformed response from aimx daemon: HOOK-LIST rows "
                              "is not a list")
        if mailbox is not None:
            rows = [row for row in rows if isinstance(row, dict) and row.get("mailbox") == mailbox]
        return _json(rows)

    def hook_delete(self, arguments: dict[str, Any]) -> str:
        name = arguments["name"]
        self.call(protocol.HookDelete, name=name)
        return f"Hook '{name}' deleted."


# --------------------------------------------------------------------------- the server


def _text_result(text: str, *, error: bool = False) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)],
                                is_error=error)


def build_server(tools: AimxTools | None = None) -> Server[Any]:
    """The MCP server: the twelve tools of spec 50 §3, and the mailboxes as resources
    (``aimx.mcp.resources``) with subscriptions fed by a daemon WATCH."""
    tools = tools or AimxTools()
    feed = resources.MailFeed(tools.client.watch)
    listing = [spec.as_tool() for spec in TOOL_SPECS]

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listing)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        spec = SPECS_BY_NAME.get(params.name)
        if spec is None:
            raise invalid_params(f"Unknown tool: {params.name}")
        arguments = check_arguments(spec, params.arguments)
        handler = tools.handlers[spec.name]
        try:
            text = await anyio.to_thread.run_sync(handler, arguments)
        except ToolFailure as failure:
            log.info("tool %s failed: %s", spec.name, failure.text)
            return _text_result(failure.text, error=True)
        except Exception as exc:  # noqa: BLE001 (an agent gets an answer, the log the trace)
            log.exception("tool %s crashed", spec.name)
            return _text_result(f"Internal error in {spec.name}: {exc}", error=True)
        return _text_result(text)

    return Server(SERVER_NAME, version=__version__, instructions=INSTRUCTIONS,
                  on_list_tools=list_tools, on_call_tool=call_tool,
                  **resources.build_resource_handlers(tools, feed))


async def serve_stdio(server: Server[Any] | None = None) -> None:
    server = server or build_server()
    # Mailboxes come and go: resources advertise listChanged (subscribe follows the handler).
    options = server.create_initialization_options(NotificationOptions(resources_changed=True))
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, options)


def run_stdio(argv: Sequence[str] | None = None) -> int:
    """``aimx mcp``: serve until the client closes stdin. Logs go to stderr only."""
    setup_logging(sys.stderr)
    logging.getLogger("mcp").setLevel(logging.WARNING)  # the SDK's per-request chatter
    try:
        anyio.run(serve_stdio)
    except KeyboardInterrupt:
        return 130
    return 0
