"""One log line shape for every part of aimx.

Lines look like ``2026-01-01T12:00:00.123Z INFO aimx::smtp: message ...`` and
go to stdout, so journald (or any supervisor) captures them unchanged.
Targets (``aimx::smtp``, ``aimx::hook``, ``aimx::uds``, ``aimx::config``) are
stdlib logger names, which keeps the lines greppable by target.
"""

from __future__ import annotations

import datetime
import logging
import re
import sys
from typing import TextIO

# A value kv() writes bare: letters and digits (str.isalnum; \w adds only "_", which is
# allowed anyway) and a few punctuation marks.
_BARE_VALUE = re.compile(r"[\w@.\-:/+<>]+")


class _Rfc3339Formatter(logging.Formatter):
    """``<RFC 3339 UTC time, ms> <LEVEL> <target>: <message>``.

    The seconds part of the time is formatted once per second and reused: a busy
    daemon logs several lines per message and strftime was a visible share of each.
    """

    _second: datetime.datetime | None = None
    _second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        second = stamp.replace(microsecond=0)
        if second != self._second:
            self._second_text = second.strftime("%Y-%m-%dT%H:%M:%S.")
            self._second = second
        when = f"{self._second_text}{stamp.microsecond // 1000:03d}Z"
        level = "WARN" if record.levelno == logging.WARNING else record.levelname
        line = f"{when} {level} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _no_caller(stack_info: bool = False,
               stacklevel: int = 1) -> tuple[str, int, str, str | None]:
    return "(unknown file)", 0, "(unknown function)", None


def logger(target: str) -> logging.Logger:
    """The logger for a target such as ``aimx::smtp``.

    Its records never say where in the code they were made: the line shape has
    no file, line or function, and finding them walks the caller's frames for
    every record, a visible cost at several lines per message.
    """
    target_logger = logging.getLogger(target)
    target_logger.findCaller = _no_caller  # type: ignore[method-assign]
    return target_logger


def setup_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send every aimx target to ``stream`` (stdout by default), one line per record."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_Rfc3339Formatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Nor does it show threads or processes: records need not look them up.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def kv(value: object) -> str:
    """Render a log field value: bare when simple, JSON-quoted otherwise."""
    text = str(value)
    if _BARE_VALUE.fullmatch(text):
        return text
    import json  # here: the CLI imports this module and rarely needs json

    return json.dumps(text, ensure_ascii=False)
