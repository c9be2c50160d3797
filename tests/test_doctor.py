"""``aimx doctor`` against healthy and broken installs built in temp dirs.

The service state and the host's addresses come through ``aimx.ops.doctor.Probes``
(the container has no aimx service and its own IP); everything else is real:
config files, mailbox dirs owned by real users, the DKIM key on disk, a real
DNS server on loopback, a real daemon for the VERSION probe.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aimx.cli.main import main
from aimx.ops import dkimkeys, doctor
from aimx.version import version_info
from tests.support.api import deliver
from tests.support.cli import aimx
from tests.support.daemon import RunningDaemon
from tests.support.dnsserver import DnsServer
from tests.support.users import skip_unless_users_reach_checkout

DOMAIN = "agent.example.test"
IPV4 = "192.0.2.10"
AIMX = Path(sys.executable).parent / "aimx"


@functools.cache
def keypair() -> dkimkeys.KeyPair:
    return dkimkeys.new_keypair()


@functools.cache
def other_keypair() -> dkimkeys.KeyPair:
    return dkimkeys.new_keypair()


def good_zone(public_b64: str) -> dict[str, list[list[str]]]:
    return {
        DOMAIN: [["A", IPV4], ["MX", f"10 {DOMAIN}"], ["TXT", f"v=spf1 ip4:{IPV4} -all"]],
        f"aimx._domainkey.{DOMAIN}": [["TXT", f"v=DKIM1; k=rsa; p={public_b64}"]],
        f"_dmarc.{DOMAIN}": [["TXT", f"v=DMARC1; p=reject; rua=mailto:postmaster@{DOMAIN}"]],
    }


@pytest.fixture(scope="module")
def dns():
    with DnsServer(good_zone(keypair().public_b64)) as server:
        yield server


@pytest.fixture
def fresh_zone(dns):
    """The healthy zone, restored before each test that edits records."""
    for name, entries in good_zone(keypair().public_b64).items():
        dns.records[name] = entries
    dns.reload()
    return dns


@pytest.fixture
def probes(monkeypatch):
    """Make the in-process doctor see a stopped service and this host at ``IPV4``."""
    settings = {"running": False, "addresses": (IPV4, None)}
    real = doctor.Probes

    def make(**overrides):
        return real(**{
            "service_running": lambda: settings["running"],
            "addresses": lambda: settings["addresses"],
            **overrides,
        })

    monkeypatch.setattr(doctor, "Probes", make)
    return settings


def write_config(dirs: dict[str, Path], body: str, *, resolver: str | None = None) -> Path:
    resolvers = f'dns_resolvers = ["{resolver}"]\n' if resolver else ""
    path = dirs["config"] / "config.toml"
    path.write_text(f'domain = "{DOMAIN}"\n{resolvers}{body}')
    path.chmod(0o640)
    return path


def make_mailbox_dirs(dirs: dict[str, Path], name: str, uid: int, gid: int) -> None:
    for folder in ("inbox", "sent"):
        path = dirs["data"] / folder / name
        path.mkdir(parents=True)
        os.chown(path, uid, gid)
        path.chmod(0o700)


def put_email(dirs: dict[str, Path], mailbox: str, stem: str, *, read: bool) -> None:
    path = dirs["data"] / "inbox" / mailbox / f"{stem}.md"
    path.write_text(f'+++\nid = "{stem}"\nread = {"true" if read else "false"}\n+++\n\nhi\n')


def run_doctor(capsys) -> tuple[int, str, str]:
    code = main(["doctor"])
    out, err = capsys.readouterr()
    return code, out, err


def section(out: str, title: str) -> list[str]:
    """The lines of one report section, without its heading."""
    lines = out.splitlines()
    start = lines.index(title) + 1
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return lines[start:end]


@pytest.fixture
def healthy(instance_dirs, test_users, fresh_zone):
    """A complete install: alice's mailbox with two messages, DKIM key, matching DNS."""
    alice = test_users["alice"]
    write_config(instance_dirs, (
        'trust = "verified"\ntrusted_senders = ["boss@example.com"]\n\n'
        f'[mailboxes.alice]\naddress = "alice@{DOMAIN}"\nowner = "{alice.name}"\n\n'
        f'[[mailboxes.alice.hooks]]\nname = "note"\nevent = "on_receive"\n'
        'cmd = ["/bin/true"]\n'
    ), resolver=fresh_zone.address)
    make_mailbox_dirs(instance_dirs, "alice", alice.uid, alice.gid)
    put_email(instance_dirs, "alice", "2025-01-01-120000-one", read=True)
    put_email(instance_dirs, "alice", "2025-01-02-120000-two", read=False)
    dkimkeys.install_keypair(keypair(), instance_dirs["config"] / "dkim")
    return instance_dirs


