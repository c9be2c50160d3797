"""The loop guard: what marks inbound mail as automatic, and the cap on hook firings.

Two agents whose ``on_receive`` hooks answer each other would mail each other
forever. Two things stop that. Mail that says it was sent by a program
(``Auto-Submitted`` other than ``no``, RFC 3834), mailing-list and bulk mail
(``Precedence``, ``List-Id``) and bounces (null reverse-path) do not wake a
hook unless the hook opts in. And whatever those headers miss, a per-mailbox,
per-sender cap on hook firings bounds. Pure logic: no Twisted, no I/O.
"""

from __future__ import annotations

import collections

import attrs

# Why a message counts as automatic (the stored ``automatic`` value), in check order.
AUTO_SUBMITTED = "auto_submitted"  # Auto-Submitted other than `no`
PRECEDENCE = "precedence"  # Precedence: bulk, junk or list
LIST_ID = "list_id"  # a List-Id header
NULL_SENDER = "null_sender"  # MAIL FROM:<> (a bounce or other notification)
AUTOMATIC_REASONS = (AUTO_SUBMITTED, PRECEDENCE, LIST_ID, NULL_SENDER)

_AUTOMATIC_PRECEDENCE = frozenset({"bulk", "junk", "list"})


def _keyword(value: str | None) -> str:
    """A header's leading keyword, lower-cased: parameters and comments dropped."""
    if not value:
        return ""
    head = value.split(";", 1)[0].split("(", 1)[0]
    return head.strip().lower()


def automatic_reason(*, auto_submitted: str | None, precedence: str | None,
                     list_id: str | None, mail_from: str | None) -> str | None:
    """Why a message counts as automatic, or None when it does not.

    ``mail_from`` is the envelope sender as received: ``""`` for ``MAIL FROM:<>``,
    None when there was no SMTP envelope (``aimx ingest``).
    """
    keyword = _keyword(auto_submitted)
    if keyword and keyword != "no":
        return AUTO_SUBMITTED
    if _keyword(precedence) in _AUTOMATIC_PRECEDENCE:
        return PRECEDENCE
    if list_id and list_id.strip():
        return LIST_ID
    if mail_from == "":
        return NULL_SENDER
    return None


@attrs.define
class FiringCap:
    """How many times hooks fired per key within a sliding window, in memory.

    The daemon keys it by (mailbox, sender); a restart forgets every count.
    """

    _fired: dict[tuple[str, str], collections.deque[float]] = attrs.field(factory=dict)
    sweep_above: int = 10_000  # keys kept before stale ones are swept out

    def admit(self, key: tuple[str, str], limit: int, window_secs: float, now: float) -> bool:
        """Record one firing for ``key`` and return True, or False when ``limit`` firings
        already happened within the last ``window_secs``. ``limit`` 0 means no cap."""
        if limit <= 0:
            return True
        times = self._fired.setdefault(key, collections.deque())
        _expire(times, now - window_secs)
        if len(times) >= limit:
            return False
        times.append(now)
        if len(self._fired) > self.sweep_above:
            self._sweep(now - window_secs)
        return True

    def _sweep(self, cutoff: float) -> None:
        for key in list(self._fired):
            times = self._fired[key]
            _expire(times, cutoff)
            if not times:
                del self._fired[key]


def _expire(times: collections.deque[float], cutoff: float) -> None:
    while times and times[0] <= cutoff:
        times.popleft()


__all__ = ["AUTOMATIC_REASONS", "FiringCap", "automatic_reason"]
