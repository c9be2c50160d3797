"""``aimx watch <mailbox>``: one line per new email as it is stored, until interrupted.

The daemon pushes each event over one WATCH connection (no polling), and the
event carries what the line shows, so nothing else is read. Every line is
flushed at once, so a pipe sees each email when it arrives.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from aimx.cli.main import CommandError, describe

DAEMON_DOWN = "aimx daemon not running. Check 'systemctl status aimx'"


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "watch", parents=parents, help="print a line for each new email in a mailbox",
        description=describe("watch"))
    parser.add_argument("mailbox", help="a mailbox you own (root: any)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per line: event, mailbox, folder, id, from, "
                             "subject, at")
    parser.add_argument("--folder", choices=("inbox", "sent", "all"), default="inbox",
                        help="which new emails to show: received (inbox, the default), "
                             "sent copies, or both")
    return parser


def printable(text: str) -> str:
    """Sender-controlled text made safe for a terminal: no escape or other control characters."""
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in text)


def human_line(event: dict[str, Any]) -> str:
    """``<time>  <id>  <from>  <subject>`` (time to the second, UTC; sent copies marked)."""
    at = event.get("at") or ""
    when = at[:19] + "Z" if len(at) >= 19 else at
    parts = [when, event.get("id") or "", event.get("from") or "", event.get("subject") or ""]
    if event.get("folder") == "sent":
        parts.insert(1, "sent")
    return printable("  ".join(parts).rstrip())


def json_line(event: dict[str, Any]) -> str:
    return json.dumps({key: event.get(key) for key in
                       ("event", "mailbox", "folder", "id", "from", "subject", "at")},
                      ensure_ascii=False, separators=(",", ":"))


def shown(event: dict[str, Any], folder: str) -> bool:
    return event.get("event") == "stored" and folder in ("all", event.get("folder"))


def run(args: argparse.Namespace) -> int:
    from aimx.daemon.client import Client, ConnectFailed, DaemonDown, MalformedReply, WatchEnded
    from aimx.daemon.protocol import ApiError

    try:
        stream = Client().watch([args.mailbox])
    except DaemonDown:
        raise CommandError(DAEMON_DOWN, 2) from None
    except ConnectFailed as exc:
        raise CommandError(str(exc), 2) from None
    except MalformedReply as exc:
        raise CommandError(f"malformed response from aimx daemon: {exc.why}", 3) from None
    except ApiError as exc:
        raise CommandError(str(exc)) from None

    print(f"Watching mailbox '{args.mailbox}' for new email; Ctrl-C stops.", file=sys.stderr,
          flush=True)
    render = json_line if args.json else human_line
    try:
        for event in stream:
            if event.get("event") == "deleted" and event.get("mailbox") == args.mailbox:
                raise CommandError(f"mailbox '{args.mailbox}' was deleted")
            if shown(event, args.folder):
                sys.stdout.write(render(event) + "\n")
                sys.stdout.flush()
    except WatchEnded as exc:
        raise CommandError(f"the daemon ended the watch ({exc}); restart it to go on "
                           "watching, and list the mailbox for anything missed") from None
    except BrokenPipeError:
        return 0  # the reader went away (``| head -1``): nothing left to do
    finally:
        stream.close()
    return 0
