"""One log line shape for every part of aimx.

Lines look like ``2026-01-01T12:00:00.123Z INFO aimx::smtp: message ...`` and
go to stdout, so journald (or any supervisor) captures them unchanged.
Targets (``aimx::smtp``, ``aimx::hook``, ``aimx::uds``, ``aimx::config``) are
stdlib logger names, which keeps the lines greppable by target.
"""

from __future__ import annotations

import datetime
import logging
import sys
from typing import TextIO


class _Rfc3339Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        when = stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"
        level = "WARN" if record.levelno == logging.WARNING else record.levelname
        line = f"{when} {level} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def logger(target: str) -> logging.Logger:
    """The logger for a target such as ``aimx::smtp``."""
    return logging.getLogger(target)


def setup_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send every aimx target to ``stream`` (stdout by default), one line per record."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_Rfc3339Formatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def kv(value: object) -> str:
    """Render a log field value: bare when simple, JSON-quoted otherwise."""
    import json

    text = str(value)
    if text and all(c.isalnum() or c in "@._-:/+<>" for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)
