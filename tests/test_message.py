"""MIME parsing: header fields, body, attachments and thread ids (spec 20 §5, §8, §12)."""

from __future__ import annotations

import base64
import datetime
import email
import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aimx.mail import frontmatter
from aimx.mail.headers import compute_thread_id, rfc3339_utc
from aimx.mail.message import (
    HTML_TRUNCATED_MARKER,
    MessageParseError,
    ParsedMessage,
    parse_message,
)

MIME_DIR = Path(__file__).parent / "data" / "mime"
NOW = datetime.datetime(2025, 3, 14, 15, 9, 26, 123456, tzinfo=datetime.UTC)


def sample(name: str, crlf: bool = True) -> bytes:
    """A sample message; SMTP hands us CRLF line ends, ``aimx ingest`` may get LF."""
    raw = (MIME_DIR / name).read_bytes()
    return raw.replace(b"\n", b"\r\n") if crlf else raw


def parse(raw: bytes | str) -> ParsedMessage:
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    return parse_message(raw, NOW)


def message(headers: str, body: str = "body\n") -> bytes:
    return (headers.strip("\n") + "\n\n" + body).replace("\n", "\r\n").encode("utf-8")


# --------------------------------------------------------------------------- header fields


@pytest.mark.parametrize("crlf", [True, False], ids=["crlf", "lf"])
def test_plain_message_fields(crlf: bool) -> None:
    raw = sample("plain.eml", crlf)
    parsed = parse(raw)
    assert parsed.message_id == "plain-001@example.com"
    assert parsed.from_ == "Alice <alice@example.com>"
    assert parsed.from_addresses == ("alice@example.com",)
    assert parsed.to == "bob@test.com"
    assert parsed.cc is None and parsed.reply_to is None
    assert parsed.subject == "Hello"
    assert parsed.date == "2025-01-01T12:00:00Z"
    assert parsed.list_id == "<mylist.example.com>"
    assert parsed.auto_submitted == "auto-replied"
    assert parsed.in_reply_to is None and parsed.references is None
    assert parsed.thread_id == compute_thread_id(None, None, "<plain-001@example.com>")
    assert parsed.size_bytes == len(raw)
    assert parsed.body == "Hi Bob,\n\njust a plain message.\n-- \nAlice\n"
    assert parsed.attachments == ()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Wed, 1 Jan 2025 12:00:00 +0000", "2025-01-01T12:00:00Z"),
        ("Wed, 1 Jan 2025 12:00:00 -0500", "2025-01-01T12:00:00-05:00"),
        ("1 Jan 2025 07:30:05 +0530 (IST)", "2025-01-01T07:30:05+05:30"),
        ("Wed, 1 Jan 2025 12:00:00 -0000", "2025-01-01T12:00:00Z"),
        ("Wed, 01 Jan 2025 12:00:00 GMT", "2025-01-01T12:00:00Z"),
        ("2025-01-01T12:00:00+02:00", "2025-01-01T12:00:00+02:00"),
    ],
)
def test_date_keeps_the_senders_offset(header: str, expected: str) -> None:
    assert parse(message(f"From: a@example.com\nDate: {header}")).date == expected


@pytest.mark.parametrize("headers", ["Date: yesterday-ish", "Date: Wed, 31 Feb 2025 12:00:00 +0000",
                                     "Subject: no date header"])
def test_missing_or_bad_date_becomes_receive_time(headers: str) -> None:
    parsed = parse(message(f"From: a@example.com\n{headers}"))
    assert parsed.date == rfc3339_utc(NOW) == "2025-03-14T15:09:26.123456Z"


def test_rfc3339_utc_converts_and_assumes_utc_for_naive() -> None:
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    assert rfc3339_utc(datetime.datetime(2025, 1, 1, 14, 0, 1, tzinfo=plus_two)) == (
        "2025-01-01T12:00:01.000000Z")
    assert rfc3339_utc(datetime.datetime(2025, 1, 1, 12, 0, 1, 5)) == "2025-01-01T12:00:01.000005Z"


@pytest.mark.parametrize(
    ("header", "expected"),
    [("Message-ID: <abc@example.com>", "abc@example.com"),
     ("Message-ID: bare-id@example.com", "bare-id@example.com"),
     ("Message-Id:\n  <folded@example.com>", "folded@example.com"),
     ("Subject: none", "")],
)
def test_message_id_is_stored_without_brackets(header: str, expected: str) -> None:
    assert parse(message(f"From: a@example.com\n{header}")).message_id == expected


