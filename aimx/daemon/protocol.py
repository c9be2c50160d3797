"""The daemon socket protocol: AMP commands, error codes and chunked fields.

Both sides import this module: the daemon (``aimx.daemon.api``) to decode requests
and encode answers, the clients (``aimx.daemon.client``) to build requests and read
answers. Each verb is one AMP command named exactly after it; each error code
of the API is one AMP error code whose description is the human reason.

AMP caps a value at 65,535 bytes, so large fields (``body``, ``html_body``
and list ``rows``) are split across the keys ``<f>``, ``<f>.2``, ``<f>.3``,
... and the first missing key ends the value.

The box format and the few AMP value encodings the API uses are implemented
here rather than taken from ``twisted.protocols.amp``: that import costs a
CLI process more than everything else it does, and the wire bytes are the
same, so the daemon's AMP protocol reads and answers these boxes unchanged.
"""

from __future__ import annotations

import json
import struct
from typing import Any, ClassVar

# Every code the daemon answers with (spec 40 §6); agents branch on these.
ERROR_CODES: tuple[str, ...] = (
    "MAILBOX", "DOMAIN", "SIGN", "DELIVERY", "TEMP", "MALFORMED", "PROTOCOL",
    "NOTFOUND", "IO", "VALIDATION", "NONEMPTY", "ECONFLICT", "EACCES", "ENOENT",
    "BODY_TOO_LARGE",
)

BODY_CAP = 26_214_400  # per body / html_body field
MAX_BOX_BYTES = 52 * 1024 * 1024 + 64 * 1024  # a bigger box drops the connection
DEFAULT_TIMEOUT_SECS = 30.0  # incomplete box, or idle connection with nothing in flight
MAX_KEY_LENGTH = 0xFF  # AMP's limits on one key and one value
MAX_VALUE_LENGTH = 0xFFFF
CHUNK = MAX_VALUE_LENGTH
_MAX_REASON_BYTES = MAX_VALUE_LENGTH

# AMP's envelope keys.
COMMAND = b"_command"
ASK = b"_ask"
ANSWER = b"_answer"
ERROR = b"_error"
ERROR_CODE = b"_error_code"
ERROR_DESCRIPTION = b"_error_description"
# The tag of the one error box a refused connection gets before the daemon
# closes it (over a connection cap): no request was read, so there is no ask
# to answer. Clients never use it for a request.
REFUSED_TAG = b"0"


class Box(dict):
    """One AMP box: ``serialize()`` gives the wire bytes, like ``amp.AmpBox``."""

    def serialize(self) -> bytes:
        out = []
        for key, value in sorted(self.items()):
            if not isinstance(key, bytes) or not isinstance(value, bytes):
                raise TypeError(f"box keys and values must be bytes: {key!r}")
            if len(key) > MAX_KEY_LENGTH or len(value) > MAX_VALUE_LENGTH:
                raise ValueError(f"box key or value too long: {key!r}")
            out += [struct.pack("!H", len(key)), key, struct.pack("!H", len(value)), value]
        out.append(b"\x00\x00")
        return b"".join(out)


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


def _python_name(name: bytes) -> str:
    return name.decode("ascii").replace("-", "_")


class Argument:
    """One typed field of a box: ``toString``/``fromString`` match AMP's encodings."""

    def __init__(self, optional: bool = False) -> None:
        self.optional = optional

    def toString(self, value: Any) -> bytes:  # noqa: N802 (AMP's name)
        raise NotImplementedError

    def fromString(self, data: bytes) -> Any:  # noqa: N802 (AMP's name)
        raise NotImplementedError

    def toBox(self, name: bytes, strings: dict[bytes, bytes], value: Any) -> None:  # noqa: N802
        strings[name] = self.toString(value)

    def fromBox(self, name: bytes, strings: dict[bytes, bytes]) -> Any:  # noqa: N802
        if name not in strings:
            if not self.optional:
                raise KeyError(name)
            return None
        return self.fromString(strings[name])


class Unicode(Argument):
    def toString(self, value: str) -> bytes:  # noqa: N802
        return value.encode("utf-8")

    def fromString(self, data: bytes) -> str:  # noqa: N802
        return data.decode("utf-8")


