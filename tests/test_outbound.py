"""SEND on the daemon side: checks and codes, signature, MIME assembly, DKIM, sent copy.

Domain ``example.com``, mailbox ``alice`` = ``alice@example.com`` and a catchall
``*@example.com`` (spec 30 §5). Signatures are verified with dkimpy against the
public half of a key made for the run.
"""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import quopri
import re
import stat

import dkim
import pytest

from aimx.config import Config, Mailbox
from aimx.daemon.outbound import (
    BODY_TOO_LARGE_REASON,
    SendError,
    mail_drop,
    prepare_send,
    quoted_printable,
    sent_copy_fields,
)
from aimx.mail import frontmatter
from aimx.mail.compose import MUTUALLY_EXCLUSIVE, compose_message
from aimx.mail.headers import compute_thread_id
from aimx.mail.render import MARKDOWN_CAP
from aimx.storage.mailstore import MailStore
from tests.support.dkimkeys import shared_key

WHEN = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)
DEFAULT_SIGNATURE_TEXT = "Sent from AIMX.  \r\nhttps://aimx.email"


def make_config(signature: str | None = None, owner: str = "root") -> Config:
    return Config(path="config.toml", domain="example.com", signature=signature, mailboxes=[
        Mailbox("alice", "alice@example.com", owner),
        Mailbox("catchall", "*@example.com", "aimx-catchall"),
    ])


def request(headers: str, body: str = "Hello") -> bytes:
    """A hand-written client message (headers separated by CRLF)."""
    return (headers.replace("\n", "\r\n") + "\r\n\r\n" + body).encode()


BASIC = "From: alice@example.com\nTo: bob@remote.example\nSubject: Hi\nMessage-ID: <m1@example.com>"


def send(raw: bytes, *, config: Config | None = None, text_only: bool = False,
         html_body: bytes | None = None, caller_uid: int = 0):
    return prepare_send(config or make_config(), raw, text_only=text_only, html_body=html_body,
                        caller_uid=caller_uid, key_pem=shared_key("outbound").private_pem,
                        now=WHEN)


def refusal(raw: bytes, **kwargs) -> SendError:
    with pytest.raises(SendError) as refused:
        send(raw, **kwargs)
    return refused.value


def dkim_verifies(signed: bytes) -> bool:
    public = shared_key("outbound").public_der

    def dnsfunc(name, timeout=5):
        assert name == b"aimx._domainkey.example.com."
        return b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    return dkim.verify(signed, dnsfunc=dnsfunc)


def wire(prepared) -> email.message.EmailMessage:
    return email.message_from_bytes(prepared.signed, policy=email.policy.default)


def top_headers(signed: bytes) -> str:
    return signed.split(b"\r\n\r\n", 1)[0].decode("ascii")


def leaves(msg) -> list:
    return [part for part in msg.walk() if not part.is_multipart()]


# --- case 14: signing, mail drop, sent copy ------------------------------------------------


def test_signed_markdown_send_drops_and_stores_a_sent_copy(tmp_path):
    prepared = send(compose_message(from_addr="alice@example.com", to="bob@remote.example",
                                    subject="Status", body="**All** good", now=WHEN))
    head = top_headers(prepared.signed)
    assert head.startswith("DKIM-Signature:")
    signature = re.sub(r"\s+", "", head.split("\r\n", 1)[0] + head.split("\r\nFrom:", 1)[0])
    for tag in ("a=rsa-sha256;", "c=relaxed/relaxed;", "d=example.com;", "s=aimx;"):
        assert tag in signature
    assert dkim_verifies(prepared.signed)
    text, html = leaves(wire(prepared))
    assert text.get_content().endswith("Sent from AIMX.  \r\nhttps://aimx.email")
    assert '<a href="https://aimx.email"' in html.get_content()

    drop = tmp_path / "spool" / "drop.eml"
    mail_drop(drop, prepared.signed)
    mail_drop(drop, prepared.signed)
    marker = b"----- AIMX TEST DROP -----\n"
    assert drop.read_bytes() == (marker + prepared.signed + b"\n") * 2

    fields = sent_copy_fields(prepared, "delivered", now=WHEN)
    stored = MailStore(tmp_path / "data").publish_sent("alice", "root", fields, prepared.body,
                                                       WHEN)
    assert stat.S_IMODE(stored.path.stat().st_mode) == 0o600
    assert [p.name for p in stored.path.parent.iterdir()] == [stored.path.name]
    record, body = frontmatter.read_email(stored.path.read_bytes())
    assert record["outbound"] is True and record["outbound_format"] == "markdown"
    assert record["delivery_status"] == "delivered"
    assert record["delivered_at"].startswith("2026-03-04T05:06:07")
    assert body.rstrip("\n") == "**All** good\n\nSent from AIMX.  \nhttps://aimx.email"