def test_repeated_header_counts_by_last_occurrence() -> None:
    parsed = parse(message(
        "From: first@example.com\nFrom: Second <second@example.com>\n"
        "To: one@test.com\nTo: two@test.com\nSubject: first\nSubject: second\n"
        "Message-ID: <one@x>\nMessage-ID: <two@x>"))
    assert parsed.from_ == "Second <second@example.com>"
    assert parsed.from_addresses == ("second@example.com",)
    assert parsed.to == "two@test.com"
    assert parsed.subject == "second"
    assert parsed.message_id == "two@x"


def test_address_fields() -> None:
    parsed = parse(message(
        'From: "Doe, John" <john@example.com>, =?utf-8?q?Ren=C3=A9e?= <renee@Example.COM>\n'
        "To: First <first@test.com>, second@test.com\n"
        "Cc: =?utf-8?q?Doe=2C_Jane?= <jane@example.com>,\n carl@example.com\n"
        "Reply-To: Team <team@example.com>"))
    assert parsed.from_ == "Doe, John <john@example.com>"
    assert parsed.from_addresses == ("john@example.com", "renee@Example.COM")
    assert parsed.to == "First <first@test.com>"  # the first To address only
    assert parsed.cc == "Doe, Jane <jane@example.com>, carl@example.com"
    assert parsed.reply_to == "Team <team@example.com>"


def test_missing_parties_are_empty_or_absent() -> None:
    parsed = parse(message("Subject: nobody\nTo: undisclosed-recipients:;"))
    assert (parsed.from_, parsed.to, parsed.cc, parsed.from_addresses) == ("", "", None, ())


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= =?utf-8?b?YXVzIEvDtmxu?=", "Grüßeaus Köln"),
        ("Subject: =?utf-8?q?caf=C3?=\n =?utf-8?q?=A9?= time", "café time"),  # split character
        ("Subject: =?iso-8859-1?q?Caf=E9?= ok", "Café ok"),
        ("Subject: =?x-no-such-charset?q?hi?=", "hi"),
        ("Subject: line\n one\n\ttwo", "line one\ttwo"),
        ("Subject: =?utf-8?q?a=0D=0Ab=00c?=", "abc"),  # CR, LF and NUL never survive
        ("Subject:    ", "(no subject)"),
        ("X-Other: no subject at all", "(no subject)"),
        ("Subject: C+++ tips", "C+++ tips"),
    ],
)
def test_subject_decoding(header: str, expected: str) -> None:
    assert parse(message(f"From: a@example.com\n{header}")).subject == expected


def test_undecodable_encoded_words_do_not_hide_the_rest() -> None:
    parsed = parse(message("From: =?utf-8?b?!!?= <a@x>\nSubject: =?utf-8?b?!!?= text"))
    assert parsed.subject == "text"
    assert parsed.from_ == "a@x"


def test_eight_bit_headers_read_as_utf8() -> None:
    parsed = parse(sample("eightbit_headers.eml"))
    assert parsed.from_ == "Jörg Müller <joerg@example.de>"
    assert parsed.subject == "Grüße aus Köln"
    assert parsed.body == "Schöne Grüße!\n"


def test_unknown_charset_is_lossy_not_fatal() -> None:
    parsed = parse(sample("unknown_charset.eml"))
    assert parsed.from_ == "Worf <worf@example.org>"
    assert parsed.subject == "nuqneH"
    assert parsed.body == "Qapla'\n"
    assert parsed.date == rfc3339_utc(NOW)


def test_latin1_body_and_invalid_utf8_body() -> None:
    latin = b"From: a@x\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nCaf\xe9\r\n"
    assert parse(latin).body == "Café\n"
    broken = b"From: a@x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nbad \xff byte\r\n"
    assert parse(broken).body == "bad \ufffd byte\n"


# --------------------------------------------------------------------------- threading


