"""Inbound ESMTP: the port-25 listener that turns mail into files.

A subclass of ``twisted.mail.smtp.ESMTP`` that keeps Twisted's plumbing
(transport, timeout mixin, TLS switch) but owns the wire: its own byte-level
line splitter, reply texts, limits and DATA handling, because the stock
protocol differs from the spec in ways that matter for a mail server:

* DATA stays bytes end to end; DKIM verifies over the exact stored bytes, so
  8-bit and chunk-split UTF-8 must pass untouched;
* an over-long line, a bare LF or a NUL never desynchronises the stream: the
  message is read to its terminator, then refused (D13);
* STARTTLS throws away plaintext pipelined behind it and resets the session,
  so nothing injected before the handshake is obeyed (D14);
* ``SIZE=`` is enforced at MAIL FROM, and every limit of D12 is counted here;
* time limits are deadlines, not idle timers: a command line must be complete
  within the command timeout however its bytes trickle in, DATA must keep up a
  minimum rate, and one source address (an IPv6 /64) holds a bounded number
  of sessions, so slow clients cannot keep every slot.

A message past 256 KiB goes to a root-only spool file as it arrives
(``storage.spool``) and is analysed from there with bounded memory; past the
size limit the rest is dropped unread. After the terminator the message is
analysed once and delivered per recipient in worker threads; the reply goes out
only when every file is durable (D1), and hooks fire after the reply, never
delaying it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections import Counter
from typing import Any

import attrs
from twisted.internet import defer, protocol, threads
from twisted.internet.interfaces import ITLSTransport
from twisted.mail import smtp

from aimx.logs import kv, logger
from aimx.smtp.ingest import ingest_message
from aimx.storage.spool import SPOOL_THRESHOLD, Spool

log = logger("aimx::smtp")

MAX_MESSAGE_BYTES = 26_214_400
MAX_COMMAND_LINE = 512  # octets, line terminator excluded
MAX_DATA_LINE = 998  # octets, line terminator excluded
MAX_RECIPIENTS = 100
MAX_SESSIONS = 100
MAX_SESSIONS_PER_IP = 20
MAX_CONSECUTIVE_ERRORS = 20
# Seconds for each complete command line (RFC 5321 §4.5.3.2 asks servers for 5 minutes);
# bytes trickling in do not extend it. Also the free time at the start of DATA.
IDLE_TIMEOUT_SECS = 300.0
IDLE_TIMEOUT_ENV = "AIMX_SMTP_IDLE_TIMEOUT"
SESSION_DEADLINE_SECS = 600.0  # a connection's whole life, so a trickling client frees its slot
SESSION_DEADLINE_ENV = "AIMX_SMTP_SESSION_DEADLINE"
# DATA may last the idle timeout plus one second per this many bytes received (Postfix's
# smtpd_min_data_rate default): any real sender is far faster, a trickle is cut early.
MIN_DATA_RATE = 500.0  # bytes per second
MIN_DATA_RATE_ENV = "AIMX_SMTP_MIN_DATA_RATE"

# Replies whose exact text operators grep for and clients branch on (spec 30 §1.3, D12-D14).
R_OK = "250 2.0.0 OK"
R_ACCEPTED = "250 2.0.0 OK message accepted"
R_BYE = "221 2.0.0 Bye"
R_DATA_GO = "354 Start mail input; end with <CRLF>.<CRLF>"
R_TLS_GO = "220 2.0.0 Ready to start TLS"
R_NEED_HELO = "503 5.5.1 Send EHLO/HELO first"
R_NESTED_MAIL = "503 5.5.1 MAIL FROM already given"
R_NEED_MAIL = "503 5.5.1 Send MAIL FROM first"
R_NEED_RCPT = "503 5.5.1 Send RCPT TO first"
R_MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address>"
R_RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address>"
R_TLS_SYNTAX = "501 5.5.4 Syntax: STARTTLS takes no parameters"
R_RELAY = "550 5.7.1 relay not permitted"
R_UNKNOWN_USER = "550 5.1.1 <{}>: Recipient address rejected: User unknown"
R_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
R_NO_TLS = "502 5.5.1 STARTTLS not available"
R_TLS_ACTIVE = "503 5.5.1 TLS already active"
R_UNRECOGNIZED = "500 5.5.1 Unrecognized command"
R_LINE_TOO_LONG = "500 5.5.2 Line too long"
R_TOO_BIG = "552 5.3.4 Message exceeds maximum size"
R_BARE_LF = "550 5.6.0 Bare LF not allowed"
R_PARTIAL = "451 4.3.0 Temporary failure on partial accept; please retry"
R_ALL_FAILED = "451 4.3.0 Temporary failure, please retry"
R_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
R_TOO_MANY_FROM_ADDRESS = "421 4.7.0 Too many connections from your address, try again later"
R_CONTROL_CHARACTER = "501 5.5.2 Syntax error: bare CR or other control character in command"
R_SOURCE_ROUTE = "501 5.1.3 Source-routed recipient address not accepted"
R_TOO_MANY_ERRORS = "421 4.7.0 Too many errors"
R_IDLE = "421 4.4.2 Idle timeout exceeded"
R_COMMAND_TIMEOUT = "421 4.4.2 Command not completed in time"
R_DATA_TIMEOUT = "421 4.4.2 Timeout during DATA"
R_DEADLINE = "421 4.4.2 Connection timed out"
R_SHUTTING_DOWN = "421 4.3.2 Service shutting down"

# A DATA line that is the end-of-data mark ("." and optional blanks, then CRLF).
_END_OF_DATA = re.compile(rb"^\.[ \t]*\r\n", re.MULTILINE)
# The dot of a stuffed line (one starting "..") that unstuffing removes.
_STUFFED_DOT = re.compile(rb"^\.(?=\.)", re.MULTILINE)

# Control characters a command line may not hold (its CRLF or LF is cut off first).
_COMMAND_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

_VERBS = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "STARTTLS"})


def _seconds_from_env(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        return default


def _positive_from_env(name: str, default: float) -> float:
    value = _seconds_from_env(name, default)
    return value if value > 0 else default


def end_of_data_mark(buffer: bytes | bytearray, start: int, end: int) -> int:
    """Where ``_END_OF_DATA.search(buffer, start, end)`` matches, or -1.

    The regex alone tries every byte of the buffer (about 19 µs for 4 KB);
    lines that begin with a dot are rare, so ``find`` (C speed) jumps from one
    to the next and only those are matched.
    """
    at = start if buffer.startswith(b".", start) else buffer.find(b"\n.", start, end) + 1 or -1
    while at >= 0:  # the pattern's "^" still checks that a newline (or nothing) is before
        if _END_OF_DATA.match(buffer, at, end):
            return at
        at = buffer.find(b"\n.", at, end) + 1 or -1
    return -1


def idle_timeout_from_env() -> float:
    return _seconds_from_env(IDLE_TIMEOUT_ENV, IDLE_TIMEOUT_SECS)


@attrs.define
class Limits:
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_recipients: int = MAX_RECIPIENTS
    max_sessions: int = MAX_SESSIONS
    max_per_ip: int = MAX_SESSIONS_PER_IP
    max_errors: int = MAX_CONSECUTIVE_ERRORS
    idle_timeout: float = IDLE_TIMEOUT_SECS
    session_deadline: float = SESSION_DEADLINE_SECS
    min_data_rate: float = MIN_DATA_RATE


# -- pure helpers -------------------------------------------------------------


def split_path_arg(arg: str, keyword: str) -> tuple[str, dict[str, str]] | None:
    """Parse ``FROM:<a> K=V ...`` / ``TO:<a>``: the address and its ESMTP parameters.

    ``None`` when the argument does not start with ``keyword:`` (any case).
    The address is the text between the first ``<`` and the first ``>``,
    trimmed; without brackets, the first word after the colon.
    """
    prefix = keyword + ":"
    if not arg[: len(prefix)].upper() == prefix:
        return None
    rest = arg[len(prefix):].strip()
    open_at = rest.find("<")
    close_at = rest.find(">", open_at + 1) if open_at >= 0 else -1
    if open_at >= 0 and close_at >= 0:
        address = rest[open_at + 1: close_at].strip()
        tail = rest[close_at + 1:]
    else:
        words = rest.split(None, 1)
        address = words[0] if words else ""
        tail = words[1] if len(words) > 1 else ""
    params: dict[str, str] = {}
    for word in tail.split():
        key, _, value = word.partition("=")
        params[key.upper()] = value
    return address, params


def has_source_route(address: str) -> bool:
    """Whether a recipient carries routing: an explicit ``@relay:`` prefix, or one hidden
    in the local part (``a@evil.example@us``, the ``%`` hack, a ``!`` bang path).

    aimx never relays, and such an address would be routed by its first local part
    while naming another host; refusing it keeps ``delivered_to`` a plain address.
    """
    local = address.rpartition("@")[0]
    return any(mark in local for mark in "@%!")


def source_key(ip: str) -> str:
    """The unit of the per-source session cap: the IPv4 address, or the IPv6 /64
    (one host is routinely given a whole /64, so single IPv6 addresses cost nothing)."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def recipient_domain(address: str) -> str:
    """The text after the last ``@`` ("" when there is none)."""
    at = address.rfind("@")
    return address[at + 1:] if at >= 0 else ""


