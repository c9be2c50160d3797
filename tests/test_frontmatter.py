"""The email file format: rendering, reading and read-state edits (spec 20 §7, §9, D2, D6)."""

from __future__ import annotations

import datetime
import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimx.mail.frontmatter import (
    INBOUND_KEYS,
    SENT_KEYS,
    FrontmatterError,
    parse,
    read_email,
    read_header_fields,
    render_email,
    set_read_state,
    split,
)

SPEC_EXAMPLE = """\
+++
id = "2025-01-01-120000-hello"
message_id = "abc123@example.com"
thread_id = "5e8ba5eb6cc1fd88"
from = "Sender Name <sender@example.com>"
to = "alice@test.com"
delivered_to = "alice@test.com"
subject = "Hello"
date = "2025-01-01T12:00:00Z"
received_at = "2025-01-01T12:00:03.512000Z"
received_from_ip = "203.0.113.50"
size_bytes = 512
dkim = "none"
spf = "none"
dmarc = "none"
trusted = "none"
mailbox = "alice"
read = false

[[attachments]]
filename = "notes.txt"
content_type = "text/plain"
size = 19
path = "notes.txt"
+++

Email with attachment.
"""


def inbound_fields(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "id": "2025-01-01-120000-hello",
        "message_id": "abc123@example.com",
        "thread_id": "5e8ba5eb6cc1fd88",
        "from": "Sender Name <sender@example.com>",
        "to": "alice@test.com",
        "cc": None,
        "reply_to": "",
        "delivered_to": "alice@test.com",
        "subject": "Hello",
        "date": "2025-01-01T12:00:00Z",
        "received_at": "2025-01-01T12:00:03.512000Z",
        "received_from_ip": "203.0.113.50",
        "size_bytes": 512,
        "in_reply_to": None,
        "references": None,
        "list_id": None,
        "auto_submitted": None,
        "dkim": "none",
        "spf": "none",
        "dmarc": "none",
        "trusted": "none",
        "mailbox": "alice",
        "read": False,
    }
    fields.update(overrides)
    return fields


def top_level_keys(rendered: bytes) -> list[str]:
    toml_text, _ = split(rendered)
    keys = []
    for line in toml_text.splitlines():
        if line.startswith("[["):
            break
        if " = " in line:
            keys.append(line.split(" = ", 1)[0])
    return keys


def delimiter_lines(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line == b"+++")


# --------------------------------------------------------------------------- rendering


def test_spec_example_is_reproduced_exactly() -> None:
    attachments = [{"filename": "notes.txt", "content_type": "text/plain", "size": 19,
                    "path": "notes.txt"}]
    rendered = render_email(inbound_fields(attachments=attachments), "Email with attachment.")
    assert rendered.decode() == SPEC_EXAMPLE


def test_cli_plain_message_has_exactly_the_required_keys_in_order() -> None:
    fields = inbound_fields(received_from_ip=None)
    scrambled = dict(reversed(list(fields.items())))
    assert top_level_keys(render_email(scrambled, "hi\n")) == [
        "id", "message_id", "thread_id", "from", "to", "delivered_to", "subject", "date",
        "received_at", "size_bytes", "dkim", "spf", "dmarc", "trusted", "mailbox", "read"]


def test_optional_keys_in_schema_order_and_unknown_keys_after() -> None:
    fields = inbound_fields(
        custom_note="kept", labels=["work", "urgent"], read_at="2025-01-02T00:00:00.000000Z",
        auto_submitted="auto-replied", list_id="<mylist.example.com>",
        references="<a@x> <b@x>", in_reply_to="b@x", reply_to="r@x", cc="c@x")
    keys = top_level_keys(render_email(fields, ""))
    assert keys == [key for key in INBOUND_KEYS if key in keys] + ["custom_note"]
    assert keys.index("read_at") == keys.index("read") + 1
    loaded = parse(render_email(fields, ""))
    assert loaded["labels"] == ["work", "urgent"]
    assert loaded["list_id"] == "<mylist.example.com>"