@pytest.mark.parametrize(
    ("in_reply_to", "references", "message_id", "expected"),
    [
        (None, None, "<abc123@example.com>", "5e8ba5eb6cc1fd88"),
        (None, None, "abc123@example.com", "5e8ba5eb6cc1fd88"),
        ("<parent@example.com>", None, "<reply-1@example.com>", "ee9cd2a3ead6d5cc"),
        ("<parent@example.com>", "<root@example.com> <parent@example.com>", "<r2@x>",
         "ee9cd2a3ead6d5cc"),
        (None, "<root@example.com> <msg2@example.com>", "<msg3@example.com>",
         "7988c5c046ac0d33"),
        ("   ", "<root@example.com>", "<msg3@example.com>", "7988c5c046ac0d33"),
        (None, None, None, "e3b0c44298fc1c14"),
        ("", "", "", "e3b0c44298fc1c14"),
    ],
)
def test_thread_id_vectors(in_reply_to, references, message_id, expected) -> None:
    assert compute_thread_id(in_reply_to, references, message_id) == expected


def test_replies_and_a_sent_reply_share_the_thread_id() -> None:
    first = parse(message("From: a@x\nMessage-ID: <r1@x>\nIn-Reply-To: <parent@example.com>"))
    second = parse(message(
        "From: b@x\nMessage-ID: <r2@x>\nIn-Reply-To: <parent@example.com> (Alice's message)\n"
        "References: <root@example.com>\n <parent@example.com>"))
    sent = compute_thread_id("<parent@example.com>", "<parent@example.com>", "<s@test.com>")
    assert first.thread_id == second.thread_id == sent == "ee9cd2a3ead6d5cc"
    assert second.in_reply_to == "parent@example.com"
    assert second.references == "<root@example.com> <parent@example.com>"


def test_references_keep_the_whole_chain_bracketed() -> None:
    parsed = parse(message("From: a@x\nReferences: <a@x>\n\t<b@x><c@x>  <d@x>"))
    assert parsed.references == "<a@x> <b@x> <c@x> <d@x>"
    bare = parse(message("From: a@x\nReferences: one@x two@x\nIn-Reply-To: two@x"))
    assert bare.references == "<one@x> <two@x>"
    assert bare.in_reply_to == "two@x"
    assert bare.thread_id == compute_thread_id(None, None, "two@x")


# --------------------------------------------------------------------------- body


@pytest.mark.parametrize("name", ["alternative_plain_first.eml", "alternative_html_first.eml"])
def test_alternative_prefers_plain_in_either_order(name: str) -> None:
    parsed = parse(sample(name))
    assert parsed.body.startswith("The plain half")
    assert "<" not in parsed.body and "HTML" not in parsed.body
    assert parsed.attachments == ()  # the HTML half is not an attachment


def test_html_only_becomes_readable_text_with_links() -> None:
    body = parse(sample("html_only.eml")).body
    lines = [line for line in body.splitlines() if line.strip()]
    assert lines[:2] == ["Hello", "World & friends"]
    assert "[the post](https://example.com/post/1)" in body
    assert "<" not in body and "alert" not in body and "color" not in body
    assert "ignored title" not in body and "\r" not in body


def test_html_only_spec_example() -> None:
    body = parse(b"From: a@x\r\nContent-Type: text/html\r\n\r\n<h1>Hello</h1><p>World</p>").body
    assert [line for line in body.splitlines() if line] == ["Hello", "World"]


