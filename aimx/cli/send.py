"""``aimx send``: compose a message as the calling user and submit it over SEND.

The command never reads the config or the DKIM key: it builds an unsigned
message (attachments read with the caller's own permissions) and the daemon
decides, from the kernel-reported uid, whether this user may send as
``--from``. Outputs and exit codes follow spec 30 §2.13 exactly because
scripts and agents branch on them.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Any

from aimx.cli.main import CommandError, describe

ROOT_REFUSAL = "send is a per-user operation, run without sudo"
ROOT_LOGIN_HINT = ("hint: you are logged in as root; run aimx send as the user who owns the "
                   "mailbox you send from (root cannot own one)")
DAEMON_DOWN = "aimx daemon not running. Check 'systemctl status aimx'"
# The codes a SEND can answer with; any other code means the reply is not understood.
SEND_CODES = frozenset({"MALFORMED", "PROTOCOL", "DOMAIN", "MAILBOX", "EACCES",
                        "BODY_TOO_LARGE", "SIGN", "TEMP", "DELIVERY", "ECONFLICT"})


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "send", parents=parents, help="send an email from one of your mailboxes",
        description=describe("send"))
    parser.add_argument("--from", dest="from_addr", required=True, metavar="ADDRESS",
                        help="sender address: a mailbox you own")
    parser.add_argument("--to", required=True, metavar="ADDRESS", help="recipient address")
    parser.add_argument("--subject", required=True)
    parser.add_argument("--body", required=True, help="message body (Markdown)")
    parser.add_argument("--reply-to", metavar="MESSAGE_ID",
                        help="Message-ID being answered (sets In-Reply-To)")
    parser.add_argument("--references", metavar="CHAIN",
                        help="References chain (used with --reply-to)")
    parser.add_argument("--attachment", action="append", default=[], metavar="PATH",
                        help="attach a file (repeatable)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--text-only", action="store_true",
                      help="send the body as plain text, no HTML part")
    kind.add_argument("--html-body", metavar="HTML",
                      help="use this HTML as the HTML part instead of rendering the body")
    parser.add_argument("--reply-to-address", metavar="ADDRESS",
                        help="Reply-To header: where answers should go (one address)")
    parser.add_argument("--message-id", metavar="ID",
                        help="use this Message-ID (<unique@your-domain>) instead of a "
                             "generated one")
    parser.add_argument("--idempotency-key", metavar="KEY",
                        help="send at most once per key: a retry with the same key within 24 "
                             "hours returns the first result and sends nothing (letters, "
                             "digits, . _ : -, at most 128)")
    parser.add_argument("--auto", action="store_true",
                        help="mark the mail as automatic (Auto-Submitted: auto-generated); "
                             "inside a hook run mail is marked auto-replied without it")
    return parser


def run(args: argparse.Namespace) -> int:
    if os.geteuid() == 0:
        if not os.environ.get("SUDO_USER"):  # "without sudo" alone would puzzle a root login
            raise CommandError(f"{ROOT_REFUSAL}\n{ROOT_LOGIN_HINT}", 2)
        raise CommandError(ROOT_REFUSAL, 2)

    from aimx.daemon.client import Client, ConnectFailed, DaemonDown, MalformedReply
    from aimx.daemon.protocol import ApiError, Send
    from aimx.mail import compose, sendoptions

    key = args.idempotency_key
    if key is not None:
        problem = sendoptions.idempotency_key_problem(key)
        if problem is not None:
            raise CommandError(f"Invalid idempotency key '{key}': {problem}", 1)
    try:
        message = compose.compose_message(
            from_addr=args.from_addr, to=args.to, subject=args.subject, body=args.body,
            reply_to=args.reply_to, references=args.references, attachments=args.attachment,
            message_id=args.message_id, reply_to_address=args.reply_to_address,
            auto_submitted=sendoptions.requested_auto_submitted(args.auto, os.environ))
    except compose.ComposeError as exc:
        raise CommandError(str(exc), 1) from None

    client = Client()
    html = compose.normalize_crlf(args.html_body) if args.html_body is not None else None
    try:
        reply = client.call(Send, body=message, text_only=True if args.text_only else None,
                            html_body=html.encode("utf-8") if html is not None else None,
                            idempotency_key=key)
    except DaemonDown as exc:
        # For send only a missing socket means "not running"; refused or denied is
        # a connect failure worth showing as it is.
        if exc.errno == errno.ENOENT:
            raise CommandError(DAEMON_DOWN, 2) from None
        raise CommandError(f"Failed to connect to aimx daemon at {exc.socket_path}: "
                           f"{exc.error}", 2) from None
    except ConnectFailed as exc:
        raise CommandError(str(exc), 2) from None
    except MalformedReply as exc:
        raise CommandError(f"malformed response from aimx daemon: {exc.why}", 3) from None
    except ApiError as exc:
        if exc.code not in SEND_CODES:
            raise CommandError(f"malformed response from aimx daemon: unknown error code "
                               f"'{exc.code}'", 3) from None
        if exc.code == "EACCES":
            raise CommandError(f"not authorized: {args.from_addr}", 1) from None
        raise CommandError(str(exc), 1) from None

    message_id = reply.get("message_id", "")
    print(message_id)
    sys.stdout.flush()
    print("Email sent.", file=sys.stderr)
    print(f"Message-ID: {message_id}", file=sys.stderr)
    return 0
