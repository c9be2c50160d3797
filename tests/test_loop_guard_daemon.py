"""Why not trusted, and the loop guard, in running daemons over real SMTP.

Trust reasons come from real DKIM verification against keys the test DNS
server publishes; hooks are real processes run as the mailbox owner; the
two-instance test has two daemons mail each other through MX records that
point at each other's loopback listener.
"""

from __future__ import annotations

import os
import re
import smtplib
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aimx.daemon.hookjournal import hook_state_dir
from aimx.mail import frontmatter
from tests.support.daemon import RunningDaemon, stored_emails
from tests.support.dkimkeys import shared_key
from tests.support.dnsserver import DnsServer
from tests.support.users import run_aimx_as, system_python_path
from tests.test_mcp import ok, with_mcp

COMPANY = shared_key("company.example")
OTHER = shared_key("other.example")
DAEMON_KEY = shared_key("daemon")  # what RunningDaemon signs outbound mail with


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer({
        "sel._domainkey.company.example": [["TXT", COMPANY.txt_record]],
        "sel._domainkey.other.example": [["TXT", OTHER.txt_record]],
    }) as server:
        yield server


def wait_for(predicate, timeout: float = 30.0):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def message(from_: str, to: str, subject: str, extra: str = "") -> bytes:
    return (f"From: {from_}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 07 Dec 2026 01:00:00 +0000\r\n"
            f"Message-ID: <{subject}@mail.example>\r\n{extra}\r\nHello.\r\n").encode()


def send(daemon: RunningDaemon, rcpts: list[str], raw: bytes,
         mail_from: str = "bounce@mail.example") -> None:
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
        client.sendmail(mail_from, rcpts, raw)


def stored_list(daemon: RunningDaemon, mailbox: str) -> list[tuple[str, dict]]:
    """(email id, frontmatter) of every email in the mailbox's inbox."""
    return [(path.stem, frontmatter.read_email(path.read_bytes())[0])
            for path in stored_emails(daemon.data_dir, mailbox)]


def stored(daemon: RunningDaemon, mailbox: str) -> dict[str, tuple[str, dict]]:
    """Subject -> (email id, frontmatter), for mailboxes whose subjects are unique."""
    return {fields["subject"]: (email_id, fields)
            for email_id, fields in stored_list(daemon, mailbox)}