def test_huge_html_is_cut_at_2_mib_with_the_marker() -> None:
    paragraph = "<p>" + "word " * 200 + "</p>\n"
    html = paragraph * (2 * 1024 * 1024 // len(paragraph) + 50)
    raw = b"From: a@x\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html.encode()
    body = parse(raw).body
    assert body.endswith("word\n\n[...HTML body truncated at 2 MB for rendering...]")
    assert body.endswith(HTML_TRUNCATED_MARKER)
    small = parse(b"From: a@x\r\nContent-Type: text/html\r\n\r\n" + paragraph.encode()).body
    assert HTML_TRUNCATED_MARKER not in small


def test_all_inline_text_parts_are_joined() -> None:
    png = base64.b64encode(b"\x89PNG fake").decode()
    raw = message(
        'From: a@x\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="m"',
        "--m\nContent-Type: text/plain\n\nFirst part.\n"
        "--m\nContent-Type: image/png\nContent-Transfer-Encoding: base64\n\n" + png + "\n"
        "--m\nContent-Type: text/plain; charset=utf-8\n\nSecond part.\n--m--\n")
    parsed = parse(raw)
    assert parsed.body == "First part.\n\nSecond part.\n"
    assert [(a.filename, a.content_type, a.data) for a in parsed.attachments] == [
        ("", "image/png", b"\x89PNG fake")]


def test_image_first_mixed_still_has_its_text() -> None:
    raw = message(
        "From: a@x\nContent-Type: multipart/mixed; boundary=m",
        "--m\nContent-Type: image/gif\n\nGIF89a\n"
        "--m\nContent-Type: text/plain\n\nCaption.\n--m--\n")
    parsed = parse(raw)
    assert parsed.body == "Caption."
    assert [a.content_type for a in parsed.attachments] == ["image/gif"]


def test_missing_boundary_keeps_the_text() -> None:
    parsed = parse(sample("missing_boundary.eml"))
    assert "The text of a message whose boundary was never declared." in parsed.body
    assert "\r" not in parsed.body


def test_absurdly_deep_nesting_falls_back_to_raw_text() -> None:
    depth = 2000
    parts = ["From: a@x\r\nSubject: deep\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"]
    parts += [f"--b{i - 1}\r\nContent-Type: multipart/mixed; boundary=b{i}\r\n\r\n"
              for i in range(1, depth)]
    parts.append(f"--b{depth - 1}\r\nContent-Type: text/plain\r\n\r\nthe deep text\r\n")
    parsed = parse("".join(parts))
    assert parsed.subject == "deep"
    assert "the deep text" in parsed.body


# --------------------------------------------------------------------------- attachments


def test_nested_multiparts_and_inline_image() -> None:
    parsed = parse(sample("nested.eml"))
    assert parsed.body == "See the picture and the report."
    assert parsed.cc == "Carol <carol@example.com>, dave@example.com"
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("", "image/png"), ("report.pdf", "application/pdf"), ("notes.txt", "text/plain")]
    image, pdf, notes = parsed.attachments
    assert image.data.startswith(b"\x89PNG\r\n\x1a\n")
    assert pdf.data == b"%PDF-1.4\n% fake pdf for tests\n"
    assert notes.data == b"These are my notes."


def test_message_rfc822_is_one_file() -> None:
    parsed = parse(sample("rfc822_attachment.eml"))
    assert parsed.body == "Forwarding the message below."
    assert len(parsed.attachments) == 1
    attached = parsed.attachments[0]
    assert (attached.filename, attached.content_type) == ("original.eml", "message/rfc822")
    inner = email.message_from_bytes(attached.data)
    assert inner["Subject"] == "original"
    assert inner["Message-ID"] == "<orig@example.org>"
    inner_text = [p for p in inner.walk() if p.get_content_type() == "text/plain"][0]
    assert inner_text.get_payload(decode=True).strip() == b"Inner body text."
    raw = sample("rfc822_attachment.eml")
    original = raw[raw.index(b"From: Original"):raw.index(b"\r\n--fwd--")]
    assert attached.data.rstrip(b"\r\n") == original  # the embedded bytes, not a re-rendering


def test_embedded_message_headers_are_not_refolded() -> None:
    embedded = (b"Subject: " + b"long words " * 12 + b"end\r\nX-Folded: one\r\n two\r\n"
                b"From: J\xc3\xb6rg <j@x>\r\n\r\nbody \xc3\xa9")
    raw = (b"From: a@x\r\nContent-Type: multipart/mixed; boundary=f\r\n\r\n--f\r\n"
           b"Content-Type: message/rfc822\r\n\r\n" + embedded + b"\r\n--f--\r\n")
    assert parse(raw).attachments[0].data == embedded


def test_calendar_invite_and_csv_are_attachments() -> None:
    parsed = parse(sample("calendar.eml", crlf=False))
    assert parsed.body == "You are invited to Planning."
    assert [a.content_type for a in parsed.attachments] == ["text/calendar", "text/csv"]
    assert parsed.attachments[0].data.startswith(b"BEGIN:VCALENDAR\nMETHOD:REQUEST\n")
    assert parsed.attachments[1].data == b"name,role\nalice,agent"


def test_broken_base64_is_decoded_as_far_as_possible() -> None:
    parsed = parse(sample("broken_base64.eml"))
    assert parsed.body == "Grüße aus Köln\n"
    (data,) = parsed.attachments
    assert data.filename == "data.bin"
    assert data.data == bytes(range(60))


