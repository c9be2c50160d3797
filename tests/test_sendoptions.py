"""The parts of the send options that need no daemon: checks, fingerprints, the key
store on disk and the hook-run check against real processes."""

from __future__ import annotations

import datetime
import os
import subprocess
import time
from pathlib import Path

import pytest

from aimx.daemon import hookcallers, sendkeys
from aimx.daemon.outbound import request_fingerprint
from aimx.mail import compose, sendoptions

DOMAIN = "agent.example.com"


@pytest.mark.parametrize(("value", "problem"), [
    ("<c0ffee-0001@agent.example.com>", None),
    ("c0ffee-0001@mail.agent.example.com", None),
    ("<c0ffee-0001@AGENT.EXAMPLE.COM>", None),
    ("<c0ffee-0001@evilagent.example.com>",
     "it must end in this server's domain (agent.example.com), not evilagent.example.com"),
    ("<c0ffee-0001@example.com>",
     "it must end in this server's domain (agent.example.com), not example.com"),
    ("<c0ffee-0001@agent.example.com", "its angle brackets do not match"),
    ("<a b@agent.example.com>",
     "the part before the @ may only hold letters, digits, dots and !#$%&'*+/=?^_`{|}~-"),
    ("<x@y@agent.example.com>", "it needs the form <unique-part@domain> with exactly one @"),
    ("<c0ffee-0001@agent.example.com>\r\nBcc: x@y.test", "it contains a line break"),
])
def test_message_id_must_be_ours(value, problem):
    assert sendoptions.message_id_problem(value, DOMAIN) == problem


def test_reply_to_address_is_one_bare_valid_address():
    assert sendoptions.reply_to_address_problem("desk@partner.test") is None
    assert sendoptions.reply_to_address_problem("Desk <desk@partner.test>") == (
        "give exactly one bare address, like desk@example.com")
    assert sendoptions.reply_to_address_problem("desk@") == "there is nothing after the @"


def _compose(body: str, attachment: Path, **extra) -> bytes:
    return compose.compose_message(from_addr=f"alice@{DOMAIN}", to="dana@partner.test",
                                   subject="Report", body=body, attachments=[attachment],
                                   **extra)


def test_two_compositions_of_one_message_share_a_fingerprint(tmp_path):
    attachment = tmp_path / "report.csv"
    attachment.write_text("a,b\n1,2\n")
    first = _compose("All good.", attachment)
    time.sleep(1.1)  # another Date header
    second = _compose("All good.", attachment)
    assert first != second  # Date, Message-ID and MIME boundary differ

    def fingerprint(raw: bytes, **options) -> str:
        return request_fingerprint(raw, text_only=options.get("text_only", False),
                                   html_body=options.get("html_body"))

    assert fingerprint(first) == fingerprint(second)
    assert fingerprint(first) != fingerprint(_compose("All bad.", attachment))
    assert fingerprint(first) != fingerprint(first, text_only=True)
    assert fingerprint(first) != fingerprint(_compose("All good.", attachment,
                                                      reply_to_address="desk@partner.test"))
    attachment.write_text("a,b\n1,3\n")
    assert fingerprint(first) != fingerprint(_compose("All good.", attachment))


def test_key_store_keeps_outcomes_across_instances_and_forgets_them_after_a_day(tmp_path):
    state = tmp_path / "state"
    now = time.time()
    store = sendkeys.SendKeyStore(state)
    store.claim(1000, "k1", "f1", now=now)
    store.complete(1000, "k1", sendkeys.SENT, message_id="<m@x>")
    store.claim(1000, "k2", "f2", now=now)
    store.release(1000, "k2")
    store.close()

    reopened = sendkeys.SendKeyStore(state)
    record = reopened.lookup(1000, "k1", now=now + 60)
    assert (record.fingerprint, record.state, record.message_id) == ("f1", "sent", "<m@x>")
    assert reopened.lookup(1001, "k1", now=now) is None  # keys are per uid
    assert reopened.lookup(1000, "k2", now=now) is None  # released
    assert reopened.lookup(1000, "k1", now=now + sendkeys.WINDOW_SECS + 1) is None
    assert (state / sendkeys.DB_NAME).stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    reopened.close()


def test_key_store_refuses_a_state_dir_others_control(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    with pytest.raises(OSError):
        sendkeys.SendKeyStore(link).lookup(0, "k")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(sendkeys.UnsafeStateDir):
        sendkeys.SendKeyStore(shared).lookup(0, "k")
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    (planted / sendkeys.DB_NAME).symlink_to(tmp_path / "victim")
    with pytest.raises(sendkeys.UnsafeStateDir):
        sendkeys.SendKeyStore(planted).lookup(0, "k")
    assert not (tmp_path / "victim").exists()


def test_a_hook_run_is_recognised_by_session_and_ancestry():
    # A stand-in hook: a session leader (as the trampoline makes every hook) with a child.
    hook = subprocess.Popen(["/bin/sh", "-c", "sleep 30; true"], start_new_session=True)
    try:
        children = Path(f"/proc/{hook.pid}/task/{hook.pid}/children")
        deadline = time.monotonic() + 10
        while not children.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.02)
        [child] = [int(pid) for pid in children.read_text().split()]
        assert hookcallers.inside_hook_run(child, {hook.pid})
        assert hookcallers.inside_hook_run(hook.pid, {hook.pid})
        assert not hookcallers.inside_hook_run(os.getpid(), {hook.pid})
        assert not hookcallers.inside_hook_run(child, set())
        assert not hookcallers.inside_hook_run(child, {os.getpid() + 10_000_000})
    finally:
        hook.kill()
        hook.wait()


def test_auto_submitted_request_follows_flag_then_hook_marker():
    assert sendoptions.requested_auto_submitted(True, {"AIMX_EVENT": "on_receive"}) == \
        "auto-generated"
    assert sendoptions.requested_auto_submitted(False, {"AIMX_EVENT": "on_receive"}) == \
        "auto-replied"
    assert sendoptions.requested_auto_submitted(False, {}) is None


def test_composed_headers_carry_the_chosen_values(tmp_path):
    raw = compose.compose_message(
        from_addr=f"alice@{DOMAIN}", to="dana@partner.test", subject="s", body="b",
        message_id=f"order-1234-5678@{DOMAIN}", reply_to_address="desk@partner.test",
        auto_submitted="auto-generated",
        now=datetime.datetime(2025, 6, 1, tzinfo=datetime.UTC))
    head = raw.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    assert f"Message-ID: <order-1234-5678@{DOMAIN}>" in head
    assert "Reply-To: desk@partner.test" in head
    assert "Auto-Submitted: auto-generated" in head
