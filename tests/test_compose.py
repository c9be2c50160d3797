"""Client-side composition (``aimx send`` / MCP) and the reply threading helpers."""

from __future__ import annotations

import datetime
import email
import email.policy
import re

import pytest

from aimx.mail.compose import (
    ComposeError,
    check_header_value,
    compose_message,
    reply_recipient,
    reply_subject,
    reply_threading,
)
from aimx.mail.message import parse_message

WHEN = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)


def compose(**overrides) -> bytes:
    args = dict(from_addr="alice@example.com", to="bob@remote.example", subject="Hi",
                body="Hello\nthere", now=WHEN)
    args.update(overrides)
    return compose_message(**args)


def header_block(raw: bytes) -> list[str]:
    return raw.split(b"\r\n\r\n", 1)[0].decode("ascii").split("\r\n")


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_plain_message_headers_in_order_with_crlf_body():
    raw = compose()
    names = [line.split(":", 1)[0] for line in header_block(raw)]
    assert names == ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version",
                     "Content-Type"]
    msg = parsed(raw)
    assert msg["Date"] == "Wed, 04 Mar 2026 05:06:07 +0000"
    assert re.fullmatch(r"<[0-9a-f-]{36}@example\.com>", msg["Message-ID"])
    assert raw.endswith(b"\r\n\r\nHello\r\nthere\r\n")
    assert "In-Reply-To" not in msg and "References" not in msg


def test_message_id_uses_the_domain_of_a_display_name_sender():
    msg = parsed(compose(from_addr='"Alice A." <alice@agents.example>'))
    assert msg["Message-ID"].endswith("@agents.example>")
    assert compose(from_addr="nobody").count(b"@localhost>") == 1


def test_non_ascii_subject_and_display_names_are_encoded_and_decode_back():
    raw = compose(from_addr="Zoë Bot <zoe@example.com>", to="Jürgen <j@remote.example>",
                  subject="Grüße aus Köln — a subject long enough to need folding twice over",
                  body="Tschüß")
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii() and b"=?utf-8?" in head
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    msg = parsed(raw)
    assert str(msg["Subject"]) == ("Grüße aus Köln — a subject long enough to need folding "
                                   "twice over")
    assert msg["From"].addresses[0].display_name == "Zoë Bot"
    assert msg["To"].addresses[0].addr_spec == "j@remote.example"
    assert msg.get_content() == "Tschüß\r\n"


@pytest.mark.parametrize("field", ["from_addr", "to", "subject"])
@pytest.mark.parametrize("breaker", ["\r\n", "\n", "\r"])
def test_line_breaks_in_headers_are_refused(field, breaker):
    name = {"from_addr": "From", "to": "To", "subject": "Subject"}[field]
    with pytest.raises(ComposeError) as refused:
        compose(**{field: f"x{breaker}Bcc: victim@example.org"})
    assert str(refused.value) == (f"Header '{name}' contains CRLF characters. "
                                  "Possible header injection")


def test_check_header_value_accepts_ordinary_text():
    check_header_value("Subject", "Quarterly report: numbers, charts & more")
    with pytest.raises(ComposeError):
        check_header_value("Subject", "a\rb")


def test_more_than_one_recipient_is_refused():
    with pytest.raises(ComposeError, match="one recipient"):
        compose(to="a@remote.example, b@remote.example")
    # A comma inside a quoted display name is still one recipient.
    msg = parsed(compose(to='"Doe, John" <john@remote.example>'))
    assert [a.addr_spec for a in msg["To"].addresses] == ["john@remote.example"]


def test_reply_to_sets_threading_headers_with_brackets():
    msg = parsed(compose(reply_to="orig@x.example"))
    assert msg["In-Reply-To"] == "<orig@x.example>"
    assert msg["References"] == "<orig@x.example>"
    msg = parsed(compose(reply_to="<orig@x.example>", references="<a@x> <b@x>"))
    assert msg["In-Reply-To"] == "<orig@x.example>" and msg["References"] == "<a@x> <b@x>"
    msg = parsed(compose(references="<a@x> <b@x>"))
    assert "In-Reply-To" not in msg and "References" not in msg
    msg = parsed(compose(reply_to="orig@x\r\n.example", references="<a@x>\r\n <b@x>"))
    assert msg["In-Reply-To"] == "<orig@x.example>" and msg["References"] == "<a@x> <b@x>"