def is_local_recipient(config: Any, address: str) -> bool:
    """The relay check: only the configured domain, compared ASCII case-insensitively."""
    domain = recipient_domain(address)
    if not domain:
        return False
    check = getattr(config, "is_local_domain", None)
    if check is not None:
        return bool(check(domain))
    return domain.lower() == str(config.domain).lower()


def outcome_reply(stored: int, failed: int) -> str:
    """The reply after delivery: duplicates count as stored (spec 20 §3.3)."""
    if failed == 0:
        return R_ACCEPTED
    if stored:
        return R_PARTIAL
    return R_ALL_FAILED


@attrs.define
class _Message:
    """DATA being received: unstuffed lines plus what was wrong with them.

    The first ``SPOOL_THRESHOLD`` bytes are kept in memory; a larger message moves
    to a spool file as it arrives (written from the reactor: appending to the page
    cache costs microseconds per block, far less than a thread hop would). Once the
    message is refused (too big, bare LF, ...) nothing more is kept.
    """

    new_file: Any  # makes the spool file (``Spool.new_file``)
    chunks: list[bytes] = attrs.Factory(list)
    spool: Any = None  # the ``SpoolFile`` once past the threshold
    size: int = 0  # unstuffed bytes kept (CRLF line ends included)
    wire_bytes: int = 0
    too_big: bool = False
    bare_lf: bool = False
    too_long: bool = False
    spool_failed: bool = False
    # Whether the previous DATA line ended in CRLF: only CRLF "." CRLF ends a message,
    # so a "\n.\r\n" inside the body cannot smuggle a second transaction.
    after_crlf: bool = True
    slow: bool = False  # a block held a problem: the rest goes line by line

    def keep(self, block: bytes) -> None:
        """Add unstuffed bytes to the message."""
        self.size += len(block)
        if self.spool is None:
            self.chunks.append(block)
            if self.size <= SPOOL_THRESHOLD:
                return
            try:
                self.spool = self.new_file()
            except OSError as exc:
                self._spool_lost(exc)
                return
            block = b"".join(self.chunks)
            self.chunks.clear()
        try:
            self.spool.write(block)
        except OSError as exc:
            self._spool_lost(exc)

    def _spool_lost(self, exc: OSError) -> None:
        log.error("cannot spool a large message: %s", exc)
        self.spool_failed = True
        self.discard()

    def discard(self) -> None:
        """Drop what was kept (the message is refused or abandoned)."""
        self.chunks.clear()
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    def take(self) -> Any:
        """The whole message (bytes, or the spool file, now the caller's to close)."""
        if self.spool is None:
            return b"".join(self.chunks)
        spool, self.spool = self.spool, None
        return spool

    def rejection(self) -> str | None:
        if self.spool_failed:
            return R_ALL_FAILED
        if self.too_big:
            return R_TOO_BIG
        if self.bare_lf:
            return R_BARE_LF
        if self.too_long:
            return R_LINE_TOO_LONG
        return None


