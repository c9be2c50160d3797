"""Hooks in the running daemon: crash replay, and a flood of trusted mail against the bound."""

from __future__ import annotations

import smtplib
import time

import pytest

from aimx.daemon.hookjournal import PendingHooks, hook_state_dir
from tests.support.daemon import RunningDaemon, stored_emails
from tests.support.dnsserver import DnsServer

DOMAIN = "replay.example.com"


@pytest.fixture(scope="module")
def dns():
    """An empty zone: authentication lookups answer NXDOMAIN at once, nothing leaves the host."""
    with DnsServer({}) as server:
        yield server


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_pending_hooks_fire_once_after_a_restart(test_users, dns, shared_dir) -> None:
    alice = test_users["alice"]
    record = shared_dir / "fired.log"
    config = {
        "domain": DOMAIN,
        "dns_resolvers": [dns.address],
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


def test_two_hundred_messages_with_a_slow_hook_respect_the_bound(test_users, dns,
                                                                 shared_dir) -> None:
    """200 messages at once, a 1 s hook each: every hook runs once, at most 16 at a time,
    and SMTP keeps answering promptly while the hooks queue."""
    import concurrent.futures
    import statistics

    alice = test_users["alice"]
    log = shared_dir / "log"
    script = ('echo "start $(date +%s.%N) $AIMX_MESSAGE_ID" >> ' + str(log)
              + '; sleep 1; echo "end $(date +%s.%N) $AIMX_MESSAGE_ID" >> ' + str(log))
    config = {
        "domain": DOMAIN,
        "dns_resolvers": [dns.address],
        "hook_rate_limit": 0,  # one sender: this test is about the bound on processes
        "mailboxes": {"alice": {
            "address": f"alice@{DOMAIN}", "owner": alice.name,
            "hooks": [{"name": "slow", "event": "on_receive", "fire_on_untrusted": True,
                       "cmd": ["/bin/sh", "-c", script]}],
        }},
    }

    def send_batch(batch: int) -> list[float]:
        waits = []
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=60) as client:
            for n in range(25):
                started = time.monotonic()
                client.sendmail("bob@example.org", [f"alice@{DOMAIN}"],
                                f"From: bob@example.org\r\nTo: alice@{DOMAIN}\r\n"
                                f"Subject: flood {batch}-{n}\r\n"
                                f"Message-ID: <flood-{batch}-{n}@example.org>\r\n\r\nhi\r\n")
                waits.append(time.monotonic() - started)
        return waits

    with RunningDaemon(config) as daemon:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            waits = [w for batch in pool.map(send_batch, range(8)) for w in batch]
        assert len(waits) == 200
        # The 250s never wait for hooks: 200 x 1 s of hook time queues behind the
        # bound while every reply comes back quickly.
        assert statistics.median(waits) < 0.5, statistics.median(waits)
        assert max(waits) < 5, max(waits)
        assert _wait_for(lambda: log.exists() and log.read_text().count("end ") >= 200,
                         timeout=90)
    events = []
    for line in log.read_text().split("\n"):
        if line:
            kind, stamp, message_id = line.split()
            events.append((float(stamp), 0 if kind == "end" else 1, message_id))
    starts = [e for e in events if e[1] == 1]
    assert len(starts) == 200 and len({e[2] for e in starts}) == 200  # each exactly once
    running = peak = 0
    for _stamp, is_start, _id in sorted(events):
        running += 1 if is_start else -1
        peak = max(peak, running)
    assert peak <= 16, peak
    assert peak >= 8  # they did run concurrently, not one by one
