"""The socket protocol's wire rules and the blocking client, without a daemon.

Request decoding, chunking and error mapping are checked on real AMP boxes;
the client is exercised over real Unix sockets (a socketpair, a bound socket
nobody listens on, a path that cannot be a socket).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator

import pytest
from twisted.protocols import amp

from aimx.daemon import protocol
from aimx.daemon.api import peer_credentials
from aimx.daemon.client import (
    Client,
    ConnectFailed,
    DaemonDown,
    MalformedReply,
    interpret_reply,
    read_box,
)
from aimx.daemon.protocol import (
    BODY_CAP,
    ApiError,
    HookCreate,
    MailboxCreate,
    MailboxList,
    MarkRead,
    Send,
    Version,
    parse_request,
    request_box,
)


def wire(box: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """A box as the peer receives it: serialised, then parsed by AMP itself."""
    (parsed,) = amp.parseString(amp.AmpBox(box).serialize())
    return parsed


def malformed_reason(command, box) -> str:
    with pytest.raises(ApiError) as info:
        parse_request(command, wire(box))
    assert info.value.code == "MALFORMED"
    return info.value.reason


# -- chunking -------------------------------------------------------------------


def test_large_body_travels_in_chunks_and_reassembles_exactly():
    body = bytes(range(256)) * 800  # 204,800 bytes: four AMP values
    box = request_box(Send, {"body": body, "text_only": True}, b"7")
    assert sorted(k for k in box if k.startswith(b"body")) == [
        b"body", b"body.2", b"body.3", b"body.4"]
    assert all(len(v) <= amp.MAX_VALUE_LENGTH for v in box.values())
    received = parse_request(Send, wire(dict(box)))
    assert received == {"body": body, "text_only": True, "html_body": None,
                        "idempotency_key": None}


def test_chunked_rows_round_trip_through_a_response_box():
    rows = [{"name": f"mailbox-{i}", "address": None, "total": i} for i in range(3000)]
    box = protocol.MailboxList.makeResponse({"rows": rows}, None)
    assert b"rows.2" in box
    box[amp.ANSWER] = b"1"
    assert interpret_reply(MailboxList, wire(dict(box))) == {"rows": rows}


def test_first_missing_chunk_key_ends_the_value():
    box = {b"_command": b"SEND", b"_ask": b"1", b"body": b"abc", b"body.3": b"lost"}
    assert parse_request(Send, wire(box))["body"] == b"abc"


# -- request decoding -------------------------------------------------------------


def test_missing_required_argument_names_the_field():
    box = {b"_command": b"MARK-READ", b"_ask": b"1", b"id": b"x"}
    assert malformed_reason(MarkRead, box) == "missing required field: mailbox"


def test_empty_required_argument_is_malformed_but_verb_judged_fields_pass():
    box = {b"_command": b"MARK-READ", b"_ask": b"1", b"mailbox": b"", b"id": b"x"}
    assert malformed_reason(MarkRead, box) == "empty mailbox value"
    # An empty id is the MARK verb's own NOTFOUND case, an empty name the name check's.
    assert parse_request(MarkRead, wire({b"mailbox": b"a", b"id": b""}))["id"] == ""
    assert parse_request(MailboxCreate, wire({b"name": b""})) == {"name": "", "owner": None}


@pytest.mark.parametrize("verb", [b"MAILBOX-LIST", b"HOOK-LIST", b"VERSION"])
def test_list_and_version_verbs_refuse_any_argument(verb):
    command = protocol.COMMANDS[verb]
    box = {b"_command": verb, b"_ask": b"1", b"name": b"x"}
    assert malformed_reason(command, box) == f"{verb.decode()} takes no arguments"
    assert parse_request(command, wire({b"_command": verb, b"_ask": b"1"})) == {}


def test_body_over_the_cap_is_refused_with_its_length():
    box = dict(request_box(Send, {"body": b"x" * (BODY_CAP + 1)}, b"1"))
    assert malformed_reason(Send, box) == f"body length {BODY_CAP + 1} exceeds cap 26214400"
    box = dict(request_box(Send, {"body": b"x", "html_body": b"y" * (BODY_CAP + 5)}, b"1"))
    assert malformed_reason(Send, box) == f"html_body length {BODY_CAP + 5} exceeds cap 26214400"
    # Exactly at the cap is fine.
    exact = dict(request_box(Send, {"body": b"x" * BODY_CAP}, b"1"))
    assert len(parse_request(Send, exact)["body"]) == BODY_CAP


def test_undecodable_values_are_malformed_naming_the_field():
    base = {b"mailbox": b"a", b"event": b"on_receive"}
    assert malformed_reason(HookCreate, {**base, b"timeout_secs": b"soon"}).startswith(
        "invalid timeout_secs value")
    assert malformed_reason(HookCreate, {**base, b"fire_on_untrusted": b"maybe"}).startswith(
        "invalid fire_on_untrusted value")
    assert malformed_reason(MarkRead, {b"mailbox": b"\xff\xfe", b"id": b"x"}).startswith(
        "invalid mailbox value")


def test_hook_create_cmd_is_a_list_of_strings_and_extra_keys_are_reported():
    box = dict(request_box(HookCreate, {"mailbox": "alice", "event": "on_receive",
                                        "cmd": ["/bin/echo", "a b", "ü"]}, b"1"))
    box[b"run_as"] = b"root"
    received = wire(box)
    assert parse_request(HookCreate, received)["cmd"] == ["/bin/echo", "a b", "ü"]
    assert protocol.undeclared_keys(HookCreate, received) == ["run_as"]


# -- errors -------------------------------------------------------------------------


def test_every_code_is_an_amp_error_of_every_command():
    for command in protocol.COMMANDS.values():
        codes = {code.decode() for code in command.errors.values()}
        assert codes == set(protocol.ERROR_CODES)
    # What a Twisted AMP client would raise for an error box is the same ApiError.
    cls = Send.reverseErrors[b"ECONFLICT"]
    err = cls("dir taken")
    assert isinstance(err, ApiError)
    assert (err.code, err.reason, str(err)) == ("ECONFLICT", "dir taken", "[ECONFLICT] dir taken")


def test_reasons_go_on_the_wire_as_one_line():
    assert protocol.clean_reason("failed to parse x:\r\nline 3\n") == "failed to parse x: line 3"
    assert len(protocol.clean_reason("é" * 40000).encode()) <= amp.MAX_VALUE_LENGTH


# -- the blocking client ---------------------------------------------------------------


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A short fresh directory for a Unix socket (paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="aimx-p-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def serve_once(directory: str, reply: bytes | dict) -> tuple[str, threading.Thread, list[dict]]:
    """A one-shot server on a real Unix socket in ``directory`` that records the request
    and sends ``reply``.

    A dict reply is a box whose ``@TAG@`` values become the request's tag.
    """
    path = os.path.join(directory, "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    seen: list[dict] = []

    def run():
        conn, _ = server.accept()
        with conn:
            seen.append(read_box(conn))
            if isinstance(reply, dict):
                tag = seen[0][b"_ask"]
                box = amp.AmpBox({k: tag if v == b"@TAG@" else v for k, v in reply.items()})
                conn.sendall(box.serialize())
            else:
                conn.sendall(reply)
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return path, thread, seen


def answer_box(fields: dict[bytes, bytes]) -> dict:
    return {**fields, amp.ANSWER: b"@TAG@"}


def test_client_sends_a_proper_amp_request_and_returns_the_answer(socket_dir):
    reply = answer_box({b"tag": b"0.1", b"git_hash": b"abc", b"target": b"x86_64-linux",
                        b"build_date": b"unknown"})
    path, thread, seen = serve_once(socket_dir, reply)
    result = Client(path, timeout=10).call(Version)
    thread.join(5)
    assert result == {"tag": "0.1", "git_hash": "abc", "target": "x86_64-linux",
                      "build_date": "unknown"}
    assert seen[0][b"_command"] == b"VERSION"


def test_client_raises_the_daemon_error_with_code_and_reason(socket_dir):
    box = {b"_error": b"@TAG@", b"_error_code": b"NONEMPTY",
           b"_error_description": b"mailbox 'a' has 2 files"}
    path, thread, seen = serve_once(socket_dir, box)
    with pytest.raises(ApiError) as info:
        Client(path, timeout=10).call(MarkRead, mailbox="a", id="x")
    thread.join(5)
    assert (info.value.code, info.value.reason) == ("NONEMPTY", "mailbox 'a' has 2 files")
    assert seen[0][b"mailbox"] == b"a"


@pytest.mark.parametrize("reply, why", [
    (b"", "connection closed"),
    (b"\x00\x03abc\x00", "connection closed"),  # cut mid-box
    ({b"_answer": b"other"}, "does not answer"),
    ({b"_answer": b"@TAG@"}, "bad VERSION answer"),
])
def test_client_reports_replies_it_cannot_read(reply, why, socket_dir):
    path, thread, _ = serve_once(socket_dir, reply)
    with pytest.raises(MalformedReply) as info:
        Client(path, timeout=10).call(Version)
    thread.join(5)
    assert why in info.value.why
    assert str(info.value).startswith("Malformed response from aimx daemon: ")


def test_missing_or_dead_socket_means_daemon_down(tmp_path):
    with pytest.raises(DaemonDown) as info:
        Client(tmp_path / "nothing.sock").call(Version)
    assert info.value.socket_path == str(tmp_path / "nothing.sock")
    # A socket file nobody listens on (a crashed daemon): connection refused.
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()
    with pytest.raises(DaemonDown):
        Client(stale).call(Version)


def test_other_connect_errors_are_connect_failed(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    path = not_a_dir / "aimx.sock"
    with pytest.raises(ConnectFailed) as info:
        Client(path).call(Version)
    assert str(info.value).startswith(f"Failed to connect to aimx daemon at {path}: ")


def test_peer_credentials_come_from_the_kernel():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        cred = peer_credentials(left)
    assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.getuid(), os.getgid())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, pytest.raises(OSError):
        peer_credentials(tcp)


def test_read_box_refuses_an_oversized_reply():
    left, right = socket.socketpair()
    with left, right:
        right.sendall(amp.AmpBox({b"k": b"v" * 100, b"k2": b"v" * 100}).serialize())
        with pytest.raises(MalformedReply):
            read_box(left, limit=150)