def test_dsn_bounce() -> None:
    parsed = parse(sample("bounce.eml"))
    assert parsed.from_ == "Mail Delivery System <MAILER-DAEMON@mx.example.net>"
    assert parsed.auto_submitted == "auto-replied"
    assert "550 5.1.1 User unknown" in parsed.body
    assert [a.content_type for a in parsed.attachments] == [
        "message/delivery-status", "message/rfc822"]
    status, original = parsed.attachments
    assert b"Final-Recipient: rfc822; nobody@example.net" in status.data
    assert b"Status: 5.1.1" in status.data
    assert email.message_from_bytes(original.data)["Message-ID"] == "<sent-by-alice@test.com>"


def test_attachment_names_rfc2231_and_encoded_words() -> None:
    parsed = parse(sample("rfc2231_names.eml"))
    assert parsed.body == "Three files."
    assert [a.filename for a in parsed.attachments] == [
        "€ budget.txt", "Quarterly report.bin", "Rechnung März.pdf"]


def test_text_attachments_keep_their_original_bytes() -> None:
    raw = message(
        "From: a@x\nContent-Type: multipart/mixed; boundary=m",
        "--m\nContent-Type: text/plain\n\nbody\n"
        "--m\nContent-Type: text/plain; charset=iso-8859-1; name=\"latin.txt\"\n"
        "Content-Transfer-Encoding: quoted-printable\n\nCaf=E9\n"
        "--m\nContent-Disposition: attachment; filename=\"untyped\"\n\nraw\n"
        "--m\nContent-Type: Application/X-Weird; name=\"../../etc/passwd\"\n\nx\n--m--\n")
    attachments = parse(raw).attachments
    assert [(a.filename, a.content_type, a.data) for a in attachments] == [
        ("latin.txt", "text/plain", b"Caf\xe9"),
        ("untyped", "application/octet-stream", b"raw"),
        ("../../etc/passwd", "application/x-weird", b"x"),
    ]


# --------------------------------------------------------------------------- what is a message


@pytest.mark.parametrize("raw", [b"", b"   ", b"\r\n\r\n", b" \t\n"])
def test_empty_input_is_not_a_message(raw: bytes) -> None:
    with pytest.raises(MessageParseError, match="^Failed to parse email$"):
        parse_message(raw, NOW)


def test_headerless_text_is_kept_as_a_body() -> None:
    parsed = parse(b"just some words\r\nand a second line\r\n")
    assert parsed.body == "just some words\nand a second line\n"
    assert (parsed.from_, parsed.subject, parsed.message_id) == ("", "(no subject)", "")


def test_header_fields_feed_the_frontmatter() -> None:
    parsed = parse(sample("nested.eml"))
    fields = {"id": "2025-01-01-120000-nested-parts", **parsed.header_fields(),
              "delivered_to": "alice@test.com", "received_at": rfc3339_utc(NOW),
              "dkim": "none", "spf": "none", "dmarc": "none", "trusted": "none",
              "mailbox": "alice", "read": False}
    loaded, body = frontmatter.read_email(frontmatter.render_email(fields, parsed.body))
    assert loaded["cc"] == parsed.cc and loaded["from"] == parsed.from_
    assert "in_reply_to" not in loaded and "list_id" not in loaded
    assert body == parsed.body + "\n"