def test_healthy_install_prints_every_section_and_exits_0(healthy, test_users, probes, capsys):
    alice = test_users["alice"]
    code, out, err = run_doctor(capsys)
    info = version_info()
    name_width = max(8, len("alice"))
    address_width = len(f"alice@{DOMAIN}")
    rule = f"+---------+{'-' * (address_width + 2)}+-------+--------+----------+---------+-------+"
    expected = f"""\
Configuration
  Domain:           {DOMAIN}
  Config file:      {healthy['config'] / 'config.toml'}
  Data directory:   {healthy['data']}
  DKIM selector:    aimx
  DKIM key:         present
  Global trust:     verified
  Trusted senders:  boss@example.com

Service
  SMTP server:      not running
  Client version:   {info.tag} ({info.git_hash})
  Server version:   (daemon not running)

Mailboxes
  Total:            1 (2 messages, 1 unread)
  {rule}
  | Mailbox | {'Address':<{address_width}} | Total | Unread | Trust    | Senders | Hooks |
  {rule}
  | alice   | alice@{DOMAIN} |     2 |      1 | verified |       1 |     1 |
  {rule}

Ownership
  {'alice':<{name_width}}  owner={alice.name}  [OK]  uid={alice.uid}

DNS
  A: [OK]
  MX: [OK]
  SPF: [OK]
  DKIM: [OK]
  DMARC: [OK]

Logs
  Run `aimx logs` for recent log lines, or `aimx logs --follow` to watch them.

Checks
  All checks passed.
"""
    assert out == expected
    assert err == ""
    assert code == 0


def test_mode_drift_is_a_warning_and_exit_stays_0(healthy, probes, capsys):
    inbox = healthy["data"] / "inbox" / "alice"
    inbox.chmod(0o755)
    code, out, err = run_doctor(capsys)
    assert section(out, "Checks") == [
        f"  [WARN] MAILBOX-DIR-MODE-DRIFT: {inbox} has mode 0755, expected 0700",
        f"         → sudo chmod 0700 {inbox}",
        "  Summary: 0 fail, 1 warn, 0 info",
    ]
    assert code == 0
    assert err == ""


def test_missing_dir_fails_with_exit_1(healthy, test_users, probes, capsys):
    alice = test_users["alice"]
    sent = healthy["data"] / "sent" / "alice"
    shutil.rmtree(sent)
    code, out, err = run_doctor(capsys)
    group = __import__("grp").getgrgid(alice.gid).gr_name
    assert section(out, "Checks") == [
        f"  [FAIL] MAILBOX-DIR-MISSING: {sent} is missing (mailbox 'alice')",
        f"         → sudo install -d -m 0700 -o {alice.name} -g {group} {sent}",
        "  Summary: 1 fail, 0 warn, 0 info",
    ]
    assert code == 1
    assert err == "Error: aimx doctor found failing checks (see Checks section above)\n"


def test_owner_drift_fails_and_group_drift_warns(healthy, test_users, probes, capsys):
    alice, bob = test_users["alice"], test_users["bob"]
    inbox = healthy["data"] / "inbox" / "alice"
    sent = healthy["data"] / "sent" / "alice"
    os.chown(inbox, bob.uid, alice.gid)
    os.chown(sent, alice.uid, bob.gid)
    code, out, _err = run_doctor(capsys)
    checks = section(out, "Checks")
    assert checks[0] == (f"  [FAIL] MAILBOX-DIR-OWNER-DRIFT: {inbox} is owned by uid {bob.uid}, "
                         f"expected {alice.name} (uid {alice.uid})")
    assert checks[2].startswith(f"  [WARN] MAILBOX-DIR-GROUP-DRIFT: {sent} has group gid "
                                f"{bob.gid}, expected ")
    assert checks[-1] == "  Summary: 1 fail, 1 warn, 0 info"
    assert code == 1


