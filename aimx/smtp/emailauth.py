"""DKIM, SPF and DMARC results for an inbound message, and DKIM signing for outbound.

Everything here blocks on DNS, so the daemon runs it in a thread. Each check
is bounded by one per-message ``dnsresolve.Budget`` (5 s per query, 15 s in
all, D10) and goes through the resolvers from ``dns_resolvers`` (D11), never
through a library's own idea of DNS. ``authenticate`` never raises: a check
that cannot be completed is recorded as ``none`` (``fail`` for DKIM when the
message does carry signatures) and the reason is logged on ``aimx::auth``.
"""

from __future__ import annotations

import contextvars
import functools
import ipaddress
import logging
import mmap
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import dkim
import dkim.canonicalization
import dkim.util
import spf
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from aimx.logs import kv, logger
from aimx.mail.authresults import NONE, AuthResults, aligned, organizational_domain
from aimx.smtp import dnsresolve
from aimx.smtp.dnsresolve import Budget, NoAnswer, NxDomain, TempFailure

log = logger("aimx::auth")

#: Header fields covered by our outbound signatures, each oversigned: listed once more
#: than the message has it, so the signature also covers "no further copy" and a field
#: added later (a second From:, a Reply-To: pointing elsewhere) breaks it.
#: MIME-Version and Content-Type are signed too (our choice over spec 30 §2.9):
#: leaving them out would let a relay swap the body's interpretation unnoticed.
#: Auto-Submitted is signed so no relay can strip or add the loop-guard marker.
SIGNED_HEADERS = ("From", "Sender", "Reply-To", "To", "Cc", "Subject", "Date", "Message-ID",
                  "In-Reply-To", "References", "Auto-Submitted", "MIME-Version", "Content-Type")


class _ParsedFrom(Protocol):
    from_addresses: tuple[str, ...]


class SigningError(Exception):
    """The DKIM key cannot be loaded or the message cannot be signed."""


# --------------------------------------------------------------------------- helpers

# The first blank line. Written without a leading optional ``\r``: that made the regex
# engine try every position of the header block (``\r?\n\r?\n`` took 3x as long as
# this search, which can skip ahead to each LF); ``_head`` steps back over the CR.
_BLANK_LINE = re.compile(rb"\n\r?\n")


def _head(raw: bytes) -> bytes:
    """The header block: everything before the first blank line (no copy of the body),
    i.e. up to the first ``\\r?\\n\\r?\\n``."""
    blank = _BLANK_LINE.search(raw)
    if blank is None:
        return raw
    start = blank.start()
    return raw[:start - 1] if start and raw[start - 1] == 0x0D else raw[:start]


_LINE_END = re.compile(r"\r?\n")


