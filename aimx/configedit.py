"""Edit ``config.toml`` in place: add or remove a mailbox or a hook, set the DKIM selector.

Every verb re-reads the file on disk (so hand edits made since the last
reload survive), changes only the lines of the table it adds or removes,
validates the result with the full loader and then swaps it in atomically
with the original mode and ownership. Comments, key order and unrelated
tables stay byte-for-byte.

Edits are made on the text, one whole table at a time, because a TOML
document model attaches the comment above a table to the table before it
and so moves or drops it. Each text edit is checked against the intended
change of the parsed data; when the file uses a shape the text edit does not
handle (inline tables, inline hook arrays), the same change is made through
the ``tomlkit`` document model and checked the same way.

Blocking I/O, no Twisted. Callers hold the mailbox and config locks.
"""

from __future__ import annotations

import copy
import os
import re
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.items

from aimx.config import (
    DEFAULT_HOOK_TIMEOUT,
    Config,
    ConfigError,
    Hook,
    Mailbox,
    derived_hook_name,
    parse_config_text,
)
from aimx.fsutil import write_atomic
from aimx.tomltext import TomlLine, toml_lines

NEW_FILE_MODE = 0o640


class ConfigEditError(Exception):
    """A rewrite failed; ``code`` is a spec 40 §6 error code, ``reason`` the client text."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# --------------------------------------------------------------------------- writing

def write_config_text(path: os.PathLike[str] | str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably, keeping mode, uid and gid.

    A file that does not exist yet is created ``0640`` owned by root (when
    running as root). Readers see the old file or the new one, never a mix;
    no temp file is left behind on failure. Raises ``ConfigEditError("IO", …)``.
    """
    target = Path(os.path.realpath(path))
    try:
        try:
            info = os.stat(target)
            mode, owner = stat.S_IMODE(info.st_mode), (info.st_uid, info.st_gid)
        except FileNotFoundError:
            mode = NEW_FILE_MODE
            owner = (0, 0) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        write_atomic(target, text.encode("utf-8"), mode, owner=owner)
    except OSError as err:
        raise ConfigEditError("IO", f"failed to write {target}: {err.strerror or err}") from None


# --------------------------------------------------------------------------- text layout

class _Section:
    """One table header plus its body, with the comment block sitting right above it."""

    def __init__(self, start: int, end: int, line: TomlLine) -> None:
        self.start = start  # first line of the attached comment block, else the header
        self.end = end  # where the next section starts (or end of text)
        self.path = line.path or ()
        self.is_array = line.is_array


def _sections(text: str) -> list[_Section]:
    lines = toml_lines(text)
    starts: list[tuple[int, TomlLine]] = []
    for index, line in enumerate(lines):
        if line.kind != "header":
            continue
        first = index
        while first > 0 and lines[first - 1].kind == "comment":
            first -= 1
        starts.append((lines[first].start, line))
    sections = []
    for number, (start, line) in enumerate(starts):
        end = starts[number + 1][0] if number + 1 < len(starts) else len(text)
        sections.append(_Section(start, end, line))
    return sections


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def _insert_block(text: str, position: int, block_lines: list[str]) -> str:
    """Insert a table at ``position`` with one blank line on each side."""
    nl = _newline(text)
    before, after = text[:position], text[position:]
    if before and not before.endswith("\n"):
        before += nl
    if before and not before.endswith(nl + nl):
        before += nl
    block = nl.join(block_lines) + nl
    if after:
        block += nl
    return before + block + after


def _cut(text: str, ranges: list[tuple[int, int]]) -> str:
    """Remove whole sections; a cut at the end of the file leaves one final newline."""
    reached_end = any(end == len(text) for _start, end in ranges)
    nl = _newline(text)
    for start, end in sorted(ranges, reverse=True):
        text = text[:start] + text[end:]
    if reached_end and text.strip():
        text = text.rstrip("\r\n") + nl
    return text


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else tomlkit.string(name).as_string()


def _value(value: Any) -> str:
    return tomlkit.item(value).as_string()


