"""The optional parts of a send an agent may set: idempotency key, Message-ID, Reply-To
address and the Auto-Submitted marker.

Clients (``aimx send``, the MCP tools) check them before they compose, and the
daemon checks the composed headers again, because it trusts no client. Each
check returns why a value is refused, or ``None``, so every surface words its
own error around the same reason. Pure: nothing is looked up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from aimx.mail.addressing import mailbox_problem

IDEMPOTENCY_KEY_MAX = 128
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*\Z")

MESSAGE_ID_MAX = 250  # with brackets; well inside one 998-octet header line
#: An explicit id's left part has at least this many characters: short ids such
#: as ``<1@domain>`` collide with the next agent that picks them.
MESSAGE_ID_MIN_LEFT = 8
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")

#: RFC 3834 §5 values aimx writes or accepts; "no" means a person sent it.
AUTO_NO = "no"
AUTO_GENERATED = "auto-generated"
AUTO_REPLIED = "auto-replied"
AUTO_SUBMITTED_VALUES = (AUTO_NO, AUTO_GENERATED, AUTO_REPLIED, "auto-notified")

#: Set in the environment of every hook run: a client that sees it marks its mail
#: ``Auto-Submitted: auto-replied`` (the daemon also finds hook runs by itself).
HOOK_EVENT_ENV = "AIMX_EVENT"


def idempotency_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an idempotency key, or ``None``."""
    if not key:
        return "it is empty"
    if len(key) > IDEMPOTENCY_KEY_MAX:
        return f"it is longer than {IDEMPOTENCY_KEY_MAX} characters"
    if _IDEMPOTENCY_KEY.match(key) is None:
        return ("use letters, digits and . _ : - only, starting with a letter or digit "
                "(a UUID works)")
    return None


def _in_domain(host: str, domain: str) -> bool:
    host, domain = host.lower().rstrip("."), domain.lower().rstrip(".")
    return host == domain or host.endswith("." + domain)


def message_id_problem(value: str, domain: str, *, explicit: bool = False) -> str | None:
    """Why ``value`` (``<left@right>``, brackets optional) cannot be our Message-ID.

    The right part must be ``domain`` or one of its subdomains: aimx signs the
    message with that domain's key, so an id under another domain would claim
    mail of someone else. ``explicit`` (an id the agent chose) also asks for a
    left part long enough to be unique.
    """
    if "\r" in value or "\n" in value:
        return "it contains a line break"
    text = value.strip()
    if len(text) > MESSAGE_ID_MAX:
        return f"it is longer than {MESSAGE_ID_MAX} characters"
    if text.startswith("<") != text.endswith(">") or (text.startswith("<") and len(text) < 2):
        return "its angle brackets do not match"
    bare = text[1:-1] if text.startswith("<") else text
    if bare.count("@") != 1:
        return "it needs the form <unique-part@domain> with exactly one @"
    left, right = bare.split("@")
    if not left or _DOT_ATOM.match(left) is None:
        return "the part before the @ may only hold letters, digits, dots and !#$%&'*+/=?^_`{|}~-"
    if not right or _DOT_ATOM.match(right) is None:
        return "the part after the @ must be a domain name"
    if not _in_domain(right, domain):
        return f"it must end in this server's domain ({domain}), not {right}"
    if explicit and len(left) < MESSAGE_ID_MIN_LEFT:
        return (f"the part before the @ is shorter than {MESSAGE_ID_MIN_LEFT} characters; "
                "use something unique, such as a UUID")
    return None


def bracketed(message_id: str) -> str:
    """A checked Message-ID as it goes in the header: ``<left@right>``."""
    text = message_id.strip()
    return text if text.startswith("<") else f"<{text}>"


def reply_to_address_problem(address: str) -> str | None:
    """Why ``address`` cannot be the Reply-To address, or ``None``: one bare mailbox."""
    if "\r" in address or "\n" in address:
        return "it contains a line break"
    text = address.strip()
    if any(char in text for char in ",;<>\"()") or any(char.isspace() for char in text):
        return "give exactly one bare address, like desk@example.com"
    return mailbox_problem(text)


def auto_submitted_problem(value: str) -> str | None:
    """Why ``value`` is not an Auto-Submitted value aimx sends, or ``None``."""
    keyword = value.split(";", 1)[0].strip().lower()
    if keyword not in AUTO_SUBMITTED_VALUES:
        return f"expected one of {', '.join(AUTO_SUBMITTED_VALUES)}"
    return None


def requested_auto_submitted(auto: bool, environ: Mapping[str, str]) -> str | None:
    """The Auto-Submitted value a client asks for: ``auto-generated`` when the agent
    says so, else ``auto-replied`` inside a hook run (``AIMX_EVENT`` set), else none."""
    if auto:
        return AUTO_GENERATED
    if environ.get(HOOK_EVENT_ENV):
        return AUTO_REPLIED
    return None
