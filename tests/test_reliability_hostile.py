"""Hostile input against a real ``aimx serve``: generated MIME and SMTP sessions,
scripted SMTP and socket abuse, and an open-relay probe.

The promises checked (issue 10): bad input never takes the server down and
never leaves a traceback in its log; every message is either stored with
valid frontmatter or refused with a 5xx; the socket answers every request
with an API error code and keeps serving; no recipient outside the
configured domain is ever accepted.

Figures (cases tried, abuse counts) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import os
import pwd
import re
import string
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aimx.mail import frontmatter
from tests.support import ampabuse, smtpabuse
from tests.support.daemon import RunningDaemon, stored_emails
from tests.support.dnsserver import DnsServer
from tests.support.smtpabuse import Target, Wire

DOMAIN = "hostile.example.com"
EXAMPLES = 150
FLOOD_SOURCE = "127.0.0.9"  # the connection flood gets its own address (per-IP cap)

REQUIRED_KEYS = {
    "id": str, "message_id": str, "thread_id": str, "from": str, "to": str,
    "delivered_to": str, "subject": str, "date": str, "received_at": str,
    "size_bytes": int, "dkim": str, "spf": str, "dmarc": str, "trusted": str,
    "mailbox": str, "read": bool,
}
AUTH_VALUES = {"dkim": {"pass", "fail", "none"},
               "spf": {"pass", "fail", "softfail", "neutral", "none"},
               "dmarc": {"pass", "fail", "none"}, "trusted": {"none", "true", "false"}}


def owner_name(request: pytest.FixtureRequest) -> str:
    if os.geteuid() == 0:
        return request.getfixturevalue("test_users")["alice"].name
    return pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(scope="module")
def zone():
    """An empty zone: every lookup is answered NXDOMAIN at once, on loopback."""
    with DnsServer({}) as dns:
        yield dns


@pytest.fixture(scope="module")
def daemon(request: pytest.FixtureRequest, zone: DnsServer):
    config = {"domain": DOMAIN, "dns_resolvers": [zone.address], "mailboxes": {
        "alice": {"address": f"alice@{DOMAIN}", "owner": owner_name(request)}}}
    env = {"AIMX_SMTP_IDLE_TIMEOUT": "3", "AIMX_API_TIMEOUT": "2"}
    with RunningDaemon(config, env=env) as running:
        yield running


@pytest.fixture(scope="module")
def target(daemon: RunningDaemon) -> Target:
    return Target("127.0.0.1", daemon.smtp_port, DOMAIN, "alice")


def assert_healthy(daemon: RunningDaemon) -> None:
    """Still running, no Python traceback in its log, and a normal message is stored."""
    assert daemon.running(), daemon.log_text()[-3000:]
    log = daemon.log_text()
    assert "Traceback" not in log, log[log.find("Traceback") - 500:][:4000]
    marker = f"health-{uuid.uuid4().hex[:10]}"
    target = Target("127.0.0.1", daemon.smtp_port, DOMAIN, "alice")
    assert smtpabuse.probe(target, marker).startswith("250")
    assert files_containing(daemon, marker), "the probe message was not stored"


def files_containing(daemon: RunningDaemon, needle: str) -> list[Path]:
    return [p for p in stored_emails(daemon.data_dir, "alice") if needle in p.read_text()]


def check_frontmatter(path: Path) -> dict:
    """The file's frontmatter parses and carries every always-present key with its type."""
    data = path.read_bytes()
    fields = frontmatter.parse(data)
    for key, kind in REQUIRED_KEYS.items():
        assert isinstance(fields.get(key), kind), (path, key, fields.get(key))
    for key, allowed in AUTH_VALUES.items():
        assert fields[key] in allowed, (path, key, fields[key])
    assert re.fullmatch(r"[0-9a-f]{16}", fields["thread_id"]), fields["thread_id"]
    assert fields["mailbox"] == "alice"
    assert fields["read"] is False
    toml_text, _ = frontmatter.split(data)
    assert "\n+++\n" not in f"\n{toml_text}\n", "a frontmatter line equals +++ (D2)"
    return fields


# -- property: generated and mutated MIME ------------------------------------------------

_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)
_ATOM = st.text(alphabet=string.ascii_letters + string.digits + "._-+=/", min_size=1,
                max_size=20)
