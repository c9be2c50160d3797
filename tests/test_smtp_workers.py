"""The daemon with ``smtp_workers = 2``: one listening socket, two worker processes.

A real daemon, real SMTP over loopback, real hooks run as a real user. Which
worker holds a connection is read from /proc (the server side of the client's
TCP connection), so each test can aim at one worker or cover both.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aimx.daemon import protocol
from aimx.daemon.hookjournal import hook_state_dir
from aimx.mail import frontmatter
from tests.support.api import call
from tests.support.daemon import RunningDaemon, SmtpWire, stored_emails
from tests.support.procs import child_pids

DOMAIN = "workers.example.com"
WORKERS = 2
TEMP_NAME = re.compile(r"^\..+\.tmp\.[0-9a-f]+$")



# -- helpers ------------------------------------------------------------------------


def worker_pids(daemon: RunningDaemon) -> list[int]:
    """The daemon's SMTP worker processes (its children running the worker module)."""
    found = []
    for pid in child_pids(daemon.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"aimx.daemon.smtpworker" in cmdline:
            found.append(pid)
    return found


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def wait_serving(daemon: RunningDaemon, count: int = WORKERS) -> list[int]:
    """Wait until ``count`` workers run and each logged that it serves; their pids."""
    def ready() -> bool:
        pids = worker_pids(daemon)
        text = daemon.log_text()
        return len(pids) == count and all(
            f"SMTP worker pid={pid} serving" in text for pid in pids)

    assert wait_for(ready, 30), daemon.log_text()[-3000:]
    return worker_pids(daemon)


def _socket_inode(local_port: int, remote_port: int) -> str | None:
    """The inode of the TCP socket 127.0.0.1:local_port ↔ 127.0.0.1:remote_port."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (int(local.split(":")[1], 16) == local_port
                and int(remote.split(":")[1], 16) == remote_port):
            return fields[9]
    return None


def serving_worker(daemon: RunningDaemon, wire: SmtpWire) -> int | None:
    """The pid of the worker holding ``wire``'s connection (None if not found)."""
    inode = _socket_inode(daemon.smtp_port, wire.sock.getsockname()[1])
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in worker_pids(daemon):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def wires_on_every_worker(daemon: RunningDaemon, tries: int = 60) -> dict[int, SmtpWire]:
    """One open, greeted connection per worker; the extra connections are closed."""
    pids = set(worker_pids(daemon))
    found: dict[int, SmtpWire] = {}
    spare: list[SmtpWire] = []
    for n in range(tries):
        # Spare connections stay open until the end (an idle worker that just accepted
        # tends to win the next accept too), each from its own loopback address so the
        # per-source session limit (20, over all workers) never refuses one.
        wire = SmtpWire(daemon.smtp_port, source=f"127.0.1.{n + 1}")
        pid = serving_worker(daemon, wire)
        if wire.banner.startswith("220") and pid is not None and pid not in found:
            found[pid] = wire
        else:
            spare.append(wire)
        if set(found) == pids:
            break
    for wire in spare:
        wire.close()
    assert set(found) == pids, f"connections reached {sorted(found)} of {sorted(pids)}"
    return found


def message(n: int | str, message_id: str, to: str = f"alice@{DOMAIN}") -> bytes:
    return (f"From: sender@example.org\r\nTo: {to}\r\nSubject: worker test {n}\r\n"
            f"Message-ID: <{message_id}>\r\nDate: Mon, 02 Jun 2025 12:00:00 +0000\r\n\r\n"
            f"body of {n}\r\n").encode()


def start_transaction(wire: SmtpWire, rcpt: str = f"alice@{DOMAIN}") -> None:
    assert wire.cmd("EHLO client.example.org").startswith("250")
    assert wire.cmd("MAIL FROM:<sender@example.org>").startswith("250")
    assert wire.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
    assert wire.cmd("DATA").startswith("354")


def message_ids_on_disk(data_dir: Path, mailbox: str = "alice") -> list[str]:
    ids = []
    for path in stored_emails(data_dir, mailbox):
        fields, _ = frontmatter.read_email(path.read_bytes())
        ids.append(str(fields.get("message_id")))
    return ids


def temp_leftovers(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*") if TEMP_NAME.match(p.name)]


@pytest.fixture
def hook_out() -> Iterator[Path]:
    """A directory every user may write: hooks run as the mailbox owner."""
    out = Path(tempfile.mkdtemp(prefix="aimx-workers-"))
    out.chmod(0o777)
    yield out
    for path in out.iterdir():
        path.unlink()
    out.rmdir()


def config_for(test_users, dns, hook_record: Path | None = None, **extra) -> dict:
    alice = {"address": f"alice@{DOMAIN}", "owner": test_users["alice"].name}
    if hook_record is not None:
        alice["hooks"] = [{"name": "mark", "event": "on_receive", "fire_on_untrusted": True,
                           "cmd": ["/bin/sh", "-c",
                                   f'echo "$AIMX_MESSAGE_ID" >> {hook_record}']}]
    # The bursts come from one sender: the per-sender firing cap would stop them at 10.
    return {"domain": DOMAIN, "dns_resolvers": [dns.address], "smtp_workers": WORKERS,
            "hook_rate_limit": 0, "mailboxes": {"alice": alice}, **extra}


def fired_ids(record: Path) -> list[str]:
    return record.read_text().split() if record.exists() else []


# -- tests ----------------------------------------------------------------------------


def test_two_workers_store_one_message_id_once(test_users, dns) -> None:
    """The same Message-ID sent at the same instant through both workers is stored once,
    and both clients get their 250 (a duplicate counts as accepted)."""
    rounds = 25
    # A short pause between write and rename keeps both deliveries in flight together.
    env = {"AIMX_TEST_PAUSE_BEFORE_RENAME": "0.05"}
    with RunningDaemon(config_for(test_users, dns), env=env) as daemon:
        pids = wait_serving(daemon)
        assert len(pids) == WORKERS  # ps: the daemon plus two workers
        for n in range(rounds):
            wires = list(wires_on_every_worker(daemon).values())
            message_id = f"same-{n}-{time.time_ns()}@example.org"
            for wire in wires:
                start_transaction(wire)
                wire.send(message(n, message_id))
            replies: list[str] = []
            barrier = threading.Barrier(len(wires))

            def finish(wire: SmtpWire, barrier=barrier, replies=replies) -> None:
                barrier.wait()
                wire.send(b".\r\n")
                replies.append(wire.reply())

            threads = [threading.Thread(target=finish, args=(w,)) for w in wires]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            for wire in wires:
                wire.close()
            assert len(replies) == len(wires) and all(r.startswith("250") for r in replies), \
                replies
            assert message_ids_on_disk(daemon.data_dir).count(message_id) == 1, n
        assert len(stored_emails(daemon.data_dir, "alice")) == rounds


def test_hooks_fire_once_per_message_for_a_burst(test_users, dns, hook_out) -> None:
    record = hook_out / "fired"
    sessions, per_session = 6, 10
    with RunningDaemon(config_for(test_users, dns, record)) as daemon:
        wait_serving(daemon)
        sent: list[str] = []
        lock = threading.Lock()

        def sender(s: int) -> None:
            with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=60) as client:
                for n in range(per_session):
                    message_id = f"burst-{s}-{n}@example.org"
                    client.sendmail("sender@example.org", [f"alice@{DOMAIN}"],
                                    message(f"{s}-{n}", message_id))
                    with lock:
                        sent.append(message_id)

        threads = [threading.Thread(target=sender, args=(s,)) for s in range(sessions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(sent) == sessions * per_session
        assert wait_for(lambda: len(fired_ids(record)) >= len(sent), 60), fired_ids(record)
        time.sleep(1)  # a second firing would land by now
        assert sorted(fired_ids(record)) == sorted(sent)
        # Both workers took part in the burst.
        served = set(re.findall(r"SMTP worker pid=(\d+) serving", daemon.log_text()))
        assert len(served) == WORKERS


def test_kill_9_of_a_worker_loses_nothing_acknowledged(test_users, dns, hook_out) -> None:
    record = hook_out / "fired"
    # Reports wait a moment, so a kill right after a 250 lands before the daemon heard.
    env = {"AIMX_TEST_WORKER_REPORT_DELAY": "3"}
    with RunningDaemon(config_for(test_users, dns, record), env=env) as daemon:
        wait_serving(daemon)
        wires = wires_on_every_worker(daemon)
        victim = sorted(wires)[0]
        survivor_wire = wires[max(wires)]
        survivor_wire.close()

        # Load on every connection while the kill lands.
        acked: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def load(s: int) -> None:
            n = 0
            while not stop.is_set():
                try:
                    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
                        while not stop.is_set():
                            message_id = f"load-{s}-{n}@example.org"
                            n += 1
                            client.sendmail("sender@example.org", [f"alice@{DOMAIN}"],
                                            message(f"load {s}-{n}", message_id))
                            with lock:
                                acked.append(message_id)
                except (OSError, smtplib.SMTPException):
                    time.sleep(0.05)

        loaders = [threading.Thread(target=load, args=(s,)) for s in range(4)]
        for thread in loaders:
            thread.start()

        # On the victim: one message acknowledged, then a second one cut off mid-DATA.
        wire = wires[victim]
        start_transaction(wire)
        wire.send(message("acked", "acked-before-kill@example.org") + b".\r\n")
        assert wire.reply().startswith("250")
        start_transaction(wire)
        wire.send(message("cut", "cut-mid-data@example.org")[:-10])
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises((ConnectionError, OSError)):
            wire.send(b"rest of the body\r\n.\r\n")
            reply = wire.reply(timeout=10)
            pytest.fail(f"a killed worker answered {reply!r}")
        wire.close()

        # The worker comes back, and serves.
        assert wait_for(lambda: len(worker_pids(daemon)) == WORKERS
                        and victim not in worker_pids(daemon), 30), daemon.log_text()[-3000:]
        assert re.search(rf"SMTP worker \d pid={victim} died \(signal 9\)", daemon.log_text())
        replacement = (set(worker_pids(daemon)) - {victim}) & set(
            int(p) for p in re.findall(r"SMTP worker \d started pid=(\d+)", daemon.log_text()))
        assert replacement
        wait_serving(daemon)
        fresh = wires_on_every_worker(daemon)
        new_pid = replacement.pop()
        start_transaction(fresh[new_pid])
        fresh[new_pid].send(message("after", "after-restart@example.org") + b".\r\n")
        assert fresh[new_pid].reply().startswith("250")
        for w in fresh.values():
            w.close()
        time.sleep(1)
        stop.set()
        for thread in loaders:
            thread.join(60)

        on_disk = message_ids_on_disk(daemon.data_dir)
        assert acked, "the load never got a 250"
        missing = set(acked) - set(on_disk)
        assert not missing, f"acknowledged but not stored: {sorted(missing)[:5]}"
        assert "acked-before-kill@example.org" in on_disk
        assert "after-restart@example.org" in on_disk
        assert "cut-mid-data@example.org" not in on_disk
        assert len(on_disk) == len(set(on_disk))  # every visible file parsed, each once
        # The acknowledged message's report died with the worker: the journal replay
        # fires its hook, once.
        assert wait_for(lambda: "acked-before-kill@example.org" in fired_ids(record), 30), \
            daemon.log_text()[-3000:]
        assert "replaying on_receive hooks" in daemon.log_text()
        # Every acknowledged message wakes its hook exactly once.
        assert wait_for(lambda: set(acked) <= set(fired_ids(record)), 60)
        time.sleep(1)
        fired = fired_ids(record)
        assert sorted(fired) == sorted(set(fired))
        assert set(fired) <= set(message_ids_on_disk(daemon.data_dir))
        pending = hook_state_dir(daemon.data_dir) / "hooks-pending"
        assert wait_for(lambda: not [p for p in pending.iterdir()
                                     if not p.name.startswith(".")], 20)
        # A kill under load may cut a write short: its hidden temp file is swept at the
        # next start (not while other workers may be writing theirs).
        daemon.restart()
        assert temp_leftovers(daemon.data_dir / "inbox") == []
        assert sorted(message_ids_on_disk(daemon.data_dir)) == sorted(on_disk)


def test_reload_reaches_every_worker_and_a_broken_config_changes_nothing(test_users,
                                                                         dns) -> None:
    config = config_for(test_users, dns)
    with RunningDaemon(config) as daemon:
        pids = wait_serving(daemon)

        def rcpt_on_every_worker(address: str) -> dict[int, str]:
            replies = {}
            for pid, wire in wires_on_every_worker(daemon).items():
                wire.cmd("EHLO client.example.org")
                wire.cmd("MAIL FROM:<sender@example.org>")
                replies[pid] = wire.cmd(f"RCPT TO:<{address}>")[:3]
                wire.close()
            return replies

        assert set(rcpt_on_every_worker(f"carol@{DOMAIN}").values()) == {"550"}

        def reloaded_everywhere(count: int) -> bool:
            text = daemon.log_text()
            return all(len(re.findall(rf"SMTP worker pid={pid}: config reloaded", text))
                       >= count for pid in pids)

        # A valid change: a new mailbox becomes routable through every worker.
        with_carol = dict(config, mailboxes={
            **config["mailboxes"],
            "carol": {"address": f"carol@{DOMAIN}", "owner": test_users["bob"].name}})
        daemon.write_config(with_carol)
        daemon.sighup()
        assert wait_for(lambda: reloaded_everywhere(1)), daemon.log_text()[-2000:]
        assert set(rcpt_on_every_worker(f"carol@{DOMAIN}").values()) == {"250"}

        # A broken config: refused by the daemon, the workers keep the old one.
        daemon.write_config("domain = \n[[broken\n")
        daemon.sighup()
        assert "config reload failed" in daemon.log_text()
        time.sleep(1)
        assert set(rcpt_on_every_worker(f"carol@{DOMAIN}").values()) == {"250"}
        assert set(rcpt_on_every_worker(f"alice@{DOMAIN}").values()) == {"250"}

        # A socket API rewrite reaches the workers too.
        daemon.write_config(with_carol)
        daemon.sighup()
        assert wait_for(lambda: reloaded_everywhere(2))
        call(daemon, protocol.MailboxCreate, name="dave", owner=test_users["bob"].name)
        assert wait_for(lambda: reloaded_everywhere(3))
        assert set(rcpt_on_every_worker(f"dave@{DOMAIN}").values()) == {"250"}
        assert worker_pids(daemon) == pids  # nothing restarted along the way


def test_sigterm_drains_the_workers_and_exits_cleanly(test_users, dns) -> None:
    with RunningDaemon(config_for(test_users, dns), env={"AIMX_DRAIN_TIMEOUT": "20"}) as daemon:
        wait_serving(daemon)
        wires = wires_on_every_worker(daemon)
        pids = sorted(wires)
        busy = wires[pids[0]]
        start_transaction(busy)
        busy.send(message("drained", "drained@example.org")[:-4])
        idle = wires[pids[1]]
        daemon.signal(signal.SIGTERM)
        assert wait_for(lambda: "SIGTERM: shutting down" in daemon.log_text(), 10)
        # The idle session is told at once; the busy one may finish its message.
        assert idle.reply(timeout=10).startswith("421")
        time.sleep(0.5)
        busy.send(b"\r\n.\r\n")
        assert busy.reply(timeout=15).startswith("250")
        assert busy.reply(timeout=10).startswith("421")
        busy.close()
        idle.close()
        assert daemon.proc.wait(30) == 0
        assert "drained@example.org" in message_ids_on_disk(daemon.data_dir)
        assert wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 10)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=2).close()
        assert "aimx daemon stopped" in daemon.log_text()


def test_smtp_workers_1_serves_in_the_daemon_process(test_users, dns) -> None:
    config = config_for(test_users, dns)
    config["smtp_workers"] = 1
    with RunningDaemon(config) as daemon:
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as client:
            client.sendmail("sender@example.org", [f"alice@{DOMAIN}"],
                            message("single", "single@example.org"))
        assert worker_pids(daemon) == []
        assert message_ids_on_disk(daemon.data_dir) == ["single@example.org"]


def test_config_accepts_smtp_workers_and_refuses_negative(tmp_path) -> None:
    from aimx.config import ConfigError, parse_config_text

    base = f'domain = "{DOMAIN}"\n'
    assert parse_config_text(base, tmp_path / "c.toml").smtp_workers == 0
    assert parse_config_text(base + "smtp_workers = 3\n", tmp_path / "c.toml").smtp_workers == 3
    with pytest.raises(ConfigError, match="smtp_workers"):
        parse_config_text(base + "smtp_workers = -1\n", tmp_path / "c.toml")


def test_setup_recognises_the_workers_as_aimx_on_the_port(test_users, dns) -> None:
    """``ss`` names every process holding the listening socket, workers included:
    ``aimx setup`` and ``doctor`` must see them as aimx, not as a foreign program."""
    from aimx.ops.initsystem import System

    with RunningDaemon(config_for(test_users, dns)) as daemon:
        wait_serving(daemon)
        holder = System(smtp_host="127.0.0.1", smtp_port=daemon.smtp_port).port_holder()
        assert holder is not None and holder.is_aimx, holder
