"""``aimx setup`` end to end: real verifier, real DNS server, real users and a real daemon.

The only stand-in is the service manager: ``systemctl`` calls go to
``FakeServiceManager``, which starts the daemon from the ``ExecStart=`` and
``Environment=`` lines of the unit file setup just wrote, the way systemd
would. Everything else (``ss``, ``useradd``, files, sockets, DNS) is real and
confined to temp dirs, loopback ports and a throwaway catchall user.
"""

from __future__ import annotations

import base64
import io
import os
import secrets
import shlex
import signal
import socket
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
import tomlkit
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from aimx.ops import dkimkeys, dnscheck
from aimx.ops.console import Console, SetupError
from aimx.ops.initsystem import System, run_command
from aimx.ops.portcheck import OUTBOUND_BLOCKED
from aimx.ops.setup import (
    NO_TRUST_WARNING,
    Wizard,
    domain_problem,
    new_config_text,
    refresh_config_text,
    run_setup,
    sender_problem,
    split_senders,
)
from tests.support.dnsserver import DnsServer
from tests.support.ports import ReservedPort
from tests.support.users import needs_root, remove_user, run_aimx_as

DOMAIN = "setup.test"
IPV4 = "203.0.113.7"
IPV6 = "2001:db8::7"
ZONE = {
    DOMAIN: [["A", IPV4], ["MX", f"10 {DOMAIN}"], ["TXT", f"v=spf1 ip4:{IPV4} -all"]],
    f"_dmarc.{DOMAIN}": [["TXT", f"v=DMARC1; p=reject; rua=mailto:postmaster@{DOMAIN}"]],
}