_HEADER_VALUES = st.one_of(
    _TEXT, _ATOM,
    st.sampled_from(["", " ", "=?utf-8?b?w6nDqMOg?=", "=?utf-8?q?=E2=82=AC_euro?=",
                     "=?bogus?x?zz?=", "<>", "<<a@b>>", "\"quoted, name\" <q@x.org>",
                     "a@b, c@d, ,,", "undisclosed-recipients:;", "@", "x" * 300,
                     "Mon, 99 Foo 2025 99:99:99 +9999", "\t", "..", "\\"]),
)
_HEADER_NAMES = st.sampled_from([
    "From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "In-Reply-To",
    "References", "List-Id", "Auto-Submitted", "MIME-Version", "Content-Type",
    "Content-Transfer-Encoding", "Content-Disposition", "X-Junk", "Received",
    "DKIM-Signature",
])
_CONTENT_TYPES = st.sampled_from([
    "text/plain", "text/plain; charset=x-unknown", "text/plain; charset=utf-8",
    "text/html", "text/html; charset=iso-8859-1", "multipart/mixed",
    "multipart/alternative; boundary=", "multipart/mixed; boundary=\"\"",
    "application/octet-stream", "message/rfc822", "image/png; name=\"../../x.png\"",
    "multipart/related; boundary=\"b\"; type=text/html", "bogus", "",
])
_ENCODINGS = st.sampled_from(["7bit", "8bit", "base64", "quoted-printable", "binary",
                              "x-uuencode", "", "BASE64"])
_FILENAMES = st.sampled_from(["a.txt", "../../etc/passwd", "CON", ".hidden", "a/b\\c.bin",
                              "é\u202egpj.exe", "x" * 300, "", "a\x00b.txt", "..",
                              "=?utf-8?b?w6k=?=.txt"])


@st.composite
def mime_parts(draw: st.DrawFn, depth: int = 0) -> str:
    """One MIME entity (headers + body) with CRLF line ends, possibly nested and broken."""
    ctype = draw(_CONTENT_TYPES)
    lines = []
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    if draw(st.booleans()):
        lines.append(f"Content-Transfer-Encoding: {draw(_ENCODINGS)}")
    if draw(st.booleans()):
        lines.append(f'Content-Disposition: attachment; filename="{draw(_FILENAMES)}"')
    if ctype.startswith("multipart") and depth < 3:
        boundary = draw(st.sampled_from(["b1", "b2", "", "--", "x" * 80]))
        if "boundary" not in ctype:
            lines[0] += f'; boundary="{boundary}"'
        children = draw(st.lists(mime_parts(depth + 1), max_size=3))
        body = "".join(f"--{boundary}\r\n{child}\r\n" for child in children)
        if draw(st.booleans()):
            body += f"--{boundary}--\r\n"
    else:
        body = draw(st.one_of(
            _TEXT, st.sampled_from(["aGVsbG8=", "not base64 !!!", "=E2=82", "=\r\n",
                                    "<p>hi<b>x", "<script>x</script>", "\u00e9" * 50])))
    return "\r\n".join(lines) + "\r\n\r\n" + body.replace("\r", "").replace("\n", "\r\n")