def recorded(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# -- why not trusted ------------------------------------------------------------------------


TRUST_CONFIG = """\
domain = "trust.test"
dns_resolvers = ["{dns}"]
trust = "verified"
trusted_senders = ["*@company.example"]

[mailboxes.catchall]
address = "*@trust.test"
owner = "{owner}"

[mailboxes.agent]
address = "agent@trust.test"
owner = "{owner}"

[mailboxes.open]
address = "open@trust.test"
owner = "{owner}"
trust = "none"
"""


def test_each_trust_reason_is_stored_logged_and_read_by_email_read(dns, users) -> None:
    alice = users["alice"]
    boss = "Boss <boss@company.example>"

    def signed(key, domain, from_, rcpt, subject):  # noqa: ANN001, ANN202
        return key.sign(message(from_, rcpt, subject), domain=domain)

    tampered = signed(COMPANY, "company.example", boss, "agent@trust.test", "dkim-failed")
    tampered = tampered.replace(b"Hello.", b"Hello!")
    cases = {  # subject -> (recipient, raw message, expected trusted, expected reason)
        "trusted": ("agent", signed(COMPANY, "company.example", boss, "agent@trust.test",
                                    "trusted"), "true", "trusted"),
        "policy-none": ("open", signed(COMPANY, "company.example", boss, "open@trust.test",
                                       "policy-none"), "none", "policy_none"),
        "catchall": ("nobody", signed(COMPANY, "company.example", boss, "nobody@trust.test",
                                      "catchall"), "false", "catchall"),
        "not-allowed": ("agent", signed(OTHER, "other.example", "Eve <eve@other.example>",
                                        "agent@trust.test", "not-allowed"),
                        "false", "sender_not_allowed"),
        "no-dkim": ("agent", message(boss, "agent@trust.test", "no-dkim"), "false", "no_dkim"),
        "dkim-failed": ("agent", tampered, "false", "dkim_failed"),
        "not-aligned": ("agent", signed(OTHER, "other.example", boss, "agent@trust.test",
                                        "not-aligned"), "false", "dkim_not_aligned"),
    }
    config = TRUST_CONFIG.format(dns=dns.address, owner=alice.name)
    with RunningDaemon(config) as daemon:
        for rcpt, raw, _trusted, _reason in cases.values():
            send(daemon, [f"{rcpt}@trust.test"], raw)
        found = {**stored(daemon, "agent"), **stored(daemon, "open"),
                 **stored(daemon, "catchall")}
        assert sorted(found) == sorted(cases)
        for subject, (_rcpt, _raw, trusted, reason) in cases.items():
            email_id, fields = found[subject]
            assert (fields["trusted"], fields["trust_reason"]) == (trusted, reason), subject
            assert list(fields)[-1] == "trust_reason"  # after every key the spec orders
            assert "automatic" not in fields
            daemon.wait_for_log(rf"stored mailbox={fields['mailbox']} id={email_id} .*"
                                rf"trusted={trusted} trust_reason={reason}")

        async def read_all(session):  # noqa: ANN001, ANN202
            texts = {}
            for subject, (email_id, fields) in found.items():
                texts[subject] = await ok(session, "email_read", mailbox=fields["mailbox"],
                                          id=email_id)
            return texts

        texts = with_mcp(daemon, alice, read_all)
    for subject, (_rcpt, _raw, _trusted, reason) in cases.items():
        assert f'\ntrust_reason = "{reason}"\n' in texts[subject], texts[subject]


# -- automatic mail and the opt-in ----------------------------------------------------------


RECORD_HOOK = 'echo "$AIMX_SUBJECT" >> {out}/{name}'


def hooked_config(dns: DnsServer, owner: str, out: Path, **extra: object) -> dict:
    def box(name: str, **hook_extra: object) -> dict:
        return {"address": f"{name}@loop.test", "owner": owner, "hooks": [{
            "name": f"record-{name}", "event": "on_receive", "fire_on_untrusted": True,
            "cmd": ["/bin/sh", "-c", RECORD_HOOK.format(out=out, name=name)], **hook_extra}]}

    return {"domain": "loop.test", "dns_resolvers": [dns.address], **extra,
            "mailboxes": {"plain": box("plain"), "robot": box("robot", fire_on_automatic=True)}}


def test_automatic_mail_wakes_only_hooks_that_opt_in(dns, users, shared_dir) -> None:
    rcpts = ["plain@loop.test", "robot@loop.test"]
    cases = [  # (subject, extra headers, envelope sender, expected `automatic`)
        ("human", "", "ann@mail.example", None),
        ("said-no", "Auto-Submitted: No (typed by a person)\r\n", "ann@mail.example", None),
        ("auto-replied", "Auto-Submitted: auto-replied\r\n", "ann@mail.example",
         "auto_submitted"),
        ("generated", "Auto-Submitted: Auto-Generated; owner-email=x@mail.example\r\n",
         "ann@mail.example", "auto_submitted"),
        ("bulk", "Precedence: BULK\r\n", "ann@mail.example", "precedence"),
        ("junk", "Precedence: junk\r\n", "ann@mail.example", "precedence"),
        ("list", "List-Id: Team <team.lists.mail.example>\r\n", "ann@mail.example", "list_id"),
        ("bounce", "", "", "null_sender"),
    ]
    config = hooked_config(dns, users["alice"].name, shared_dir)
    with RunningDaemon(config) as daemon:
        for subject, extra, mail_from, _automatic in cases:
            send(daemon, rcpts, message("Ann <ann@mail.example>", ", ".join(rcpts), subject,
                                        extra), mail_from=mail_from)
        reasons = [reason for *_rest, reason in cases]
        for reason in set(reasons) - {None}:
            daemon.wait_for_log(r"hook_name=record-plain event=on_receive mailbox=plain "
                                rf"skipped: automatic={reason} fire_on_automatic=false",
                                count=reasons.count(reason))
        # The opted-in hook saw everything; the plain one only the mail a person sent.
        assert wait_for(lambda: len(recorded(shared_dir / "robot")) == len(cases))
        assert wait_for(lambda: len(recorded(shared_dir / "plain")) == 2)
        daemon.wait_for_log(r"hook_name=record-robot .* exit_code=0", count=len(cases))
        daemon.wait_for_log(r"hook_name=record-plain .* exit_code=0", count=2)
        assert sorted(recorded(shared_dir / "plain")) == ["human", "said-no"]
        assert sorted(recorded(shared_dir / "robot")) == sorted(s for s, *_r in cases)
        for mailbox in ("plain", "robot"):  # all of it is stored, and says why it is automatic
            found = stored(daemon, mailbox)
            assert {s: f[1].get("automatic") for s, f in found.items()} == {
                s: reason for s, _e, _m, reason in cases}
        # No crash-replay marker is left waiting for hooks that will never run.
        pending = hook_state_dir(daemon.data_dir) / "hooks-pending"
        assert wait_for(lambda: not pending.exists() or not any(pending.iterdir()))


# -- the per-sender cap ---------------------------------------------------------------------


def test_the_cap_stops_the_eleventh_firing_per_sender(dns, users, shared_dir) -> None:
    config = hooked_config(dns, users["alice"].name, shared_dir)
    with RunningDaemon(config) as daemon:
        for n in range(12):
            send(daemon, ["plain@loop.test"],
                 message("Bob <BOB@mail.example>", "plain@loop.test", f"bob-{n}"))
        send(daemon, ["plain@loop.test"],
             message("carol@mail.example", "plain@loop.test", "carol-0"))
        skips = daemon.wait_for_log(
            r"event=on_receive mailbox=plain sender=bob@mail.example email_id=\S+ skipped: "
            r"hook rate limit reached \(10 firings per 600s from this sender\)", count=2)
        assert skips
        daemon.wait_for_log(r"hook_name=record-plain .* exit_code=0", count=11)
        fired = recorded(shared_dir / "plain")
        assert sorted(fired) == sorted([f"bob-{n}" for n in range(10)] + ["carol-0"])
        assert len(stored(daemon, "plain")) == 13  # capped mail is still stored


# -- two instances whose hooks answer each other --------------------------------------------


# Runs as the mailbox owner under the system interpreter: reads the email on stdin
# and answers its sender with `aimx send`, as an agent's auto-reply hook would.
REPLY_HOOK = textwrap.dedent("""\
    import os, sys, tomllib
    sys.path[:0] = {paths!r}
    text = sys.stdin.read()
    fields = tomllib.loads(text.split("+++\\n")[1])
    sender = fields["from"].rpartition("<")[2].rstrip(">").strip()
    os.environ.update({env!r})
    import aimx.cli.main
    sys.exit(aimx.cli.main.main([
        "send", "--from", {address!r}, "--to", sender, "--text-only",
        "--subject", "Re: " + fields["subject"].removeprefix("Re: "),
        "--reply-to", fields["message_id"], "--body", "Got it, thanks."]))
""")
CAP = 3


@pytest.fixture(scope="module")
def python_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the reply hook's system interpreter imports ``aimx`` from."""
    return system_python_path(tmp_path_factory.mktemp("python-path"))


def reply_hook(path: Path, daemon: RunningDaemon, address: str, python_path: Path
               ) -> list[str]:
    """Write the auto-reply script for ``daemon``'s mailbox; its hook ``cmd``."""
    env = {key: value for key, value in daemon.client_env({}).items()
           if key.startswith("AIMX_")}
    path.write_text(REPLY_HOOK.format(paths=[str(python_path)], env=env, address=address))
    path.chmod(0o644)
    return ["/usr/bin/python3", str(path)]


def loop_config(dns: DnsServer, domain: str, peer: str, owner: str) -> dict:
    return {"domain": domain, "dns_resolvers": [dns.address], "signature": "",
            "trust": "verified", "trusted_senders": [f"*@{peer}"],
            "hook_rate_limit": CAP, "hook_rate_window_secs": 3600,
            "mailboxes": {"agent": {"address": f"agent@{domain}", "owner": owner}}}


@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK),
                    reason="the reply hook runs under /usr/bin/python3")