def test_signing_failure_is_sign():
    with pytest.raises(SendError) as refused:
        prepare_send(make_config(), request(BASIC), text_only=False, html_body=None,
                     caller_uid=0, key_pem=b"-----BEGIN RSA PRIVATE KEY-----\nnope\n")
    assert refused.value.code == "SIGN"


# --- cases 15–18: sender, authorization, malformed requests --------------------------------


def test_sender_domain_must_be_ours():
    error = refusal(request(BASIC.replace("alice@example.com", "alice@other.org", 1)))
    assert (error.code, error.reason) == (
        "DOMAIN", "sender domain 'other.org' does not match aimx domain 'example.com'")


@pytest.mark.parametrize("sender", ["ALICE@EXAMPLE.COM", '"Alice" <alice@example.com>',
                                    "Alice Example <Alice@Example.com>"])
def test_sender_matches_mailbox_in_any_case_and_with_display_name(sender):
    prepared = send(request(BASIC.replace("alice@example.com", sender, 1)))
    assert prepared.mailbox.name == "alice"
    assert prepared.envelope_from.lower() == "alice@example.com"


@pytest.mark.parametrize("sender", ["bogus@example.com", "catchall@example.com"])
def test_unknown_sender_and_catchall_are_mailbox_errors(sender):
    error = refusal(request(BASIC.replace("alice@example.com", sender, 1)))
    assert error.code == "MAILBOX"
    assert error.reason == (f"no mailbox matches From: {sender} (run `aimx mailboxes create "
                            "<name>` to register one; catchall is inbound-only)")


def test_only_root_or_the_owner_may_send(test_users):
    alice, bob = test_users["alice"], test_users["bob"]
    config = make_config(owner=alice.name)
    assert send(request(BASIC), config=config, caller_uid=alice.uid).mailbox.name == "alice"
    assert send(request(BASIC), config=config, caller_uid=0).mailbox.name == "alice"
    # To bob, alice's mailbox looks exactly like one that does not exist.
    error = refusal(request(BASIC), config=config, caller_uid=bob.uid)
    missing = refusal(request(BASIC.replace("alice@", "nobody@", 1)), config=config,
                      caller_uid=bob.uid)
    assert (error.code, error.reason) == (missing.code, missing.reason.replace("nobody@", "alice@"))
    assert error.code == "MAILBOX"


def test_unknown_owner_authorizes_nobody_but_root():
    config = make_config(owner="no-such-user-aimx")
    assert refusal(request(BASIC), config=config, caller_uid=4242).code == "MAILBOX"
    assert send(request(BASIC), config=config, caller_uid=0).mailbox.name == "alice"


@pytest.mark.parametrize(("raw", "reason"), [
    (request("To: bob@remote.example\nSubject: x"), "missing required header: From"),
    (request("From: Alice\nTo: bob@remote.example"),
     "could not extract sender address from From: Alice"),
    (request("From: alice@example.com\nSubject: x"), "missing required header: To"),
    (request("From: alice@example.com\nTo: Bob"),
     "could not extract recipient address from To: Bob"),
    (b"From: alice@example.com\r\nTo: bob@remote.example\r\nSubject: no blank line",
     "outbound request body has no header/body separator (expected blank line)"),
    (request("From: alice@example.com\nTo: bob@remote.example\nX-Big: " + "y" * 70_000),
     "outbound request header block is too large"),
    (b"\xff\xfe not utf-8", "missing required header: From"),
])
def test_malformed_requests_get_the_canonical_reason(raw, reason):
    error = refusal(raw)
    assert (error.code, error.reason) == ("MALFORMED", reason)