@st.composite
def hostile_messages(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A message and, when its Message-ID header is intact, that id."""
    msg_id = f"prop.{uuid.uuid4().hex}@example.org"
    names = draw(st.lists(_HEADER_NAMES, max_size=8))
    headers = [(name, draw(_HEADER_VALUES).replace("\r", " ").replace("\n", " "))
               for name in names]
    keep_id = draw(st.booleans())
    if keep_id:
        headers.insert(draw(st.integers(0, len(headers))), ("Message-ID", f"<{msg_id}>"))
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    raw = (head + draw(mime_parts())).encode("utf-8", "surrogatepass")
    # Byte-level mutations: flips, cuts, duplicated spans, 8-bit noise.
    mutations = draw(st.integers(0, 3))
    for _ in range(mutations):
        if not raw:
            break
        at = draw(st.integers(0, len(raw) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "dup", "insert"]))
        if kind == "flip":
            raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
        elif kind == "cut":
            raw = raw[:at] + raw[at + draw(st.integers(1, 40)):]
        elif kind == "dup":
            raw = raw[:at] + raw[at:at + 30] * 2 + raw[at + 30:]
        else:
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    # The id is only certain to be the message's when nothing could have hidden it:
    # no mutation, and no other Message-ID header drawn.
    intact = keep_id and mutations == 0 and "Message-ID" not in names
    return raw, (msg_id if intact else None)


def dot_stuff(raw: bytes) -> bytes:
    lines = raw.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def test_generated_mime_is_stored_with_valid_frontmatter_or_refused_5xx(
        daemon: RunningDaemon, target: Target) -> None:
    tried: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=20_000, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(case=hostile_messages())
    def prop(case: tuple[bytes, str | None]) -> None:
        raw, msg_id = case
        before = set(stored_emails(daemon.data_dir, "alice"))
        report = smtpabuse.AbuseReport("prop")
        with Wire(report, target.host, target.port) as wire:
            wire.cmd("EHLO prop.example.org")
            assert wire.cmd("MAIL FROM:<prop@example.org>").startswith("250")
            assert wire.cmd(f"RCPT TO:<{target.rcpt}>").startswith("250")
            assert wire.cmd("DATA").startswith("354")
            body = dot_stuff(raw)
            wire.send(body + (b"" if body.endswith(b"\r\n") else b"\r\n") + b".\r\n")
            answer = wire.reply()
            wire.cmd("QUIT")
        tried[answer[:3]] += 1
        assert answer.startswith("250") or answer.startswith("5"), answer
        new = set(stored_emails(daemon.data_dir, "alice")) - before
        if answer.startswith("5"):
            assert not new, f"refused with {answer!r} but stored {new}"
            return
        assert len(new) <= 1, new
        for path in new:
            fields = check_frontmatter(path)
            if msg_id is not None:
                assert fields["message_id"] == msg_id
        if msg_id is not None:
            assert len(new) == 1, "a message with a fresh Message-ID was not stored"

    prop()
    print(f"\nMIME property: {sum(tried.values())} cases, replies {dict(tried)}")
    assert sum(tried.values()) >= EXAMPLES // 2
    assert_healthy(daemon)


# -- property: SMTP command sequences against a model -------------------------------------

_ADDRESSES = st.sampled_from([
    f"alice@{DOMAIN}", f"ALICE@{DOMAIN.upper()}", f"nobody@{DOMAIN}", "x@evil.example",
    f"alice@sub.{DOMAIN}", "alice@example.com", "alice", "", "<>", "a@b@c", "@:x@y",
    f"alice@{DOMAIN} SIZE=10", "\u00e9@x.org",
])


@st.composite
def smtp_sessions(draw: st.DrawFn) -> list[tuple[str, str]]:
    """A list of (verb, argument) pairs; the verb may be junk."""
    verbs = st.sampled_from(["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP",
                             "QUIT", "VRFY", "EXPN", "AUTH", "BDAT", "STARTTLS", "HELP",
                             "ehlo", "Mail", "JUNK", ""])
    steps = []
    for _ in range(draw(st.integers(1, 14))):
        verb = draw(verbs)
        if verb.upper() == "MAIL":
            arg = draw(st.sampled_from(["FROM:", "FROM: ", "TO:", "", "FROM:<>"]))
            arg += draw(_ADDRESSES) if arg.startswith("FROM:") and arg != "FROM:<>" else ""
            if draw(st.booleans()):
                arg = f"FROM:<{draw(_ADDRESSES)}>" + draw(st.sampled_from(
                    ["", " SIZE=99999999999", " SIZE=10", " BODY=8BITMIME", " X=Y"]))
        elif verb.upper() == "RCPT":
            arg = draw(st.sampled_from(["TO:<{}>", "TO:{}", "FROM:<{}>", "{}"])).format(
                draw(_ADDRESSES))
        elif verb.upper() in ("EHLO", "HELO"):
            arg = draw(st.sampled_from(["", "client.example.org", "[127.0.0.1]", "x" * 600]))
        else:
            arg = draw(st.sampled_from(["", "x", "x" * 600]))
        steps.append((verb, arg))
    return steps


class SessionModel:
    """What the reply table (spec 30 §1.3 plus D12-D14) says each command gets."""

    def __init__(self) -> None:
        self.greeted = False
        self.mail = False
        self.rcpts = 0

    @staticmethod
    def _address(arg: str, keyword: str) -> str | None:
        if arg[: len(keyword) + 1].upper() != keyword + ":":
            return None
        rest = arg[len(keyword) + 1:].strip()
        if "<" in rest and ">" in rest[rest.find("<"):]:
            return rest[rest.find("<") + 1: rest.find(">", rest.find("<"))].strip()
        return rest.split()[0] if rest.split() else ""

    def expect(self, verb: str, arg: str) -> set[str]:
        """The reply codes allowed for ``verb arg`` in the current state (updates it)."""
        line = f"{verb} {arg}".strip() if arg else verb
        if len(line.encode()) > 512:
            return {"500"}
        if not line.strip():
            return set()  # blank lines get no reply
        name = verb.upper()
        if name in ("EHLO", "HELO"):
            if not arg:
                return {"501"}
            self.greeted, self.mail, self.rcpts = True, False, 0
            return {"250"}
        if name == "MAIL":
            if not self.greeted:
                return {"503"}
            if self.mail:
                return {"503"}
            if self._address(arg, "FROM") is None:
                return {"501"}
            if "SIZE=99999999999" in arg:
                return {"552"}
            self.mail = True
            return {"250"}
        if name == "RCPT":
            if not self.mail:
                return {"503"}
            address = self._address(arg, "TO")
            if not address:
                return {"501"}
            domain = address.rpartition("@")[2] if "@" in address else ""
            if domain.lower() != DOMAIN:
                return {"550"}
            if address.split("@")[0].lower() != "alice":
                return {"550"}
            self.rcpts += 1
            return {"250"}
        if name == "DATA":
            if not self.rcpts:
                return {"503"}
            self.mail, self.rcpts = False, 0
            return {"354"}
        if name in ("RSET",):
            self.mail, self.rcpts = False, 0
            return {"250"}
        if name == "NOOP":
            return {"250"}
        if name == "QUIT":
            return {"221"}
        if name == "STARTTLS":
            return {"502", "501"}
        return {"500"}


def test_generated_smtp_sessions_follow_the_reply_table(
        daemon: RunningDaemon, target: Target) -> None:
    tried = Counter()

    @settings(max_examples=EXAMPLES, deadline=20_000, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow,
                                     HealthCheck.function_scoped_fixture])
    @given(steps=smtp_sessions())
    def prop(steps: list[tuple[str, str]]) -> None:
        model = SessionModel()
        report = smtpabuse.AbuseReport("session")
        errors_in_row = 0
        with Wire(report, target.host, target.port, timeout=20) as wire:
            for verb, arg in steps:
                allowed = model.expect(verb, arg)
                line = f"{verb} {arg}" if arg else verb
                wire.send(line.encode() + b"\r\n")
                if not allowed:
                    continue
                answer = wire.reply()
                tried["commands"] += 1
                code = answer[:3]
                assert re.fullmatch(r"\d{3}", code), answer
                assert code in allowed, f"{line!r} -> {answer!r}, expected {allowed}"
                errors_in_row = errors_in_row + 1 if code >= "400" else 0
                if code == "354":
                    wire.send(b"Subject: generated\r\n\r\nbody\r\n.\r\n")
                    final = wire.reply()
                    assert final.startswith("250"), final
                    errors_in_row = 0
                if code == "221":
                    assert wire.eof(), "the connection stayed open after 221"
                    return
                if errors_in_row >= 20:
                    assert wire.reply().startswith("421")
                    assert wire.eof()
                    return
            # Exactly one reply per command: a final NOOP is answered next, nothing queued.
            assert wire.cmd("NOOP").startswith("250")

    prop()
    tried["sessions"] = EXAMPLES
    print(f"\nSMTP session property: {EXAMPLES} sessions, {tried['commands']} commands checked")
    assert_healthy(daemon)


# -- scripted SMTP abuse --------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["long_lines", "nul_bytes", "bare_cr_lf",
                                      "pipelining_flood", "after_quit", "binary_noise"])
def test_smtp_abuse_script(daemon: RunningDaemon, target: Target, scenario: str) -> None:
    report = smtpabuse.SCENARIOS[scenario](target)
    print(f"\n{report.summary()}")
    assert report.problems == []
    if report.marker:
        stored = files_containing(daemon, report.marker)
        assert len(stored) == report.stored_expected, (report.marker, stored)
        for path in stored:
            check_frontmatter(path)
    assert_healthy(daemon)


def test_no_transaction_hidden_inside_data_is_ever_obeyed(
        daemon: RunningDaemon, target: Target) -> None:
    """SMTP smuggling: after every fake terminator, no "smuggled" message is on disk."""
    report = smtpabuse.bare_cr_lf(target)
    smuggled = [p for p in stored_emails(daemon.data_dir, "alice")
                if frontmatter.parse(p.read_bytes()).get("subject") == "smuggled"]
    assert smuggled == [], f"a transaction hidden inside DATA was obeyed: {report.problems}"


def test_slow_loris_sessions_do_not_starve_normal_clients(
        daemon: RunningDaemon, target: Target) -> None:
    report = smtpabuse.slow_loris(target, sessions=12, seconds=4.0, source="127.0.0.1")
    print(f"\n{report.summary()}")
    assert report.problems == []
    assert len(files_containing(daemon, report.marker)) == report.stored_expected
    assert_healthy(daemon)


def test_silent_connections_are_cut_by_the_idle_timeout(target: Target) -> None:
    report = smtpabuse.AbuseReport("idle")
    started = time.monotonic()
    with Wire(report, target.host, target.port, timeout=15) as wire:
        assert wire.reply(timeout=15).startswith("421")
        assert wire.eof()
    assert time.monotonic() - started < 10  # AIMX_SMTP_IDLE_TIMEOUT is 3 s here


def test_two_hundred_parallel_connections_from_one_address(
        daemon: RunningDaemon, target: Target) -> None:
    report = smtpabuse.connection_flood(target, count=200, source=FLOOD_SOURCE, per_ip=20)
    print(f"\n{report.summary()}")
    assert report.problems == []
    assert_healthy(daemon)


# -- scripted socket abuse --------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["random_boxes", "oversize", "half_written", "garbage"])
def test_socket_abuse_script(daemon: RunningDaemon, scenario: str) -> None:
    report = ampabuse.SCENARIOS[scenario](str(daemon.socket_path))
    print(f"\n{report.summary()}")
    assert report.problems == []
    assert ampabuse.version_answered(str(daemon.socket_path))
    assert_healthy(daemon)


def test_stalled_half_written_boxes_are_dropped_at_the_timeout(daemon: RunningDaemon) -> None:
    report = ampabuse.half_written(str(daemon.socket_path), count=40, stall_seconds=8.0)
    print(f"\n{report.summary()}")
    assert report.problems == []
    assert report.replies["dropped"] == 40


def test_thousands_of_socket_connections(daemon: RunningDaemon) -> None:
    report = ampabuse.connection_storm(str(daemon.socket_path), sequential=2000,
                                       concurrent=300)
    print(f"\n{report.summary()}")
    assert report.problems == []
    assert_healthy(daemon)


# -- open relay probe ------------------------------------------------------------------------

FOREIGN_RECIPIENTS = [
    "postmaster@evil.example", "alice@example.com", f"alice@sub.{DOMAIN}",
    f"alice@deep.sub.{DOMAIN}", "alice@example.com.", f"alice@{DOMAIN}.evil.example",
    f"alice@evil-{DOMAIN}", f"alice@x{DOMAIN}", "alice@com", "alice@[127.0.0.1]",
    "alice@[IPv6:::1]", f"alice@{DOMAIN}@evil.example", "alice", "alice@",
    f"\"alice@{DOMAIN}\"@evil.example", f"alice@{DOMAIN}.", "ALICE@EVIL.EXAMPLE",
]
# Local-domain tricks (percent hack, source route, quoted local parts): each names another
# host inside the local part and is refused as a source route.
LOCAL_TRICKS = [
    f"alice%evil.example@{DOMAIN}", f"@evil.example:alice@{DOMAIN}",
    f"\"alice@evil.example\"@{DOMAIN}", f"evil.example!alice@{DOMAIN}",
    f"alice@evil.example@{DOMAIN}",
]


@pytest.mark.parametrize("mail_from", ["relay@evil.example", f"alice@{DOMAIN}", ""])
def test_open_relay_probe(daemon: RunningDaemon, target: Target, mail_from: str) -> None:
    report = smtpabuse.AbuseReport("relay probe")
    refused = 0
    with Wire(report, target.host, target.port) as wire:
        wire.cmd("EHLO relay-probe.example.org")
        assert wire.cmd(f"MAIL FROM:<{mail_from}>").startswith("250")
        for rcpt in FOREIGN_RECIPIENTS:
            answer = wire.cmd(f"RCPT TO:<{rcpt}>")
            assert answer.startswith("550"), f"{rcpt!r} answered {answer!r}"
            refused += 1
            assert wire.cmd("NOOP").startswith("250")  # keep clear of the 20-errors cap
        for rcpt in LOCAL_TRICKS:
            answer = wire.cmd(f"RCPT TO:<{rcpt}>")
            assert answer == "501 5.1.3 Source-routed recipient address not accepted", (
                f"{rcpt!r} answered {answer!r}")
            refused += 1
            assert wire.cmd("NOOP").startswith("250")
        wire.cmd("RSET")
        wire.cmd("QUIT")
    print(f"\nrelay probe (MAIL FROM <{mail_from}>): "
          f"{len(FOREIGN_RECIPIENTS) + len(LOCAL_TRICKS)} recipients, {refused} refused")