def test_two_instances_that_auto_reply_to_each_other_stop(dns, users, shared_dir,
                                                          python_path) -> None:
    owners = {"one.test": users["alice"], "two.test": users["bob"]}
    for domain in owners:
        dns.set(domain, [["MX", f"10 mx.{domain}"]])
        dns.set(f"mx.{domain}", [["A", "127.0.0.1"]])
        dns.set(f"aimx._domainkey.{domain}", [["TXT", DAEMON_KEY.txt_record]])
    one = RunningDaemon(loop_config(dns, "one.test", "two.test", owners["one.test"].name),
                        start=False)
    two = RunningDaemon(loop_config(dns, "two.test", "one.test", owners["two.test"].name),
                        start=False)
    with one, two:
        # Each daemon's outbound SMTP goes to the port the other one listens on.
        one.extra_env["AIMX_TEST_SMTP_PORT"] = str(two.smtp_port)
        two.extra_env["AIMX_TEST_SMTP_PORT"] = str(one.smtp_port)
        for daemon, domain in ((one, "one.test"), (two, "two.test")):
            cmd = reply_hook(shared_dir / f"reply-{domain}.py", daemon, f"agent@{domain}",
                             python_path)
            config = loop_config(dns, domain, "two.test" if domain == "one.test" else "one.test",
                                 owners[domain].name)
            config["mailboxes"]["agent"]["hooks"] = [
                {"name": f"auto-reply-{domain.split('.')[0]}", "event": "on_receive",
                 "cmd": cmd, "timeout_secs": 60}]
            daemon.write_config(config)
            daemon.start()

        # A person on two.test writes to the agent on one.test; both agents auto-reply.
        kickoff = run_aimx_as(owners["two.test"], [
            "send", "--from", "agent@two.test", "--to", "agent@one.test", "--text-only",
            "--subject", "Ping", "--body", "Are you there?"], env=two.client_env())
        assert kickoff.returncode == 0, kickoff.stderr

        # The exchange is one chain (each message draws at most one reply), so it is
        # over once either side declines to wake its hook.
        stopper = re.compile(r"event=on_receive mailbox=agent .*skipped: "
                             r"(automatic=auto_submitted|hook rate limit)")
        assert wait_for(lambda: any(stopper.search(d.log_text()) for d in (one, two)),
                        timeout=120), one.log_text() + two.log_text()
        for daemon in (one, two):  # every reply that was started went out
            assert wait_for(lambda d=daemon: d.log_text().count("firing hook_name=auto-reply")
                            == len(re.findall(r"hook_name=auto-reply\S* event=on_receive "
                                              r".* exit_code=0 ", d.log_text()))), \
                daemon.log_text()
        received = {domain: stored_list(daemon, "agent")
                    for domain, daemon in (("one.test", one), ("two.test", two))}
        total = sum(len(found) for found in received.values())
        # The reply sent from inside the hook run says Auto-Submitted: auto-replied, so the
        # other side stores it and does not wake its hook: one message each way, and the
        # firing cap was never needed.
        assert total == 2, received
        assert "skipped: automatic=auto_submitted" in two.log_text(), two.log_text()
        for daemon in (one, two):
            assert "hook rate limit" not in daemon.log_text()
        replies = [fields for found in received.values() for _id, fields in found
                   if fields["subject"] == "Re: Ping"]
        assert len(replies) == 1, replies
        assert replies[0]["trusted"] == "true"
        assert replies[0].get("auto_submitted") == "auto-replied", replies