# --- one sender identity --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["From", "Sender", "Reply-To", "To", "Cc", "Bcc", "Subject",
                                  "Date", "Message-ID", "In-Reply-To", "References"])
def test_a_singleton_header_given_twice_is_refused_by_name(name):
    values = {"From": "alice@example.com", "Sender": "alice@example.com",
              "To": "bob@remote.example", "Message-ID": "<m2@example.com>",
              "Date": "Mon, 02 Jun 2025 12:00:00 +0000", "Subject": "again"}
    value = values.get(name, "")
    # BASIC has From, To, Subject and Message-ID; the others come twice, in other cases.
    copies = 1 if name in ("From", "To", "Subject", "Message-ID") else 2
    extra = "".join(f"\n{(name.lower(), name.upper())[i]}: {value}" for i in range(copies))
    error = refusal(request(BASIC + extra))
    assert (error.code, error.reason) == (
        "MALFORMED", f"duplicate header: {name} appears 2 times (a message may have only one)")


def test_own_from_followed_by_another_owners_from_is_refused():
    """The finding: the daemon checked the first From, dkimpy signed the last one."""
    raw = request("From: alice@example.com\nFrom: bob@example.com\nTo: carol@remote.example\n"
                  "Subject: Hi")
    config = Config(path="config.toml", domain="example.com", mailboxes=[
        Mailbox("alice", "alice@example.com", "root"), Mailbox("bob", "bob@example.com", "root")])
    error = refusal(raw, config=config)
    assert (error.code, error.reason) == (
        "MALFORMED", "duplicate header: From appears 2 times (a message may have only one)")


@pytest.mark.parametrize(("sender", "reason"), [
    ("alice@example.com, bob@example.com",
     "From: must name exactly one mailbox, not 2: alice@example.com, bob@example.com"),
    ("Alice <alice@example.com>, Bob <bob@example.com>",
     "From: must name exactly one mailbox, not 2: Alice <alice@example.com>, "
     "Bob <bob@example.com>"),
    ("alice@example.com <bob@example.com>",
     "From: must name exactly one mailbox, not 2: alice@example.com <bob@example.com>"),
    ("Team: alice@example.com, bob@example.com;",
     "From: must be a single mailbox, not a group: Team: alice@example.com, "
     "bob@example.com;"),
    ("Team: alice@example.com;",
     "From: must be a single mailbox, not a group: Team: alice@example.com;"),
    ("alice@example.com;", "could not extract sender address from From: alice@example.com;"),
    ("Alice <alice@evil.example@example.com>",
     "could not extract sender address from From: Alice <alice@evil.example@example.com>"),
])
def test_from_must_be_exactly_one_mailbox(sender, reason):
    error = refusal(request(BASIC.replace("alice@example.com", sender, 1)))
    assert (error.code, error.reason) == ("MALFORMED", reason)


@pytest.mark.parametrize("sender", ["Alice B. <alice@example.com>", "<alice@example.com>",
                                    "=?utf-8?q?Zo=C3=AB?= <alice@example.com>",
                                    "alice@example.com (Alice)", '"Doe, A" <alice@example.com>'])
def test_ordinary_single_senders_still_pass(sender):
    prepared = send(request(BASIC.replace("alice@example.com", sender, 1)))
    assert prepared.envelope_from == "alice@example.com"
    assert dkim_verifies(prepared.signed)


def test_sender_header_must_name_the_from_address():
    error = refusal(request(BASIC + "\nSender: bob@example.com"))
    assert (error.code, error.reason) == (
        "MALFORMED", "Sender: must be the From: address alice@example.com, not bob@example.com")
    error = refusal(request(BASIC + "\nSender: alice@example.com, bob@example.com"))
    assert error.reason.startswith("Sender: must name exactly one mailbox, not 2")
    assert send(request(BASIC + "\nSender: Alice <ALICE@example.com>")).mailbox.name == "alice"


def test_sender_checks_come_before_recipient_checks():
    raw = request("From: mallory@other.org\nSubject: no recipient")
    assert refusal(raw).code == "DOMAIN"
    assert refusal(request("From: alice@example.com"), caller_uid=4242).code == "MAILBOX"