class Integer(Argument):
    def toString(self, value: int) -> bytes:  # noqa: N802
        return str(int(value)).encode("ascii")

    def fromString(self, data: bytes) -> int:  # noqa: N802
        return int(data)


class ListOf(Argument):
    """A list of one element type, each item prefixed by its 16-bit length."""

    def __init__(self, element: Argument, optional: bool = False) -> None:
        super().__init__(optional)
        self.element = element

    def toString(self, value: list[Any]) -> bytes:  # noqa: N802
        out = []
        for item in value:
            data = self.element.toString(item)
            out += [struct.pack("!H", len(data)), data]
        return b"".join(out)

    def fromString(self, data: bytes) -> list[Any]:  # noqa: N802
        items = []
        offset = 0
        while offset < len(data):
            if offset + 2 > len(data):
                raise ValueError("truncated list item length")
            (size,) = struct.unpack_from("!H", data, offset)
            offset += 2
            if offset + size > len(data):
                raise ValueError("truncated list item")
            items.append(self.element.fromString(data[offset:offset + size]))
            offset += size
        return items


class Flag(Argument):
    """A boolean sent as AMP's ``True``/``False``, also accepting other clients' spellings."""

    _TRUE = (b"True", b"true", b"1", b"yes")
    _FALSE = (b"False", b"false", b"0", b"no")

    def toString(self, value: bool) -> bytes:  # noqa: N802
        return b"True" if value else b"False"

    def fromString(self, data: bytes) -> bool:  # noqa: N802
        if data in self._TRUE:
            return True
        if data in self._FALSE:
            return False
        raise TypeError(f"bad boolean value: {data!r}")


class Chunked(Argument):
    """Bytes of any length, split across ``<f>``, ``<f>.2``, ... keys."""

    def toBox(self, name: bytes, strings: dict[bytes, bytes], value: Any) -> None:  # noqa: N802
        data = self.encode(value)
        pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        for key, piece in zip(chunk_keys(name, len(pieces)), pieces, strict=True):
            strings[key] = piece

    def fromBox(self, name: bytes, strings: dict[bytes, bytes]) -> Any:  # noqa: N802
        data = join_chunks(name, strings)
        if data is None:
            if not self.optional:
                raise KeyError(name)
            return None
        return self.decode(data)

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


def _to_strings(fields: list[tuple[bytes, Argument]], values: dict[str, Any]) -> Box:
    box = Box()
    for name, argument in fields:
        value = values.get(_python_name(name))
        if value is None:
            if not argument.optional:
                raise KeyError(name)
            continue
        argument.toBox(name, box, value)
    return box


# -- commands ---------------------------------------------------------------


class ApiCommand:
    """Base of every verb: its fields, the shared error map and the request rules.

    ``may_be_empty`` names required fields whose emptiness the verb judges
    itself (e.g. a mailbox name gets the name-check text, not MALFORMED).
    ``takes_no_arguments`` makes any argument key a MALFORMED request.
    """

    errors = _AMP_ERRORS
    reverseErrors: ClassVar[dict[bytes, type[ApiError]]] = {  # noqa: N815 (AMP's name)
        code: cls for cls, code in _AMP_ERRORS.items()}
    may_be_empty: ClassVar[frozenset[bytes]] = frozenset()
    takes_no_arguments: ClassVar[bool] = False
    capped: ClassVar[frozenset[bytes]] = frozenset()

    commandName: ClassVar[bytes]
    arguments: ClassVar[list[tuple[bytes, Argument]]] = []
    response: ClassVar[list[tuple[bytes, Argument]]] = []

    @classmethod
    def verb(cls) -> str:
        return cls.commandName.decode("ascii")

    @classmethod
    def makeResponse(cls, objects: dict[str, Any], proto: Any = None) -> Any:  # noqa: N802
        """The answer box for a handler's result (daemon side, inside AMP's dispatch)."""
        from twisted.protocols import amp

        return amp.AmpBox(_to_strings(cls.response, objects))


class Send(ApiCommand):
    commandName = b"SEND"
    arguments = [
        (b"body", Chunked()),
        (b"text_only", Flag(optional=True)),
        (b"html_body", Chunked(optional=True)),
        (b"idempotency_key", Unicode(optional=True)),
    ]
    response = [(b"message_id", Unicode())]
    capped = frozenset({b"body", b"html_body"})


