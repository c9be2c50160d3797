"""``aimx ingest <rcpt>`` (hidden): store a raw message from stdin as if SMTP delivered it.

Used by tests and by operators piping mail in from elsewhere. A message past
256 KiB is read into a root-only spool file, as SMTP does. There is no
SMTP peer and no envelope sender, routing uses the local part only (no
domain check), and ``on_receive`` hooks run before the command returns.
It takes the same per-mailbox locks as the daemon, so both can run at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from aimx import paths
from aimx.cli.main import CommandError, describe
from aimx.logs import setup_logging


def add_parser(subparsers, parents):  # noqa: ANN001, ANN201
    # No ``help=``: argparse then leaves the command out of every listing
    # (``help=argparse.SUPPRESS`` would print "==SUPPRESS==" on Python 3.11).
    parser = subparsers.add_parser(
        "ingest",
        parents=parents,
        description=describe("ingest"),
    )
    parser.add_argument("rcpt", help="recipient address, used verbatim as delivered_to")
    return parser


def run(args: argparse.Namespace) -> int:
    # Imported here so building the parser (every aimx command) stays cheap.
    from aimx import config as aimx_config
    from aimx.smtp import ingest
    from aimx.storage.mailstore import MailStore
    from aimx.storage.spool import Spool, read_message

    # Warnings (e.g. an owner that does not resolve) go to stderr; stdout stays clean.
    setup_logging(sys.stderr, level=logging.WARNING)
    try:
        config = aimx_config.load_config(
            data_dir_override=paths.data_dir_override(getattr(args, "data_dir", None))
        )
    except aimx_config.ConfigError as exc:
        raise CommandError(str(exc)) from exc
    store = MailStore(config.data_dir)
    spool = Spool(config.data_dir)
    try:
        # A large message streams to a root-only spool file and is analysed from there.
        raw = read_message(sys.stdin.buffer, spool.new_file)
        _, stored, failures = ingest.ingest_message(
            config, store, raw, peer_ip=None, mail_from=None, helo=None, rcpts=[args.rcpt],
            new_file=spool.new_file)
    finally:
        spool.close()
    if failures:
        raise CommandError(failures[0][1])
    result = stored[0]
    if result.status == "stored":
        # CLI ingest waits for its on_receive hooks (spec 20 §4.1); a hook's
        # failure is logged and never changes the exit status.
        from aimx.daemon import hooks
        from aimx.daemon.hookjournal import hook_state_dir

        hooks.run_on_receive_blocking(
            config, result.mailbox, result, state_dir=hook_state_dir(config.data_dir)
        )
    return 0