def _header_fields(raw: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) for each header field of ``raw``, top down.

    Tolerant by design: it only has to find a few fields for authentication,
    so lines that are not fields are skipped rather than refused. The block is
    decoded once (line ends are ASCII, so this equals decoding line by line).
    """
    fields: list[list[str]] = []
    for text in _LINE_END.split(_head(raw).decode("utf-8", "replace")):
        if text[:1] in (" ", "\t"):
            if fields:
                fields[-1][1] += " " + text.strip()
            continue
        name, sep, value = text.partition(":")
        if sep and name and " " not in name:
            fields.append([name.strip(), value.strip()])
    return [(name, value) for name, value in fields]


def _domain_of(address: str) -> str:
    _, at, domain = address.rpartition("@")
    return domain.strip().strip("<>").rstrip(".").lower() if at else ""


# --------------------------------------------------------------------------- DKIM

# dkimpy does its RSA arithmetic in pure Python: about 10 ms of CPU per 2048-bit
# signature and a good part of a millisecond per verification, all of it holding the
# GIL. Its two RSASSA-PKCS1-v1_5 primitives are replaced (in dkimpy's namespace, where
# its sign and verify code looks them up) by OpenSSL's through ``cryptography``: the
# same scheme over the same digest, so verdicts and signature bytes are identical.
# Anything unusual (other hashes, short keys, odd signature lengths) goes to dkimpy's
# own code.
_dkimpy_rsa_sign = dkim.RSASSA_PKCS1_v1_5_sign
_dkimpy_rsa_verify = dkim.RSASSA_PKCS1_v1_5_verify
_OPENSSL_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


@functools.lru_cache(maxsize=256)
def _rsa_public_key(modulus: int, exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


@functools.lru_cache(maxsize=8)
def _rsa_private_key(numbers: tuple[int, ...]) -> rsa.RSAPrivateKey:
    modulus, public_exponent, private_exponent, p, q, dmp1, dmq1, iqmp = numbers
    return rsa.RSAPrivateNumbers(
        p=p, q=q, d=private_exponent, dmp1=dmp1, dmq1=dmq1, iqmp=iqmp,
        public_numbers=rsa.RSAPublicNumbers(public_exponent, modulus)).private_key()


def _openssl_rsa_verify(digest: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    algorithm = _OPENSSL_HASHES.get(str(getattr(digest, "name", "")).lower())
    modulus = public_key.get("modulus", 0)
    if algorithm is None or modulus.bit_length() < 1024 \
            or len(signature) != (modulus.bit_length() + 7) // 8:
        return _dkimpy_rsa_verify(digest, signature, public_key)
    try:
        key = _rsa_public_key(modulus, public_key["publicExponent"])
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return _dkimpy_rsa_verify(digest, signature, public_key)
    try:
        key.verify(signature, digest.digest(), padding.PKCS1v15(), Prehashed(algorithm()))
    except InvalidSignature:
        return False
    return True


def _openssl_rsa_sign(digest: Any, private_key: dict[str, int]) -> bytes:
    algorithm = _OPENSSL_HASHES.get(str(getattr(digest, "name", "")).lower())
    if algorithm is None or private_key.get("modulus", 0).bit_length() < 1024:
        return _dkimpy_rsa_sign(digest, private_key)
    try:
        key = _rsa_private_key(tuple(private_key[name] for name in (
            "modulus", "publicExponent", "privateExponent", "prime1", "prime2",
            "exponent1", "exponent2", "coefficient")))
    except (KeyError, ValueError, TypeError, UnsupportedAlgorithm):
        return _dkimpy_rsa_sign(digest, private_key)
    return key.sign(digest.digest(), padding.PKCS1v15(), Prehashed(algorithm()))


dkim.RSASSA_PKCS1_v1_5_verify = _openssl_rsa_verify
dkim.RSASSA_PKCS1_v1_5_sign = _openssl_rsa_sign

# Two more hot spots of dkimpy's verification, replaced by exact equivalents:
# - the public key in a DNS answer is parsed (pure-Python ASN.1) for every
#   message; the parsed form of a given key never changes, so it is kept
#   (dkimpy only reads the dict it gets);
# - relaxed body canonicalization rewrites every single space between words
#   with a single space. The same result comes from rewriting only what changes
#   (tabs, runs of two or more) and from skipping the trailing-whitespace pass
#   when no line ends in whitespace.
_dkimpy_parse_public_key = dkim.parse_public_key


@functools.lru_cache(maxsize=256)
def _parse_public_key(data: bytes) -> dict[str, Any]:
    return _dkimpy_parse_public_key(data)


# The whole key record is evaluated (tag list parsed, key decoded, sizes and flags
# derived) from the record's name and text alone, so a steady sender's record is
# evaluated once; a record that is refused raises each time, as before.
_dkimpy_evaluate_pk = dkim.evaluate_pk


@functools.lru_cache(maxsize=256)
def _evaluate_pk(name: bytes | str, record: bytes | str) -> tuple[Any, Any, Any, bool]:
    return _dkimpy_evaluate_pk(name, record)


_WSP_TO_COMPRESS = re.compile(rb"\t[\t ]*| [\t ]+")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")


class _CanonicalBody(mmap.mmap):
    """A spooled body already in canonical form (mapped read-only): the canonicalization
    steps below hand it on untouched, so dkimpy hashes it without a copy."""


def _compress_whitespace(content: bytes) -> bytes:
    if isinstance(content, _CanonicalBody):
        return content
    if b"\t" not in content and b"  " not in content:
        return content  # only single spaces: nothing to compress
    return _WSP_TO_COMPRESS.sub(b" ", content)


def _strip_trailing_whitespace(content: bytes) -> bytes:
    if isinstance(content, _CanonicalBody):
        return content
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _TRAILING_WSP.sub(b"\r\n", content)


_dkimpy_rfc822_parse = dkim.rfc822_parse
_LEADING_BLANK_LINE = re.compile(rb"\r?\n")


def _rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's message split, without running its line regex over the whole body.

    dkimpy splits the entire message on ``\\r?\\n`` and joins the body back with
    CRLF. Here only the header block goes through dkimpy's own parser; the body
    gets the same CRLF normalisation by plain replacement (a no-op for SMTP input,
    whose lines all end in CRLF).
    """
    if not isinstance(message, bytes):
        return _dkimpy_rfc822_parse(message)
    leading = _LEADING_BLANK_LINE.match(message)
    if leading is not None:
        head, body = b"", message[leading.end():]
    else:
        blank = _BLANK_LINE.search(message)
        if blank is None:
            return _dkimpy_rfc822_parse(message)
        head, body = message[:blank.start() + 1], message[blank.end():]
    headers, _ = _dkimpy_rfc822_parse(head)
    if body.count(b"\n") != body.count(b"\r\n"):
        body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return headers, body


