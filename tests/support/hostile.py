"""A mailbox owner turned attacker: swaps paths in its own mailbox under a root daemon.

Run through ``tests.support.users.python_as_command`` with ``PREPARE`` and ``RUN``:
the module imports everything it needs while still root (the interpreter's tree
may be root-only), the launcher drops to the user, then one action runs and
prints its result as JSON. Watching actions run until their stdin reaches end of
file.

Actions:

``swap_staging``  whenever a staging dir (``.<stem>.tmp.<hex>``) appears in the
    mailbox dir, move it aside and put a symlink to ``target`` under its name
    (prints a ``ready`` line once it watches).
``swap_bundle_on_read``  for ``rounds`` rounds, ask the daemon to flip the read
    state of a bundled email, and the moment the daemon opens its ``.md`` swap the
    bundle dir for a symlink to ``target``; the layout is restored after each round,
    and each round reports the call's outcome and the read state the file then has.
``sparse_email``  write an email file of ``size`` bytes (a frontmatter, then a hole).
``call``  one socket API call.
``cli``  one ``aimx`` command.
"""

from __future__ import annotations

import base64  # noqa: F401 (imported while still root: ``aimx send`` needs them later)
import email.header  # noqa: F401
import email.utils  # noqa: F401
import json
import mimetypes
import os
import re
import threading
import uuid  # noqa: F401
from pathlib import Path
from typing import Any

import aimx.cli.main
import aimx.mail.compose  # noqa: F401
from aimx.daemon import protocol
from aimx.daemon.client import Client
from tests.support.inotify import IN_CREATE, IN_ISDIR, IN_OPEN, Inotify

STAGING = re.compile(r"^\..+\.tmp\.[0-9a-f]+$")


def _stdin_closed() -> bool:
    return os.read(0, 1) == b""


def swap_staging(mailbox_dir: str, target: str) -> dict[str, Any]:
    swaps = failures = 0
    with Inotify() as inotify:
        inotify.watch(mailbox_dir, IN_CREATE)
        print(json.dumps({"ready": True}), flush=True)
        stop = threading.Event()
        threading.Thread(target=lambda: (_stdin_closed(), stop.set()), daemon=True).start()
        while not stop.is_set():
            for event in inotify.events(0.2):
                if not (event.mask & IN_ISDIR and STAGING.match(event.name)):
                    continue
                path = os.path.join(mailbox_dir, event.name)
                try:
                    os.rename(path, os.path.join(mailbox_dir, f".held-{swaps}-{failures}"))
                    os.symlink(target, path)
                    swaps += 1
                except OSError:
                    failures += 1
    return {"swaps": swaps, "failures": failures}


def swap_bundle_on_read(socket: str, mailbox: str, mailbox_dir: str, email_id: str,
                        target: str, rounds: int, pad: int) -> dict[str, Any]:
    bundle = os.path.join(mailbox_dir, email_id)
    held = os.path.join(mailbox_dir, f".held-{email_id}")
    md = os.path.join(bundle, f"{email_id}.md")
    if pad:  # a big body makes the daemon's read, and so the window, longer
        with open(md, "ab") as handle:
            handle.write(b"\n" + b"padding line of the body\n" * (pad // 25))
    client = Client(socket, timeout=60)
    swaps = 0
    results: list[str] = []
    with Inotify() as inotify:
        inotify.watch(bundle, IN_OPEN)
        for index in range(rounds):
            done = threading.Event()
            swapped = threading.Event()
            watcher = threading.Thread(target=_swap_on_open, args=(
                inotify, f"{email_id}.md", bundle, held, target, done, swapped))
            watcher.start()
            verb = protocol.MarkRead if index % 2 == 0 else protocol.MarkUnread
            try:
                client.call(verb, mailbox=mailbox, id=email_id)
                outcome = "ok"
            except protocol.ApiError as exc:
                outcome = exc.code
            done.set()
            watcher.join()
            if swapped.is_set():
                swaps += 1
                os.unlink(bundle)
                os.rename(held, bundle)
            with open(md, "rb") as handle:
                state = "read" if b"\nread = true\n" in handle.read(4096) else "unread"
            results.append(f"{outcome} {state}")
            list(inotify.events(0))  # drop what the restore, this read and the daemon queued
    return {"swaps": swaps, "results": results}


def _swap_on_open(inotify: Inotify, name: str, bundle: str, held: str, target: str,
                  done: threading.Event, swapped: threading.Event) -> None:
    """Swap ``bundle`` for a symlink to ``target`` as soon as ``name`` in it is opened."""
    while not done.is_set():
        for event in inotify.events(0.05):
            if event.name == name:
                os.rename(bundle, held)
                os.symlink(target, bundle)
                swapped.set()
                return


def sparse_email(path: str, size: int, head: str) -> dict[str, Any]:
    with open(path, "wb") as handle:
        handle.write(head.encode())
        handle.truncate(size)
    return {"size": os.stat(path).st_size}


def call(socket: str, verb: str, args: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"ok": Client(socket, timeout=60).call(protocol.COMMANDS[verb.encode()], **args)}
    except protocol.ApiError as exc:
        return {"error": [exc.code, exc.reason]}


def cli(argv: list[str]) -> dict[str, Any]:
    return {"exit": aimx.cli.main.main(argv)}


ACTIONS = {"swap_staging": swap_staging, "swap_bundle_on_read": swap_bundle_on_read,
           "sparse_email": sparse_email, "call": call, "cli": cli}


def prepare() -> None:
    """Load every module a command may need, while still root."""
    aimx.cli.main.import_all_commands()
    mimetypes.init()


def run(spec: dict[str, Any]) -> None:
    os.chdir(Path(spec.get("cwd") or "/"))
    result = ACTIONS[spec["action"]](**spec["args"])
    print(json.dumps(result), flush=True)


PREPARE = "import tests.support.hostile\ntests.support.hostile.prepare()"
RUN = "import tests.support.hostile\ntests.support.hostile.run(spec)"