# -- the protocol ---------------------------------------------------------------


class SmtpSession(smtp.ESMTP):
    """One inbound SMTP connection."""

    factory: SmtpFactory

    def __init__(self, factory: SmtpFactory) -> None:
        super().__init__(contextFactory=factory.tls_context)
        self.factory = factory
        self.timeout = factory.limits.idle_timeout
        self._unread = bytearray()  # received, not handled yet (LineReceiver is bypassed)
        self._skipping = False  # inside an over-long line, dropping bytes up to its LF
        self._in_data = False
        self._busy = False  # a finished message is being stored; input waits
        self._admitting = False  # the daemon has yet to admit the session; input waits
        self._looping = False
        self._closed = False
        self._counted = False
        self._greeted = False
        self._helo_name: str | None = None
        self._tls = False
        self._mail_from: str | None = None
        self._rcpts: list[str] = []
        self._txn_config: Any = None
        self._message: _Message | None = None
        self._pending_hooks: tuple[Any, list[Any]] | None = None
        self._errors_in_row = 0
        self._messages = 0
        self._bytes = 0
        self._started = time.monotonic()
        self._outcome = "ok"
        self._received = 0  # bytes read on this connection (after TLS)
        self._data_started = 0.0  # reactor time of the 354 reply
        self._data_mark = 0  # ``_received`` when the message's first byte was yet to come
        self._data_check: Any = None
        self.peer_ip = ""

    # -- connection lifecycle ------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        peer = self.transport.getPeer()
        self.peer_ip = str(getattr(peer, "host", peer))
        if self.factory.draining:
            self._send(R_SHUTTING_DOWN)
            self._close("shutdown")
            return
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._counted = True
        if self.factory.admission is not None:
            # Several processes serve this port: the session counts only once the
            # daemon, which sees them all, has admitted it too. Input waits meanwhile.
            # Bytes that arrive anyway (pipelined behind a PROXY header) wait in the buffer.
            self._admitting = True
            self.transport.pauseProducing()
            self.factory.admission.admit(self).addCallback(self._admitted)
            return
        self._send_banner()

    def _admitted(self, refusal: str | None) -> None:
        self._admitting = False
        if self._closed:
            return  # the client left while we asked; connectionLost released it
        if refusal is not None:
            self._counted = False
            self.factory.release(self)
            self._refuse(refusal)
            return
        self.transport.resumeProducing()
        self._send_banner()
        self._drain_buffer()

    def _refuse(self, refusal: str) -> None:
        reason = ("too-many-from-address" if refusal == R_TOO_MANY_FROM_ADDRESS
                  else "too-many-connections")
        log.warning("connection refused peer=%s reason=%s", kv(self.peer_ip), reason)
        self._send(refusal)
        self._close("refused")

    def _send_banner(self) -> None:
        self.canStartTLS = (self.ctx is not None and ITLSTransport.providedBy(self.transport))
        self._send(f"220 {self.factory.daemon.config.domain} ESMTP aimx")
        self.setTimeout(self.timeout)
        self._deadline = self.factory.daemon.reactor.callLater(
            self.factory.limits.session_deadline, self._deadline_reached)

    def _deadline_reached(self) -> None:
        """The connection's overall time is up; a message being stored finishes first,
        and so does DATA, which has its own deadline from the minimum rate (a 25 MB
        message at a legitimate pace must not be cut off; a trickle still is)."""
        if self._closed:
            return
        if self._in_data or self._busy:  # checked again each second until both are over
            self._deadline = self.factory.daemon.reactor.callLater(1, self._deadline_reached)
            return
        self._outcome = "timeout"
        self._send(R_DEADLINE)
        self._close("timeout")

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:  # noqa: N802
        self.setTimeout(None)
        for pending in (getattr(self, "_deadline", None), self._data_check):
            if pending is not None and pending.active():
                pending.cancel()
        was_closed = self._closed
        self._closed = True
        if self._message is not None:
            self._message.discard()  # a spool file left by a client gone mid-DATA
        if self._counted:
            self._counted = False
            if not was_closed and self._outcome == "ok" and self._in_transaction():
                self._outcome = "error"  # the client vanished mid-transaction
            log.info("connection closed peer=%s helo=%s tls=%s messages=%d bytes=%d "
                     "duration_ms=%d outcome=%s", kv(self.peer_ip), kv(self._helo_name or "-"),
                     str(self._tls).lower(), self._messages, self._bytes,
                     int((time.monotonic() - self._started) * 1000), self._outcome)
            self.factory.release(self)

    def timeoutConnection(self) -> None:  # noqa: N802 (Twisted's name)
        """No complete line within the idle timeout (partial bytes do not count)."""
        self._outcome = "timeout"
        if self._in_data:
            self._send(R_DATA_TIMEOUT)
        elif self._unread or self._skipping:
            self._send(R_COMMAND_TIMEOUT)
        else:
            self._send(R_IDLE)
        self._close("timeout")

    def _close(self, outcome: str | None = None) -> None:
        if outcome and self._outcome == "ok" and outcome not in ("quit", "shutdown"):
            self._outcome = outcome
        self._closed = True
        self._unread.clear()
        self.transport.loseConnection()

    # -- output ----------------------------------------------------------------

    def _send(self, line: str) -> None:
        self.transport.write(line.encode("utf-8", "replace") + b"\r\n")

    def reply(self, line: str) -> None:
        """Send a reply and count consecutive errors (D12: 20 in a row close the session)."""
        self._send(line)
        code = int(line[:3])
        if code >= 400:
            self._errors_in_row += 1
            if self._errors_in_row >= self.factory.limits.max_errors:
                self._send(R_TOO_MANY_ERRORS)
                self._close("error")
        else:
            self._errors_in_row = 0

    # -- input: a byte-level line splitter that never loses its place ------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        if self._closed:
            return
        self._received += len(data)
        self._unread += data
        self._drain_buffer()

    def _drain_buffer(self) -> None:
        """Handle every complete line buffered. Only a complete line restarts the idle
        timer: a client trickling bytes of one line still meets the deadline."""
        if self._looping:
            return
        self._looping = True
        progressed = False
        try:
            while self._unread and not (self._busy or self._admitting or self._closed):
                if self._in_data and not self._skipping and self._data_block():
                    progressed = True
                    continue
                newline = self._unread.find(b"\n")
                if newline < 0:
                    self._partial_line()
                    break
                progressed = True
                line = bytes(self._unread[: newline + 1])
                del self._unread[: newline + 1]
                if self._skipping:
                    self._skipping = False
                    self._overlong_line_ended()
                elif self._in_data:
                    self._data_line(line)
                else:
                    self._command_line(line)
        finally:
            self._looping = False
            if progressed and not self._closed and not self._busy:
                self.resetTimeout()

    def _partial_line(self) -> None:
        """No LF yet: cap what an unfinished line may hold, then drop the rest up to its LF."""
        limit = (MAX_DATA_LINE if self._in_data else MAX_COMMAND_LINE) + 2
        if self._skipping:
            if self._message is not None:
                self._message.wire_bytes += len(self._unread)
            self._unread.clear()
        elif len(self._unread) > limit:
            if self._message is not None:
                self._message.too_long = True
                self._message.wire_bytes += len(self._unread)
                self._message.discard()
            self._unread.clear()
            self._skipping = True

    def _overlong_line_ended(self) -> None:
        if self._in_data:
            return  # already flagged; the message is refused at its terminator
        self.reply(R_LINE_TOO_LONG)

    # -- commands ----------------------------------------------------------------

    def lookupMethod(self, command: bytes | str) -> Any:  # noqa: N802 (Twisted's name)
        """Only the verbs of the reply table; Twisted's AUTH, VRFY and friends stay unknown."""
        verb = command.decode("ascii", "replace") if isinstance(command, bytes) else command
        verb = verb.upper()
        return getattr(self, "do_" + verb) if verb in _VERBS else None

    def _command_line(self, line: bytes) -> None:
        content = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if len(content) > MAX_COMMAND_LINE:
            self.reply(R_LINE_TOO_LONG)
            return
        if _COMMAND_CONTROL.search(content):
            # A CR that does not end the line would reach replies and logs verbatim.
            self.reply(R_CONTROL_CHARACTER)
            return
        text = content.rstrip()
        if not text:
            return  # blank lines are ignored and unanswered
        decoded = text.decode("utf-8", "replace")
        verb, _, arg = decoded.partition(" ")
        if self.factory.draining and not self._in_transaction() and verb.upper() != "QUIT":
            self.shut_down()
            return
        method = self.lookupMethod(verb)
        if method is None:
            self.reply(R_UNRECOGNIZED)
            return
        method(arg.strip())

    def _in_transaction(self) -> bool:
        return self._mail_from is not None or self._in_data or self._busy

    def _reset_transaction(self) -> None:
        self._mail_from = None
        self._rcpts = []
        self._txn_config = None
        if self._message is not None:
            self._message.discard()
        self._message = None

    def do_EHLO(self, arg: str) -> None:  # noqa: N802
        if not arg:
            self.reply("501 5.5.4 EHLO requires domain argument")
            return
        self._greet(arg)
        lines = [f"{self.factory.daemon.config.domain} Hello {arg}",
                 f"SIZE {self.factory.limits.max_message_bytes}", "8BITMIME", "PIPELINING",
                 "ENHANCEDSTATUSCODES"]
        if self.canStartTLS and not self._tls:
            lines.append("STARTTLS")
        lines.append("SMTPUTF8")
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}"
        self.reply(text)

    def do_HELO(self, arg: str) -> None:  # noqa: N802
        if not arg:
            self.reply("501 5.5.4 HELO requires domain argument")
            return
        self._greet(arg)
        self.reply(f"250 {self.factory.daemon.config.domain} Hello {arg}")

    def _greet(self, name: str) -> None:
        self._greeted = True
        self._helo_name = name
        self._reset_transaction()

    def do_MAIL(self, arg: str) -> None:  # noqa: N802
        if not self._greeted:
            self.reply(R_NEED_HELO)
            return
        if self._mail_from is not None:
            self.reply(R_NESTED_MAIL)
            return
        parsed = split_path_arg(arg, "FROM")
        if parsed is None:
            self.reply(R_MAIL_SYNTAX)
            return
        address, params = parsed
        size = params.get("SIZE", "")
        if size.isdigit() and int(size) > self.factory.limits.max_message_bytes:
            self.reply(R_TOO_BIG)
            return
        self._mail_from = address
        self._rcpts = []
        self._txn_config = self.factory.daemon.config
        self.reply(R_OK)

    def do_RCPT(self, arg: str) -> None:  # noqa: N802
        if self._mail_from is None:
            self.reply(R_NEED_MAIL)
            return
        parsed = split_path_arg(arg, "TO")
        if parsed is None or not parsed[0]:
            self.reply(R_RCPT_SYNTAX)
            return
        address = parsed[0]
        if len(self._rcpts) >= self.factory.limits.max_recipients:
            self.reply(R_TOO_MANY_RCPTS)
            return
        config = self._txn_config
        if not is_local_recipient(config, address):
            self.reply(R_RELAY)
            return
        if has_source_route(address):
            self.reply(R_SOURCE_ROUTE)
            return
        if config.route(address) is None:
            self.reply(R_UNKNOWN_USER.format(address))
            return
        self._rcpts.append(address)
        self.reply(R_OK)

    def do_DATA(self, arg: str) -> None:  # noqa: N802
        if not self._rcpts:
            self.reply(R_NEED_RCPT)
            return
        self._in_data = True
        self._message = _Message(self.factory.spool.new_file)
        reactor = self.factory.daemon.reactor
        self._data_started = reactor.seconds()
        self._data_mark = self._received - len(self._unread)
        self._data_check = reactor.callLater(self._data_deadline() - self._data_started,
                                             self._check_data_rate)
        self.reply(R_DATA_GO)

    def _data_deadline(self) -> float:
        """When DATA must be over: the idle timeout, plus one second for every
        ``min_data_rate`` bytes received since the 354, counting at most twice the
        size limit (a message with every line dot-stuffed), so DATA, which the
        session deadline waits for, cannot be stretched for ever."""
        limits = self.factory.limits
        received = min(self._received - self._data_mark, 2 * limits.max_message_bytes)
        return self._data_started + limits.idle_timeout + received / limits.min_data_rate

    def _check_data_rate(self) -> None:
        self._data_check = None
        if self._closed or not self._in_data:
            return
        reactor = self.factory.daemon.reactor
        now, deadline = reactor.seconds(), self._data_deadline()
        if now < deadline:
            self._data_check = reactor.callLater(deadline - now, self._check_data_rate)
            return
        log.info("DATA too slow peer=%s bytes=%d seconds=%.1f", kv(self.peer_ip),
                 self._received - self._data_mark, now - self._data_started)
        self._outcome = "timeout"
        self._send(R_DATA_TIMEOUT)
        self._close("timeout")

    def do_RSET(self, arg: str) -> None:  # noqa: N802
        self._reset_transaction()
        self.reply(R_OK)

    def do_NOOP(self, arg: str) -> None:  # noqa: N802
        self.reply(R_OK)

    def do_QUIT(self, arg: str) -> None:  # noqa: N802
        self._send(R_BYE)
        self._close("quit")

    def do_STARTTLS(self, arg: str) -> None:  # noqa: N802
        if self._tls:
            self.reply(R_TLS_ACTIVE)
            return
        if not self.canStartTLS:
            self.reply(R_NO_TLS)
            return
        if arg:
            self.reply(R_TLS_SYNTAX)
            return
        self.reply(R_TLS_GO)
        # Plaintext pipelined behind STARTTLS must never be obeyed (CVE-2011-0411 class).
        self._unread.clear()
        self.transport.startTLS(self.ctx)
        self._tls = True
        self._greeted = False
        self._helo_name = None
        self._reset_transaction()

    # -- DATA --------------------------------------------------------------------

    def _data_block(self) -> bool:
        """Take every complete DATA line in the buffer at once, when they are all clean.

        The per-line path (``_data_line``) costs a few microseconds of Python per
        line; a 100 KB message has well over a thousand. When the buffered lines
        up to the end-of-data mark (or the last complete line) hold no bare LF,
        NUL or over-long line and fit the size limit, they are unstuffed and
        kept as one block: the same bytes and counts the per-line path would
        produce. Anything else (or a message already refused) falls back to the
        per-line path, which stays the reference.
        """
        message = self._message
        if message is not None and (message.too_big or message.spool_failed):
            return self._discard_block(message)
        if message is None or message.slow or message.rejection() is not None:
            return False
        buffer = self._unread
        last = buffer.rfind(b"\n")
        if last < 0:
            return False
        mark = end_of_data_mark(buffer, 0, last + 1)
        stop = mark if mark >= 0 else last + 1
        if stop == 0:
            return False  # the mark itself is next: the per-line path ends the message
        block = bytes(buffer[:stop])
        lines = block.split(b"\n")
        if (b"\0" in block or block.count(b"\r\n") != len(lines) - 1
                or max(map(len, lines)) > MAX_DATA_LINE + 1):
            message.slow = True  # let the per-line path find and flag the bad line
            return False
        if block.startswith(b".") or b"\n." in block:
            block = _STUFFED_DOT.sub(b"", block)
        if message.size + len(block) > self.factory.limits.max_message_bytes:
            message.slow = True
            return False
        message.wire_bytes += stop
        message.keep(block)
        del buffer[:stop]
        return True

    def _discard_block(self, message: _Message) -> bool:
        """A message over the size limit: drop every buffered line before its end mark
        unread (no reply can change any more; the per-line path ends the message)."""
        buffer = self._unread
        last = buffer.rfind(b"\n")
        if last < 0:
            return False
        stop, position = last + 1, 0
        while (start := end_of_data_mark(buffer, position, last + 1)) >= 0:
            if (start == 0 and message.after_crlf) or (start >= 2 and buffer[start - 2] == 13):
                stop = start  # a real end mark: "." alone after a CRLF-ended line
                break
            position = start + 1
        if stop == 0:
            return False
        message.after_crlf = stop >= 2 and buffer[stop - 2] == 13
        message.wire_bytes += stop
        del buffer[:stop]
        return True

    def _data_line(self, line: bytes) -> None:
        message = self._message
        assert message is not None
        crlf = line.endswith(b"\r\n")
        content = line[:-2] if crlf else line[:-1]
        if crlf and message.after_crlf and content.rstrip(b" \t") == b".":
            self._end_of_data()
            return
        message.after_crlf = crlf
        message.wire_bytes += len(line)
        if not crlf or b"\0" in content:
            message.bare_lf = True
        if len(content) > MAX_DATA_LINE:
            message.too_long = True
        if message.rejection() is not None:
            message.discard()
            return
        if content.startswith(b".."):
            content = content[1:]
        if message.size + len(content) + 2 > self.factory.limits.max_message_bytes:
            message.too_big = True
            message.discard()
            return
        message.keep(content + b"\r\n")

    def _end_of_data(self) -> None:
        message = self._message
        assert message is not None
        self._in_data = False
        if self._data_check is not None and self._data_check.active():
            self._data_check.cancel()
        self._data_check = None
        self._bytes += message.wire_bytes
        rejection = message.rejection()
        raw = message.take() if rejection is None else b""
        mail_from, rcpts = self._mail_from or "", list(self._rcpts)
        self._reset_transaction()
        if rejection is not None:
            log.info("message refused peer=%s from=%s rcpts=%d size=%d reply=%s",
                     kv(self.peer_ip), kv(mail_from or "<>"), len(rcpts), message.wire_bytes,
                     kv(rejection))
            self.reply(rejection)
            self._after_transaction()
            return
        self._busy = True
        self.setTimeout(None)
        self.transport.pauseProducing()
        d = self._store(raw, mail_from, rcpts)
        d.addErrback(self._store_crashed)
        d.addBoth(self._stored)

    def _store_crashed(self, failure: Any) -> str:
        log.error("message handling failed peer=%s: %s", kv(self.peer_ip),
                  failure.getTraceback())
        return R_ALL_FAILED

    def _stored(self, reply: str) -> None:
        self._busy = False
        self._messages += 1
        if self._closed:
            pending, self._pending_hooks = self._pending_hooks, None
            if pending is not None:  # stored although the client left: hooks still fire
                self._fire_hooks(*pending)
            return
        self.reply(reply)
        # Hooks start only once the reply is on its way; the client never waits for them.
        pending, self._pending_hooks = self._pending_hooks, None
        if pending is not None:
            self._fire_hooks(*pending)
        if self._closed:
            return
        self.setTimeout(self.timeout)
        self.transport.resumeProducing()
        self._after_transaction()
        self._drain_buffer()

    def _after_transaction(self) -> None:
        if self.factory.draining and not self._closed:
            self.shut_down()

    def _in_thread(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        reactor = self.factory.daemon.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args, **kwargs)

    def _store(self, raw: Any, mail_from: str, rcpts: list[str]) -> defer.Deferred[str]:
        """Analyse once, deliver to each recipient in turn; fires with the reply text.

        The whole message is handled in one worker-thread job: one hop off the
        reactor and one back per message, whatever the number of recipients.
        ``raw`` (bytes or a spool file) belongs to that job from here on.
        """
        daemon = self.factory.daemon
        config = daemon.config  # the live config: routing is re-checked now (D4)
        pending = daemon.hooks.pending if daemon.hooks is not None else None
        d = self._in_thread(ingest_message, config, daemon.store, raw, peer_ip=self.peer_ip,
                            mail_from=mail_from, helo=self._helo_name, rcpts=rcpts,
                            pending=pending, new_file=self.factory.spool.new_file)

        def replied(outcome: tuple[Any, list[Any], list[tuple[str, str]]]) -> str:
            analysis, stored, failures = outcome
            reply = outcome_reply(len(stored), len(failures))
            for rcpt, reason in failures:
                log.warning("delivery failed peer=%s rcpt=%s: %s", kv(self.peer_ip), kv(rcpt),
                            reason)
            message_id = getattr(getattr(analysis, "parsed", None), "message_id", None) or ""
            log.info("message peer=%s helo=%s from=%s rcpts=%d stored=%d failed=%d size=%d "
                     "message_id=%s reply=%s", kv(self.peer_ip), kv(self._helo_name or "-"),
                     kv(mail_from or "<>"), len(rcpts), len(stored), len(failures), len(raw),
                     kv(message_id or "-"), reply[:3])
            self._pending_hooks = (config, stored)
            return reply

        d.addCallback(replied)
        return d

    def _fire_hooks(self, config: Any, results: list[Any]) -> None:
        self.factory.daemon.inbound_stored(config, results)

    # -- shutdown ------------------------------------------------------------------

    def idle_for_shutdown(self) -> bool:
        return not self._in_transaction()

    def shut_down(self) -> None:
        """Tell the client the service is going away and close (D15)."""
        if self._closed:
            return
        self._send(R_SHUTTING_DOWN)
        self._close("shutdown")