def test_empty_message_id_is_still_written() -> None:
    loaded = parse(render_email(inbound_fields(message_id=""), "x"))
    assert loaded["message_id"] == ""


def test_sent_copy_order() -> None:
    fields = {
        "delivery_status": "delivered", "outbound_format": "markdown", "outbound": True,
        "delivered_at": "2025-01-01T12:00:05.000000Z", "read": False, "mailbox": "alice",
        "trusted": "none", "dmarc": "none", "spf": "none", "dkim": "pass", "size_bytes": 900,
        "date": "2025-01-01T12:00:00Z", "subject": "Re: Hello", "delivered_to": "bob@x.com",
        "to": "bob@x.com", "from": "alice@test.com", "thread_id": "ee9cd2a3ead6d5cc",
        "message_id": "m1@test.com", "id": "2025-01-01-120000-re-hello",
        "in_reply_to": "parent@example.com", "references": "<parent@example.com>",
        "received_at": None, "delivery_details": None, "bcc": [],
        "attachments": [{"filename": "a.pdf", "content_type": "application/pdf", "size": 3}],
    }
    rendered = render_email(fields, "**Markdown** source\n")
    keys = top_level_keys(rendered)
    assert keys == [key for key in SENT_KEYS if key in keys]
    assert "received_at" not in keys and "bcc" not in keys and "delivery_details" not in keys
    assert keys[-4:] == ["outbound", "outbound_format", "delivery_status", "delivered_at"]
    fields_back, body = read_email(rendered)
    assert fields_back["attachments"] == [
        {"filename": "a.pdf", "content_type": "application/pdf", "size": 3}]
    assert body == "**Markdown** source\n"


@pytest.mark.parametrize(("body", "ending"), [("", b"+++\n\n\n"), ("text", b"+++\n\ntext\n"),
                                              ("text\n", b"+++\n\ntext\n")])
def test_body_separation_and_final_newline(body: str, ending: bytes) -> None:
    assert render_email(inbound_fields(), body).endswith(ending)


@pytest.mark.parametrize("value", [
    "x\n+++\ny", "+++", "C+++ tips", 'quote " and back\\slash', "tab\tcr\rnul\x00del\x7f",
    "\x85next line \u2028 sep", "''' \"\"\" multi", "émoji 🎉 日本語", "[[attachments]]",
])
def test_strings_stay_on_one_line_and_round_trip(value: str) -> None:
    rendered = render_email(inbound_fields(**{"from": value, "subject": value}), "body\n")
    assert delimiter_lines(rendered) == 2
    assert len(split(rendered)[0].splitlines()) == 17
    loaded = tomllib.loads(split(rendered)[0])
    assert loaded["from"] == loaded["subject"] == value


def test_lone_surrogate_cannot_break_the_file() -> None:
    rendered = render_email(inbound_fields(subject="bad \ud800 half"), "b\udcff")
    assert parse(rendered)["subject"] == "bad \ufffd half"


def test_other_value_types_round_trip() -> None:
    when = datetime.datetime(2025, 1, 1, 12, 0, tzinfo=datetime.UTC)
    extra = {"score": 0.5, "count": 3, "flag": True, "when": when, "nested": {"a": 1, "b": "c"},
             "mixed": [1, 2], "weird key": "v"}
    loaded = parse(render_email(inbound_fields(**extra), ""))
    for key, value in extra.items():
        assert loaded[key] == value


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text(), st.text())
def test_any_text_round_trips(sender: str, subject: str, body: str) -> None:
    rendered = render_email(inbound_fields(**{"from": sender, "subject": subject}), body)
    loaded, body_back = read_email(rendered)
    assert (loaded["from"], loaded["subject"]) == (sender, subject)
    assert body_back == body + ("" if body.endswith("\n") else "\n")


# --------------------------------------------------------------------------- reading


