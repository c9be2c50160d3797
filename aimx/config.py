"""Load and validate ``config.toml`` into frozen objects; routing and hook names.

The loader is strict on purpose: a typo such as ``trusted_sender`` must stop
the daemon instead of silently disabling a policy, and every message names
the table and key so an operator can fix the file without reading code.
Checks run in a fixed order and walk mailboxes and hooks in file order, so the
same broken file always reports the same first error.

Pure: no Twisted, no I/O except reading the file and ``getpwnam``.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import pwd
import re
import tomllib
import types
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from aimx import paths
from aimx.logs import logger
from aimx.mail.addressing import domain_problem
from aimx.tomltext import line_of, toml_lines

ON_RECEIVE = "on_receive"
AFTER_SEND = "after_send"
EVENTS = (ON_RECEIVE, AFTER_SEND)
TRUST_VALUES = ("none", "verified")
HOOK_TYPES = ("cmd",)

HOOK_NAME_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127}", re.ASCII)
USERNAME_RE = re.compile(r"[a-z_][a-z0-9_-]*[$]?", re.ASCII)
USERNAME_MAX = 32

ROOT_OWNER = "root"
CATCHALL_OWNER = "aimx-catchall"
RESERVED_OWNERS = (ROOT_OWNER, CATCHALL_OWNER)

DEFAULT_DKIM_SELECTOR = "aimx"
DEFAULT_SIGNATURE = "Sent from AIMX.  \nhttps://aimx.email"
DEFAULT_VERIFY_HOST = "https://check.aimx.email"
DEFAULT_HOOK_TIMEOUT = 60
MAX_HOOK_TIMEOUT = 600
DEFAULT_DNS_PORT = 53

MAILBOX_NAME_MAX = 64
# RFC 2142 role addresses (plus root): mail for them reaches whoever holds the
# mailbox, so only root may create them.
ROLE_MAILBOX_NAMES = (
    "postmaster", "abuse", "hostmaster", "webmaster", "mailer-daemon", "root", "noc", "security",
)

# Limits no single local user can exhaust (overridable in config.toml).
DEFAULT_MAX_MAILBOXES_PER_USER = 10
# The loop guard's cap: on_receive firings per (mailbox, sender) within a sliding window.
DEFAULT_HOOK_RATE_LIMIT = 10
DEFAULT_HOOK_RATE_WINDOW_SECS = 600
DEFAULT_SOCKET_MAX_CONNECTIONS = 1024
DEFAULT_SOCKET_MAX_CONNECTIONS_PER_USER = 64
_MAILBOX_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")
_RESERVED_MAILBOX_NAMES = ("catchall", "aimx-catchall")

_log = logger("aimx::config")


# Why a hook's program must be named by an absolute path (hooks.md: working
# directory `/`, a fixed PATH): shared by the config loader and HOOK-CREATE.
HOOK_CMD_ABSOLUTE = ("hooks run in working directory / with a fixed PATH, so name the "
                     "program by its absolute path (e.g. `/bin/echo` instead of `echo`)")


class ConfigError(Exception):
    """``config.toml`` is missing, unreadable or invalid; ``str(err)`` is the operator text.

    ``message`` is the problem alone, as validating an edit reports it. An error
    found in a file on disk also names the file and, when ``at`` (the TOML path
    of the table or key at fault) leads to one, the line: ``<file>, line <n>:
    <message>``, so the operator knows where to look.
    """

    def __init__(self, message: str, *, at: tuple[str | int, ...] | None = None) -> None:
        super().__init__(message)
        self.at = at
        self.file: Path | None = None
        self.line: int | None = None

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def locate(self, path: os.PathLike[str] | str, text: str) -> ConfigError:
        """Name ``path`` (and the line of ``at`` in ``text``) unless the message already does."""
        if str(path) not in self.message:
            self.file = Path(path)
            self.line = line_of(text, self.at) if self.at else None
        return self

    def __str__(self) -> str:
        if self.file is None:
            return self.message
        where = f"{self.file}, line {self.line}" if self.line else str(self.file)
        return f"{where}: {self.message}"


@contextlib.contextmanager
def _at(*path: str | int) -> Iterator[None]:
    """Record ``path`` on a ``ConfigError`` raised inside, unless a deeper one already did."""
    try:
        yield
    except ConfigError as err:
        if err.at is None:
            err.at = path
        raise


# --------------------------------------------------------------------------- names

def derived_hook_name(event: str, cmd: Iterable[str], fire_on_untrusted: bool) -> str:
    """The stable name of an anonymous hook: 12 hex chars of a hash of what it does.

    The mailbox is left out so the name survives moving a hook, and the 0x1F
    separators keep ``["/bin/echo a", "b"]`` apart from ``["/bin/echo", "a b"]``.
    """
    digest = hashlib.sha256()
    digest.update(event.encode("utf-8", "surrogateescape"))
    digest.update(b"\x1f")
    for arg in cmd:
        digest.update(arg.encode("utf-8", "surrogateescape"))
        digest.update(b"\x1f")
    digest.update(b"\x01" if fire_on_untrusted else b"\x00")
    return digest.hexdigest()[:12]


def validate_mailbox_name(name: str) -> str | None:
    """The reason ``name`` cannot be a mailbox name, or ``None`` when it can.

    Names become directory names under the data dir and local parts of
    addresses, hence the narrow alphabet and the ``..``/edge-dot rules.
    """
    if not name:
        return "Mailbox name cannot be empty"
    if ".." in name:
        return "Mailbox name cannot contain '..'"
    if name.startswith(".") or name.endswith("."):
        return "Mailbox name cannot start or end with '.'"
    if name in _RESERVED_MAILBOX_NAMES:
        return f"Mailbox name '{name}' is reserved for the wildcard catchall slot"
    for char in name:
        if char not in _MAILBOX_NAME_CHARS:
            return f"Mailbox name contains invalid character '{char}'; allowed: [a-z0-9._-]"
    if len(name) > MAILBOX_NAME_MAX:
        return f"Mailbox name is too long (max {MAILBOX_NAME_MAX} characters)"
    return None


def is_valid_username(owner: str) -> bool:
    """Whether ``owner`` is shaped like a Linux user name (not whether it exists)."""
    return 0 < len(owner) <= USERNAME_MAX and USERNAME_RE.fullmatch(owner) is not None


def owner_ids(owner: str) -> tuple[int, int] | None:
    """The (uid, primary gid) of a mailbox owner, or ``None`` when the user is unknown."""
    if owner == ROOT_OWNER:
        return (0, 0)
    try:
        entry = pwd.getpwnam(owner)
    except (KeyError, ValueError):
        return None
    return (entry.pw_uid, entry.pw_gid)


def parse_resolver(text: str) -> tuple[str, int]:
    """Split a ``dns_resolvers`` entry into (ip, port); raise ``ValueError`` when malformed.

    Accepted: ``1.2.3.4``, ``1.2.3.4:5353``, ``::1``, ``[::1]``, ``[::1]:5353``.
    Only addresses: a resolver given by name would need a resolver to find it.
    """
    problem = ValueError(
        f"invalid dns_resolvers entry '{text}': expected \"ip\" or \"ip:port\""
        ' (IPv6 with a port as "[addr]:port")'
    )
    host, port_text = text, None
    bracketed = re.fullmatch(r"\[([^\[\]]+)\](?::([0-9]+))?", text)
    if bracketed:
        host, port_text = bracketed.group(1), bracketed.group(2)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise problem from None
    if bracketed and address.version != 6:
        raise problem
    if port_text is None:
        return (str(address), DEFAULT_DNS_PORT)
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise problem
    return (str(address), int(port_text))


def parse_proxy_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """One ``smtp_trusted_proxies`` entry: an address or a CIDR network; ``ValueError`` if not.

    Host bits set (``10.0.0.1/8``) are refused rather than masked: such an entry
    usually means a typo, and silently trusting a whole network is the wrong guess.
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        raise ValueError(
            f"invalid smtp_trusted_proxies entry '{text}': expected an IP address or a "
            'network such as "10.0.0.0/8" (no host bits set after the /)'
        ) from None


def _ascii_lower(text: str) -> str:
    """Lower-case A–Z only: Unicode folding would map e.g. KELVIN SIGN onto ``k``."""
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = {code: code + 32 for code in range(ord("A"), ord("Z") + 1)}


# --------------------------------------------------------------------------- data

@attrs.frozen
class Hook:
    """One ``[[mailboxes.<n>.hooks]]`` entry: a command run on an event."""

    event: str
    cmd: tuple[str, ...] = attrs.field(converter=tuple)
    name: str | None = None
    fire_on_untrusted: bool = False
    timeout_secs: int = DEFAULT_HOOK_TIMEOUT
    type: str = "cmd"
    fire_on_automatic: bool = False  # on_receive: also wake for automatic mail (loop guard)

    @property
    def effective_name(self) -> str:
        """The explicit name, else the derived one: what lists show and deletes take."""
        if self.name is not None:
            return self.name
        return derived_hook_name(self.event, self.cmd, self.fire_on_untrusted)

    @property
    def label(self) -> str:
        """How validation messages refer to the hook (explicit name or ``<anonymous>``)."""
        return self.name if self.name is not None else "<anonymous>"


def _optional_tuple(value: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


@attrs.frozen
class Mailbox:
    """One ``[mailboxes.<name>]`` table."""

    name: str
    address: str
    owner: str
    hooks: tuple[Hook, ...] = attrs.field(default=(), converter=tuple)
    trust: str | None = None
    trusted_senders: tuple[str, ...] | None = attrs.field(
        default=None, converter=_optional_tuple
    )
    allow_root_catchall: bool = False
    hook_rate_limit: int | None = None  # None: the global value
    hook_rate_window_secs: int | None = None

    def is_catchall(self, domain: str) -> bool:
        """Whether this mailbox takes mail for unknown local parts (``*@<domain>``)."""
        return _ascii_lower(self.address) == "*@" + _ascii_lower(domain)


def _mailbox_mapping(value: Mapping[str, Mailbox] | Iterable[Mailbox]) -> Mapping[str, Mailbox]:
    if isinstance(value, Mapping):
        items = dict(value)
    else:
        items = {mailbox.name: mailbox for mailbox in value}
    return types.MappingProxyType(items)


@attrs.frozen
class Config:
    """One immutable snapshot of ``config.toml`` (plus the process's data-dir override)."""

    path: Path = attrs.field(converter=Path)
    domain: str
    data_dir: Path = attrs.field(default=paths.DEFAULT_DATA_DIR, converter=Path)
    dkim_selector: str = DEFAULT_DKIM_SELECTOR
    trust: str = "none"
    trusted_senders: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    # Read-only and in file order; a sequence of Mailbox objects is accepted too.
    mailboxes: Mapping[str, Mailbox] = attrs.field(
        factory=dict, converter=_mailbox_mapping, hash=False
    )
    verify_host: str | None = None
    enable_ipv6: bool = False
    public_ip: str | None = None  # the address the internet sees, for a server behind NAT
    signature: str | None = None
    release_manifest_url: str | None = None
    dns_resolvers: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    max_mailboxes_per_user: int = DEFAULT_MAX_MAILBOXES_PER_USER
    socket_max_connections: int = DEFAULT_SOCKET_MAX_CONNECTIONS
    socket_max_connections_per_user: int = DEFAULT_SOCKET_MAX_CONNECTIONS_PER_USER
    smtp_proxy_protocol: bool = False
    smtp_trusted_proxies: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    hook_rate_limit: int = DEFAULT_HOOK_RATE_LIMIT
    hook_rate_window_secs: int = DEFAULT_HOOK_RATE_WINDOW_SECS
    smtp_workers: int = 0  # SMTP worker processes; 0 means one per CPU
    warnings: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def mailbox(self, name: str) -> Mailbox | None:
        return self.mailboxes.get(name)

    def catchall(self) -> Mailbox | None:
        """The first mailbox whose address is ``*@<domain>``, if any."""
        for mailbox in self.mailboxes.values():
            if mailbox.is_catchall(self.domain):
                return mailbox
        return None

    def route(self, rcpt: str) -> Mailbox | None:
        """The mailbox that takes mail for ``rcpt``; the domain is not checked here.

        The local part (text before the first ``@``) is lower-cased because
        mailbox names are lower-case and senders capitalise freely (D4).
        """
        local = _ascii_lower(rcpt.split("@", 1)[0])
        exact = self.mailboxes.get(local)
        if exact is not None:
            return exact
        return self.catchall()

    def is_local_domain(self, domain: str) -> bool:
        """Whether mail for ``domain`` is ours: exact match, sub- and parent domains are foreign."""
        return _ascii_lower(domain) == _ascii_lower(self.domain)

    def effective_trust(self, mailbox: Mailbox) -> str:
        return mailbox.trust if mailbox.trust is not None else self.trust

    def effective_senders(self, mailbox: Mailbox) -> tuple[str, ...]:
        """The mailbox's own allow-list when it has one (even empty), else the global one."""
        if mailbox.trusted_senders is not None:
            return mailbox.trusted_senders
        return self.trusted_senders

    def hook_rate(self, mailbox: Mailbox) -> tuple[int, int]:
        """(firings allowed per sender, window in seconds) for ``mailbox``; 0 firings: no cap."""
        limit = mailbox.hook_rate_limit
        window = mailbox.hook_rate_window_secs
        return (self.hook_rate_limit if limit is None else limit,
                self.hook_rate_window_secs if window is None else window)

    @property
    def effective_signature(self) -> str:
        """The outbound signature; ``""`` means none."""
        return DEFAULT_SIGNATURE if self.signature is None else self.signature

    def resolver_addresses(self) -> tuple[tuple[str, int], ...]:
        """``dns_resolvers`` as (ip, port) pairs; empty means the system resolver."""
        return tuple(parse_resolver(entry) for entry in self.dns_resolvers)

    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``smtp_trusted_proxies`` as networks (a bare address is a one-address network)."""
        return tuple(parse_proxy_network(entry) for entry in self.smtp_trusted_proxies)

    def with_data_dir(self, path: os.PathLike[str] | str) -> Config:
        return attrs.evolve(self, data_dir=Path(path))

    def hooks_for(self, mailbox_name: str, event: str) -> tuple[Hook, ...]:
        """The mailbox's hooks for ``event`` in config order (the order they run)."""
        mailbox = self.mailboxes.get(mailbox_name)
        if mailbox is None:
            return ()
        return tuple(hook for hook in mailbox.hooks if hook.event == event)

    def all_hooks(self) -> tuple[tuple[Mailbox, Hook], ...]:
        """Every (mailbox, hook) pair in file order."""
        return tuple(
            (mailbox, hook) for mailbox in self.mailboxes.values() for hook in mailbox.hooks
        )

    def find_hook(self, effective_name: str) -> tuple[Mailbox, Hook] | None:
        """The first hook, in file order, whose effective name is ``effective_name``."""
        for mailbox, hook in self.all_hooks():
            if hook.effective_name == effective_name:
                return (mailbox, hook)
        return None


def log_warnings(config: Config) -> None:
    """Log the load warnings at WARN; the daemon calls this at start and on every reload."""
    for warning in config.warnings:
        _log.warning("%s", warning)


# --------------------------------------------------------------------------- loading

_LEGACY_HOOK_KEYS = {
    "run_as": "hook sets `run_as`; the field was removed — hooks now run as the mailbox's "
              "`owner`",
    "origin": "hook sets `origin`; the field was removed",
    "dangerously_support_untrusted": "hook sets `dangerously_support_untrusted`; the field "
                                     "was renamed to `fire_on_untrusted`",
    "template": "hook sets `template`; template hooks were removed. See book/hooks.md for the "
                "supported raw-cmd schema",
    "params": "hook sets `params`; template hooks were removed. See book/hooks.md for the "
              "supported raw-cmd schema",
}
_HOOK_TEMPLATE_ERROR = (
    "[[hook_template]] blocks are not supported; template hooks were removed. "
    "See book/hooks.md for the supported raw-cmd schema"
)

_TOP_KEYS = (
    "domain", "data_dir", "dkim_selector", "trust", "trusted_senders", "mailboxes",
    "verify_host", "enable_ipv6", "signature", "upgrade", "dns_resolvers", "public_ip",
    "max_mailboxes_per_user", "socket_max_connections", "socket_max_connections_per_user",
    "smtp_proxy_protocol", "smtp_trusted_proxies",
    "hook_rate_limit", "hook_rate_window_secs",
    "smtp_workers",
)
# Integer limits and the smallest value each accepts.
_HOOK_RATE_KEYS = {
    "hook_rate_limit": 0,
    "hook_rate_window_secs": 1,
}
_LIMIT_KEYS = {
    "max_mailboxes_per_user": 0,
    "socket_max_connections": 1,
    "socket_max_connections_per_user": 1,
    **_HOOK_RATE_KEYS,
    "smtp_workers": 0,
}
_MAILBOX_KEYS = ("address", "owner", "hooks", "trust", "trusted_senders", "allow_root_catchall",
                 *_HOOK_RATE_KEYS)
_HOOK_KEYS = ("name", "event", "type", "cmd", "fire_on_untrusted", "timeout_secs",
              "fire_on_automatic")
_UPGRADE_KEYS = ("release_manifest_url",)
_TOP = "top-level table"


def _legacy_on_receive(mailbox: str, what: str) -> str:
    return (
        f"mailbox '{mailbox}' uses the legacy `{what}` schema; migrate to "
        f"`[[mailboxes.{mailbox}.hooks]]` with `event = \"on_receive\"`"
    )


def _check_legacy_schema(text: str) -> None:
    """Step 2: name removed schema features before TOML parsing can blur them."""
    in_hook = False
    for line in toml_lines(text):
        if line.kind == "header":
            path = line.path or ()
            in_hook = line.is_array and len(path) == 3 and path[0] == "mailboxes" \
                and path[2] == "hooks"
            if path[:1] == ("hook_template",):
                raise ConfigError(_HOOK_TEMPLATE_ERROR)
            if len(path) == 3 and path[0] == "mailboxes" and path[2] == "on_receive":
                raise ConfigError(_legacy_on_receive(path[1], "on_receive"))
            if len(path) == 4 and path[0] == "mailboxes" and path[2:] == ("on_receive", "match"):
                raise ConfigError(_legacy_on_receive(path[1], "on_receive.match"))
        elif line.kind == "key" and in_hook and line.path and line.path[0] in _LEGACY_HOOK_KEYS:
            raise ConfigError(_LEGACY_HOOK_KEYS[line.path[0]])


def _loose_hooks(data: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    """(mailbox name, raw hook table) pairs of whatever is shaped like one, in file order."""
    mailboxes = data.get("mailboxes")
    if not isinstance(mailboxes, dict):
        return
    for name, table in mailboxes.items():
        hooks = table.get("hooks") if isinstance(table, dict) else None
        if isinstance(hooks, list):
            for hook in hooks:
                if isinstance(hook, dict):
                    yield name, hook


def _loose_hook_name(hook: dict[str, Any]) -> str:
    name, event, cmd = hook.get("name"), hook.get("event"), hook.get("cmd")
    if isinstance(name, str):
        return name
    if isinstance(event, str) and isinstance(cmd, list) and all(isinstance(a, str) for a in cmd):
        fire = hook.get("fire_on_untrusted")
        return derived_hook_name(event, cmd, fire is True)
    return "<anonymous>"


def _check_stdin(data: dict[str, Any]) -> None:
    """Step 4: ``stdin`` gets its own message because the email is now always piped."""
    for _mailbox, hook in _loose_hooks(data):
        if "stdin" in hook:
            raise ConfigError(
                f"hook '{_loose_hook_name(hook)}' carries removed field 'stdin' — remove this "
                "line and restart aimx serve; the email is always piped to hooks"
            )


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"


def _type_error(key: str, table: str, expected: str, value: Any) -> ConfigError:
    found = _kind(value)
    if isinstance(value, list):
        odd = next((item for item in value if not isinstance(item, str)), None)
        if odd is not None and expected == "an array of strings":
            found = f"an array containing a {_kind(odd)}"
    return ConfigError(f"invalid type for '{key}' in {table}: expected {expected}, found {found}")


def _string(value: Any, key: str, table: str) -> str:
    if not isinstance(value, str):
        raise _type_error(key, table, "a string", value)
    return value


def _bool(value: Any, key: str, table: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(key, table, "a boolean", value)
    return value


def _limit(value: Any, key: str, minimum: int, table: str = _TOP) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(key, table, "an integer", value)
    if value < minimum:
        raise ConfigError(f"invalid {key} = {value}: must be at least {minimum}")
    return value


def _strings(value: Any, key: str, table: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _type_error(key, table, "an array of strings", value)
    return tuple(value)


def _unknown(key: str, table: str) -> ConfigError:
    return ConfigError(f"unknown field '{key}' in {table}")


def _missing(key: str, table: str) -> ConfigError:
    return ConfigError(f"missing required field '{key}' in {table}")


def _decode_hook(raw: Any, mailbox: str) -> Hook:
    table = f"[[mailboxes.{mailbox}.hooks]]"
    if not isinstance(raw, dict):
        raise _type_error("hooks", f"[mailboxes.{mailbox}]", "an array of tables", [raw])
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _LEGACY_HOOK_KEYS:
            raise ConfigError(_LEGACY_HOOK_KEYS[key])
        if key not in _HOOK_KEYS:
            raise _unknown(key, table)
        if key in ("name", "type"):
            fields[key] = _string(value, key, table)
        elif key == "event":
            event = _string(value, key, table)
            if event not in EVENTS:
                raise ConfigError(
                    f"invalid event '{event}' on mailbox '{mailbox}': "
                    "expected 'on_receive' or 'after_send'"
                )
            fields[key] = event
        elif key == "cmd":
            fields[key] = _strings(value, key, table)
        elif key in ("fire_on_untrusted", "fire_on_automatic"):
            fields[key] = _bool(value, key, table)
        else:  # timeout_secs
            if isinstance(value, bool) or not isinstance(value, int):
                raise _type_error(key, table, "an integer", value)
            fields[key] = value
    for required in ("event", "cmd"):
        if required not in fields:
            raise _missing(required, table)
    return Hook(**fields)


def _decode_mailbox_key(name: str, key: str, value: Any) -> dict[str, Any]:
    table = f"[mailboxes.{name}]"
    if key not in _MAILBOX_KEYS:
        raise _unknown(key, table)
    if key in ("address", "owner", "trust"):
        return {key: _string(value, key, table)}
    if key == "trusted_senders":
        # D9: globs match case-insensitively, so keep them in the case From is compared in.
        return {key: tuple(glob.lower() for glob in _strings(value, key, table))}
    if key == "allow_root_catchall":
        return {key: _bool(value, key, table)}
    if key in _HOOK_RATE_KEYS:
        return {key: _limit(value, key, _HOOK_RATE_KEYS[key], table)}
    # hooks
    if not isinstance(value, list):
        raise _type_error(key, table, "an array of tables", value)
    hooks = []
    for index, hook in enumerate(value):
        with _at("mailboxes", name, "hooks", index):
            hooks.append(_decode_hook(hook, name))
    return {key: tuple(hooks)}


def _decode_mailbox(name: str, raw: Any) -> Mailbox:
    table = f"[mailboxes.{name}]"
    if not isinstance(raw, dict):
        raise _type_error(name, "[mailboxes]", "a table", raw)
    fields: dict[str, Any] = {"owner": ""}  # a missing owner gets the step-6 message
    for key, value in raw.items():
        with _at("mailboxes", name, key):
            fields.update(_decode_mailbox_key(name, key, value))
    if "address" not in fields:
        raise _missing("address", table)
    return Mailbox(name=name, **fields)


def _decode_top_key(fields: dict[str, Any], key: str, value: Any) -> None:
    """One top-level key of step 5 into ``fields``."""
    if key not in _TOP_KEYS:
        raise _unknown(key, _TOP)
    if key in ("domain", "dkim_selector", "trust", "verify_host", "signature", "public_ip"):
        fields[key] = _string(value, key, _TOP)
    elif key == "data_dir":
        fields[key] = Path(_string(value, key, _TOP))
    elif key == "trusted_senders":
        fields[key] = tuple(glob.lower() for glob in _strings(value, key, _TOP))
    elif key in ("enable_ipv6", "smtp_proxy_protocol"):
        fields[key] = _bool(value, key, _TOP)
    elif key == "smtp_trusted_proxies":
        proxies = _strings(value, key, _TOP)
        for entry in proxies:
            try:
                parse_proxy_network(entry)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        fields[key] = proxies
    elif key in _LIMIT_KEYS:
        fields[key] = _limit(value, key, _LIMIT_KEYS[key])
    elif key == "dns_resolvers":
        resolvers = _strings(value, key, _TOP)
        for entry in resolvers:
            try:
                parse_resolver(entry)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        fields[key] = resolvers
    elif key == "upgrade":
        if not isinstance(value, dict):
            raise _type_error(key, _TOP, "a table", value)
        for sub, sub_value in value.items():
            with _at("upgrade", sub):
                if sub not in _UPGRADE_KEYS:
                    raise _unknown(sub, "[upgrade]")
                fields["release_manifest_url"] = _string(sub_value, sub, "[upgrade]")
    else:  # mailboxes
        if not isinstance(value, dict):
            raise _type_error(key, _TOP, "a table", value)
        mailboxes = []
        for name, raw in value.items():
            with _at("mailboxes", name):
                mailboxes.append(_decode_mailbox(name, raw))
        fields[key] = tuple(mailboxes)


def _decode(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Step 5: types, required and unknown keys, in file order."""
    fields: dict[str, Any] = {"path": path}
    for key, value in data.items():
        with _at(key):
            _decode_top_key(fields, key, value)
    if "domain" not in fields:
        raise _missing("domain", _TOP)
    return fields


def _trust_error(mailbox: Mailbox | None, value: str) -> ConfigError:
    allowed = '["none", "verified"]'
    if mailbox is None:
        return ConfigError(f"invalid top-level trust value '{value}': expected one of {allowed}",
                           at=("trust",))
    return ConfigError(
        f"invalid trust value '{value}' on mailbox '{mailbox.name}': expected one of {allowed}",
        at=("mailboxes", mailbox.name, "trust"),
    )


def _check_owner(mailbox: Mailbox, domain: str, warnings: list[str]) -> None:
    """Step 9 for one mailbox: owner shape, then the root and catchall rules."""
    name, owner = mailbox.name, mailbox.owner
    if owner not in RESERVED_OWNERS:
        if not is_valid_username(owner):
            raise ConfigError(
                f"mailbox '{name}' has invalid owner '{owner}': must be 'root', "
                f"'aimx-catchall', or a valid Linux username matching {USERNAME_RE.pattern}"
            )
        if owner_ids(owner) is None:
            warnings.append(
                f"mailbox '{name}' owner '{owner}' does not resolve via getpwnam; mailbox "
                "marked inactive — create the user or update config.toml"
            )
    catchall = mailbox.is_catchall(domain)
    if mailbox.allow_root_catchall and not catchall:
        raise ConfigError(
            f"mailbox '{name}' sets allow_root_catchall=true but is not a catchall "
            f"(*@{domain}); remove the flag or change the address"
        )
    if owner != ROOT_OWNER:
        return
    if not catchall:
        raise ConfigError(
            f"mailbox '{name}' cannot be owned by root; use a regular Linux user or set "
            "'allow_root_catchall = true' on a catchall mailbox"
        )
    if not mailbox.allow_root_catchall:
        raise ConfigError(
            f"catchall mailbox '{name}' has owner='root' but allow_root_catchall=false; set "
            "allow_root_catchall=true to opt into the root-catchall escape hatch, or change "
            "owner to 'aimx-catchall' (the default)"
        )
    warnings.append(
        f"catchall mailbox '{name}' is running with owner='root' and allow_root_catchall=true; "
        "this is a documented escape hatch — mail lands owned by uid 0"
    )


def _check_hook_fields(hook: Hook, mailbox: str) -> None:
    """Step 10, first half: one hook on its own."""
    where = f"hook '{hook.label}' on mailbox '{mailbox}'"
    if hook.name is not None and not HOOK_NAME_RE.fullmatch(hook.name):
        raise ConfigError(
            f"invalid hook name '{hook.name}' on mailbox '{mailbox}': "
            f"must match {HOOK_NAME_RE.pattern}"
        )
    if not hook.cmd:
        raise ConfigError(
            f"{where} has empty `cmd`: `cmd` must be a non-empty argv array, "
            'e.g. `cmd = ["/bin/echo", "hi"]`'
        )
    if not hook.cmd[0].strip():
        raise ConfigError(f"{where} has blank `cmd[0]`")
    if not hook.cmd[0].startswith("/"):
        raise ConfigError(
            f"{where} has non-absolute `cmd[0]` '{hook.cmd[0]}': {HOOK_CMD_ABSOLUTE}"
        )
    if hook.type not in HOOK_TYPES:
        raise ConfigError(f"{where} has unsupported type '{hook.type}': only `cmd` is supported")
    if hook.timeout_secs <= 0:
        raise ConfigError(f"{where} has `timeout_secs = {hook.timeout_secs}`: must be > 0")
    if hook.timeout_secs > MAX_HOOK_TIMEOUT:
        raise ConfigError(
            f"{where} has `timeout_secs = {hook.timeout_secs}` which exceeds the max of "
            f"{MAX_HOOK_TIMEOUT}"
        )


def _check_unique_names(mailboxes: Iterable[Mailbox]) -> None:
    """Step 10, second half: effective names are unique across the mailboxes of one owner.

    Hooks of different owners may share a name: a file-wide rule would let a
    user learn, from a refused HOOK-CREATE, which names and commands other
    users' hooks have and on which mailboxes.
    """
    seen: dict[tuple[str, str], tuple[str, bool]] = {}
    for mailbox in mailboxes:
        for index, hook in enumerate(mailbox.hooks):
            with _at("mailboxes", mailbox.name, "hooks", index):
                _check_unique_name(seen, mailbox, hook)


def _check_unique_name(seen: dict[tuple[str, str], tuple[str, bool]], mailbox: Mailbox,
                       hook: Hook) -> None:
    """One hook against the names ``seen`` so far (owner, name) -> (mailbox, explicit)."""
    name, explicit = hook.effective_name, hook.name is not None
    key = (mailbox.owner, name)
    if key not in seen:
        seen[key] = (mailbox.name, explicit)
        return
    first, first_explicit = seen[key]
    where = (f"mailbox '{first}'" if first == mailbox.name
             else f"mailboxes '{first}' and '{mailbox.name}'")
    if explicit and first_explicit:
        raise ConfigError(
            f"duplicate hook name '{name}' on {where}: "
            "hook names must be unique across the mailboxes of one owner"
        )
    if not explicit and not first_explicit:
        raise ConfigError(
            f"anonymous hooks on {where} have identical "
            f"event/cmd and derive the same name '{name}': set an explicit `name` on at "
            "least one to disambiguate"
        )
    raise ConfigError(
        f"explicit hook name '{name}' collides with the derived name of an anonymous "
        f"hook ({where}): rename the explicit hook or set an explicit `name` on the "
        "anonymous one"
    )


def _check_proxy_protocol(fields: dict[str, Any], warnings: list[str]) -> None:
    """PROXY protocol needs someone to trust: with no trusted proxy every connection
    would be plain SMTP and the setting would silently do nothing."""
    enabled = fields.get("smtp_proxy_protocol", False)
    proxies = fields.get("smtp_trusted_proxies", ())
    if enabled and not proxies:
        raise ConfigError(
            "smtp_proxy_protocol = true needs smtp_trusted_proxies: list the addresses or "
            'networks of the proxies that send the PROXY header, e.g. ["10.0.0.0/8"]',
            at=("smtp_proxy_protocol",))
    if proxies and not enabled:
        warnings.append("smtp_trusted_proxies is set but smtp_proxy_protocol is not true: "
                        "the list is ignored and every connection is plain SMTP")


def parse_config_text(
    text: str, path: os.PathLike[str] | str, data_dir_override: os.PathLike[str] | str | None = None
) -> Config:
    """Run the whole load pipeline (spec 40 §2.1 steps 2–10) on ``text``.

    ``path`` only names the file in messages and in ``Config.path``. Warnings
    end up in ``Config.warnings``; nothing is logged here so that validating a
    candidate edit stays silent.
    """
    path = Path(path)
    _check_legacy_schema(text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"failed to parse {path}: {err}") from None
    _check_stdin(data)
    fields = _decode(data, path)
    mailboxes: tuple[Mailbox, ...] = fields.get("mailboxes", ())
    domain: str = fields["domain"]
    problem = domain_problem(domain)
    if problem is not None:
        raise ConfigError(f"invalid domain '{domain}': {problem}; `domain` must be the host "
                          "name mail is addressed to, e.g. agent.example.com", at=("domain",))

    selector = fields.get("dkim_selector", DEFAULT_DKIM_SELECTOR)
    problem = paths.dkim_selector_problem(selector)
    if problem is not None:
        raise ConfigError(f"invalid dkim_selector '{selector}': {problem}",
                          at=("dkim_selector",))
    public_ip = fields.get("public_ip")
    if public_ip is not None:
        try:
            if ipaddress.ip_address(public_ip).version != 4:
                raise ValueError
        except ValueError:
            raise ConfigError(f"invalid public_ip '{public_ip}': expected an IPv4 address "
                              "such as 203.0.113.7", at=("public_ip",)) from None

    for mailbox in mailboxes:
        if not mailbox.owner.strip():
            raise ConfigError(
                f"mailbox '{mailbox.name}' is missing required field 'owner'; re-run "
                "'sudo aimx setup' or hand-edit config.toml", at=("mailboxes", mailbox.name)
            )
    if fields.get("trust", "none") not in TRUST_VALUES:
        raise _trust_error(None, fields["trust"])
    for mailbox in mailboxes:
        if mailbox.trust is not None and mailbox.trust not in TRUST_VALUES:
            raise _trust_error(mailbox, mailbox.trust)
    for mailbox in mailboxes:
        if mailbox.hooks and mailbox.is_catchall(domain):
            raise ConfigError(
                f"mailbox '{mailbox.name}' is the catchall but has hooks attached; "
                "catchall does not support hooks", at=("mailboxes", mailbox.name, "hooks", 0)
            )
        for index, hook in enumerate(mailbox.hooks):
            if hook.fire_on_untrusted and hook.event == "after_send":
                raise ConfigError(
                    f"hook '{hook.label}' on mailbox '{mailbox.name}' sets "
                    "`fire_on_untrusted = true` on event 'after_send': fire_on_untrusted is "
                    "on_receive only", at=("mailboxes", mailbox.name, "hooks", index)
                )
            if hook.fire_on_automatic and hook.event == "after_send":
                raise ConfigError(
                    f"hook '{hook.label}' on mailbox '{mailbox.name}' sets "
                    "`fire_on_automatic = true` on event 'after_send': fire_on_automatic is "
                    "on_receive only", at=("mailboxes", mailbox.name, "hooks", index)
                )
    warnings: list[str] = []
    for mailbox in mailboxes:
        with _at("mailboxes", mailbox.name):
            _check_owner(mailbox, domain, warnings)
    for mailbox in mailboxes:
        for index, hook in enumerate(mailbox.hooks):
            with _at("mailboxes", mailbox.name, "hooks", index):
                _check_hook_fields(hook, mailbox.name)
    _check_unique_names(mailboxes)
    _check_proxy_protocol(fields, warnings)

    fields["warnings"] = tuple(warnings)
    if data_dir_override is not None:
        fields["data_dir"] = Path(data_dir_override)
    return Config(**fields)


def load_config(
    path: os.PathLike[str] | str | None = None,
    data_dir_override: os.PathLike[str] | str | None = None,
) -> Config:
    """Read and validate ``config.toml`` (default: ``aimx.paths.config_path()``).

    ``data_dir_override`` (``--data-dir`` / ``AIMX_DATA_DIR``) replaces
    ``data_dir`` in the returned snapshot only; it never reaches the file.
    """
    path = Path(path) if path is not None else paths.config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"Config file not found at {path}. Run 'sudo aimx setup' first"
        ) from None
    except OSError as err:
        raise ConfigError(f"failed to read {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"failed to parse {path}: invalid UTF-8: {err}") from None
    try:
        return parse_config_text(text, path, data_dir_override)
    except ConfigError as err:
        raise err.locate(path, text) from None