class SmtpFactory(protocol.ServerFactory):
    """Builds sessions and enforces the connection limits (100 total, 20 per source)."""

    def __init__(self, daemon: Any, *, tls_context: Any = None,
                 limits: Limits | None = None, admission: Any = None) -> None:
        self.daemon = daemon
        self.tls_context = tls_context
        # With several SMTP processes, what counts sessions over all of them (``admit``
        # fires with a refusal reply or None, ``release`` forgets); None: this process alone.
        self.admission = admission
        self.limits = limits or Limits(
            idle_timeout=idle_timeout_from_env(),
            session_deadline=_seconds_from_env(SESSION_DEADLINE_ENV, SESSION_DEADLINE_SECS),
            min_data_rate=_positive_from_env(MIN_DATA_RATE_ENV, MIN_DATA_RATE),
        )
        self.spool = Spool(daemon.store.data_dir)
        self.sessions: set[SmtpSession] = set()
        self.per_ip: Counter[str] = Counter()  # open sessions per ``source_key``
        self.draining = False
        self._idle_waiters: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> SmtpSession:  # noqa: N802 (Twisted's name)
        return SmtpSession(self)

    def admit(self, session: SmtpSession) -> str | None:
        """Count ``session`` in, or return the 421 reply that refuses it."""
        if len(self.sessions) >= self.limits.max_sessions:
            return R_TOO_MANY_CONNECTIONS
        source = source_key(session.peer_ip)
        if self.per_ip[source] >= self.limits.max_per_ip:
            return R_TOO_MANY_FROM_ADDRESS
        self.sessions.add(session)
        self.per_ip[source] += 1
        return None

    def release(self, session: SmtpSession) -> None:
        if session in self.sessions:
            if self.admission is not None:
                self.admission.release(session)
            self.sessions.discard(session)
            source = source_key(session.peer_ip)
            self.per_ip[source] -= 1
            if self.per_ip[source] <= 0:
                del self.per_ip[source]
        if not self.sessions:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def begin_drain(self) -> None:
        """Stop taking new work: idle sessions get 421 now, busy ones after their transaction."""
        self.draining = True
        for session in list(self.sessions):
            if session.idle_for_shutdown():
                session.shut_down()

    def close_all(self) -> None:
        """The drain deadline passed: 421 to everything still open."""
        for session in list(self.sessions):
            session.shut_down()

    def wait_idle(self) -> defer.Deferred[None]:
        """Fires once no session is open."""
        if not self.sessions:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter
