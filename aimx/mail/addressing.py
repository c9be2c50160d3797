"""Syntax of mailboxes and host names: what aimx sends to and what it accepts as its domain.

A recipient is an RFC 5321 mailbox: a dot-string or quoted-string local part
(UTF-8 allowed, RFC 6531), ``@``, and a domain of LDH labels; non-ASCII labels
must be valid IDNA 2008. Address literals (``user@[192.0.2.1]``) are refused:
delivery goes through the domain's MX. Each check returns the reason a value is
invalid, or ``None``, so callers word the error for their own surface and name
the value in it. Pure: no DNS, nothing is looked up.
"""

from __future__ import annotations

import re

import idna

LOCAL_PART_MAX = 64  # octets, RFC 5321 §4.5.3.1.1
DOMAIN_MAX = 253  # characters of the ASCII form, without a trailing dot
LABEL_MAX = 63
ADDRESS_MAX = 254  # octets: the 256-octet path minus its angle brackets

_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   "!#$%&'*+-/=?^_`{|}~")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")


def _shown(char: str) -> str:
    if char == " ":
        return "a space"
    return repr(char) if char.isprintable() and not char.isspace() else f"U+{ord(char):04X}"


def _label_problem(label: str) -> str | None:
    if not label:
        return "a host name cannot have an empty label (a dot at either end or two in a row)"
    if not label.isascii():
        try:
            label = idna.alabel(label.lower()).decode("ascii")
        except idna.IDNAError as err:
            return f"label '{label}' is not valid IDNA ({err})"
    elif label.lower().startswith("xn--"):
        try:
            idna.ulabel(label.lower())
        except idna.IDNAError as err:
            return f"label '{label}' is not valid IDNA ({err})"
    if len(label) > LABEL_MAX:
        return f"label '{label[:20]}…' is longer than {LABEL_MAX} characters"
    if _LDH_LABEL.match(label) is None:
        bad = next((c for c in label if not (c.isascii() and (c.isalnum() or c == "-"))), None)
        if bad is not None:
            return f"{_shown(bad)} is not allowed in a host name"
        return f"label '{label}' starts or ends with a hyphen"
    return None


def domain_problem(domain: str) -> str | None:
    """Why ``domain`` is not a usable host name (RFC 1123 labels, IDNA 2008), or ``None``."""
    if not domain:
        return "the domain is empty"
    if domain.startswith("[") and domain.endswith("]"):
        return "address literals ([...]) are not supported; use a domain name"
    labels = domain.split(".")
    for label in labels:
        problem = _label_problem(label)
        if problem is not None:
            return problem
    if labels[-1].isdigit():
        return "the last label of a host name cannot be all digits"
    ascii_length = len(idna.encode(domain.lower(), uts46=False)) if not domain.isascii() \
        else len(domain)
    if ascii_length > DOMAIN_MAX:
        return f"the domain is longer than {DOMAIN_MAX} characters"
    return None


def _quoted_problem(local: str) -> str | None:
    inner = local[1:-1]
    if len(local) < 2 or not local.endswith('"'):
        return "the quoted part before the @ is not closed"
    escaped = False
    for char in inner:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return "a quote inside the quoted part before the @ must be escaped"
        elif not (char.isprintable() or char == " "):
            return f"{_shown(char)} is not allowed before the @"
    if escaped:
        return "the quoted part before the @ ends in a lone backslash"
    return None


def _local_problem(local: str) -> str | None:
    if not local:
        return "there is nothing before the @"
    if len(local.encode("utf-8")) > LOCAL_PART_MAX:
        return f"the part before the @ is longer than {LOCAL_PART_MAX} octets"
    if local.startswith('"'):
        return _quoted_problem(local)
    for atom in local.split("."):
        if not atom:
            return ("the part before the @ cannot start or end with a dot, or have two dots "
                    "in a row")
        for char in atom:
            if char not in _ATEXT and (char.isascii() or not char.isprintable()
                                       or char.isspace()):
                return f"{_shown(char)} is not allowed before the @ unless that part is quoted"
    return None


def mailbox_problem(address: str) -> str | None:
    """Why ``address`` (a bare ``local@domain``) cannot be sent to, or ``None``."""
    if "@" not in address:
        return "an address needs a part before the @, an @ and a domain"
    local, _, domain = address.rpartition("@")
    if "@" in local and not local.startswith('"'):
        return "an address has exactly one @"
    if not domain:
        return "there is nothing after the @"
    problem = _local_problem(local) or domain_problem(domain)
    if problem is None and len(address.encode("utf-8")) > ADDRESS_MAX:
        problem = f"the address is longer than {ADDRESS_MAX} octets"
    return problem


def header_address(value: str) -> str:
    """The one address a ``To:`` value names, as written: ``a@b``, ``<a@b>`` or ``Name <a@b>``.

    Taken from the text itself rather than from an address-list parser, which
    repairs some malformed input (``a@@b.com`` becomes ``@b.com``) instead of
    refusing it.
    """
    text = value.strip()
    if text.endswith(">") and "<" in text:
        return text[text.rindex("<") + 1:-1].strip()
    return text