def test_a_25_mib_message_needs_only_a_few_copies_of_itself(tmp_path: Path) -> None:
    """Measured in a fresh interpreter so the peak belongs to the parse alone."""
    payload = bytes(range(256)) * (18 * 1024 * 1024 // 256)
    raw = (b"From: a@x\r\nSubject: big\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
           b"--XX\r\nContent-Type: text/plain\r\n\r\nhi\r\n--XX\r\n"
           b"Content-Type: application/octet-stream; name=big.bin\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(payload).replace(b"\n", b"\r\n") + b"--XX--\r\n")
    path = tmp_path / "big.eml"
    path.write_bytes(raw)
    script = (
        "import datetime, hashlib, json, resource, sys\n"
        "from aimx.mail.message import parse_message\n"
        "raw = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "parsed = parse_message(raw, datetime.datetime.now(datetime.UTC))\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "data = parsed.attachments[0].data\n"
        "print(json.dumps([grown * 1024, len(data), hashlib.sha256(data).hexdigest()]))\n")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                         check=True, timeout=120, cwd=Path(__file__).parent.parent)
    grown, size, digest = json.loads(out.stdout)
    assert (size, digest) == (len(payload), hashlib.sha256(payload).hexdigest())
    assert grown < 4 * len(raw), f"parse grew the process by {grown / len(raw):.1f}x the input"


# --------------------------------------------------------------------------- never crash

_SAMPLES = sorted(path.name for path in MIME_DIR.glob("*.eml"))


def _check_never_crashes(raw: bytes) -> None:
    try:
        parsed = parse_message(raw, NOW)
    except MessageParseError:
        assert not raw.strip()
        return
    fields = {"id": "x", **parsed.header_fields(), "delivered_to": "alice@test.com",
              "received_at": rfc3339_utc(NOW), "mailbox": "alice", "read": False,
              "attachments": [{"filename": a.filename, "content_type": a.content_type,
                               "size": len(a.data), "path": a.filename}
                              for a in parsed.attachments]}
    rendered = frontmatter.render_email(fields, parsed.body)
    assert rendered.startswith(b"+++\n")
    toml_text, _rest = frontmatter.split(rendered)
    assert "+++" not in toml_text.splitlines()
    loaded = tomllib.loads(toml_text)
    _fields, body = frontmatter.read_email(rendered)
    assert body == parsed.body + ("" if parsed.body.endswith("\n") else "\n")
    for key, value in fields.items():
        if key != "attachments" and value not in (None, ""):
            assert loaded[key] == value
    assert len(loaded.get("attachments", [])) == len(parsed.attachments)
    for value in (parsed.from_, parsed.to, parsed.subject, parsed.message_id, parsed.date):
        assert not set(value) & {"\r", "\n", "\x00"}
    assert "\r" not in parsed.body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes_never_crash(raw: bytes) -> None:
    _check_never_crashes(raw)


_HEADER_NAMES = [b"From", b"To", b"Cc", b"Reply-To", b"Subject", b"Date", b"Message-ID",
                 b"In-Reply-To", b"References", b"List-ID", b"Content-Type",
                 b"Content-Disposition", b"Content-Transfer-Encoding"]
_ATOMS = [b"=?", b"?=", b"utf-8", b"?q?", b"?b?", b"<", b">", b"@", b",", b";", b'"', b"\\",
          b"(", b")", b":", b" ", b"\r\n ", b"\xff", b"\xc3\xa9", b"=C3", b"*0*=", b"''", b"%E2",
          b"multipart/mixed", b"boundary=", b"text/html", b"name=", b"filename*=", b"base64",
          b"quoted-printable", b"Thu, 1 Jan 2026 00:00:00 +9999", b"a", b"x@y", b"--"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_HEADER_NAMES),
                          st.lists(st.sampled_from(_ATOMS), max_size=12).map(b"".join)),
                max_size=8),
       st.lists(st.sampled_from(_ATOMS), max_size=20).map(b"".join))
def test_hostile_headers_never_crash(headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    _check_never_crashes(b"".join(name + b": " + value + b"\r\n" for name, value in headers)
                         + b"\r\n" + body)


@st.composite
def mutated_samples(draw: st.DrawFn) -> bytes:
    raw = bytearray(sample(draw(st.sampled_from(_SAMPLES)), crlf=draw(st.booleans())))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        at = draw(st.integers(0, len(raw)))
        if action == "flip" and raw:
            raw[min(at, len(raw) - 1)] = draw(st.integers(0, 255))
        elif action == "insert":
            raw[at:at] = draw(st.sampled_from([
                b"\r\n", b"\n\n", b"\x00", b"--", b"=?utf-8?b?", b"?=", b"<", b">", b"\xff\xfe",
                b"Content-Type: multipart/mixed; boundary=", b"\r\n--alt\r\n", b":", b";",
                b"charset=\"x-bogus\"", b"Content-Transfer-Encoding: base64\r\n",
                b"=?x-unknown?q?=FF=00?=", b"filename*0*=utf-8''%FF%"]))
        elif action == "delete":
            raw[at:at + draw(st.integers(1, 40))] = b""
        elif action == "truncate":
            del raw[at:]
        elif action == "duplicate":
            raw[at:at] = raw[max(0, at - 80):at]
    return bytes(raw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_samples())
def test_mutated_messages_never_crash(raw: bytes) -> None:
    _check_never_crashes(raw)