def test_orphan_owner_exits_1_with_the_ownership_message(instance_dirs, probes, capsys):
    write_config(instance_dirs, (
        f'[mailboxes.ghost]\naddress = "ghost@{DOMAIN}"\nowner = "aimxt-nosuchuser"\n'
    ))
    stray = instance_dirs["data"] / "inbox" / "stray"
    stray.mkdir(parents=True)
    probes["addresses"] = (None, None)
    code, out, err = run_doctor(capsys)

    assert "  DKIM key:         MISSING - run `aimx dkim-keygen`" in out
    assert "  Trusted senders:  (none)" in out
    assert section(out, "Ownership") == [
        "  ghost     owner=aimxt-nosuchuser  [FAIL]  user not found"]
    assert section(out, "DNS") == ["  skipped - could not determine server IP"]
    checks = section(out, "Checks")
    ids = [line.split("] ", 1)[1].split(":", 1)[0] for line in checks if line.startswith("  [")]
    assert ids == ["MAILBOX-OWNER-ORPHAN", "ORPHAN-CONFIG", "ORPHAN-STORAGE",
                   "ORPHAN-MAILBOX-OWNER"]
    assert checks[-1] == "  Summary: 0 fail, 4 warn, 0 info"
    assert code == 1
    assert err == ("Error: aimx doctor found mailboxes with unresolvable owners "
                   "(see Ownership section)\n")


def test_catchall_without_its_system_user_fails(instance_dirs, probes, capsys):
    try:
        __import__("pwd").getpwnam("aimx-catchall")
        pytest.skip("this host has an aimx-catchall user")
    except KeyError:
        pass
    write_config(instance_dirs, (
        f'[mailboxes.catchall]\naddress = "*@{DOMAIN}"\nowner = "aimx-catchall"\n'))
    probes["addresses"] = (None, None)
    code, out, err = run_doctor(capsys)
    assert section(out, "Ownership") == ["  (no non-catchall mailboxes)"]
    assert ("  [FAIL] CATCHALL-USER-MISSING: catchall mailbox 'catchall' is owned by "
            "'aimx-catchall', but that system user does not exist") in out
    assert code == 1
    assert "found failing checks" in err


def test_dns_mismatch_prints_fix_lines_but_does_not_fail(instance_dirs, fresh_zone, probes,
                                                        capsys):
    write_config(instance_dirs, "", resolver=fresh_zone.address)
    dkimkeys.install_keypair(keypair(), instance_dirs["config"] / "dkim")
    fresh_zone.records[DOMAIN] = [["A", "192.0.2.99"], ["MX", f"10 {DOMAIN}"],
                                  ["TXT", f"v=spf1 ip4:{IPV4} -all"]]
    fresh_zone.records[f"aimx._domainkey.{DOMAIN}"] = [
        ["TXT", f"v=DKIM1; k=rsa; p={other_keypair().public_b64}"]]
    fresh_zone.records[f"_dmarc.{DOMAIN}"] = [["TXT", "v=DMARC1; p=none"]]
    fresh_zone.reload()
    code, out, _err = run_doctor(capsys)
    assert section(out, "DNS") == [
        f"  A: [FAIL] - A record points to [192.0.2.99], expected {IPV4}",
        f"         → Add: A  {DOMAIN}  {IPV4}",
        "  MX: [OK]",
        "  SPF: [OK]",
        "  DKIM: [FAIL] - DKIM record found but public key does not match local key",
        f"         → Add: TXT  aimx._domainkey.{DOMAIN}  v=DKIM1; k=rsa; p={keypair().public_b64}",
        "         !! Outbound DKIM signatures will FAIL verification at receivers until DNS "
        "matches.",
        "  DMARC: [WARN] - DMARC record uses p=none (no enforcement). Consider p=quarantine or "
        "p=reject for production.",
    ]
    assert section(out, "Checks") == ["  All checks passed."]
    assert code == 0


def test_dns_without_local_key_shows_no_dkim_add_hint(instance_dirs, fresh_zone, probes, capsys):
    write_config(instance_dirs, "", resolver=fresh_zone.address)
    del fresh_zone.records[f"aimx._domainkey.{DOMAIN}"]
    fresh_zone.reload()
    _code, out, _err = run_doctor(capsys)
    dns_lines = section(out, "DNS")
    assert "  DKIM: [FAIL] - No DKIM record found" in dns_lines
    assert not any("Add: TXT  aimx._domainkey" in line for line in dns_lines)


