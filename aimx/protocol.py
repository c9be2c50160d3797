"""The daemon socket protocol: AMP commands, error codes and chunked fields.

Both sides import this module: the daemon (``aimx.api``) to decode requests
and encode answers, the clients (``aimx.client``) to build requests and read
answers. Each verb is one AMP command named exactly after it; each error code
of the API is one AMP error code whose description is the human reason.

AMP caps a value at 65,535 bytes, so large fields (``body``, ``html_body``
and list ``rows``) are split across the keys ``<f>``, ``<f>.2``, ``<f>.3``,
... and the first missing key ends the value.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from twisted.protocols import amp

# Every code the daemon answers with (spec 40 §6); agents branch on these.
ERROR_CODES: tuple[str, ...] = (
    "MAILBOX", "DOMAIN", "SIGN", "DELIVERY", "TEMP", "MALFORMED", "PROTOCOL",
    "NOTFOUND", "IO", "VALIDATION", "NONEMPTY", "ECONFLICT", "EACCES", "ENOENT",
    "BODY_TOO_LARGE",
)

BODY_CAP = 26_214_400  # per body / html_body field
MAX_BOX_BYTES = 52 * 1024 * 1024 + 64 * 1024  # a bigger box drops the connection
DEFAULT_TIMEOUT_SECS = 30.0  # incomplete box, or idle connection with nothing in flight
CHUNK = amp.MAX_VALUE_LENGTH
_MAX_REASON_BYTES = amp.MAX_VALUE_LENGTH


def clean_reason(reason: str) -> str:
    """A reason fit for the wire: one line, within AMP's value limit."""
    text = " ".join(part for part in reason.replace("\r", "\n").split("\n") if part != "")
    data = text.encode("utf-8", "replace")
    if len(data) > _MAX_REASON_BYTES:
        text = data[:_MAX_REASON_BYTES].decode("utf-8", "ignore")
    return text


class ApiError(Exception):
    """A daemon error: one code of spec 40 §6 plus its reason.

    Raised by the daemon's handlers and re-raised by the clients, so both sides
    branch on ``code`` the same way. ``str()`` gives the CLI's
    ``[<CODE>] <reason>`` shape.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"[{self.code}] {self.reason}"


def _coded_error(code: str) -> type[ApiError]:
    """A subclass bound to one code, so AMP's error maps can name it.

    AMP builds a received error from the description alone, hence the
    one-argument constructor.
    """

    def __init__(self: ApiError, reason: str) -> None:
        ApiError.__init__(self, code, reason)

    name = "".join(part.capitalize() for part in code.split("_")) + "Error"
    return type(name, (ApiError,), {"__init__": __init__, "__module__": __name__})


ERROR_CLASSES: dict[str, type[ApiError]] = {code: _coded_error(code) for code in ERROR_CODES}
_AMP_ERRORS: dict[type[Exception], bytes] = {
    cls: code.encode("ascii") for code, cls in ERROR_CLASSES.items()
}


def error(code: str, reason: str) -> ApiError:
    """An ``ApiError`` of the class registered for ``code``."""
    cls = ERROR_CLASSES.get(code)
    return cls(reason) if cls is not None else ApiError(code, reason)


def malformed(reason: str) -> ApiError:
    return error("MALFORMED", reason)


# -- argument types ---------------------------------------------------------


def chunk_keys(name: bytes, count: int) -> list[bytes]:
    """The box keys holding ``count`` chunks of field ``name``."""
    return [name] + [name + b".%d" % i for i in range(2, count + 1)]


def join_chunks(name: bytes, box: dict[bytes, bytes], *, pop: bool = False) -> bytes | None:
    """Reassemble a chunked field from ``box``; ``None`` when ``name`` is absent."""
    if name not in box:
        return None
    parts = []
    index = 1
    key = name
    while key in box:
        parts.append(box.pop(key) if pop else box[key])
        index += 1
        key = name + b".%d" % index
    return b"".join(parts)


class Chunked(amp.Argument):
    """Bytes of any length, split across ``<f>``, ``<f>.2``, ... keys."""

    def toBox(self, name, strings, objects, proto):  # noqa: N802 (AMP's name)
        value = self.retrieve(objects, amp._wireNameToPythonIdentifier(name), proto)
        if value is None:
            return
        data = self.encode(value)
        pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        for key, piece in zip(chunk_keys(name, len(pieces)), pieces, strict=True):
            strings[key] = piece

    def fromBox(self, name, strings, objects, proto):  # noqa: N802 (AMP's name)
        data = join_chunks(name, strings, pop=True)
        key = amp._wireNameToPythonIdentifier(name)
        if data is None:
            if not self.optional:
                raise KeyError(name)
            objects[key] = None
        else:
            objects[key] = self.decode(data)

    def encode(self, value: Any) -> bytes:
        if isinstance(value, str):
            return value.encode("utf-8")
        return bytes(value)

    def decode(self, data: bytes) -> Any:
        return data


class ChunkedJson(Chunked):
    """A JSON document (list rows), chunked like any large field."""

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def decode(self, data: bytes) -> Any:
        return json.loads(data.decode("utf-8"))


class Flag(amp.Boolean):
    """AMP's Boolean, also accepting the spellings other clients send."""

    _TRUE = (b"True", b"true", b"1", b"yes")
    _FALSE = (b"False", b"false", b"0", b"no")

    def fromString(self, inString):  # noqa: N802,N803 (AMP's names)
        if inString in self._TRUE:
            return True
        if inString in self._FALSE:
            return False
        raise TypeError(f"bad boolean value: {inString!r}")