def test_attachments_round_trip_byte_for_byte(tmp_path):
    binary = bytes(range(256)) * 40
    (tmp_path / "data.bin").write_bytes(binary)
    (tmp_path / 'a"b.txt').write_text("quoted name\n")
    (tmp_path / "résumé.pdf").write_bytes(b"%PDF-1.4 fake")
    raw = compose(body="see attached", attachments=[
        tmp_path / "data.bin", str(tmp_path / 'a"b.txt'), tmp_path / "résumé.pdf"])
    assert b'filename="a\\"b.txt"' in raw
    assert b"filename*=utf-8''r%C3%A9sum%C3%A9.pdf" in raw
    assert re.search(rb'boundary="aimx-[0-9a-f]{32}"', raw)
    base64_lines = [line for line in raw.split(b"\r\n") if re.fullmatch(rb"[A-Za-z0-9+/=]+", line)]
    assert base64_lines and max(len(line) for line in base64_lines) == 76
    msg = parsed(raw)
    assert msg.get_content_type() == "multipart/mixed"
    body, *files = list(msg.iter_parts())
    assert body.get_content_type() == "text/plain" and body.get_content() == "see attached"
    assert [(part.get_filename(), part.get_content_type(), part.get_content()) for part in files] \
        == [("data.bin", "application/octet-stream", binary),
            ('a"b.txt', "text/plain", "quoted name\n"),
            ("résumé.pdf", "application/pdf", b"%PDF-1.4 fake")]


def test_missing_or_non_file_attachments_are_refused(tmp_path):
    with pytest.raises(ComposeError) as refused:
        compose(attachments=[tmp_path / "nope.txt"])
    assert str(refused.value) == f"Attachment file not found: {tmp_path / 'nope.txt'}"
    with pytest.raises(ComposeError) as refused:
        compose(attachments=[tmp_path])
    assert str(refused.value) == f"Attachment path is not a file: {tmp_path}"


@pytest.mark.parametrize(("original", "expected"), [
    ("Hello", "Re: Hello"),
    ("Re: Hello", "Re: Hello"),
    ("RE: Hello", "RE: Hello"),
    ("re:Hello", "re:Hello"),
    ("Fwd: Hello", "Re: Fwd: Hello"),
    ("", "Re: "),
])
def test_reply_subject_never_doubles_re(original, expected):
    assert reply_subject(original) == expected


def test_reply_recipient_prefers_reply_to_then_from():
    assert reply_recipient({"from": "Bob <bob@x.example>"}) == "bob@x.example"
    assert reply_recipient({"from": "bob@x.example", "reply_to": ""}) == "bob@x.example"
    assert reply_recipient({"from": "Bob <bob@x.example>",
                            "reply_to": "List <list@y.example>, other@z"}) == "list@y.example"
    assert reply_recipient({"from": ""}) is None


def test_reply_threading_extends_the_chain():
    assert reply_threading("c@x", "<a@x> <b@x>") == ("<c@x>", "<a@x> <b@x> <c@x>")
    assert reply_threading("orig@y", None) == ("<orig@y>", "<orig@y>")
    assert reply_threading("orig@y", "prev@x") == ("<orig@y>", "<prev@x> <orig@y>")
    assert reply_threading("<c@x>", "<a@x><c@x>") == ("<c@x>", "<a@x> <c@x>")
    assert reply_threading("", "<a@x>") == (None, None)
    assert reply_threading(None, None) == (None, None)


def test_long_non_ascii_display_names_fold_with_crlf_and_keep_utf8_addresses():
    name = "Zoë " + "Ångström " * 12
    raw = compose(to=f"{name.strip()} <zoë@remote.example>")
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"\n" not in head.replace(b"\r\n", b"")
    assert "<zoë@remote.example>".encode() in head
    # Decoded as aimx's own inbound parser does (the stdlib's address parser adds stray
    # spaces between adjacent encoded words).
    assert parse_message(raw, WHEN).to == f"{name.strip()} <zoë@remote.example>"
