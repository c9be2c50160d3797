"""Large messages from the spool: the spooled parse, DKIM body hash and stored files equal
the in-memory ones for every message; spool files never outlive their use."""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import given, settings
from hypothesis import strategies as st

from aimx.mail.message import ParsedMessage, parse_message, parse_spooled
from aimx.smtp.emailauth import BareLineFeed, write_canonical_body
from aimx.storage.spool import SPOOL_DIR, Spool, SpoolFile

MIME_DIR = Path(__file__).parent / "data" / "mime"
NOW = datetime.datetime(2025, 3, 14, 15, 9, 26, 123456, tzinfo=datetime.UTC)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    made = Spool(tmp_path)
    yield made
    made.close()


def spooled(spool: Spool, raw: bytes) -> SpoolFile:
    file = spool.new_file()
    for start in range(0, len(raw), 7777):  # odd pieces, as the network delivers them
        file.write(raw[start:start + 7777])
    return file


def b64_lines(data: bytes, junk: bytes = b"") -> str:
    text = base64.encodebytes(data).decode().replace("\n", "\r\n")
    return text.replace("\r\n", junk.decode() + "\r\n", 3) if junk else text


def multipart(*parts: str, boundary: str = "b1", head: str = "") -> bytes:
    text = (f"From: Alice <alice@example.com>\r\nTo: bob@test.com\r\nSubject: big\r\n{head}"
            f"Message-ID: <big@example.com>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\npreamble\r\n")
    for part in parts:
        text += f"--{boundary}\r\n{part}\r\n"
    return (text + f"--{boundary}--\r\nepilogue\r\n").encode("utf-8", "surrogateescape")


def attachment(data: bytes, name: str = "a.bin", *, body: str | None = None,
               kind: str = "application/octet-stream") -> str:
    return (f"Content-Type: {kind}; name=\"{name}\"\r\n"
            f"Content-Disposition: attachment; filename=\"{name}\"\r\n"
            f"Content-Transfer-Encoding: base64\r\n\r\n"
            f"{b64_lines(data) if body is None else body}")


TEXT = "Content-Type: text/plain; charset=utf-8\r\n\r\nSee attached.\r\n"
BLOB = bytes(range(256)) * 400 + b"tail"


def corpus() -> Iterator[tuple[str, bytes]]:
    for path in sorted(MIME_DIR.glob("*.eml")):
        raw = path.read_bytes()
        yield path.stem, raw.replace(b"\n", b"\r\n")
        yield path.stem + "-lf", raw
    yield "attachment", multipart(TEXT, attachment(BLOB))
    yield "two-attachments", multipart(TEXT, attachment(BLOB), attachment(BLOB[::-1], "b"))
    yield "no-trailing-newline", multipart(TEXT, attachment(BLOB)).rstrip(b"\r\n-") + b"-"
    yield "padding-one", multipart(TEXT, attachment(BLOB[:-1]))
    yield "padding-two", multipart(TEXT, attachment(BLOB[:-2]))
    yield "junk-in-base64", multipart(TEXT, attachment(BLOB, body=b64_lines(BLOB, b" !")))
    yield "padding-in-the-middle", multipart(TEXT, attachment(
        BLOB, body=b64_lines(b"xy") + b64_lines(BLOB)))
    yield "dangling-character", multipart(TEXT, attachment(
        BLOB, body=b64_lines(BLOB).rstrip("=\r\n") + "Q\r\n"))
    yield "eight-bit-in-base64", multipart(TEXT, attachment(
        BLOB, body=b64_lines(BLOB).replace("\r\n", "\udcff\r\n", 2)))
    yield "base64-text-body", multipart(
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64_lines(("naïve text\n" * 3000).encode()), attachment(BLOB))
    yield "base64-html-only", multipart(
        "Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64_lines(b"<p>hello</p>" * 2000))
    inner = multipart(TEXT, attachment(BLOB), boundary="inner").decode("utf-8",
                                                                        "surrogateescape")
    yield "embedded-message", multipart(TEXT, "Content-Type: message/rfc822\r\n\r\n" + inner)
    yield "single-part-base64", (
        "From: a@example.com\r\nSubject: pdf\r\nContent-Type: application/pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n" + b64_lines(BLOB)).encode()
    yield "headers-only-base64", ("\r\n".join(["QUJD"] * 40) + "\r\n").encode()
    yield "no-message-id", multipart(TEXT, attachment(BLOB)).replace(
        b"Message-ID: <big@example.com>\r\n", b"")


def materialised(parsed: ParsedMessage) -> ParsedMessage:
    """``parsed`` with spooled attachment data read back into bytes, for comparison."""
    import attrs

    attachments = tuple(
        attrs.evolve(a, data=a.data if isinstance(a.data, bytes)
                     else b"".join(a.data.chunks()))
        for a in parsed.attachments)
    return attrs.evolve(parsed, attachments=attachments)


@pytest.mark.parametrize(("name", "raw"), list(corpus()), ids=[n for n, _ in corpus()])
def test_spooled_parse_equals_in_memory_parse(spool: Spool, name: str, raw: bytes) -> None:
    file = spooled(spool, raw)
    try:
        from_file = parse_spooled(file, NOW, spool.new_file)
        assert materialised(from_file) == parse_message(raw, NOW)
    finally:
        file.close()


def test_large_base64_attachments_come_back_as_spool_files(spool: Spool) -> None:
    raw = multipart(TEXT, attachment(BLOB))
    file = spooled(spool, raw)
    parsed = parse_spooled(file, NOW, spool.new_file)
    (data,) = [a.data for a in parsed.attachments]
    assert isinstance(data, SpoolFile)
    assert hashlib.sha256(b"".join(data.chunks())).digest() == hashlib.sha256(BLOB).digest()


def test_spool_dir_is_private_and_holds_no_names(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    file = spool.new_file()
    file.write(b"x" * 100)
    st = os.stat(tmp_path / SPOOL_DIR, follow_symlinks=False)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert os.listdir(tmp_path / SPOOL_DIR) == []  # unlinked at once: only the fd holds it
    assert b"".join(file.chunks()) == b"x" * 100
    file.close()
    spool.close()


def test_spool_dir_that_is_a_link_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / SPOOL_DIR).symlink_to(elsewhere)
    with pytest.raises(OSError):
        Spool(data).new_file()
    assert list(elsewhere.iterdir()) == []


# --------------------------------------------------------------------------- DKIM bodies

_BODY_PIECES = st.lists(st.sampled_from(
    [b"a", b"b c", b" ", b"\t", b"  ", b"\r\n", b"\r", b"\r\n\r\n", b".", b"x \t y"]),
    max_size=40)


class _Collect:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


@settings(max_examples=300, deadline=None)
@given(pieces=_BODY_PIECES, relaxed=st.booleans(), split=st.integers(1, 7))
def test_streamed_dkim_canonical_body_equals_dkimpy(pieces: list[bytes], relaxed: bool,
                                                    split: int) -> None:
    body = b"".join(pieces)
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed" if relaxed
                                                 else b"simple/simple")
    out = _Collect()
    write_canonical_body((body[i:i + split] for i in range(0, len(body), split)), relaxed,
                         out)  # type: ignore[arg-type]
    assert bytes(out.data) == policy.canonicalize_body(body)


def test_body_with_a_bare_lf_is_left_to_the_in_memory_path() -> None:
    with pytest.raises(BareLineFeed):
        write_canonical_body([b"one\r\ntwo\nthree\r\n"], True, _Collect())  # type: ignore[arg-type]
