"""Hooks survive a crash: an email stored but never fired gets its hooks at the next start."""

from __future__ import annotations

import os
import smtplib
import tempfile
import time
from pathlib import Path

from aimx.hooks import PendingHooks, hook_state_dir
from tests.support.daemon import RunningDaemon, stored_emails

DOMAIN = "replay.example.com"


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_pending_hooks_fire_once_after_a_restart(test_users) -> None:
    alice = test_users["alice"]
    out = Path(tempfile.mkdtemp(prefix="aimx-replay-"))
    out.chmod(0o777)
    record = out / "fired.log"
    config = {
        "domain": DOMAIN,
        "mailboxes": {"alice": {
            "address": f"alice@{DOMAIN}", "owner": alice.name,
            "hooks": [{"name": "wake", "event": "on_receive", "fire_on_untrusted": True,
                       "cmd": ["/bin/sh", "-c", f"echo \"$AIMX_ID\" >> {record}"]}],
        }},
    }
    with RunningDaemon(config) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
            client.sendmail("bob@example.org", [f"alice@{DOMAIN}"],
                            f"From: bob@example.org\r\nTo: alice@{DOMAIN}\r\n"
                            "Subject: wake me\r\nMessage-ID: <replay-1@example.org>\r\n"
                            "\r\nhello\r\n")
        assert _wait_for(record.exists)
        email = stored_emails(daemon.data_dir, "alice")[0]
        assert record.read_text() == f"{email.stem}\n"
        pending_dir = hook_state_dir(daemon.data_dir) / "hooks-pending"
        assert not any(pending_dir.iterdir())  # claimed, so no longer pending
        daemon.stop()

        # What a kill -9 between the 250 and the hook's claim leaves behind: the
        # email on disk and its pending marker. Forget that it ever fired.
        PendingHooks(hook_state_dir(daemon.data_dir)).add("alice", str(email))
        fired_dir = hook_state_dir(daemon.data_dir) / "hooks-fired"
        for marker in fired_dir.iterdir():
            marker.unlink()
        record.unlink()
        daemon.start()
        assert _wait_for(record.exists)
        assert record.read_text() == f"{email.stem}\n"
        assert _wait_for(lambda: not any(pending_dir.iterdir()))
        assert "replaying on_receive hooks after a restart" in daemon.log_text()

        # A marker for an email whose hooks did fire: the replay claims nothing twice.
        PendingHooks(hook_state_dir(daemon.data_dir)).add("alice", str(email))
        daemon.restart()
        assert _wait_for(lambda: not any(pending_dir.iterdir()))
        time.sleep(1)
        assert record.read_text() == f"{email.stem}\n"
    for path in out.iterdir():
        path.unlink()
    os.rmdir(out)