def _hook_fields(hook: Hook) -> dict[str, Any]:
    """The keys to write for a hook: defaults are left out so the file stays short."""
    fields: dict[str, Any] = {}
    if hook.name is not None:
        fields["name"] = hook.name
    fields["event"] = hook.event
    if hook.type != "cmd":
        fields["type"] = hook.type
    fields["cmd"] = list(hook.cmd)
    if hook.fire_on_untrusted:
        fields["fire_on_untrusted"] = True
    if hook.fire_on_automatic:
        fields["fire_on_automatic"] = True
    if hook.timeout_secs != DEFAULT_HOOK_TIMEOUT:
        fields["timeout_secs"] = hook.timeout_secs
    return fields


def _table_lines(header: str, fields: dict[str, Any]) -> list[str]:
    return [header] + [f"{key} = {_value(value)}" for key, value in fields.items()]


# --------------------------------------------------------------------------- the edit engine

def _read(path: Path) -> tuple[str, dict[str, Any]]:
    """Read and parse the on-disk file; any failure is ``IO`` and nothing changes."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigEditError("IO", f"failed to parse {path}: invalid UTF-8: {err}") from None
    except OSError as err:
        raise ConfigEditError("IO", f"failed to read {path}: {err.strerror or err}") from None
    try:
        tomlkit.parse(text)
        data = tomllib.loads(text)
    except Exception as err:  # tomlkit raises several unrelated exception types
        raise ConfigEditError("IO", f"failed to parse {path}: {err}") from None
    return text, data


def _normalise(data: dict[str, Any]) -> dict[str, Any]:
    """Treat an empty ``hooks`` array like an absent one: both mean "no hooks"."""
    mailboxes = data.get("mailboxes")
    if isinstance(mailboxes, dict):
        for table in mailboxes.values():
            if isinstance(table, dict) and table.get("hooks") == []:
                del table["hooks"]
    return data


def _parses_to(text: str | None, expected: dict[str, Any]) -> bool:
    if text is None:
        return False
    try:
        return _normalise(tomllib.loads(text)) == expected
    except tomllib.TOMLDecodeError:
        return False


def _apply(
    path: Path,
    text: str,
    expected: dict[str, Any],
    text_edit: Callable[[], str | None],
    model_edit: Callable[[tomlkit.TOMLDocument], None],
    data_dir_override: os.PathLike[str] | str | None,
) -> Config:
    """Make the edit (text first, document model as fallback), validate, write."""
    expected = _normalise(expected)
    new_text = text_edit()
    if not _parses_to(new_text, expected):
        document = tomlkit.parse(text)
        try:
            model_edit(document)
            new_text = document.as_string()
        except Exception:  # an odd shape tomlkit cannot edit: reported below
            new_text = None
        if not _parses_to(new_text, expected):
            raise ConfigEditError(
                "IO", f"cannot apply the edit to {path} without changing unrelated content"
            )
    assert new_text is not None
    try:
        config = parse_config_text(new_text, path, data_dir_override)
    except ConfigError as err:
        try:
            parse_config_text(text, path, data_dir_override)
        except ConfigError as broken:
            # The file was invalid before this edit: point the operator at it, not the request.
            raise ConfigEditError("IO", str(broken.locate(path, text))) from None
        raise ConfigEditError("VALIDATION", str(err)) from None
    write_config_text(path, new_text)
    return config


def _mailboxes(data: dict[str, Any]) -> dict[str, Any]:
    mailboxes = data.get("mailboxes")
    return mailboxes if isinstance(mailboxes, dict) else {}


def _domain(data: dict[str, Any]) -> str:
    domain = data.get("domain")
    return domain if isinstance(domain, str) else ""


def _raw_effective_name(hook: Any) -> str | None:
    if not isinstance(hook, dict):
        return None
    name, event, cmd = hook.get("name"), hook.get("event"), hook.get("cmd")
    if isinstance(name, str):
        return name
    if isinstance(event, str) and isinstance(cmd, list) and all(isinstance(a, str) for a in cmd):
        return derived_hook_name(event, cmd, hook.get("fire_on_untrusted") is True)
    return None


# --------------------------------------------------------------------------- verbs

def add_mailbox(
    path: os.PathLike[str] | str,
    name: str,
    address: str | None,
    owner: str,
    data_dir_override: os.PathLike[str] | str | None = None,
) -> Config:
    """Append ``[mailboxes.<name>]`` with ``address`` and ``owner``; return the new config.

    ``address=None`` means ``<name>@<domain>`` with the file's domain.
    """
    path = Path(path)
    text, data = _read(path)
    if name in _mailboxes(data):
        raise ConfigEditError("MAILBOX", f"mailbox '{name}' already exists")
    if address is None:
        address = f"{name}@{_domain(data)}"
    expected = copy.deepcopy(data)
    expected.setdefault("mailboxes", {})
    if isinstance(expected["mailboxes"], dict):
        expected["mailboxes"][name] = {"address": address, "owner": owner}

    def text_edit() -> str:
        related = [s for s in _sections(text) if s.path[:1] == ("mailboxes",)]
        position = related[-1].end if related else len(text)
        lines = _table_lines(
            f"[mailboxes.{_key(name)}]", {"address": address, "owner": owner}
        )
        return _insert_block(text, position, lines)

    def model_edit(document: tomlkit.TOMLDocument) -> None:
        if "mailboxes" not in document:
            document["mailboxes"] = tomlkit.table(is_super_table=True)
        mailboxes = document["mailboxes"]
        table = (
            tomlkit.inline_table()
            if isinstance(mailboxes, tomlkit.items.InlineTable)
            else tomlkit.table()
        )
        table["address"] = address
        table["owner"] = owner
        mailboxes[name] = table

    return _apply(path, text, expected, text_edit, model_edit, data_dir_override)


def remove_mailbox(
    path: os.PathLike[str] | str,
    name: str,
    data_dir_override: os.PathLike[str] | str | None = None,
) -> Config:
    """Remove ``[mailboxes.<name>]`` and its hooks; return the new config.

    The catchall (address ``*@<domain>``, whatever its name) is refused: it is
    where mail for unknown local parts goes.
    """
    path = Path(path)
    text, data = _read(path)
    mailboxes = _mailboxes(data)
    if name not in mailboxes:
        raise ConfigEditError("MAILBOX", f"mailbox '{name}' does not exist")
    address = mailboxes[name].get("address") if isinstance(mailboxes[name], dict) else None
    if isinstance(address, str) and Mailbox(name, address, "").is_catchall(_domain(data)):
        raise ConfigEditError("MAILBOX", "cannot delete the catchall mailbox")
    expected = copy.deepcopy(data)
    del expected["mailboxes"][name]

    def text_edit() -> str | None:
        doomed = [s for s in _sections(text) if s.path[:2] == ("mailboxes", name)]
        return _cut(text, [(s.start, s.end) for s in doomed]) if doomed else None

    def model_edit(document: tomlkit.TOMLDocument) -> None:
        del document["mailboxes"][name]

    return _apply(path, text, expected, text_edit, model_edit, data_dir_override)


def add_hook(
    path: os.PathLike[str] | str,
    mailbox: str,
    hook: Hook,
    data_dir_override: os.PathLike[str] | str | None = None,
) -> Config:
    """Append one ``[[mailboxes.<mailbox>.hooks]]`` entry; return the new config.

    Only non-default keys are written. Problems with the hook (or with the
    file once it is added, e.g. a duplicate name) are ``VALIDATION`` errors
    carrying the loader's message.
    """
    path = Path(path)
    text, data = _read(path)
    if not isinstance(_mailboxes(data).get(mailbox), dict):
        raise ConfigEditError(
            "ENOENT",
            f"mailbox '{mailbox}' does not exist (race with concurrent MAILBOX-DELETE)",
        )
    fields = _hook_fields(hook)
    expected = copy.deepcopy(data)
    hooks = expected["mailboxes"][mailbox].setdefault("hooks", [])
    if isinstance(hooks, list):
        hooks.append(copy.deepcopy(fields))

    def text_edit() -> str | None:
        owned = [s for s in _sections(text) if s.path[:2] == ("mailboxes", mailbox)]
        if not owned:
            return None
        header = f"[[mailboxes.{_key(mailbox)}.hooks]]"
        return _insert_block(text, owned[-1].end, _table_lines(header, fields))

    def model_edit(document: tomlkit.TOMLDocument) -> None:
        table = document["mailboxes"][mailbox]
        existing = table.get("hooks")
        if isinstance(existing, tomlkit.items.AoT) or (
            existing is None and not isinstance(table, tomlkit.items.InlineTable)
        ):
            entry = tomlkit.table()
            entry.update(fields)
            if existing is None:
                table["hooks"] = tomlkit.aot()
            table["hooks"].append(entry)
        else:
            entry = tomlkit.inline_table()
            entry.update(fields)
            if existing is None:
                table["hooks"] = tomlkit.array()
            table["hooks"].append(entry)

    return _apply(path, text, expected, text_edit, model_edit, data_dir_override)


def remove_hook(
    path: os.PathLike[str] | str,
    mailbox: str,
    effective_name: str,
    data_dir_override: os.PathLike[str] | str | None = None,
) -> Config:
    """Remove the mailbox's first hook whose effective (explicit or derived) name matches."""
    path = Path(path)
    text, data = _read(path)
    table = _mailboxes(data).get(mailbox)
    hooks = table.get("hooks") if isinstance(table, dict) else None
    names = [_raw_effective_name(hook) for hook in hooks] if isinstance(hooks, list) else []
    if effective_name not in names:
        raise ConfigEditError("ENOENT", f"hook '{effective_name}' not found")
    index = names.index(effective_name)
    expected = copy.deepcopy(data)
    del expected["mailboxes"][mailbox]["hooks"][index]

    def text_edit() -> str | None:
        entries = [
            s for s in _sections(text)
            if s.is_array and s.path == ("mailboxes", mailbox, "hooks")
        ]
        if index >= len(entries):
            return None
        return _cut(text, [(entries[index].start, entries[index].end)])

    def model_edit(document: tomlkit.TOMLDocument) -> None:
        table = document["mailboxes"][mailbox]
        del table["hooks"][index]
        if len(table["hooks"]) == 0:
            del table["hooks"]

    return _apply(path, text, expected, text_edit, model_edit, data_dir_override)