def _unfold_header_value(content: bytes) -> bytes:
    """dkimpy's header unfolding (``re.sub(b"\\r?\\n", b"", content)``) without the
    regex: every CRLF pair goes, then every lone LF; a lone CR stays, as there."""
    return content.replace(b"\r\n", b"").replace(b"\n", b"")


_TAG_NAME_START = re.compile(rb"[a-zA-Z]")


def _parse_tag_value(tag_list: bytes) -> dict[bytes, bytes]:
    """dkimpy's ``parse_tag_value`` with one compiled check of a tag name's first
    character (its ``^[a-zA-Z](\\w)*`` only ever tests that) and no list per tag."""
    tags: dict[bytes, bytes] = {}
    tag_specs = tag_list.strip().split(b";")
    if not tag_specs[-1]:  # trailing semicolons are valid
        tag_specs.pop()
    for tag_spec in tag_specs:
        key, equals, value = tag_spec.partition(b"=")
        key = key.strip()
        if not equals or _TAG_NAME_START.match(key) is None:
            raise dkim.util.InvalidTagSpec(tag_spec)
        if key in tags:
            raise dkim.util.DuplicateTag(key)
        tags[key] = value.strip()
    return tags


_dkimpy_strip_trailing_lines = dkim.canonicalization.strip_trailing_lines
_dkimpy_correct_empty_body = dkim.canonicalization.correct_empty_body


def _strip_trailing_lines(content: bytes) -> bytes:
    if isinstance(content, _CanonicalBody):
        return content
    return _dkimpy_strip_trailing_lines(content)


def _correct_empty_body(content: bytes) -> bytes:
    if isinstance(content, _CanonicalBody):
        return content
    return _dkimpy_correct_empty_body(content)


# dkimpy blanks the b= value of the signature field with a pattern whose folding
# whitespace (``(?:(?:\s*\r?\n)?\s+)?``, which matches exactly what ``\s*`` does)
# sits inside a repetition over every base64 character: ≈80 µs per signature.
# This pattern picks the same match: the b= tag, then the longest run of
# whitespace and base64 characters that ends in a base64 character, then an
# optional final line break; only its group 1 is kept, the same as dkimpy's.
_SIGNATURE_B_TAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")

dkim.parse_public_key = _parse_public_key
dkim.evaluate_pk = _evaluate_pk
dkim.parse_tag_value = _parse_tag_value
dkim.rfc822_parse = _rfc822_parse
dkim.RE_BTAG = _SIGNATURE_B_TAG
dkim.canonicalization.compress_whitespace = _compress_whitespace
dkim.canonicalization.unfold_header_value = _unfold_header_value
dkim.canonicalization.strip_trailing_whitespace = _strip_trailing_whitespace
dkim.canonicalization.strip_trailing_lines = _strip_trailing_lines
dkim.canonicalization.correct_empty_body = _correct_empty_body