def test_headers_are_found_in_any_case_and_folded():
    prepared = send(request("from: alice@example.com\nTO:\n  Bob\n <bob@remote.example>\n"
                            "Subject: folded\n subject"))
    assert prepared.envelope_to == "bob@remote.example"
    assert prepared.subject == "folded subject"


@pytest.mark.parametrize("headers", [
    BASIC.replace("bob@remote.example", "bob@remote.example, carol@remote.example"),
    BASIC + "\nCc: carol@remote.example",
    BASIC + "\nBcc: carol@remote.example",
])
def test_more_than_one_recipient_is_malformed(headers):
    error = refusal(request(headers))
    assert error.code == "MALFORMED" and "one recipient" in error.reason


def test_quoted_comma_in_display_name_is_one_recipient():
    prepared = send(request(BASIC.replace("bob@remote.example", '"Doe, John" <john@r.example>')))
    assert prepared.envelope_to == "john@r.example"


def test_missing_message_id_is_added_first_and_echoed():
    prepared = send(request("From: alice@example.com\nTo: bob@remote.example\nSubject: x"))
    assert re.fullmatch(r"<[0-9a-f-]{36}@example\.com>", prepared.message_id)
    head = top_headers(prepared.signed).split("\r\n")
    first_after_signature = next(line for line in head if not line.startswith((" ", "\t",
                                                                               "DKIM")))
    assert first_after_signature == f"Message-ID: {prepared.message_id}"
    assert wire(prepared)["Date"]  # a message without Date gets one
    assert dkim_verifies(prepared.signed)


def test_empty_message_id_is_replaced():
    prepared = send(request("From: alice@example.com\nTo: bob@remote.example\nMessage-ID:"))
    assert prepared.message_id.endswith("@example.com>")
    assert top_headers(prepared.signed).count("Message-ID:") == 1


def test_client_message_id_is_kept():
    prepared = send(request(BASIC))
    assert prepared.message_id == "<m1@example.com>"
    assert top_headers(prepared.signed).count("Message-ID:") == 1


# --- cases 19–24: formats, signature, cap --------------------------------------------------