_SELECTOR_LINE = re.compile(r"""^(?P<lead>[ \t]*dkim_selector[ \t]*=[ \t]*)"""
                            r"""(?P<value>"[^"\\\n]*"|'[^'\n]*')""", re.MULTILINE)


def set_dkim_selector(
    path: os.PathLike[str] | str,
    selector: str,
    data_dir_override: os.PathLike[str] | str | None = None,
) -> Config:
    """Make ``selector`` the top-level ``dkim_selector``; return the new config.

    Only the value on the ``dkim_selector`` line changes (a trailing comment
    stays); a file without the key gets it after ``domain``.
    """
    path = Path(path)
    text, data = _read(path)
    expected = copy.deepcopy(data)
    expected["dkim_selector"] = selector

    def text_edit() -> str | None:
        first_header = next((line.start for line in toml_lines(text)
                             if line.kind == "header"), len(text))
        found = _SELECTOR_LINE.search(text, 0, first_header)
        if found is not None:
            return text[:found.start("value")] + _value(selector) + text[found.end("value"):]
        domain = next((line for line in toml_lines(text)
                       if line.kind == "key" and line.path == ("domain",)
                       and line.start < first_header), None)
        if domain is None:
            return None
        line = f"dkim_selector = {_value(selector)}{_newline(text)}"
        return text[:domain.end] + line + text[domain.end:]

    def model_edit(document: tomlkit.TOMLDocument) -> None:
        document["dkim_selector"] = selector

    return _apply(path, text, expected, text_edit, model_edit, data_dir_override)