# -- DKIM body hashes of a spooled message ---------------------------------------
#
# dkimpy hashes ``DKIM.body`` after canonicalising it whole: for a 25 MB message that
# is the body plus two or three copies. For a message in a spool file, the body is
# canonicalised here line block by line block into a spool file of its own (once per
# algorithm the signatures use), which is mapped and given to dkimpy as ``body``; the
# steps above pass it through and dkimpy hashes the mapping (``l=`` slices it).
# A body with a bare LF (never over SMTP) is left to the in-memory path, whose
# line-end repair this does not repeat.

#: Canonical bodies up to this size are handed over as plain bytes.
_MAP_THRESHOLD = 64 * 1024
_CRLF = b"\r\n"


def header_block_end(start: bytes) -> int | None:
    """Where the body begins, as DKIM splits a message whose first bytes are ``start``:
    just after the first blank line. None when ``start`` holds no blank line, or the
    message begins with one (those take the in-memory path)."""
    if _LEADING_BLANK_LINE.match(start):
        return None
    blank = _BLANK_LINE.search(start)
    return blank.end() if blank is not None else None


class BareLineFeed(Exception):
    """The body has a bare LF: only the in-memory path canonicalises it like dkimpy."""


class _ScratchFile(Protocol):
    fd: int

    def __len__(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def read_at(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


@attrs.frozen
class SpooledBody:
    """The body of a spooled message: ``chunks`` yields its bytes (from the first byte
    after the header block's blank line), ``new_file`` makes scratch files."""

    chunks: Callable[[], Iterable[bytes]]
    new_file: Callable[[], _ScratchFile]


def write_canonical_body(chunks: Iterable[bytes], relaxed: bool, out: _ScratchFile) -> None:
    """Write the DKIM canonical form of a body (RFC 6376 §3.4.3/§3.4.4, exactly as dkimpy
    computes it) to ``out``, reading ``chunks`` once. Raises :class:`BareLineFeed`."""
    pending = 0  # empty lines held back: only content after them lets them count
    wrote = False
    carry = b""
    for chunk in chunks:
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        block, carry = data[:cut], data[cut:]
        if not block:
            continue
        if block.count(b"\n") != block.count(_CRLF):
            raise BareLineFeed()
        if relaxed:
            block = _compress_whitespace(_strip_trailing_whitespace(block))
        end = len(block)
        empties = 0
        while end >= 2 and block.endswith(_CRLF, 0, end) and (end == 2 or block[end - 3] == 10):
            empties += 1
            end -= 2
        if end == 0:
            pending += empties
            continue
        out.write(_CRLF * pending)
        out.write(block[:end] if end < len(block) else block)
        pending, wrote = empties, True
    if carry:  # a last line without CRLF: no trailing blanks stripped, a CRLF added
        out.write(_CRLF * pending)
        out.write((_compress_whitespace(carry) if relaxed else carry) + _CRLF)
        wrote = True
    if not wrote and not relaxed:
        out.write(_CRLF)


def _body_algorithm(verifier: Any, index: int) -> bytes | None:
    """``simple`` or ``relaxed``: the body canonicalization of signature ``index``
    (None when dkimpy would refuse the signature anyway)."""
    values = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    try:
        sig = dkim.util.parse_tag_value(values[index])
        policy = dkim.canonicalization.CanonicalizationPolicy.from_c_value(
            sig.get(b"c", b"simple/simple"))
    except Exception:  # noqa: BLE001 - dkimpy reports the same problem when verifying
        return None
    return bytes(policy.body_algorithm.name)


class _CanonicalBodies:
    """Canonical forms of one spooled body, made on first use; ``close`` frees them."""

    def __init__(self, body: SpooledBody) -> None:
        self.body = body
        self.made: dict[bytes, Any] = {}
        self.files: list[_ScratchFile] = []

    def get(self, algorithm: bytes) -> Any:
        if algorithm not in self.made:
            out = self.body.new_file()
            self.files.append(out)
            write_canonical_body(self.body.chunks(), algorithm == b"relaxed", out)
            size = len(out)
            if size <= _MAP_THRESHOLD:
                self.made[algorithm] = out.read_at(0, size)
            else:
                self.made[algorithm] = _CanonicalBody(out.fd, size, access=mmap.ACCESS_READ)
        return self.made[algorithm]

    def close(self) -> None:
        for value in self.made.values():
            if isinstance(value, _CanonicalBody):
                value.close()
        for out in self.files:
            out.close()

class _DkimpyLog:
    """dkimpy reports ordinary verification failures (missing key, bad hash) at
    ERROR; for inbound mail those are routine, so they go to our target at DEBUG."""

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - dkimpy's call
        return log.isEnabledFor(logging.DEBUG)

    def _note(self, msg: object, *args: object, **_kw: object) -> None:
        log.debug("dkimpy: " + str(msg), *args)

    debug = info = warning = error = exception = _note


def _dkim_dnsfunc(resolver: Any, budget: Budget) -> Callable[..., bytes | None]:
    """dkimpy's documented ``dnsfunc`` hook, answered by our resolver and budget."""

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            records = dnsresolve.txt(resolver, qname, budget)
        except (NxDomain, NoAnswer):
            return None  # dkimpy turns a missing key into a failed signature
        except TempFailure as exc:
            raise dkim.DnsTimeoutError(str(exc)) from exc
        keys = [r for r in records if b"p=" in r]
        return (keys or list(records) or [None])[0]

    return lookup


def _count_signatures(raw: bytes) -> int:
    return sum(1 for name, _ in _header_fields(raw) if name.lower() == "dkim-signature")


def check_dkim(raw: bytes, resolver: Any, budget: Budget, *,
               body: SpooledBody | None = None) -> tuple[str, tuple[str, ...]]:
    """(result, passing d= domains): pass if any signature verifies, fail if
    signatures exist and none does, none if the message is unsigned.

    With ``body``, ``raw`` is only the header block up to and including its blank
    line and the body is read from the spool (see :class:`SpooledBody`); raises
    :class:`BareLineFeed` when that body needs the in-memory path.
    """
    count = _count_signatures(raw)
    if not count:
        return "none", ()
    try:
        verifier = dkim.DKIM(raw, logger=_DkimpyLog())
    except Exception as exc:  # noqa: BLE001
        log.info("dkim=fail reason=%s", kv(f"message not parseable for DKIM: {exc}"))
        return "fail", ()
    canonical = _CanonicalBodies(body) if body is not None else None
    try:
        return _verify_each(verifier, count, _dkim_dnsfunc(resolver, budget), canonical)
    finally:
        if canonical is not None:
            canonical.close()


def _verify_each(verifier: Any, count: int, dnsfunc: Callable[..., bytes | None],
                 canonical: _CanonicalBodies | None) -> tuple[str, tuple[str, ...]]:
    passing: list[str] = []
    for index in range(count):
        if canonical is not None:
            algorithm = _body_algorithm(verifier, index)
            verifier.body = canonical.get(algorithm) if algorithm is not None else b""
        try:
            ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
        except Exception as exc:  # noqa: BLE001 - one bad signature must not hide the others
            log.debug("dkim signature %d unusable: %s", index, exc)
            ok = False
        if ok and verifier.domain:
            domain = verifier.domain.decode("utf-8", "replace").rstrip(".").lower()
            if domain not in passing:
                passing.append(domain)
    return ("pass" if passing else "fail"), tuple(passing)


# --------------------------------------------------------------------------- SPF

# pyspf does its own DNS through the module-level function ``spf.DNSLookup``
# (the library itself swaps that function between its pydns and dnspython
# back ends, so replacing it is the supported seam). We install one
# dispatcher, once, that answers through the resolver and budget of the
# message being checked; those travel in a ContextVar, so concurrent checks
# in different threads each use their own, and code that calls pyspf
# outside ``check_spf`` keeps pyspf's original behaviour.
_spf_lookup: contextvars.ContextVar[Callable[[str, str], list] | None] = \
    contextvars.ContextVar("aimx_spf_lookup", default=None)
_pyspf_own_lookup = spf.DNSLookup


def _routed_spf_lookup(name: str, qtype: str, strict: object = True,
                       timeout: object = None) -> list:
    lookup = _spf_lookup.get()
    if lookup is None:
        return _pyspf_own_lookup(name, qtype, strict, timeout)
    return lookup(name, qtype)


spf.DNSLookup = _routed_spf_lookup


def _pyspf_answers(resolver: Any, budget: Budget,
                   consulted: list[tuple[str, str]]) -> Callable[[str, str], list]:
    """Answers in the shape pyspf's lookup functions return: ((name, type), value).

    Each (name, type) asked is appended to ``consulted``, in the answer cache's key form.
    """

    def lookup(name: str, qtype: str) -> list:
        if qtype in ("A", "AAAA", "MX", "PTR", "TXT"):
            consulted.append((name.lower().rstrip("."), qtype))
        try:
            if qtype in ("A", "AAAA"):
                fetch = dnsresolve.a if qtype == "A" else dnsresolve.aaaa
                return [((name, qtype), ip) for ip in fetch(resolver, name, budget)]
            if qtype == "MX":
                return [((name, qtype), pair) for pair in dnsresolve.mx(resolver, name, budget)]
            if qtype == "PTR":
                return [((name, qtype), t) for t in dnsresolve.ptr(resolver, name, budget)]
            if qtype == "TXT":
                return [((name, qtype), (t,)) for t in dnsresolve.txt(resolver, name, budget)]
            return []  # type 99 (SPF) is obsolete (RFC 7208 §3.1)
        except (NxDomain, NoAnswer):
            return []
        except TempFailure as exc:
            raise spf.TempError(f"DNS {exc}") from exc

    return lookup


_RECEIVED_IP = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")


def received_ip(raw: bytes) -> str | None:
    """The client IP for CLI ingest: the first ``Received:`` field (top down) holding
    a bracketed, non-loopback IP literal, e.g. ``(m.example.com [203.0.113.5])``.
    Bare addresses in text (``HELO x 1.2.3.4``, ``host-1.2.3.4.example``) never count."""
    for name, value in _header_fields(raw):
        if name.lower() != "received":
            continue
        for match in _RECEIVED_IP.finditer(value):
            try:
                ip = ipaddress.ip_address(match.group(1))
            except ValueError:
                continue
            if not (ip.is_loopback or ip.is_unspecified):
                return str(ip)
    return None


def _is_domain_name(name: str | None) -> bool:
    if not name or "." not in name or name.startswith("["):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


def check_spf(raw: bytes, parsed: _ParsedFrom, *, peer_ip: str | None,
              mail_from: str | None, helo: str | None, resolver: Any,
              budget: Budget) -> tuple[str, str]:
    """(result, checked domain) per D10.

    Identity: the envelope MAIL FROM; for the null sender (``""``) the HELO
    name (RFC 7208 §2.3); with no envelope at all (CLI ingest) the first From
    address. IP: the SMTP peer, or for CLI ingest the first Received field
    with a bracketed IP literal.
    """
    ip = peer_ip or received_ip(raw)
    if mail_from:
        sender, domain = mail_from, _domain_of(mail_from)
    elif mail_from == "" and helo is not None:
        sender, domain = "", (helo or "").rstrip(".").lower()
        if not _is_domain_name(domain):
            domain = ""
    else:
        first = parsed.from_addresses[0] if parsed.from_addresses else ""
        sender, domain = first, _domain_of(first)
    if not ip or not domain:
        return "none", domain
    verdict_key = ("spf", ip, sender, helo or domain)
    verdicts = getattr(resolver, "verdicts", None)
    known = verdicts.get(verdict_key) if verdicts is not None else None
    if isinstance(known, tuple):
        return known
    consulted: list[tuple[str, str]] = []
    token = _spf_lookup.set(_pyspf_answers(resolver, budget, consulted))
    try:
        query = spf.query(i=ip, s=sender, h=helo or domain, timeout=budget.per_query)
        result, _code, reason = query.check()
    except spf.TempError as exc:
        result, reason = "temperror", str(exc)
    except spf.PermError as exc:
        result, reason = "permerror", str(exc)
    finally:
        _spf_lookup.reset(token)
    identity = sender or f"postmaster@{domain}"
    if result in ("temperror", "permerror"):
        log.info("spf=%s identity=%s ip=%s reason=%s", result, kv(identity), ip, kv(reason))
        return "none", domain
    if result not in ("pass", "fail", "softfail", "neutral", "none"):
        log.info("spf=%s identity=%s ip=%s reason=unexpected-result", kv(result),
                 kv(identity), ip)
        return "none", domain
    _remember_spf(verdicts, getattr(resolver, "answers", None), verdict_key, (result, domain),
                  consulted)
    return result, domain


def _remember_spf(verdicts: dnsresolve.AnswerCache | None,
                  answers: dnsresolve.AnswerCache | None, key: tuple[str, ...],
                  verdict: tuple[str, str], consulted: list[tuple[str, str]]) -> None:
    """Keep an SPF verdict for as long as every DNS answer it was computed from is cached.

    The evaluation depends only on the IP, the sender, the HELO name and those
    answers, so until the first of them expires, evaluating again could only
    repeat it. A verdict that read anything the cache does not hold (no TTL, a
    failure) is not kept.
    """
    if verdicts is None or answers is None or not consulted:
        return
    expiries = [answers.expires_at(name) for name in set(consulted)]
    if any(expiry is None for expiry in expiries):
        return
    verdicts.put(key, verdict, min(expiries) - answers.clock())


# --------------------------------------------------------------------------- DMARC

_DMARC_VERSION = re.compile(rb"^\s*v\s*=\s*DMARC1\s*(;|$)")


def _dmarc_record(domain: str, resolver: Any, budget: Budget) -> dict[str, str] | None:
    """The tags of the single DMARC record at ``_dmarc.<domain>``, or None.
    A temporary DNS failure propagates as ``TempFailure``."""
    try:
        records = dnsresolve.txt(resolver, f"_dmarc.{domain}", budget)
    except (NxDomain, NoAnswer):
        return None
    found = [r for r in records if _DMARC_VERSION.match(r)]
    if len(found) != 1:
        return None  # RFC 7489 §6.6.3: several records count as none
    tags: dict[str, str] = {}
    for part in found[0].decode("utf-8", "replace").split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = value.strip()
    return tags


def check_dmarc(parsed: _ParsedFrom, *, dkim_domains: Sequence[str], spf_result: str,
                spf_domain: str, resolver: Any, budget: Budget) -> str:
    """pass if SPF or DKIM passed aligned with the author domain; none without a
    record or without a single author domain; else fail.

    Unlike the reference, a domain that publishes DMARC gets ``fail`` when
    nothing passed at all: that is exactly what a spoof of it looks like.
    """
    domains = {_domain_of(address) for address in parsed.from_addresses}
    if len(domains) != 1 or "" in domains:
        return "none"
    author = domains.pop()
    try:
        record = _dmarc_record(author, resolver, budget)
        org = organizational_domain(author)
        if record is None and org != author:
            record = _dmarc_record(org, resolver, budget)
    except TempFailure as exc:
        log.info("dmarc=fail domain=%s reason=%s", author, kv(str(exc)))
        return "fail"
    if record is None:
        return "none"
    aspf = record.get("aspf", "r").lower()
    adkim = record.get("adkim", "r").lower()
    spf_aligned = spf_result == "pass" and aligned(spf_domain, author, aspf)
    dkim_aligned = any(aligned(d, author, adkim) for d in dkim_domains)
    return "pass" if spf_aligned or dkim_aligned else "fail"


# --------------------------------------------------------------------------- entry point

def authenticate(raw: bytes, parsed: _ParsedFrom, *, peer_ip: str | None,
                 mail_from: str | None, helo: str | None, resolver: Any,
                 budget: Budget | None = None,
                 body: SpooledBody | None = None,
                 whole: Callable[[], bytes] | None = None) -> AuthResults:
    """DKIM, SPF and DMARC for one message; blocking, bounded by ``budget``
    (a fresh 15 s one when omitted), and it never raises.

    For a spooled message ``raw`` is the header block with its blank line, ``body``
    the rest (see :func:`check_dkim`) and ``whole`` reads the entire message for the
    rare body DKIM must canonicalise in memory.

    ``resolver`` is a ``dnsresolve.make_resolver`` result; ``None`` (no resolver
    could be built) gives ``NONE``. ``mail_from`` is the envelope sender without
    brackets (``""`` for ``<>``), ``None`` when there is no envelope (CLI ingest).
    """
    if resolver is None:
        log.info("no DNS resolver available; dkim, spf and dmarc recorded as none")
        return NONE
    budget = budget if budget is not None else Budget()

    try:
        try:
            dkim_result, dkim_domains = check_dkim(raw, resolver, budget, body=body)
        except BareLineFeed:
            if whole is None:
                raise
            dkim_result, dkim_domains = check_dkim(whole(), resolver, budget)
    except Exception:  # noqa: BLE001
        log.exception("dkim check failed unexpectedly")
        dkim_result, dkim_domains = ("fail" if _safe_count(raw) else "none"), ()

    try:
        spf_result, spf_domain = check_spf(raw, parsed, peer_ip=peer_ip, mail_from=mail_from,
                                           helo=helo, resolver=resolver, budget=budget)
    except Exception:  # noqa: BLE001
        log.exception("spf check failed unexpectedly")
        spf_result, spf_domain = "none", ""

    try:
        dmarc_result = check_dmarc(parsed, dkim_domains=dkim_domains, spf_result=spf_result,
                                   spf_domain=spf_domain, resolver=resolver, budget=budget)
    except Exception:  # noqa: BLE001
        log.exception("dmarc check failed unexpectedly")
        dmarc_result = "none"

    results = AuthResults(dkim_result, spf_result, dmarc_result, dkim_domains)
    log.debug("dkim=%s spf=%s dmarc=%s dkim_domains=%s dns_seconds=%.2f", results.dkim,
              results.spf, results.dmarc, kv(",".join(dkim_domains) or "-"),
              budget.total - budget.remaining())
    return results


def _safe_count(raw: bytes) -> int:
    try:
        return _count_signatures(raw)
    except Exception:  # noqa: BLE001
        return 0


# --------------------------------------------------------------------------- signing

def load_signing_key(path: str | Path) -> bytes:
    """The RSA private key at ``path`` as PKCS#1 PEM, the form dkimpy signs with.
    PKCS#8 files are accepted and converted."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read DKIM private key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"invalid DKIM private key {path}: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SigningError(f"invalid DKIM private key {path}: not an RSA key")
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def sign(message: bytes, *, domain: str, selector: str, key_pem: bytes | str) -> bytes:
    """``message`` with a ``DKIM-Signature:`` field prepended: rsa-sha256,
    relaxed/relaxed, ``t=`` now, no ``l=``, over every field of ``SIGNED_HEADERS``
    oversigned (``h=`` names each one time more than the message has it)."""
    present = Counter(name.lower() for name, _ in _header_fields(message))
    if not present["from"]:
        raise SigningError("cannot sign: the message has no From header")
    include = [name.lower().encode() for name in SIGNED_HEADERS
               for _ in range(present[name.lower()] + 1)]
    head = _head(message)
    linesep = b"\r\n" if b"\r\n" in head or b"\n" not in head else b"\n"
    pem = key_pem.encode() if isinstance(key_pem, str) else key_pem
    try:
        field = dkim.sign(message, selector.encode("ascii"), domain.encode("idna"), pem,
                          canonicalize=(b"relaxed", b"relaxed"), include_headers=include,
                          signature_algorithm=b"rsa-sha256", length=False,
                          logger=_DkimpyLog(), linesep=linesep)
    except (dkim.DKIMException, UnicodeError, ValueError) as exc:
        raise SigningError(f"DKIM signing failed: {exc}") from exc
    return field + message


__all__ = [
    "SIGNED_HEADERS", "BareLineFeed", "SigningError", "SpooledBody", "authenticate", "check_dkim",
    "check_dmarc", "check_spf", "header_block_end", "load_signing_key", "received_ip", "sign",
    "write_canonical_body",
]