def test_markdown_becomes_alternative_text_then_html():
    prepared = send(request(BASIC, "# Hello\n\nWorld"), config=make_config(signature=""))
    msg = wire(prepared)
    assert msg.get_content_type() == "multipart/alternative"
    assert re.search(r'boundary="aimx-[0-9a-f]{32}"', msg["Content-Type"])
    text, html = leaves(msg)
    assert (text.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert text["Content-Transfer-Encoding"] == "7bit"
    assert text.get_content() == "# Hello\r\n\r\nWorld"
    assert ('<h1 style="font-size: 1.75em; margin: 1.2em 0 0.5em; line-height: 1.25;">'
            in html.get_content())
    assert "Hello</h1>" in html.get_content()
    assert prepared.outbound_format == "markdown"


@pytest.mark.parametrize(("signature", "expected_tail"), [
    (None, DEFAULT_SIGNATURE_TEXT),
    ("Best,\nBot", "Hi there\r\n\r\nBest,\r\nBot"),
    ("Best,\r\nBot", "Hi there\r\n\r\nBest,\r\nBot"),
    ("", "Hi there\r\n\r\n\r\n"),  # no signature: the body is left as written
])
def test_signature_is_appended_after_a_blank_line(signature, expected_tail):
    prepared = send(request(BASIC, "Hi there\r\n\r\n\r\n"), config=make_config(signature))
    text = leaves(wire(prepared))[0].get_content()
    assert text.endswith(expected_tail)
    assert ("Sent from AIMX." in text) == (signature is None)


def test_text_only_is_a_single_plain_part():
    prepared = send(request(BASIC, "Your code is 123456"), text_only=True)
    head = top_headers(prepared.signed)
    assert "multipart/" not in prepared.signed.decode() and "text/html" not in head
    assert "\r\nContent-Type: text/plain; charset=utf-8\r\n" in head
    assert "\r\nContent-Transfer-Encoding: 7bit" in head
    assert prepared.outbound_format == "text"
    assert dkim_verifies(prepared.signed)


def test_text_only_non_ascii_is_quoted_printable():
    prepared = send(request(BASIC, "Grüße, Zoë — ça va?"), text_only=True,
                    config=make_config(signature=""))
    assert "Content-Transfer-Encoding: quoted-printable" in top_headers(prepared.signed)
    assert wire(prepared).get_content() == "Grüße, Zoë — ça va?\r\n"
    assert dkim_verifies(prepared.signed)


def test_html_body_is_sent_verbatim_with_signature_only_in_text():
    prepared = send(request(BASIC, "Fallback text"), html_body=b"<h1>x</h1>")
    text, html = leaves(wire(prepared))
    assert html.get_content() == "<h1>x</h1>"
    assert "style=" not in html.get_content() and "AIMX" not in html.get_content()
    assert text.get_content().startswith("Fallback text\r\n\r\nSent from AIMX.")
    assert prepared.outbound_format == "html"
    assert prepared.body.startswith("Fallback text\n\nSent from AIMX.")


def test_text_only_with_html_body_is_refused_first():
    error = refusal(b"garbage", text_only=True, html_body=b"")
    assert (error.code, error.reason) == ("MALFORMED", MUTUALLY_EXCLUSIVE)
    assert MUTUALLY_EXCLUSIVE == "AIMX/1 SEND: --text-only and --html-body are mutually exclusive"


def _markdown_of_size(size: int) -> str:
    """Cheap-to-render Markdown (a fenced block) of exactly ``size`` UTF-8 bytes."""
    line = "x = compute(1, 2)  # filler\n"
    inner = size - len("```\n") - len("```")
    return "```\n" + (line * (inner // len(line) + 1))[:inner - 1] + "\n```"


def test_markdown_cap_is_exactly_five_mebibytes():
    config = make_config(signature="")
    body = _markdown_of_size(MARKDOWN_CAP)
    assert len(body.encode()) == MARKDOWN_CAP
    prepared = send(request(BASIC, body), config=config)
    assert b"Content-Type: text/html" in prepared.signed and b"<pre style=" in prepared.signed
    error = refusal(request(BASIC, body + "y"), config=config)
    assert (error.code, error.reason) == ("BODY_TOO_LARGE", BODY_TOO_LARGE_REASON)
    assert BODY_TOO_LARGE_REASON == (
        "markdown body exceeds 5 MiB; use --html-body for pre-rendered large documents or "
        "--attachment for sending the document as a file")
    # Only the Markdown path is capped.
    assert send(request(BASIC, body + "y"), config=config, text_only=True).outbound_format \
        == "text"


def test_signature_counts_towards_the_cap():
    body = _markdown_of_size(MARKDOWN_CAP - 4)
    assert refusal(request(BASIC, body), config=make_config(signature="sig")).code \
        == "BODY_TOO_LARGE"


# --- case 25: attachments --------------------------------------------------------------------


def test_attachments_go_into_mixed_and_round_trip(tmp_path):
    binary = bytes(range(256)) * 64
    (tmp_path / "x.bin").write_bytes(binary)
    (tmp_path / 'a"b.txt').write_bytes(b"line one\nline two\n")
    (tmp_path / "Überblick.pdf").write_bytes(b"%PDF-1.7 fake")
    raw = compose_message(from_addr="alice@example.com", to="bob@remote.example",
                          subject="Files", body="See **attached**.", now=WHEN,
                          attachments=[tmp_path / "x.bin", tmp_path / 'a"b.txt',
                                       tmp_path / "Überblick.pdf"])
    prepared = send(raw)
    assert dkim_verifies(prepared.signed)
    assert b'filename="x.bin"' in prepared.signed and b'filename="a\\"b.txt"' in prepared.signed
    msg = wire(prepared)
    assert msg.get_content_type() == "multipart/mixed"
    alternative, *files = list(msg.iter_parts())
    assert alternative.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in alternative.iter_parts()] == [
        "text/plain", "text/html"]
    assert all(part["Content-Transfer-Encoding"] == "base64" for part in files)
    assert [(part.get_filename(), part.get_payload(decode=True)) for part in files] == [
        ("x.bin", binary), ('a"b.txt', b"line one\nline two\n"),
        ("Überblick.pdf", b"%PDF-1.7 fake")]
    encoded_lines = files[0].get_payload().split("\n")
    assert max(len(line.rstrip("\r")) for line in encoded_lines) == 76

    fields = sent_copy_fields(prepared, "delivered", now=WHEN)
    assert fields["attachments"] == [
        {"filename": "x.bin", "content_type": "application/octet-stream", "size": len(binary)},
        {"filename": 'a"b.txt', "content_type": "text/plain", "size": 18},
        {"filename": "Überblick.pdf", "content_type": "application/pdf", "size": 13}]


def test_text_only_with_attachment_is_mixed_with_plain_text(tmp_path):
    (tmp_path / "note.txt").write_text("n")
    raw = compose_message(from_addr="alice@example.com", to="bob@remote.example",
                          subject="x", body="text", attachments=[tmp_path / "note.txt"])
    prepared = send(raw, text_only=True)
    msg = wire(prepared)
    assert [part.get_content_type() for part in msg.iter_parts()] == ["text/plain", "text/plain"]
    assert "text/html" not in prepared.signed.decode()
    assert dkim_verifies(prepared.signed)


def test_encoded_client_text_is_decoded_before_rendering():
    body = base64.b64encode("# Grüße\n".encode()).decode()
    prepared = send(request(BASIC + "\nContent-Type: text/plain; charset=utf-8\n"
                            "Content-Transfer-Encoding: base64", body),
                    config=make_config(signature=""))
    text, html = leaves(wire(prepared))
    assert text.get_content() == "# Grüße\r\n"
    assert "Grüße</h1>" in html.get_content()
    assert top_headers(prepared.signed).count("Content-Transfer-Encoding") == 0


# --- headers on the wire -------------------------------------------------------------------


def test_raw_utf8_headers_are_encoded_on_the_wire():
    prepared = send(request("From: Zoë <alice@example.com>\nTo: bob@remote.example\n"
                            "Subject: Grüße aus Köln"))
    assert top_headers(prepared.signed).isascii()
    msg = wire(prepared)
    assert msg["Subject"] == "Grüße aus Köln"
    assert msg["From"].addresses[0].display_name == "Zoë"
    assert prepared.subject == "Grüße aus Köln" and prepared.from_ == "Zoë <alice@example.com>"
    assert dkim_verifies(prepared.signed)


def test_client_mime_headers_are_replaced():
    prepared = send(request(BASIC + "\nMIME-Version: 9.9\nContent-Type: text/html\n"
                            "Content-Transfer-Encoding: 8bit"))
    head = top_headers(prepared.signed)
    assert head.count("MIME-Version:") == 1 and "MIME-Version: 1.0" in head
    assert "text/html\r\n" not in head and "Content-Transfer-Encoding" not in head


def test_long_lines_are_quoted_printable_and_decode_back():
    body = "word " * 400  # one 2000-character line
    prepared = send(request(BASIC, body), text_only=True, config=make_config(signature=""))
    assert "quoted-printable" in top_headers(prepared.signed)
    assert max(len(line) for line in prepared.signed.split(b"\r\n\r\n", 1)[1].split(b"\r\n")) \
        <= 76
    assert wire(prepared).get_content() == body + "\r\n"


def test_quoted_printable_never_splits_escapes_and_protects_trailing_space():
    text = "é" * 60 + "\r\ntrailing \r\n=\ttab"
    encoded = quoted_printable(text)
    assert all(len(line) <= 76 for line in encoded.split("\r\n"))
    assert "trailing=20" in encoded and "=3D=09tab" in encoded
    assert quopri.decodestring(encoded.encode()).decode() == text


# --- sent copy -------------------------------------------------------------------------------


def test_sent_copy_has_inbound_shape_for_a_reply():
    raw = compose_message(from_addr="Alice <alice@example.com>", to="Bob <bob@remote.example>",
                          subject="Re: Plan", body="Sounds good.", reply_to="orig@remote.example",
                          references="<root@remote.example>", now=WHEN)
    prepared = send(raw)
    fields = sent_copy_fields(prepared, "failed", "Rejected by mx.remote.example: 550 no",
                              now=WHEN)
    assert fields["message_id"] == prepared.message_id.strip("<>")
    assert fields["thread_id"] == compute_thread_id("<orig@remote.example>",
                                                    "<root@remote.example>",
                                                    prepared.message_id)
    assert fields["from"] == "Alice <alice@example.com>"
    assert fields["to"] == "Bob <bob@remote.example>"
    assert fields["delivered_to"] == "bob@remote.example"
    assert fields["subject"] == "Re: Plan"
    assert fields["date"] == "2026-03-04T05:06:07Z"
    assert fields["size_bytes"] == len(prepared.signed)
    assert fields["in_reply_to"] == "orig@remote.example"
    assert fields["references"] == "<root@remote.example>"
    assert (fields["dkim"], fields["spf"], fields["dmarc"], fields["trusted"]) == (
        "pass", "none", "none", "none")
    assert fields["read"] is False and fields["outbound"] is True
    assert fields["delivery_status"] == "failed"
    assert fields["delivery_details"] == "Rejected by mx.remote.example: 550 no"
    assert "delivered_at" not in fields and "attachments" not in fields
    assert "reply_to" not in fields and "cc" not in fields
    assert fields["mailbox"] == "alice"
    assert prepared.body == "Sounds good.\n\nSent from AIMX.  \nhttps://aimx.email"


def test_sent_copy_keeps_an_agent_reply_to_and_auto_submitted():
    prepared = send(request(BASIC + "\nReply-To: Desk <desk@example.com>\n"
                            "Auto-Submitted: auto-generated"))
    fields = sent_copy_fields(prepared, "delivered", now=WHEN)
    assert fields["reply_to"] == "Desk <desk@example.com>"
    assert fields["auto_submitted"] == "auto-generated"


def test_malformed_header_line_is_refused():
    error = refusal(request(BASIC + "\nthis is not a header"))
    assert error.code == "MALFORMED" and "this is not a header" in error.reason


def test_mail_drop_write_failure_is_temp(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SendError) as failed:
        mail_drop(blocker / "drop.eml", b"message")
    assert failed.value.code == "TEMP"


# -- recipients and header lines a receiver accepts ------------------------------------------


@pytest.mark.parametrize(("to", "named", "why"), [
    ("a@@b.com", "a@@b.com", "exactly one @"),
    ("dana@", "dana@", "nothing after the @"),
    ("@example.com", "@example.com", "nothing before the @"),
    ("Dana <dana@example..com>", "dana@example..com", "empty label"),
    ("dana@-bad-.com", "dana@-bad-.com", "starts or ends with a hyphen"),
    ("dana@xn--zz.com", "dana@xn--zz.com", "not valid IDNA"),
    ("dana@[192.0.2.1]", "dana@[192.0.2.1]", "address literals"),
])
def test_a_malformed_recipient_is_refused_by_name(to, named, why):
    """A client that writes the request itself gets the same refusal as aimx send."""
    error = refusal(request(BASIC.replace("bob@remote.example", to)))
    assert error.code == "MALFORMED"
    assert error.reason.startswith(f"invalid recipient address '{named}': ")
    assert why in error.reason


@pytest.mark.parametrize("to", ["dana@exämple.com", "dänä@example.com", '"dana b"@example.com',
                                "Dana <dana@mail.example.com>"])
def test_international_and_quoted_recipients_are_accepted(to):
    assert send(request(BASIC.replace("bob@remote.example", to))).envelope_to == \
        to.removeprefix("Dana <").removesuffix(">")


def test_a_long_ascii_header_is_folded_on_the_wire():
    subject = " ".join(f"word{i}" for i in range(3000))  # ~26 KB on one line
    prepared = send(request(BASIC.replace("Subject: Hi", "Subject: " + subject)))
    head = prepared.signed.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    parsed = email.message_from_bytes(prepared.signed, policy=email.policy.default)
    assert parsed["Subject"] == subject and prepared.subject == subject
    assert dkim_verifies(prepared.signed)


def test_a_header_word_that_cannot_fit_in_998_is_refused():
    error = refusal(request(BASIC.replace("Subject: Hi", "Subject: see " + "x" * 1000)))
    assert (error.code, error.reason) == (
        "MALFORMED", "header 'Subject' has a word longer than 998 characters and cannot be "
                     "folded")