# -- commands ---------------------------------------------------------------


class ApiCommand(amp.Command):
    """Base of every verb: the shared error map and the request rules.

    ``may_be_empty`` names required fields whose emptiness the verb judges
    itself (e.g. a mailbox name gets the name-check text, not MALFORMED).
    ``takes_no_arguments`` makes any argument key a MALFORMED request.
    """

    errors = _AMP_ERRORS
    may_be_empty: ClassVar[frozenset[bytes]] = frozenset()
    takes_no_arguments: ClassVar[bool] = False
    capped: ClassVar[frozenset[bytes]] = frozenset()

    @classmethod
    def verb(cls) -> str:
        return cls.commandName.decode("ascii")


class Send(ApiCommand):
    commandName = b"SEND"
    arguments = [
        (b"body", Chunked()),
        (b"text_only", Flag(optional=True)),
        (b"html_body", Chunked(optional=True)),
    ]
    response = [(b"message_id", amp.Unicode())]
    capped = frozenset({b"body", b"html_body"})


class MarkRead(ApiCommand):
    commandName = b"MARK-READ"
    arguments = [(b"mailbox", amp.Unicode()), (b"id", amp.Unicode())]
    response: ClassVar[list] = []
    may_be_empty = frozenset({b"id"})


class MarkUnread(ApiCommand):
    commandName = b"MARK-UNREAD"
    arguments = [(b"mailbox", amp.Unicode()), (b"id", amp.Unicode())]
    response: ClassVar[list] = []
    may_be_empty = frozenset({b"id"})


class MailboxCreate(ApiCommand):
    commandName = b"MAILBOX-CREATE"
    arguments = [(b"name", amp.Unicode()), (b"owner", amp.Unicode(optional=True))]
    response = [(b"address", amp.Unicode()), (b"owner", amp.Unicode())]
    may_be_empty = frozenset({b"name"})


class MailboxDelete(ApiCommand):
    commandName = b"MAILBOX-DELETE"
    arguments = [(b"name", amp.Unicode()), (b"force", Flag(optional=True))]
    response: ClassVar[list] = []
    may_be_empty = frozenset({b"name"})


class MailboxList(ApiCommand):
    commandName = b"MAILBOX-LIST"
    arguments: ClassVar[list] = []
    response = [(b"rows", ChunkedJson())]
    takes_no_arguments = True


class HookCreate(ApiCommand):
    commandName = b"HOOK-CREATE"
    arguments = [
        (b"mailbox", amp.Unicode()),
        (b"event", amp.Unicode()),
        (b"name", amp.Unicode(optional=True)),
        (b"cmd", amp.ListOf(amp.Unicode(), optional=True)),
        (b"fire_on_untrusted", Flag(optional=True)),
        (b"type", amp.Unicode(optional=True)),
        (b"timeout_secs", amp.Integer(optional=True)),
    ]
    response = [(b"name", amp.Unicode())]