def test_split_tolerates_crlf_and_finds_the_body() -> None:
    rendered = render_email(inbound_fields(), "line one\n+++\nnot a delimiter\n")
    crlf = rendered.replace(b"\n", b"\r\n")
    toml_text, rest = split(crlf)
    assert tomllib.loads(toml_text)["id"] == "2025-01-01-120000-hello"
    assert rest == "\r\nline one\r\n+++\r\nnot a delimiter\r\n"
    assert read_email(rendered)[1] == "line one\n+++\nnot a delimiter\n"
    assert split(rendered.decode())[0] == split(rendered)[0]


def test_reference_style_multiline_and_literal_strings_are_accepted() -> None:
    written_elsewhere = (
        '+++\nid = "x"\nsubject = \'He said "hi"\'\nfrom = """line\nsecond"""\nread = true\n'
        "+++\n\nbody\n")
    assert parse(written_elsewhere) == {"id": "x", "subject": 'He said "hi"',
                                        "from": "line\nsecond", "read": True}


@pytest.mark.parametrize("data", [b"", b"no frontmatter\n", b"+++\nid = \"x\"\n",
                                  b" +++\nid = 1\n+++ \n", b"++++\na = 1\n++++\n"])
def test_missing_delimiters_are_malformed(data: bytes) -> None:
    with pytest.raises(FrontmatterError, match="^malformed frontmatter$"):
        split(data)
    with pytest.raises(FrontmatterError, match="^malformed frontmatter$"):
        read_header_fields(data)


def test_bad_toml_is_reported() -> None:
    with pytest.raises(FrontmatterError, match="^failed to parse frontmatter: "):
        parse(b"+++\nid = \nread = false\n+++\n\nbody\n")


def test_read_header_fields_does_not_read_the_body(tmp_path: Path) -> None:
    path = tmp_path / "big.md"
    path.write_bytes(render_email(inbound_fields(), "x" * (20 * 1024 * 1024)))

    def bytes_read() -> int:
        with open("/proc/self/io") as io:
            return int(next(line for line in io if line.startswith("rchar:")).split()[1])

    before = bytes_read()
    fields = read_header_fields(path)
    assert bytes_read() - before < 256 * 1024
    assert fields["message_id"] == "abc123@example.com"
    assert fields["received_at"] == "2025-01-01T12:00:03.512000Z"


def test_read_header_fields_follows_a_long_frontmatter(tmp_path: Path) -> None:
    attachments = [{"filename": f"file-{i}.txt", "content_type": "text/plain", "size": i,
                    "path": f"file-{i}.txt"} for i in range(600)]
    data = render_email(inbound_fields(attachments=attachments), "body\n")
    assert len(data) > 3 * 16384
    path = tmp_path / "many.md"
    path.write_bytes(data)
    for max_bytes in (16384, 100, 7):
        fields = read_header_fields(path, max_bytes=max_bytes)
        assert len(fields["attachments"]) == 600
    assert read_header_fields(os.fspath(path))["id"] == read_header_fields(data)["id"]


def test_read_header_fields_accepts_a_file_ending_at_the_delimiter(tmp_path: Path) -> None:
    path = tmp_path / "short.md"
    path.write_bytes(b'+++\nid = "short"\n+++')
    assert read_header_fields(path, max_bytes=8) == {"id": "short"}


# --------------------------------------------------------------------------- read state

ORIGINAL = (
    b"+++\n"
    b'id = "2025-01-01-120000-hello"\n'
    b'message_id = "abc123@example.com"\n'
    b"# a comment someone added\n"
    b'subject = "Hello"\n'
    b"size_bytes   =   512\n"
    b"read = false\n"
    b'labels = [ "work" ,"later" ]\n'
    b'x_custom = { a = 1 }\n'
    b"\n"
    b"[[attachments]]\n"
    b'filename = "notes.txt"\n'
    b'path = "notes.txt"\n'
    b"+++\n"
    b"\n"
    b"Body with\r\nmixed endings and a +++\n+++\nline.\n"
)


