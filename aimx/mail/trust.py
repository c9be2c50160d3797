"""The trust gate: may this inbound message wake the mailbox's hooks? (spec 20 §10, D8, D9)

``trusted = "true"`` needs two things: the sender matches the effective
``trusted_senders`` allow-list, and a DKIM signature that verified was made
by the From domain's own organisation (relaxed alignment). The second part
is what stops a valid signature from some unrelated domain vouching for a
forged ``From: boss@company.com``. Mail routed to the catchall is never
trusted: no agent asked for it, and the catchall runs no hooks.

Every verdict carries the reason for it (one of :data:`REASONS`), so an
agent reading the file can tell why a message did not wake its hooks.
Pure logic: no DNS, no Twisted.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

import attrs

from aimx.logs import kv, logger
from aimx.mail.authresults import AuthResults, aligned

log = logger("aimx::trust")

# Why a message got its ``trusted`` value, in the order the gate checks them.
POLICY_NONE = "policy_none"  # the mailbox's trust policy is `none`: nothing evaluated
CATCHALL = "catchall"  # routed to the catchall, which is never trusted
SENDER_NOT_ALLOWED = "sender_not_allowed"  # From matches no trusted_senders pattern
NO_DKIM = "no_dkim"  # the message carries no DKIM signature
DKIM_FAILED = "dkim_failed"  # signatures present, none verified
DKIM_NOT_ALIGNED = "dkim_not_aligned"  # a signature verified, but for another organisation
TRUSTED = "trusted"
REASONS = (POLICY_NONE, CATCHALL, SENDER_NOT_ALLOWED, NO_DKIM, DKIM_FAILED, DKIM_NOT_ALIGNED,
           TRUSTED)


@attrs.frozen
class Verdict:
    """The gate's answer: the stored ``trusted`` value and the reason for it."""

    trusted: str  # "none" | "true" | "false"
    reason: str  # one of REASONS


def sender_address(from_field: str) -> str:
    """The stored ``from`` cut to the text between its last ``<`` and the next
    ``>`` (the whole value when there is none), lower-cased."""
    start = from_field.rfind("<")
    if start >= 0:
        end = from_field.find(">", start + 1)
        inner = from_field[start + 1:end] if end >= 0 else from_field[start + 1:]
        return inner.strip().lower()
    return from_field.strip().lower()


@functools.lru_cache(maxsize=512)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a whole-string glob: ``*`` (never across ``/``), ``?``, ``[abc]``,
    ``[a-z]``, ``[!a]``, ``{a,b}``; ``\\`` escapes the next character.
    Unclosed ``[`` or ``{`` are taken literally."""
    out: list[str] = []
    depth = 0  # inside {…}: a comma separates alternatives
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            close = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "^") else i + 1)
            if close < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:close]
                negate = body[:1] in ("!", "^")
                if negate:
                    body = body[1:]
                body = body.replace("\\", "\\\\").replace("^", "\\^")
                out.append(f"[{'^' if negate else ''}{body}]")
                i = close + 1
                continue
        elif c == "{" and "}" in pattern[i + 1:]:
            depth += 1
            out.append("(?:")
        elif c == "}" and depth:
            depth -= 1
            out.append(")")
        elif c == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(c))
        i += 1
    out.extend(")" * depth)
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error:
        return re.compile(re.escape(pattern))  # a malformed class: match it literally


def matches_any(sender: str, patterns: Iterable[str]) -> bool:
    """Whether ``sender`` (already lower-cased) matches one of ``patterns``
    as a whole string; patterns are lower-cased too (D9)."""
    return any(_glob_regex(p.lower()).fullmatch(sender) for p in patterns)


def _domain_of(address: str) -> str:
    _, at, domain = address.rpartition("@")
    return domain.rstrip(".").lower() if at else ""


def _reason(config: Any, mailbox: Any, sender: str, auth: AuthResults) -> str:
    """The first check a ``verified`` mailbox's message fails, or ``trusted``."""
    if mailbox.is_catchall(config.domain):
        return CATCHALL
    if not sender or not matches_any(sender, config.effective_senders(mailbox)):
        return SENDER_NOT_ALLOWED
    if auth.dkim == "none":
        return NO_DKIM
    if auth.dkim != "pass":
        return DKIM_FAILED
    if not any(aligned(d, _domain_of(sender)) for d in auth.dkim_domains):
        return DKIM_NOT_ALIGNED
    return TRUSTED


def evaluate(config: Any, mailbox: Any, parsed: Any, auth: AuthResults) -> Verdict:
    """The verdict for one message delivered to ``mailbox``."""
    policy = config.effective_trust(mailbox)
    if policy != "verified":
        # `none` is the only other policy the config accepts; anything else is "false".
        verdict = Verdict("none" if policy == "none" else "false", POLICY_NONE)
        log.debug("mailbox=%s policy=%s result=%s reason=%s", kv(mailbox.name), kv(policy),
                  verdict.trusted, verdict.reason)
        return verdict
    sender = sender_address(parsed.from_ or "")
    reason = _reason(config, mailbox, sender, auth)
    verdict = Verdict("true" if reason == TRUSTED else "false", reason)
    match = reason not in (CATCHALL, SENDER_NOT_ALLOWED)
    log.info("mailbox=%s policy=%s sender=%s dkim=%s match=%s aligned=%s result=%s reason=%s",
             kv(mailbox.name), kv(policy), kv(sender or "-"), auth.dkim,
             str(match).lower(), str(reason == TRUSTED).lower(), verdict.trusted, reason)
    return verdict


__all__ = ["REASONS", "Verdict", "evaluate", "matches_any", "sender_address"]