def test_server_version_when_service_runs_but_socket_is_missing(instance_dirs, probes, capsys):
    write_config(instance_dirs, "")
    probes.update(running=True, addresses=(None, None))
    _code, out, _err = run_doctor(capsys)
    assert section(out, "Service")[0] == "  SMTP server:      running"
    assert section(out, "Service")[2] == (
        f"  Server version:   (daemon not reachable on {instance_dirs['run'] / 'aimx.sock'})")


def test_server_version_when_the_socket_answers_garbage(instance_dirs, probes, capsys):
    write_config(instance_dirs, "")
    probes["addresses"] = (None, None)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(instance_dirs["run"] / "aimx.sock"))
    listener.listen(1)

    def answer_junk() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"\xff\xff")

    thread = threading.Thread(target=answer_junk, daemon=True)
    thread.start()
    try:
        _code, out, _err = run_doctor(capsys)
    finally:
        thread.join(5)
        listener.close()
    assert section(out, "Service")[2] == (
        "  Server version:   (daemon probe failed: Malformed response from aimx daemon: "
        "key length 65535 exceeds 255)")


def test_clicolor_force_beats_no_color(healthy, probes, capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("CLICOLOR_FORCE", "1")
    (healthy["data"] / "inbox" / "alice").chmod(0o755)
    _code, out, _err = run_doctor(capsys)
    assert "\x1b[" in out
    assert "  A: \x1b[32m✓\x1b[0m" in out
    assert "[\x1b[33mWARN\x1b[0m] MAILBOX-DIR-MODE-DRIFT" in out
    assert "[[" not in out


def test_real_daemon_version_and_piped_output_without_escapes(tmp_path):
    """End to end: the `aimx doctor` command, piped, against a running daemon."""
    with DnsServer({}) as dns, RunningDaemon(
            f'domain = "{DOMAIN}"\ndns_resolvers = ["{dns.address}"]\n') as daemon:
        env = daemon.client_env()
        env.pop("NO_COLOR", None)
        env.pop("CLICOLOR_FORCE", None)
        piped = subprocess.run([str(AIMX), "doctor"], env=env, capture_output=True, timeout=120)
        env["NO_COLOR"] = "1"
        no_color = subprocess.run([str(AIMX), "doctor"], env=env, capture_output=True,
                                  timeout=120)
    info = version_info()
    for result in (piped, no_color):
        text = result.stdout.decode()
        assert f"  Server version:   {info.tag} ({info.git_hash})" in text
        assert b"\x1b" not in result.stdout + result.stderr
        assert "[[" not in text
        assert "  DMARC: [FAIL] - No DMARC record found" in text or "skipped" in text
        assert result.returncode == 0, result.stderr


def test_a_running_daemon_and_a_catchall_without_sent_dir_are_healthy(test_users):
    """What a fresh `make run` looks like: the daemon started by hand (no service
    manager), mail only in the catch-all's inbox, a local-only domain."""
    alice = test_users["alice"]
    config = ('domain = "aimx.localhost"\n\n[mailboxes.catchall]\n'
              f'address = "*@aimx.localhost"\nowner = "{alice.name}"\n')
    with RunningDaemon(config) as daemon:
        inbox = daemon.data_dir / "inbox" / "catchall"
        inbox.mkdir(parents=True, exist_ok=True)
        os.chown(inbox, alice.uid, alice.gid)
        inbox.chmod(0o700)
        env = daemon.client_env({**os.environ, "NO_COLOR": "1"})
        done = subprocess.run([str(AIMX), "doctor"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "  SMTP server:      running" in lines
    assert "  skipped - aimx.localhost is a local-only name; no DNS records can be published " \
           "for it" in lines
    assert section(done.stdout, "Checks") == ["  All checks passed."]


# -- as a user other than root ---------------------------------------------------------------


def _two_user_instance(users: dict) -> RunningDaemon:
    """A daemon with alice's and bob's mailboxes (dirs as setup makes them), mail in both."""
    config = "".join(f'[mailboxes.{short}]\naddress = "{short}@aimx.localhost"\n'
                     f'owner = "{user.name}"\n\n' for short, user in users.items())
    daemon = RunningDaemon('domain = "aimx.localhost"\n\n' + config)
    for short, user in users.items():
        for folder in ("inbox", "sent"):
            path = daemon.data_dir / folder / short
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, user.uid, user.gid)
            path.chmod(0o700)
    deliver(daemon, "alice@aimx.localhost", 1)
    deliver(daemon, "bob@aimx.localhost", 2)
    return daemon


def test_as_a_user_other_mailboxes_are_not_counted_and_the_report_says_why(users):
    skip_unless_users_reach_checkout()
    alice = users["alice"]
    with _two_user_instance(users) as daemon:
        daemon.config_path.chmod(0o644)  # an operator made the config world-readable
        mine = aimx(daemon, "doctor", user=alice)
        full = aimx(daemon, "doctor")
    assert "Traceback" not in mine.stderr
    assert mine.returncode == 0, mine.stdout + mine.stderr  # a note, not a failure
    mailboxes = section(mine.stdout, "Mailboxes")
    assert mailboxes[0] == "  Total:            2 (1 messages, 1 unread; 1 not readable)"
    assert "  | alice   | alice@aimx.localhost |     1 |      1 | none  |       0 |     0 |" \
        in mailboxes
    assert "  | bob     | bob@aimx.localhost   |     ? |      ? | none  |       0 |     0 |" \
        in mailboxes
    assert section(mine.stdout, "Checks") == [
        f"  [INFO] NOT-CHECKED: message counts of mailbox 'bob' not checked: mailbox "
        f"directories are readable by their owners only; this run is {alice.name} "
        f"(uid {alice.uid})",
        "         → run `sudo aimx doctor` for the full report",
        "  Summary: 0 fail, 0 warn, 1 info",
    ]
    # Root reads everything: real counts, nothing left unchecked.
    assert full.returncode == 0, full.stdout + full.stderr
    assert section(full.stdout, "Mailboxes")[0] == "  Total:            2 (3 messages, 3 unread)"
    assert "NOT-CHECKED" not in full.stdout


@pytest.mark.parametrize("private", ["file", "directory"])
def test_as_a_user_without_the_config_doctor_reports_the_service_and_what_it_skipped(
        users, private):
    skip_unless_users_reach_checkout()
    alice = users["alice"]
    with _two_user_instance(users) as daemon:
        if private == "directory":  # not even whether the file exists can be seen
            daemon.config_dir.chmod(0o700)
        run = aimx(daemon, "doctor", user=alice)
    assert "Traceback" not in run.stderr
    assert run.returncode == 1
    assert section(run.stdout, "Service")[0] == "  SMTP server:      running"
    assert section(run.stdout, "Checks") == [
        f"  [INFO] NOT-CHECKED: configuration, mailboxes, ownership and DNS not checked: "
        f"{daemon.config_path} is not readable by {alice.name} (uid {alice.uid})",
        "         → run `sudo aimx doctor` for the full report",
        "  Summary: 0 fail, 0 warn, 1 info",
    ]
    assert run.stderr == (f"Error: this command needs to read {daemon.config_path} "
                          "(root-owned). Re-run with sudo, or use a UDS-backed alternative.\n")


def test_every_dkim_key_gets_a_dns_line_and_the_signing_one_is_named(healthy, fresh_zone, probes,
                                                                      capsys):
    """After ``aimx dkim-keygen --selector``: the new key's DNS state, the old one still signs."""
    dkim = healthy["config"] / "dkim"
    dkimkeys.install_keypair(other_keypair(), dkim, dkimkeys.key_files("s2", "aimx", dkim))
    dkimkeys.install_keypair(dkimkeys.new_keypair(), dkim, dkimkeys.key_files("s3", "aimx", dkim))
    fresh_zone.records[f"s3._domainkey.{DOMAIN}"] = [
        ["TXT", f"v=DKIM1; k=rsa; p={keypair().public_b64}"]]  # someone else's key
    fresh_zone.reload()
    code, out, _err = run_doctor(capsys)
    assert "  DKIM keys:        aimx (signing), s2, s3" in section(out, "Configuration")
    assert section(out, "DNS") == [
        "  A: [OK]",
        "  MX: [OK]",
        "  SPF: [OK]",
        "  DKIM: [OK]",
        "  DKIM s2 (not signing): [FAIL] - No DKIM record found",
        f"         → Add: TXT  s2._domainkey.{DOMAIN}  v=DKIM1; k=rsa; "
        f"p={other_keypair().public_b64}",
        "  DKIM s3 (not signing): [FAIL] - DKIM record found but public key does not match "
        "local key",
        f"         → Add: TXT  s3._domainkey.{DOMAIN}  v=DKIM1; k=rsa; "
        f"p={dkimkeys.local_public_b64(dkim, dkimkeys.key_files('s3', 'aimx', dkim))}",
        "  DMARC: [OK]",
    ]
    assert code == 0
    del fresh_zone.records[f"s3._domainkey.{DOMAIN}"]
    fresh_zone.reload()


def test_on_a_private_address_doctor_asks_the_verifier_which_address_to_check(
        instance_dirs, fresh_zone, probes, verifier, capsys):
    write_config(instance_dirs, f'verify_host = "{verifier.url}"\n', resolver=fresh_zone.address)
    dkimkeys.install_keypair(keypair(), instance_dirs["config"] / "dkim")
    probes["addresses"] = ("100.64.3.4", None)  # carrier-grade NAT
    _code, out, _err = run_doctor(capsys)
    # The test verifier sees this machine on loopback, so that is the public address.
    assert section(out, "DNS")[:2] == [
        "  checking against public address 127.0.0.1 (this machine's address 100.64.3.4 is "
        f"private; learned from the verifier at {verifier.url})",
        f"  A: [FAIL] - A record points to [{IPV4}], expected 127.0.0.1",
    ]

    # --public-ip wins over asking.
    assert main(["doctor", "--public-ip", IPV4]) == 0
    lines = section(capsys.readouterr().out, "DNS")
    assert lines[:4] == [f"  checking against public address {IPV4} (from --public-ip)",
                         "  A: [OK]", "  MX: [OK]", "  SPF: [OK]"]


def test_when_the_verifier_cannot_answer_doctor_says_so_and_uses_the_own_address(
        instance_dirs, fresh_zone, probes, capsys):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    try:
        write_config(instance_dirs, f'verify_host = "{url}"\n', resolver=fresh_zone.address)
        probes["addresses"] = ("10.1.2.3", None)
        _code, out, _err = run_doctor(capsys)
    finally:
        closed.close()
    first, second = section(out, "DNS")[:2]
    assert first.startswith(f"  this machine's address 10.1.2.3 is private and the verifier at "
                            f"{url} could not tell the public one (")
    assert first.endswith("); checking against 10.1.2.3. Pass --public-ip or set public_ip in "
                          "config.toml")
    assert second == f"  A: [FAIL] - A record points to [{IPV4}], expected 10.1.2.3"


def test_a_public_own_address_is_used_as_is_without_a_note(instance_dirs, fresh_zone, probes,
                                                           capsys):
    write_config(instance_dirs, 'verify_host = "http://127.0.0.1:9"\n',
                 resolver=fresh_zone.address)
    _code, out, _err = run_doctor(capsys)
    assert section(out, "DNS")[0] == "  A: [OK]"  # the verifier was not needed


@pytest.mark.parametrize("address, private", [
    ("10.0.0.5", True), ("172.16.9.1", True), ("172.32.0.1", False), ("192.168.1.1", True),
    ("100.64.0.1", True), ("100.127.255.254", True), ("100.128.0.1", False),
    ("169.254.1.1", True), ("fd12::1", True), ("fe80::1", True), ("203.0.113.7", False),
    ("8.8.8.8", False), ("2001:db8::7", False),
])
def test_private_ranges(address, private):
    from aimx.ops.publicip import is_private

    assert is_private(address) is private


def test_a_readable_or_foreign_owned_dkim_key_fails(healthy, test_users, probes, capsys):
    alice = test_users["alice"]
    dkim = healthy["config"] / "dkim"
    dkimkeys.install_keypair(other_keypair(), dkim, dkimkeys.key_files("s2", "aimx", dkim))
    (dkim / "private.key").chmod(0o640)
    os.chown(dkim / "s2.private.key", alice.uid, alice.gid)
    code, out, err = run_doctor(capsys)
    checks = section(out, "Checks")
    assert (f"  [FAIL] DKIM-KEY-MODE: {dkim / 'private.key'} (selector 'aimx') has mode 0640; "
            "a private key must be 0600") in checks
    assert f"         → sudo chmod 0600 {dkim / 'private.key'}" in checks
    assert (f"  [FAIL] DKIM-KEY-OWNER: {dkim / 's2.private.key'} (selector 's2') is owned by "
            f"uid {alice.uid}, not root") in checks
    assert code == 1 and "found failing checks" in err