def test_mark_read_touches_only_read_and_read_at() -> None:
    marked = set_read_state(ORIGINAL, True, "2025-01-02T03:04:05.000006Z")
    expected = ORIGINAL.replace(
        b"read = false\n", b'read = true\nread_at = "2025-01-02T03:04:05.000006Z"\n')
    assert marked == expected
    assert parse(marked)["read"] is True


def test_mark_read_again_overwrites_read_at_in_place() -> None:
    once = set_read_state(ORIGINAL, True, "2025-01-02T00:00:00.000000Z")
    twice = set_read_state(once, True, "2025-01-03T00:00:00.000000Z")
    assert twice == once.replace(b"2025-01-02T00:00:00.000000Z", b"2025-01-03T00:00:00.000000Z")


def test_mark_unread_restores_the_original_bytes() -> None:
    marked = set_read_state(ORIGINAL, True, "2025-01-02T00:00:00.000000Z")
    assert set_read_state(marked, False, "ignored") == ORIGINAL
    assert set_read_state(ORIGINAL, False, "ignored") == ORIGINAL


def test_mark_read_on_a_rendered_file_places_read_at_after_read() -> None:
    fields = inbound_fields(labels=["a"], attachments=[
        {"filename": "n.txt", "content_type": "text/plain", "size": 1, "path": "n.txt"}])
    rendered = render_email(fields, "body\n")
    marked = set_read_state(rendered, True, "2025-01-02T00:00:00.000000Z")
    keys = top_level_keys(marked)
    assert keys[keys.index("read") + 1] == "read_at"
    assert read_email(marked)[1] == "body\n"
    loaded = parse(marked)
    assert loaded["labels"] == ["a"] and loaded["attachments"][0]["filename"] == "n.txt"


def test_set_read_state_errors() -> None:
    with pytest.raises(FrontmatterError, match="^malformed frontmatter$") as malformed:
        set_read_state(b"+++\nread = false\n", True, "now")
    assert malformed.value.__cause__ is None
    with pytest.raises(FrontmatterError, match="^failed to parse frontmatter: ") as bad:
        set_read_state(b"+++\nread = = false\n+++\n\nbody\n", True, "now")
    assert bad.value.__cause__ is not None


def test_mark_read_adds_read_before_the_first_table_when_the_file_has_none() -> None:
    original = ORIGINAL.replace(b"read = false\n", b"")
    marked = set_read_state(original, True, "2025-01-02T00:00:00.000000Z")
    assert marked == original.replace(
        b"x_custom = { a = 1 }\n",
        b'x_custom = { a = 1 }\nread = true\nread_at = "2025-01-02T00:00:00.000000Z"\n')
    assert parse(marked)["attachments"][0]["filename"] == "notes.txt"


def test_read_state_edit_keeps_crlf_multiline_values_and_a_misplaced_read_at() -> None:
    original = (b"+++\r\n"
                b'read_at = "2024-12-31T00:00:00.000000Z"\r\n'
                b"labels = [\r\n  \"a\",\r\n  \"read = false\",\r\n]\r\n"
                b"read = true\r\n"
                b'subject = """not\r\nread = a key"""\r\n'
                b"+++\r\n\r\nbody\r\n")
    unread = set_read_state(original, False, "ignored")
    assert unread == original.replace(
        b'read_at = "2024-12-31T00:00:00.000000Z"\r\n', b"").replace(
        b"read = true\r\n", b"read = false\r\n")
    again = set_read_state(unread, True, "2025-01-02T00:00:00.000000Z")
    assert again == unread.replace(
        b"read = false\r\n", b'read = true\r\nread_at = "2025-01-02T00:00:00.000000Z"\r\n')
    assert parse(again)["labels"] == ["a", "read = false"]
    assert parse(again)["subject"] == "not\nread = a key"
