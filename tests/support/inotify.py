"""Linux inotify through ctypes: enough to react to a file event within microseconds.

Used by the hostile-owner tests to swap a path for a symlink the moment the
daemon creates or opens something in a directory the owner controls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
from collections.abc import Iterator

import attrs

IN_OPEN = 0x00000020
IN_CREATE = 0x00000100
IN_ISDIR = 0x40000000
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000

_EVENT = struct.Struct("iIII")
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


@attrs.frozen
class Event:
    wd: int
    mask: int
    name: str


class Inotify:
    """One inotify instance; ``events`` yields what arrived within ``timeout`` seconds."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_CLOEXEC | IN_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd

    def watch(self, path: str | os.PathLike[str], mask: int) -> int:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
        return wd

    def events(self, timeout: float) -> Iterator[Event]:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset < len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = data[offset:offset + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
            offset += length
            yield Event(wd, mask, name)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