class FakeServiceManager:
    """``systemctl`` for tests: ``restart`` runs the unit's ExecStart like systemd would."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        self.calls: list[list[str]] = []
        self.proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __call__(self, argv, *, capture: bool = True, timeout: float | None = 60):
        argv = list(argv)
        if argv[0] not in ("systemctl", "rc-service", "rc-update"):
            return run_command(argv, capture=capture, timeout=timeout)
        self.calls.append(argv)
        code = 0
        if argv[1] == "is-active":
            code = 0 if self.running else 3
        elif argv[1] == "restart":
            self.stop()
            self.start()
        elif argv[1] == "stop":
            self.stop()
        elif argv[1] == "reload" and self.running:
            self.proc.send_signal(signal.SIGHUP)
        return subprocess.CompletedProcess(argv, code, "", "")

    def start(self) -> None:
        unit = (self.root / "etc/systemd/system/aimx.service").read_text()
        env = {"PATH": os.environ["PATH"], "HOME": "/root", "AIMX_DRAIN_TIMEOUT": "1"}
        command: list[str] = []
        for line in unit.splitlines():
            if line.startswith("Environment="):
                key, _, value = shlex.split(line.removeprefix("Environment="))[0].partition("=")
                env[key] = value
            elif line.startswith("ExecStart="):
                command = shlex.split(line.removeprefix("ExecStart="))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def stop(self) -> None:
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="module")
def dns():
    with DnsServer(ZONE) as server:
        yield server


@pytest.fixture
def env(instance_dirs, tmp_path, monkeypatch) -> dict[str, Path]:
    dirs = dict(instance_dirs, tls=tmp_path / "tls", root=tmp_path / "root")
    monkeypatch.setenv("AIMX_TLS_DIR", str(dirs["tls"]))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("AIMX_NONINTERACTIVE", raising=False)
    (dirs["root"] / "run/systemd/system").mkdir(parents=True)
    return dirs


@pytest.fixture
def catchall_user():
    name = f"aimxt-c{secrets.token_hex(4)}"
    yield name
    remove_user(name)


@pytest.fixture
def manager(env, tmp_path):
    fake = FakeServiceManager(env["root"], tmp_path / "daemon.log")
    yield fake
    fake.stop()


def make_system(env, manager, verifier, probe_port, dns, catchall_user, **changes) -> System:
    fields = dict(root=env["root"], run=manager, euid=lambda: 0, smtp_host="127.0.0.1",
                  smtp_port=probe_port, verify_smtp_port=verifier.smtp_port,
                  catchall_user=catchall_user, catchall_home=env["root"] / "catchall-home",
                  dns_resolvers=(dns.address,), bind_wait_seconds=15.0,
                  addresses=lambda: [IPV4, "fd00::2"])
    fields.update(changes)
    return System(**fields)


def console(stdin: str = "", interactive: bool = False) -> Console:
    return Console(stdin=io.StringIO(stdin), out=io.StringIO(), err=io.StringIO(),
                   interactive=interactive)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- full runs

@needs_root
def test_first_run_installs_config_keys_cert_dirs_and_service(
        env, manager, verifier, probe_port, dns, catchall_user):
    system = make_system(env, manager, verifier, probe_port, dns, catchall_user)
    io_ = console()
    assert run_setup(DOMAIN, verify_host=verifier.url, system=system, console=io_) == 0
    out, err = io_.out.getvalue(), io_.err.getvalue()

    config_path = env["config"] / "config.toml"
    assert mode(config_path) == 0o640 and config_path.stat().st_uid == 0
    config = tomllib.loads(config_path.read_text())
    assert config["domain"] == DOMAIN and config["data_dir"] == str(env["data"])
    assert (config["trust"], config["trusted_senders"]) == ("none", [])
    assert config["mailboxes"]["catchall"] == {"address": f"*@{DOMAIN}", "owner": catchall_user}
    assert NO_TRUST_WARNING in err

    private, public = env["config"] / "dkim/private.key", env["config"] / "dkim/public.key"
    assert mode(private) == 0o600 and mode(public) == 0o644
    assert private.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    der = serialization.load_pem_public_key(public.read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    p_value = base64.b64encode(der).decode()
    assert f"v=DKIM1; k=rsa; p={p_value}" in out  # the DNS table publishes this very key

    cert_path, key_path = env["tls"] / "cert.pem", env["tls"] / "key.pem"
    assert mode(cert_path) == 0o644 and mode(key_path) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [DOMAIN]
    assert cert.subject.rfc4514_string() == f"CN={DOMAIN}"
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3650

    # The catchall user exists and owns its mailbox dirs: it was created before the chown.
    import pwd

    uid = pwd.getpwnam(catchall_user).pw_uid
    for folder in ("inbox", "sent"):
        box = env["data"] / folder / "catchall"
        assert (box.stat().st_uid, mode(box)) == (uid, 0o700)
    assert mode(env["data"] / "README.md") == 0o644
    assert (env["root"] / "catchall-home").stat().st_uid == uid

    unit = (env["root"] / "etc/systemd/system/aimx.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert shlex.split(exec_start.removeprefix("ExecStart="))[1:] == [
        "serve", "--data-dir", str(env["data"]), "--bind", f"127.0.0.1:{probe_port}",
        "--tls-cert", str(cert_path), "--tls-key", str(key_path)]
    assert f"Environment=AIMX_CONFIG_DIR={env['config']}" in unit
    assert [c[1:] for c in manager.calls if c[1] != "is-active"] == [
        ["daemon-reload"], ["enable", "aimx"], ["reset-failed", "aimx"], ["restart", "aimx"]]

    assert "  Waiting for aimx serve to bind port 25... [OK]\n`aimx serve` is running.\n" in out
    assert "  A: [OK]\n  MX: [OK]\n  SPF: [OK]\n  DKIM: [FAIL] - No DKIM record found\n" in out
    assert "  DMARC: [OK]\n" in out
    assert "AIMX has been set up successfully." in out
    assert "  - Claude Code\n" in out and "[>] aimx agents setup" in out
    # The daemon started from the unit answers SMTP with the config setup wrote.
    with socket.create_connection(("127.0.0.1", probe_port), timeout=5) as sock:
        assert sock.makefile("rb").readline().startswith(b"220 ")


@needs_root
def test_rerun_skips_what_exists_and_keeps_the_trust_policy(
        env, manager, verifier, probe_port, dns, catchall_user):
    system = make_system(env, manager, verifier, probe_port, dns, catchall_user)
    assert run_setup(DOMAIN, verify_host=verifier.url, system=system, console=console()) == 0
    config_path = env["config"] / "config.toml"
    document = tomlkit.parse(config_path.read_text())
    document["trust"] = "verified"
    document["trusted_senders"] = ["boss@example.com"]
    config_path.write_text(tomlkit.dumps(document))
    before = {p: p.read_bytes() for p in (env["tls"] / "cert.pem", env["tls"] / "key.pem",
                                          env["config"] / "dkim/private.key")}
    restarts = manager.calls.count(["systemctl", "restart", "aimx"])

    io_ = console()
    assert run_setup(None, verify_host=verifier.url, system=system, console=io_) == 0
    out = io_.out.getvalue()
    assert "Existing aimx configuration detected. Skipping install, proceeding to " \
           "verification." in out
    assert "aimx is already listening on port 25; probing it." in out
    assert "  Inbound port 25... [OK]" in out  # the live daemon answered the verifier
    assert "[WARN] Step 3 skipped (existing install)." in out
    assert "[WARN] Step 4 skipped (config.toml exists; trust policy kept)." in out
    assert "[WARN] Step 5 skipped (aimx is already installed and running)." in out
    config = tomllib.loads(config_path.read_text())
    assert (config["trust"], config["trusted_senders"]) == ("verified", ["boss@example.com"])
    assert all(path.read_bytes() == data for path, data in before.items())
    assert manager.calls.count(["systemctl", "restart", "aimx"]) == restarts


@needs_root
@pytest.mark.timeout(90)
def test_end_of_input_skips_the_dns_loop_instead_of_spinning(
        env, manager, verifier, probe_port, dns, catchall_user):
    system = make_system(env, manager, verifier, probe_port, dns, catchall_user)
    # Enter confirms DNS access, Enter verifies (DKIM is missing, so it fails), then EOF.
    io_ = console("\n\n", interactive=True)
    assert run_setup(DOMAIN, verify_host=verifier.url, system=system, console=io_) == 0
    out = io_.out.getvalue()
    assert out.count("DNS Verification:") == 1
    assert "Some DNS records are not yet correct." in out
    assert "Update your DNS records and run `aimx doctor` to re-verify." in out
    config = tomllib.loads((env["config"] / "config.toml").read_text())
    assert config["trust"] == "none"  # EOF at the trust prompt keeps hooks disabled


@needs_root
def test_interactive_trust_prompt_validates_and_saves_senders(
        env, manager, verifier, probe_port, dns, catchall_user):
    system = make_system(env, manager, verifier, probe_port, dns, catchall_user)
    answers = "y\nq\nbad-entry, a@@b\nyou@example.com, *@corp.example\ny\n"
    io_ = console(answers, interactive=True)
    assert run_setup(DOMAIN, verify_host=verifier.url, system=system, console=io_) == 0
    out, err = io_.out.getvalue(), io_.err.getvalue()
    assert "DNS Verification:" not in out  # q skipped verification
    assert "[FAIL] invalid sender 'bad-entry': must contain exactly one '@'" in err
    assert "[FAIL] invalid sender 'a@@b': must contain exactly one '@'" in err
    assert "Trusted senders:\n  - you@example.com\n  - *@corp.example\n" in out
    config = tomllib.loads((env["config"] / "config.toml").read_text())
    assert (config["trust"], config["trusted_senders"]) == (
        "verified", ["you@example.com", "*@corp.example"])


def test_failing_preflight_writes_nothing(env, manager, verifier, probe_port, dns):
    with ReservedPort() as closed:  # outbound port 25 "blocked": nothing listens there
        system = make_system(env, manager, verifier, probe_port, dns, "aimxt-never",
                             verify_smtp_port=closed.port)
        io_ = console()
        with pytest.raises(SetupError) as err:
            run_setup(DOMAIN, verify_host=verifier.url, system=system, console=io_)
    assert str(err.value).startswith("Port 25 preflight failed.")
    assert "  Outbound port 25... [FAIL]\n" in io_.out.getvalue()
    assert OUTBOUND_BLOCKED in io_.err.getvalue()
    assert "Hetzner Cloud" in io_.err.getvalue()
    assert list(env["config"].iterdir()) == [] and list(env["data"].iterdir()) == []
    assert not env["tls"].exists()
    assert not (env["root"] / "etc").exists()


def test_port_held_by_another_process_aborts_before_any_write(env, manager, verifier, dns):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        system = make_system(env, manager, verifier, holder.getsockname()[1], dns,
                             "aimxt-never")
        with pytest.raises(SetupError) as err:
            run_setup(DOMAIN, verify_host=verifier.url, system=system, console=console())
    finally:
        holder.close()
    name = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert str(err.value) == (f"Port 25 is occupied by {name}. Stop the process and run "
                              "`aimx setup` again.")
    assert list(env["config"].iterdir()) == []


def test_non_root_is_refused_with_a_pointer_to_agents_setup(test_users, instance_dirs):
    alice = test_users["alice"]
    result = run_aimx_as(alice, ["setup", DOMAIN], alice.env(), input="")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: `aimx setup` requires root. To set up the AIMX "
                                    "server, run with: `sudo aimx setup`.\n\n")
    assert "`aimx agents setup`" in result.stderr
    assert list(instance_dirs["config"].iterdir()) == []


def test_bad_verify_host_fails_before_the_root_check(test_users, instance_dirs):
    alice = test_users["alice"]
    result = run_aimx_as(alice, ["setup", "--verify-host", "check.example"], alice.env(), input="")
    assert result.returncode == 1
    assert result.stderr == ("Error: verify-host must start with http:// or https:// "
                             "(got: check.example)\n")


def test_noninteractive_without_domain_cancels(env, manager, verifier, probe_port, dns):
    system = make_system(env, manager, verifier, probe_port, dns, "aimxt-never")
    with pytest.raises(SetupError) as err:
        run_setup(None, verify_host=verifier.url, system=system, console=console())
    assert str(err.value) == "No domain entered. Setup cancelled."
    assert list(env["config"].iterdir()) == []


# --------------------------------------------------------------------------- pieces

def test_domain_prompt_reprompts_until_a_confirmed_valid_domain(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    io_ = console("localhost\nAgent.Example.COM.\nn\nmail.example.org\n\n", interactive=True)
    assert Wizard(system=System(), console=io_)._ask_domain() == "mail.example.org"
    out = io_.out.getvalue()
    assert out.startswith("Enter the domain you want to use for email\n"
                          "(e.g. agent.example.com).\n> ")
    assert "Domain: agent.example.com\nConfirm? [Y/n] " in out
    assert "Domain: mail.example.org\nConfirm? [Y/n] " in out
    assert io_.err.getvalue() == ("[FAIL] Domain must have at least two labels "
                                  "(e.g. agent.example.com)\n")


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_empty_domain_answer_cancels(stdin):
    with pytest.raises(SetupError) as err:
        Wizard(system=System(), console=console(stdin, interactive=True))._ask_domain()
    assert str(err.value) == "No domain entered. Setup cancelled."


@pytest.mark.parametrize("domain, problem", [
    ("agent.example.com", None),
    ("a-b.c0", None),
    ("localhost", "Domain must have at least two labels (e.g. agent.example.com)"),
    ("-bad.example", "Invalid label '-bad': labels cannot start or end with a hyphen"),
    ("bad_.example", "Invalid label 'bad_': use 1-63 letters, digits or hyphens"),
    ("a..example", "Domain contains an empty label"),
    ("x" * 64 + ".example", f"Invalid label '{'x' * 64}': use 1-63 letters, digits or hyphens"),
    (".".join(["abcdefgh"] * 29) + ".com", "Domain is too long (max 253 characters)"),
])
def test_domain_rules(domain, problem):
    assert domain_problem(domain) == problem


def test_sender_rules():
    assert split_senders(" you@example.com,*@company.com  x@y ") == [
        "you@example.com", "*@company.com", "x@y"]
    assert sender_problem("*@company.com") is None
    assert sender_problem("a+tag?@sub.example") is None
    assert sender_problem("@example.com") == "the part before '@' is empty"
    assert sender_problem("you@") == "the part after '@' is empty"
    assert sender_problem("you@exa$mple.com") == (
        "invalid character '$' (allowed: letters, digits and . - _ + * ?)")


def test_refreshing_config_moves_addresses_and_restores_the_catchall():
    text = (
        "# my notes\n"
        'domain = "old.example"\n'
        'trust = "verified"\n'
        'trusted_senders = ["boss@example.com"]\n\n'
        "# alice's box\n"
        "[mailboxes.alice]\n"
        'address = "alice@old.example"\n'
        'owner = "alice"\n'
    )
    updated = refresh_config_text(text, "new.example", None, "aimx-catchall")
    data = tomllib.loads(updated)
    assert data["domain"] == "new.example"
    assert data["trust"] == "verified" and data["trusted_senders"] == ["boss@example.com"]
    assert data["mailboxes"]["alice"]["address"] == "alice@new.example"
    assert data["mailboxes"]["catchall"] == {"address": "*@new.example",
                                             "owner": "aimx-catchall"}
    assert "# my notes" in updated and "# alice's box" in updated
    # Nothing to change: the text comes back as it was.
    assert refresh_config_text(updated, "new.example", None, "aimx-catchall") == updated


def test_new_config_escapes_values():
    text = new_config_text("a.example", Path('/srv/odd "dir"'), "verified", ['x"y@a.b'],
                           "aimx-catchall")
    data = tomllib.loads(text)
    assert data["data_dir"] == '/srv/odd "dir"' and data["trusted_senders"] == ['x"y@a.b']
    assert data["dkim_selector"] == "aimx"


def test_dns_table_with_and_without_ipv6():
    key = base64.b64encode(b"spki").decode()
    four = dnscheck.record_table(dnscheck.server_records(
        "agent.example.com", IPV4, selector="aimx", dkim_public_b64=key))
    assert four == [
        "  TYPE NAME                                          VALUE",
        "  ---- --------------------------------------------- -----",
        "  A    agent.example.com                             203.0.113.7",
        "  MX   agent.example.com                             10 agent.example.com.",
        "  TXT  agent.example.com                             v=spf1 ip4:203.0.113.7 -all",
        f"  TXT  aimx._domainkey.agent.example.com             v=DKIM1; k=rsa; p={key}",
        "  TXT  _dmarc.agent.example.com                      v=DMARC1; p=reject; "
        "rua=mailto:postmaster@agent.example.com",
    ]
    six = dnscheck.record_table(dnscheck.server_records(
        "agent.example.com", IPV4, IPV6, dkim_public_b64=key))
    assert six[3] == "  AAAA agent.example.com                             2001:db8::7"
    assert "v=spf1 ip4:203.0.113.7 ip6:2001:db8::7 -all" in six[5]


# --------------------------------------------------------------------------- DNS lines

def _checks(dns_server: DnsServer, key: str | None, **kwargs) -> list[dnscheck.DnsCheck]:
    resolver = dnscheck.make_resolver([dns_server.address])
    return dnscheck.check_dns(resolver, "dns.test", IPV4, selector="aimx",
                              dkim_public_b64=key, retry_delay=0.05, **kwargs)


def test_dns_lines_all_pass_and_dmarc_none_only_warns(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    key = dkimkeys.new_keypair(1024).public_b64
    zone = {
        "dns.test": [["A", IPV4], ["AAAA", IPV6], ["MX", "10 DNS.test"],
                     ["TXT", "v=spf1 +ip4:203.0.113.0/24 ip6:2001:db8::7 -all"]],
        "aimx._domainkey.dns.test": [["TXT", f"v=DKIM1; k=rsa; p={key}"]],
        "_dmarc.dns.test": [["TXT", "v=DMARC1; p=none"]],
    }
    with DnsServer(zone) as server:
        checks = _checks(server, key, ipv6=IPV6, enable_ipv6=True)
    assert dnscheck.format_checks(checks) == [
        "  A: [OK]", "  AAAA: [OK]", "  MX: [OK]", "  SPF: [OK]", "  SPF (IPv6): [OK]",
        "  DKIM: [OK]", f"  DMARC: [WARN] - {dnscheck.DMARC_NONE_WARNING}"]
    assert dnscheck.all_pass(checks)


def test_dns_lines_missing_and_mismatched_records(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    local = dkimkeys.new_keypair(1024).public_b64
    other = dkimkeys.new_keypair(1024).public_b64
    zone = {
        "dns.test": [["A", "198.51.100.1"], ["MX", "10 mx.elsewhere.example"]],
        "aimx._domainkey.dns.test": [["TXT", f"v=DKIM1; k=rsa; p={other}"]],
    }
    with DnsServer(zone) as server:
        checks = _checks(server, local)
    lines = dnscheck.format_checks(checks)
    indent = " " * 9
    assert lines == [
        "  A: [FAIL] - A record points to [198.51.100.1], expected 203.0.113.7",
        f"{indent}→ Add: A  dns.test  203.0.113.7",
        "  MX: [FAIL] - MX record points to [mx.elsewhere.example], expected dns.test",
        f"{indent}→ Add: MX  dns.test  10 dns.test.",
        "  SPF: [FAIL] - No SPF record found",
        f"{indent}→ Add: TXT  dns.test  v=spf1 ip4:203.0.113.7 -all",
        "  DKIM: [FAIL] - DKIM record found but public key does not match local key",
        f"{indent}→ Add: TXT  aimx._domainkey.dns.test  v=DKIM1; k=rsa; p={local}",
        f"{indent}!! Outbound DKIM signatures will FAIL verification at receivers until DNS "
        "matches.",
        "  DMARC: [FAIL] - No DMARC record found",
        f"{indent}→ Add: TXT  _dmarc.dns.test  v=DMARC1; p=reject; "
        "rua=mailto:postmaster@dns.test",
    ]
    assert not dnscheck.all_pass(checks)
    # Without a local key (doctor), the DKIM line carries no "Add" hint.
    no_hint = dnscheck.format_checks(checks, dkim_add_hint=False)
    assert not any("_domainkey" in line for line in no_hint)


def test_dns_lookup_errors_fail_with_the_record_type(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    with DnsServer({"dns.test": [["SERVFAIL", ""]], "_dmarc.dns.test": [["SERVFAIL", ""]],
                    "aimx._domainkey.dns.test": [["SERVFAIL", ""]]}) as server:
        checks = _checks(server, None, tries=2)
    assert [(c.label, c.status) for c in checks] == [
        ("A", "fail"), ("MX", "fail"), ("SPF", "fail"), ("DKIM", "fail"), ("DMARC", "fail")]
    assert checks[0].reason.startswith("A lookup failed: ")
    assert checks[2].reason.startswith("TXT lookup failed: ")


# --------------------------------------------------------------------------- behind NAT

@needs_root
def test_on_a_private_address_setup_checks_dns_against_what_the_verifier_saw(
        env, manager, verifier, probe_port, dns, catchall_user):
    system = make_system(env, manager, verifier, probe_port, dns, catchall_user,
                         addresses=lambda: ["10.0.0.5", "fd00::2"])
    io_ = console()
    assert run_setup(DOMAIN, verify_host=verifier.url, system=system, console=io_) == 0
    out = io_.out.getvalue()
    # The test verifier sees this machine on loopback: that is the address it reports.
    assert (f"Checking against public address 127.0.0.1 (this machine's address 10.0.0.5 is "
            f"private; learned from the verifier at {verifier.url}).\n") in out
    assert f"  A    {DOMAIN:<45} 127.0.0.1\n" in out
    assert f"  TXT  {DOMAIN:<45} v=spf1 ip4:127.0.0.1 -all\n" in out
    assert f"  A: [FAIL] - A record points to [{IPV4}], expected 127.0.0.1\n" in out
    assert "  SPF: [FAIL] - SPF record does not include ip4:127.0.0.1\n" in out
    assert "10.0.0.5 -all" not in out and "public_ip" not in (
        env["config"] / "config.toml").read_text()


@needs_root
def test_public_ip_flag_is_used_saved_and_then_read_by_doctor(
        env, manager, verifier, probe_port, dns, catchall_user, capsys):
    system = make_system(env, manager, verifier, probe_port, dns, catchall_user,
                         addresses=lambda: ["192.168.1.20"])
    io_ = console()
    assert run_setup(DOMAIN, verify_host=verifier.url, public_ip=IPV4, system=system,
                     console=io_) == 0
    out = io_.out.getvalue()
    assert f"Checking against public address {IPV4} (from --public-ip).\n" in out
    assert "  A: [OK]\n  MX: [OK]\n  SPF: [OK]\n" in out
    assert tomllib.loads((env["config"] / "config.toml").read_text())["public_ip"] == IPV4

    from aimx.cli import doctor as doctor_cli
    from aimx.cli.main import build_parser
    from aimx.ops import doctor

    probes = doctor.Probes(service_running=lambda: False,
                           addresses=lambda: ("192.168.1.20", None),
                           resolver=lambda _configured: dnscheck.make_resolver([dns.address]))
    doctor_cli.run(build_parser("doctor").parse_args(["doctor"]), probes)
    report = capsys.readouterr().out
    assert f"  checking against public address {IPV4} (public_ip in config.toml)\n" \
           "  A: [OK]\n  MX: [OK]\n  SPF: [OK]\n" in report


def test_a_bad_public_ip_flag_fails_before_anything_else(env):
    with pytest.raises(SetupError) as err:
        run_setup(DOMAIN, public_ip="10.0.0.300", system=System(euid=lambda: 1000),
                  console=console())
    assert str(err.value) == ("invalid public IP '10.0.0.300': expected an IPv4 address such "
                              "as 203.0.113.7")


@needs_root
def test_rerun_after_a_rotation_keeps_the_named_signing_key(
        env, manager, verifier, probe_port, dns, catchall_user, capsys):
    from aimx.cli.main import main

    system = make_system(env, manager, verifier, probe_port, dns, catchall_user)
    assert run_setup(DOMAIN, verify_host=verifier.url, system=system, console=console()) == 0
    assert main(["dkim-keygen", "--selector", "s2"]) == 0
    assert main(["dkim", "rotate", "s2", "--force"]) == 0
    capsys.readouterr()
    keys = env["config"] / "dkim"
    assert sorted(p.name for p in keys.iterdir()) == [
        "aimx.private.key", "aimx.public.key", "s2.private.key", "s2.public.key"]

    io_ = console()
    assert run_setup(None, verify_host=verifier.url, system=system, console=io_) == 0
    out = io_.out.getvalue()
    assert "Existing aimx configuration detected." in out  # the signing key counts as present
    assert "Generating DKIM keypair" not in out and not (keys / "private.key").exists()
    s2 = dkimkeys.local_public_b64(keys, dkimkeys.key_files("s2", "s2", keys))
    assert f"s2._domainkey.{DOMAIN}" in out and f"p={s2}" in out
