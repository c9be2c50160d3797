"""D1 under fire: ``kill -9`` of the daemon while eight clients are sending.

Every message whose ``250`` a client read must be on disk, complete, after
the restart; nothing half-written may be visible. Writes are slowed a little
before their rename (a storage test seam) so the kill lands while temp files
exist, which the restart must sweep away.
"""

from __future__ import annotations

import os
import pwd
import re
import smtplib
import threading
import time
from pathlib import Path

import pytest

from aimx.mail import frontmatter
from tests.support.daemon import RunningDaemon, stored_emails

DOMAIN = "test.local"
SENDERS = 8
MAX_MESSAGES = 150
KILL_AFTER_ACKS = 40
TEMP_NAME = re.compile(r"^\..+\.tmp\.[0-9a-f]+$")


@pytest.fixture
def owner(request: pytest.FixtureRequest) -> str:
    if os.geteuid() == 0:
        return request.getfixturevalue("test_users")["alice"].name
    return pwd.getpwuid(os.getuid()).pw_name


def crash_message(n: int) -> tuple[str, bytes]:
    msg_id = f"crash-{n}-{time.time_ns()}@example.com"
    body = f"message {n}\r\n" + "filler line\r\n" * 40 + f"END-OF-BODY {msg_id}\r\n"
    head = (f"From: load@example.com\r\nTo: alice@{DOMAIN}\r\nSubject: crash {n}\r\n"
            f"Message-ID: <{msg_id}>\r\nDate: Mon, 02 Jun 2025 12:00:00 +0000\r\n")
    if n % 3:
        return msg_id, (head + "\r\n" + body).encode()
    boundary = f"b{n}"
    return msg_id, (
        head + f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="{boundary}"\r\n'
        f"\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\n{body}"
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        f'Content-Disposition: attachment; filename="data-{n}.bin"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n--{boundary}--\r\n"
    ).encode()


def temp_leftovers(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*") if TEMP_NAME.match(p.name)]


def test_kill_9_mid_load_loses_no_acknowledged_message(owner: str) -> None:
    config = {"domain": DOMAIN, "mailboxes": {
        "alice": {"address": f"alice@{DOMAIN}", "owner": owner}}}
    env = {"AIMX_TEST_PAUSE_BEFORE_RENAME": "0.01"}
    with RunningDaemon(config, env=env) as daemon:
        counter = iter(range(MAX_MESSAGES))
        lock = threading.Lock()
        sent: list[str] = []
        acked: list[str] = []

        def sender() -> None:
            try:
                client = smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30)
                while True:
                    with lock:
                        n = next(counter, None)
                    if n is None:
                        break
                    msg_id, raw = crash_message(n)
                    with lock:
                        sent.append(msg_id)
                    client.sendmail("load@example.com", [f"alice@{DOMAIN}"], raw)
                    with lock:
                        acked.append(msg_id)
                client.quit()
            except (OSError, smtplib.SMTPException):
                return  # the daemon died under us: expected

        threads = [threading.Thread(target=sender) for _ in range(SENDERS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(acked) < KILL_AFTER_ACKS and time.monotonic() < deadline:
            time.sleep(0.005)
        daemon.kill()
        for thread in threads:
            thread.join(30)
        left_by_crash = len(temp_leftovers(daemon.data_dir))

        daemon.start()
        stored = {}
        for path in stored_emails(daemon.data_dir, "alice"):
            fields = frontmatter.parse(path.read_bytes())  # every visible file parses
            stored[fields["message_id"]] = path
        print(f"\ncrash test: sent={len(sent)} acknowledged={len(acked)} "
              f"stored={len(stored)} temp files left by the crash={left_by_crash}")

        assert len(acked) >= KILL_AFTER_ACKS
        assert len(sent) > len(acked) or len(sent) == MAX_MESSAGES
        missing = [msg_id for msg_id in acked if msg_id not in stored]
        assert missing == [], f"acknowledged but not on disk: {missing}"
        for msg_id, path in stored.items():
            assert f"END-OF-BODY {msg_id}" in path.read_text(), path
        assert set(stored) <= set(sent)
        assert temp_leftovers(daemon.data_dir) == []
        assert daemon.stop() == 0