class MarkRead(ApiCommand):
    commandName = b"MARK-READ"
    arguments = [(b"mailbox", Unicode()), (b"id", Unicode())]
    response: ClassVar[list] = []
    may_be_empty = frozenset({b"id"})


class MarkUnread(ApiCommand):
    commandName = b"MARK-UNREAD"
    arguments = [(b"mailbox", Unicode()), (b"id", Unicode())]
    response: ClassVar[list] = []
    may_be_empty = frozenset({b"id"})


class MailboxCreate(ApiCommand):
    commandName = b"MAILBOX-CREATE"
    arguments = [(b"name", Unicode()), (b"owner", Unicode(optional=True))]
    response = [(b"address", Unicode()), (b"owner", Unicode())]
    may_be_empty = frozenset({b"name"})


class MailboxDelete(ApiCommand):
    commandName = b"MAILBOX-DELETE"
    arguments = [(b"name", Unicode()), (b"force", Flag(optional=True))]
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
        (b"mailbox", Unicode()),
        (b"event", Unicode()),
        (b"name", Unicode(optional=True)),
        (b"cmd", ListOf(Unicode(), optional=True)),
        (b"fire_on_untrusted", Flag(optional=True)),
        (b"type", Unicode(optional=True)),
        (b"timeout_secs", Integer(optional=True)),
    ]
    response = [(b"name", Unicode())]


class HookDelete(ApiCommand):
    commandName = b"HOOK-DELETE"
    # ``mailbox`` picks one when root sees the name on mailboxes of several owners.
    arguments = [(b"name", Unicode()), (b"mailbox", Unicode(optional=True))]
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
        (b"tag", Unicode()),
        (b"git_hash", Unicode()),
        (b"target", Unicode()),
        (b"build_date", Unicode()),
    ]
    takes_no_arguments = True


class Watch(ApiCommand):
    """Subscribe this connection to mail events of the named mailboxes (none: all readable).

    The answer lists the mailboxes now watched; from then on the daemon sends
    ``WATCH-EVENT`` commands over the same connection until it closes.
    """

    commandName = b"WATCH"
    arguments = [(b"mailboxes", ListOf(Unicode(), optional=True))]
    response = [(b"mailboxes", ListOf(Unicode()))]


class WatchEvent(ApiCommand):
    """Daemon → client on a watching connection; the client answers each with an empty box.

    ``event`` is one of ``WATCH_EVENTS``. Mail events carry ``folder`` and
    ``id`` (and, for ``stored``, ``from`` and ``subject``); mailbox events only
    the ``mailbox``. ``at`` is when the daemon saw it (RFC 3339, UTC).
    Never a verb a client may send: it is not in ``COMMANDS``.
    """

    commandName = b"WATCH-EVENT"
    arguments = [
        (b"event", Unicode()),
        (b"mailbox", Unicode()),
        (b"at", Unicode()),
        (b"folder", Unicode(optional=True)),
        (b"id", Unicode(optional=True)),
        (b"from", Unicode(optional=True)),
        (b"subject", Unicode(optional=True)),
    ]
    response: ClassVar[list] = []


# Kinds of WATCH-EVENT: a new email in a folder, a read-state change, a mailbox coming or going.
WATCH_EVENTS: tuple[str, ...] = ("stored", "read", "unread", "created", "deleted")


COMMANDS: dict[bytes, type[ApiCommand]] = {
    cmd.commandName: cmd
    for cmd in (Send, MarkRead, MarkUnread, MailboxCreate, MailboxDelete, MailboxList,
                HookCreate, HookDelete, HookList, Version, Watch)
}

_ENVELOPE_KEYS = frozenset({COMMAND, ASK})


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
        pyname = _python_name(name)
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


def request_box(command: type[ApiCommand], arguments: dict[str, Any], tag: bytes) -> Box:
    """The request box for ``command`` (a client's verb, or the daemon's ``WATCH-EVENT``),
    ``None`` arguments left out."""
    box = _to_strings(command.arguments, arguments)
    box[COMMAND] = command.commandName
    box[ASK] = tag
    return box


def parse_answer(command: type[ApiCommand], box: dict[bytes, bytes]) -> dict[str, Any]:
    """Decode an answer box (client side) into a dict of the response fields."""
    return {_python_name(name): argument.fromBox(name, box)
            for name, argument in command.response}