class HookDelete(ApiCommand):
    commandName = b"HOOK-DELETE"
    arguments = [(b"name", amp.Unicode())]
    response: ClassVar[list] = []


class HookList(ApiCommand):
    commandName = b"HOOK-LIST"
    arguments: ClassVar[list] = []
    response = [(b"rows", ChunkedJson())]
    takes_no_arguments = True


class Version(ApiCommand):
    commandName = b"VERSION"
    arguments: ClassVar[list] = []
    response = [
        (b"tag", amp.Unicode()),
        (b"git_hash", amp.Unicode()),
        (b"target", amp.Unicode()),
        (b"build_date", amp.Unicode()),
    ]
    takes_no_arguments = True


COMMANDS: dict[bytes, type[ApiCommand]] = {
    cmd.commandName: cmd
    for cmd in (Send, MarkRead, MarkUnread, MailboxCreate, MailboxDelete, MailboxList,
                HookCreate, HookDelete, HookList, Version)
}

_ENVELOPE_KEYS = frozenset({amp.COMMAND, amp.ASK})


# -- request decoding (daemon side) -----------------------------------------


def declared_keys(command: type[ApiCommand], box: dict[bytes, bytes]) -> set[bytes]:
    """Every key of ``box`` that belongs to a declared argument (chunks included)."""
    keys: set[bytes] = set()
    for name, argument in command.arguments:
        if isinstance(argument, Chunked):
            index = 1
            key = name
            while key in box:
                keys.add(key)
                index += 1
                key = name + b".%d" % index
        elif name in box:
            keys.add(name)
    return keys


def undeclared_keys(command: type[ApiCommand], box: dict[bytes, bytes]) -> list[str]:
    """Argument keys the verb does not know, in box order, as text."""
    known = declared_keys(command, box) | _ENVELOPE_KEYS
    return [key.decode("utf-8", "replace") for key in box if key not in known]


def parse_request(command: type[ApiCommand], box: dict[bytes, bytes]) -> dict[str, Any]:
    """Decode a request box into keyword arguments, or raise a MALFORMED ``ApiError``.

    Stock AMP raises its own errors for missing keys and undecodable values;
    here every such case gets the text the API promises, naming the field.
    """
    if command.takes_no_arguments:
        if any(key not in _ENVELOPE_KEYS for key in box):
            raise malformed(f"{command.verb()} takes no arguments")
        return {}
    values: dict[str, Any] = {}
    for name, argument in command.arguments:
        field = name.decode("ascii")
        pyname = amp._wireNameToPythonIdentifier(name)
        if isinstance(argument, Chunked):
            raw = join_chunks(name, box)
        else:
            raw = box.get(name)
        if raw is None:
            if not argument.optional:
                raise malformed(f"missing required field: {field}")
            values[pyname] = None
            continue
        if name in command.capped and len(raw) > BODY_CAP:
            raise malformed(f"{field} length {len(raw)} exceeds cap {BODY_CAP}")
        if raw == b"" and not argument.optional and name not in command.may_be_empty:
            raise malformed(f"empty {field} value")
        try:
            if isinstance(argument, Chunked):
                value = argument.decode(raw)
            else:
                value = argument.fromString(raw)
        except (ValueError, TypeError, UnicodeDecodeError):
            shown = raw[:64].decode("utf-8", "replace")
            raise malformed(f"invalid {field} value: {json.dumps(shown)}") from None
        values[pyname] = value
    return values


def request_box(command: type[ApiCommand], arguments: dict[str, Any], tag: bytes) -> amp.AmpBox:
    """The request box for ``command`` (client side), ``None`` arguments left out."""
    present = {key: value for key, value in arguments.items() if value is not None}
    box = command.makeArguments(present, None)
    box[amp.COMMAND] = command.commandName
    box[amp.ASK] = tag
    return box


def parse_answer(command: type[ApiCommand], box: dict[bytes, bytes]) -> dict[str, Any]:
    """Decode an answer box (client side) into a dict of the response fields."""
    return command.parseResponse(dict(box), None)
