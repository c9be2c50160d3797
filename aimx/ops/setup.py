"""``aimx setup``: the install wizard.

Six steps: port-25 preflight, domain and DNS, TLS certificate, trust policy,
install (config, users, directories, keys, service), and the hand-off to
``aimx agents setup``. Running it again is safe: what exists is kept (the
trust policy, the keys, the certificate) and only what is missing or stale
is redone. Nothing is written before the preflight has passed.

Everything that touches the machine goes through ``aimx.ops.initsystem.System``;
everything the operator sees goes through a ``Console`` (``aimx.ops.console``), so
tests drive the wizard with real files, a real DNS server and a real verifier over
loopback. The port-25 preflight is ``aimx.ops.portcheck``, shared with ``aimx portcheck``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import attrs
import tomlkit

from aimx import paths, term
from aimx.config import (
    CATCHALL_OWNER,
    DEFAULT_DKIM_SELECTOR,
    Config,
    ConfigError,
    load_config,
    owner_ids,
    parse_config_text,
)
from aimx.configedit import ConfigEditError, write_config_text
from aimx.ops import dkimkeys, dnscheck, publicip, tlscert
from aimx.ops.console import Console, SetupError
from aimx.ops.initsystem import (
    OPENRC,
    SYSTEMD,
    ServiceError,
    System,
    render_openrc_script,
    render_systemd_unit,
)
from aimx.ops.portcheck import (
    normalise_verify_host,
    resolve_verify_host,
    run_port_checks,
)
from aimx.storage.layout import ensure_data_dir, ensure_mailbox_dir, write_readme

MAX_TRUST_ATTEMPTS = 5
MAX_DOMAIN_ATTEMPTS = 5

STEPS = (
    "Preflight checks on port 25",
    "Set up domain and DNS",
    "Set up TLS certificate",
    "Set up trust policy",
    "Install AIMX",
    "Set up MCP for agent(s)",
)
# name: (colour on, colour off)
STEP_MARKS = {
    "pending": ("☐", "[ ]"),
    "running": ("◐", "[~]"),
    "done": ("☑", "[x]"),
    "skipped": ("☒", "[-]"),
    "handoff": ("⎘", "[*]"),
    "error": ("✗", "[!]"),
}
SMTP_PROVIDERS = (
    "Hetzner Cloud", "OVH / OVHcloud", "BuyVM (Frantech)", "Vultr (on request)",
    "Linode/Akamai (on request)",
)

ROOT_REQUIRED = (
    "`aimx setup` requires root. To set up the AIMX server, run with: `sudo aimx setup`.\n\n"
    "To wire an AI agent to an existing server, run `aimx agents setup` as your regular "
    "user instead (no root needed)."
)
NO_TRUST_WARNING = (
    "No trusted senders configured. Hooks will NOT fire for inbound email. "
    "Add addresses to `trusted_senders` in config.toml and set `trust = \"verified\"` "
    "to enable them later."
)


_LABEL = re.compile(r"[A-Za-z0-9-]{1,63}")


def domain_problem(domain: str) -> str | None:
    """Why ``domain`` cannot be the mail domain, or ``None``."""
    if not domain:
        return "Domain cannot be empty"
    if len(domain) > 253:
        return "Domain is too long (max 253 characters)"
    labels = domain.split(".")
    if len(labels) < 2:
        return "Domain must have at least two labels (e.g. agent.example.com)"
    for label in labels:
        if not label:
            return "Domain contains an empty label"
        if not _LABEL.fullmatch(label):
            return (f"Invalid label '{label}': use 1-63 letters, digits or hyphens")
        if label.startswith("-") or label.endswith("-"):
            return f"Invalid label '{label}': labels cannot start or end with a hyphen"
    return None


def clean_domain(text: str) -> str:
    return text.strip().rstrip(".").lower()


_SENDER_CHARS = re.compile(r"[A-Za-z0-9.\-_+*?]+")


def sender_problem(sender: str) -> str | None:
    """Why ``sender`` is not a usable trusted-sender address or glob, or ``None``."""
    if sender.count("@") != 1:
        return "must contain exactly one '@'"
    local, domain = sender.split("@")
    if not local:
        return "the part before '@' is empty"
    if not domain:
        return "the part after '@' is empty"
    for char in local + domain:
        if not _SENDER_CHARS.fullmatch(char):
            return f"invalid character '{char}' (allowed: letters, digits and . - _ + * ?)"
    return None


def split_senders(text: str) -> list[str]:
    return [part for part in re.split(r"[,\s]+", text.strip()) if part]


# --------------------------------------------------------------------------- config text

def _toml(value: object) -> str:
    return tomlkit.item(value).as_string()


def new_config_text(domain: str, data_dir: Path, trust: str, senders: Sequence[str],
                    catchall_owner: str, selector: str = DEFAULT_DKIM_SELECTOR,
                    public_ip: str | None = None) -> str:
    nat = ("# The address the internet reaches this server at (it is behind NAT).\n"
           f"public_ip = {_toml(public_ip)}\n") if public_ip else ""
    return (
        "# aimx configuration, written by `aimx setup`.\n"
        "# The daemon re-reads it on `systemctl reload aimx` (SIGHUP).\n"
        f"domain = {_toml(domain)}\n"
        f"data_dir = {_toml(str(data_dir))}\n"
        f"dkim_selector = {_toml(selector)}\n"
        f"trust = {_toml(trust)}\n"
        f"trusted_senders = {_toml(list(senders))}\n"
        f"{nat}"
        "\n"
        "# Mail for addresses without a mailbox of their own lands here.\n"
        "[mailboxes.catchall]\n"
        f"address = {_toml('*@' + domain)}\n"
        f"owner = {_toml(catchall_owner)}\n"
    )


def refresh_config_text(text: str, domain: str, data_dir: Path | None,
                        catchall_owner: str, public_ip: str | None = None) -> str:
    """An existing config with the new domain, data dir, public IP and a catchall;
    comments kept.

    Addresses on the old domain move to the new one; a config without a
    catchall gets ``[mailboxes.catchall]`` back.
    """
    document = tomlkit.parse(text)
    if public_ip is not None and str(document.get("public_ip", "")) != public_ip:
        document["public_ip"] = public_ip
    old = str(document.get("domain", ""))
    if old.lower() != domain.lower():
        document["domain"] = domain
    if data_dir is not None and str(document.get("data_dir", "")) != str(data_dir):
        document["data_dir"] = str(data_dir)
    mailboxes = document.get("mailboxes")
    if mailboxes is None:
        mailboxes = tomlkit.table(is_super_table=True)
        document["mailboxes"] = mailboxes
    has_catchall = False
    for _name, table in mailboxes.items():
        address = str(table.get("address", ""))
        local, at, host = address.rpartition("@")
        if at and old and host.lower() == old.lower() and host.lower() != domain.lower():
            table["address"] = f"{local}@{domain}"
        if str(table.get("address", "")).lower() == f"*@{domain}".lower():
            has_catchall = True
    if not has_catchall:
        name, counter = "catchall", 1
        while name in mailboxes:
            counter += 1
            name = f"catchall-{counter}"
        table = tomlkit.table()
        table["address"] = f"*@{domain}"
        table["owner"] = catchall_owner
        mailboxes[name] = table
    return tomlkit.dumps(document)


# --------------------------------------------------------------------------- the wizard

@attrs.define
class Wizard:
    """One run of ``aimx setup``."""

    system: System
    console: Console
    domain_arg: str | None = None
    verify_host_flag: str | None = None
    data_dir_flag: str | None = None
    public_ip_flag: str | None = None
    verify_host: str = ""
    seen_ip: str | None = None  # where the verifier saw this machine (preflight)
    states: list[str] = attrs.field(factory=lambda: ["pending"] * len(STEPS))
    config: Config | None = None
    config_text: str | None = None
    domain: str = ""
    selector: str = DEFAULT_DKIM_SELECTOR
    enable_ipv6: bool = False
    trust: str = "none"
    senders: list[str] = attrs.field(factory=list)
    reentry: bool = False

    # -- output helpers

    def _mark(self, state: str) -> str:
        glyph, ascii_mark = STEP_MARKS[state]
        if not term.color_enabled():
            return ascii_mark
        colour = {"done": "green", "error": "red", "skipped": "yellow", "running": "bold",
                  "handoff": "bold", "pending": "dim"}[state]
        return term.style(glyph, colour)

    def checklist(self) -> None:
        for number, (title, state) in enumerate(zip(STEPS, self.states, strict=True), 1):
            self.console.say(f"  {self._mark(state)} {number}. {title}")
        self.console.say()

    def begin(self, number: int) -> None:
        self.states[number - 1] = "running"
        self.console.say(term.style(f"Step {number}: {STEPS[number - 1]}", "bold"))

    def complete(self, number: int) -> None:
        self.states[number - 1] = "done"
        self.console.say(f"{term.mark('ok')} Step {number} complete.")
        self.console.say()
        self.checklist()

    def skip(self, number: int, reason: str) -> None:
        self.states[number - 1] = "skipped"
        self.console.say(f"{term.mark('warn')} Step {number} skipped ({reason}).")
        self.console.say()
        self.checklist()

    def fail(self, number: int) -> None:
        self.states[number - 1] = "error"

    # -- the run

    def run(self) -> int:
        if self.verify_host_flag is not None:
            normalise_verify_host(self.verify_host_flag)  # a bad flag fails first
        if self.public_ip_flag is not None:
            problem = publicip.ipv4_problem(self.public_ip_flag)
            if problem is not None:
                raise SetupError(problem)
        if self.system.euid() != 0:
            raise SetupError(ROOT_REQUIRED)
        self.load_existing()
        verify_host = self.verify_host = resolve_verify_host(self.verify_host_flag, self.config)
        self.console.say(term.style("🐦‍⬛ AIMX setup", "bold"))
        self.console.say(term.style("Self-hosted email SMTP and MCP server for AI agents.",
                                    "dim"))
        self.console.say()
        self.checklist()
        self.reentry = (self.system.service_running() and tlscert.cert_path().exists()
                        and self._dkim_files()[0].exists())
        if self.reentry:
            self.console.say("Existing aimx configuration detected. Skipping install, "
                             "proceeding to verification.")
            self.console.say()
        steps = (lambda n: self.step_port25(n, verify_host), self.step_domain, self.step_tls,
                 self.step_trust, self.step_install)
        for number, step in enumerate(steps, 1):
            try:
                step(number)
            except BaseException:
                self.fail(number)
                raise
        self.step_handoff(6)
        return 0

    def load_existing(self) -> None:
        path = paths.config_path()
        if not path.exists():
            return
        try:
            self.config = load_config(path)
            self.config_text = path.read_text(encoding="utf-8")
        except (ConfigError, OSError) as exc:
            raise SetupError(f"the existing config cannot be used: {exc}. Fix or remove it, "
                             "then re-run `sudo aimx setup`.") from exc
        self.selector = self.config.dkim_selector
        self.enable_ipv6 = self.config.enable_ipv6

    # -- step 1

    def step_port25(self, number: int, verify_host: str) -> None:
        self.begin(number)
        holder = self.system.port_holder()
        if holder is not None and not holder.is_aimx:
            raise SetupError(f"Port 25 is occupied by {holder.name}. Stop the process and run "
                             "`aimx setup` again.")
        self.console.say(f"Checking port 25 through {verify_host}")
        if holder is not None:
            self.console.say("aimx is already listening on port 25; probing it.")
        outbound, inbound, self.seen_ip = run_port_checks(self.console, self.system,
                                                          verify_host, listen=holder is None)
        if outbound:
            self.console.problem("Providers known to allow SMTP on port 25: "
                                 + ", ".join(SMTP_PROVIDERS) + ".")
        if outbound or inbound:
            raise SetupError("Port 25 preflight failed. Nothing was changed; fix the "
                             "problem above and run `sudo aimx setup` again.")
        self.complete(number)

    # -- step 2

    def _ask_domain(self) -> str:
        default = self.config.domain if self.config is not None else None
        if self.domain_arg is not None:
            domain = clean_domain(self.domain_arg)
            problem = domain_problem(domain)
            if problem is None:
                return domain
            if not self.console.interactive:
                raise SetupError(problem)
            self.console.problem(f"{term.mark('fail')} {problem}")
        elif not self.console.interactive:
            if default:
                return default
            raise SetupError("No domain entered. Setup cancelled.")
        for _ in range(MAX_DOMAIN_ATTEMPTS):
            self.console.say("Enter the domain you want to use for email")
            self.console.say("(e.g. agent.example.com)." +
                             (f" Press Enter to keep {default}." if default else ""))
            answer = self.console.ask("> ")
            text = clean_domain(answer or "")
            if not text and default:
                text = default
            if not text:
                raise SetupError("No domain entered. Setup cancelled.")
            problem = domain_problem(text)
            if problem is None:
                self.console.say(f"Domain: {text}")
                if self.console.confirm("Confirm?"):
                    return text
                continue
            self.console.problem(f"{term.mark('fail')} {problem}")
        raise SetupError("No valid domain entered. Setup cancelled.")

    def step_domain(self, number: int) -> None:
        self.begin(number)
        self.domain = self._ask_domain()
        if self.console.interactive and not self.console.confirm(
                f"Do you control the DNS records of {self.domain}?"):
            raise SetupError("Setup cancelled. You need DNS access to proceed.")
        own, ipv6 = self.system.ip_addresses()
        if own is None and not (self.public_ip_flag or self.config and self.config.public_ip):
            raise SetupError("Could not determine server IPv4 address")
        ipv6 = ipv6 if self.enable_ipv6 else None
        chosen = publicip.choose(own, flag=self.public_ip_flag,
                                 configured=self.config.public_ip if self.config else None,
                                 learn=self._seen_by_verifier, verifier=self.verify_host)
        ipv4 = chosen.address
        assert ipv4 is not None
        # The key is made now because the record below must publish it, and kept:
        # a key the operator already put in DNS must survive an aborted run.
        if not self._dkim_files()[0].exists():
            self.console.say("Generating DKIM keypair...")
            self._generate_dkim()
            self.console.say("DKIM keypair generated.")
        public = dkimkeys.local_public_b64(files=self._dkim_files())
        self.console.say()
        self.console.say(term.style("DNS", "bold"))
        if chosen.note:
            self.console.say(chosen.note[:1].upper() + chosen.note[1:] + ".")
        self.console.say("Add the following DNS records at your domain registrar:")
        self.console.say()
        records = dnscheck.server_records(self.domain, ipv4, ipv6, selector=self.selector,
                                          dkim_public_b64=public)
        for line in dnscheck.record_table(records):
            self.console.say(line)
        self.console.say()
        self.console.say(term.style(
            "The DKIM value is longer than 255 bytes; if your provider wants it split, "
            "run `aimx dkim-keygen` to print it as quoted strings.", "dim"))
        self.console.say()
        self._verify_dns(ipv4, ipv6, public)
        self.complete(number)

    def _seen_by_verifier(self) -> str:
        """The address the preflight's verifier saw this machine at (no second request)."""
        if self.seen_ip is None:
            raise publicip.LearnFailed("its answer named no address")
        return self.seen_ip

    def _dkim_files(self) -> tuple[Path, Path]:
        """The signing key's files (after a rotation, named by the selector)."""
        return dkimkeys.key_files(self.selector, self.selector)

    def _generate_dkim(self) -> None:
        try:
            dkimkeys.install_keypair(dkimkeys.new_keypair(), files=self._dkim_files())
        except OSError as exc:
            raise SetupError(f"cannot write the DKIM key to {paths.dkim_dir()}: "
                             f"{exc.strerror or exc}") from exc

    def _dns_resolvers(self) -> Sequence[str]:
        if self.system.dns_resolvers is not None:
            return self.system.dns_resolvers
        return self.config.dns_resolvers if self.config is not None else ()

    def _verify_once(self, ipv4: str, ipv6: str | None, public: str | None) -> bool:
        try:
            resolver = dnscheck.make_resolver(self._dns_resolvers())
        except Exception as exc:  # a bad dns_resolvers entry or unreadable resolv.conf
            self.console.problem(f"{term.mark('fail')} DNS resolver unusable: {exc}")
            return False
        checks = dnscheck.check_dns(resolver, self.domain, ipv4, ipv6=ipv6,
                                    enable_ipv6=self.enable_ipv6, selector=self.selector,
                                    dkim_public_b64=public)
        self.console.say("DNS Verification:")
        for line in dnscheck.format_checks(checks):
            self.console.say(line)
        self.console.say()
        if dnscheck.all_pass(checks):
            self.console.say(term.style("All DNS records verified. Your email server is ready!",
                                        "green"))
            return True
        self.console.say("Some DNS records are not yet correct.")
        self.console.say("DNS propagation can take up to 48 hours.")
        return False

    def _verify_dns(self, ipv4: str, ipv6: str | None, public: str | None) -> None:
        if not self.console.interactive:
            self._verify_once(ipv4, ipv6, public)
            self.console.say("Run `aimx doctor` to re-verify DNS later.")
            return
        while True:
            self.console.say("Press Enter to verify DNS records now.")
            self.console.say("Press q to skip and run `aimx doctor` later.")
            answer = self.console.ask(f"{term.mark('prompt')} ")
            if answer is None or answer.strip().lower() in ("q", "quit"):
                # End of input means nobody is there to press Enter again.
                self.console.say("Update your DNS records and run `aimx doctor` to "
                                 "re-verify.")
                return
            if self._verify_once(ipv4, ipv6, public):
                return

    # -- step 3

    def step_tls(self, number: int) -> None:
        self.begin(number)
        if self.reentry:
            self.skip(number, "existing install")
            return
        directory = tlscert.tls_dir()
        if tlscert.cert_path(directory).exists():
            self.console.say("TLS certificate already exists.")
        else:
            self.console.say("Generating self-signed TLS certificate...")
            try:
                tlscert.generate(self.domain, directory)
            except OSError as exc:
                raise SetupError(f"cannot write the TLS certificate to {directory}: "
                                 f"{exc.strerror or exc}") from exc
            self.console.say(f"TLS certificate generated in {directory}/")
        self.complete(number)

    # -- step 4

    def step_trust(self, number: int) -> None:
        self.begin(number)
        if self.config is not None:
            self.skip(number, "config.toml exists; trust policy kept")
            return
        if not self.console.interactive:
            self.trust, self.senders = "none", []
            self.console.warn(NO_TRUST_WARNING)
            self.complete(number)
            return
        failures = 0
        while True:
            self.console.say("Which senders do you trust to trigger hooks? Enter addresses or "
                             "globs separated by commas")
            self.console.say("(e.g. you@example.com,*@company.com).")
            self.console.say("Leave blank to disable the trust model and hooks.")
            answer = self.console.ask("> ")
            senders = split_senders(answer or "")
            if not senders:
                self.console.warn(NO_TRUST_WARNING)
                if answer is None or self.console.confirm("Leave hooks disabled?"):
                    self.trust, self.senders = "none", []
                    break
                continue
            bad = [(s, sender_problem(s)) for s in senders if sender_problem(s)]
            if bad:
                for sender, problem in bad:
                    self.console.problem(f"{term.mark('fail')} invalid sender '{sender}': "
                                         f"{problem}")
                failures += 1
                if failures >= MAX_TRUST_ATTEMPTS:
                    raise SetupError("Too many invalid trusted senders. Setup cancelled.")
                continue
            self.console.say("Trusted senders:")
            for sender in senders:
                self.console.say(f"  - {sender}")
            if self.console.confirm("Confirm?"):
                self.trust, self.senders = "verified", senders
                break
        self.complete(number)

    # -- step 5

    def _data_dir(self) -> tuple[Path, bool]:
        """(install data dir, whether it was chosen explicitly by flag or env)."""
        override = paths.data_dir_override(self.data_dir_flag)
        if override is not None:
            return Path(os.path.abspath(override)), True
        if self.config is not None:
            return self.config.data_dir, False
        return paths.DEFAULT_DATA_DIR, False

    def _write_config(self, data_dir: Path, explicit: bool) -> tuple[Config, bool]:
        path = paths.config_path()
        owner = self.system.catchall_user
        if self.config_text is None:
            text = new_config_text(self.domain, data_dir, self.trust, self.senders, owner,
                                   self.selector, self.public_ip_flag)
        else:
            text = refresh_config_text(self.config_text, self.domain,
                                       data_dir if explicit else None, owner,
                                       self.public_ip_flag)
        try:
            config = parse_config_text(text, path)
        except ConfigError as exc:
            raise SetupError(f"the updated config would be invalid: {exc}") from exc
        changed = text != self.config_text
        if changed:
            try:
                write_config_text(path, text)
            except ConfigEditError as exc:
                raise SetupError(exc.reason) from exc
            self.console.say(f"Wrote {path}")
        else:
            self.console.say(f"{path} is up to date.")
        return config, changed

    def _prepare_mailboxes(self, config: Config, data_dir: Path) -> None:
        catchall_owners = {CATCHALL_OWNER, self.system.catchall_user}
        catchall = config.catchall()
        if catchall is not None and catchall.owner in catchall_owners:
            try:
                if self.system.ensure_system_user(catchall.owner, self.system.catchall_home):
                    self.console.say(f"Created system user {catchall.owner}")
            except (ServiceError, OSError) as exc:
                raise SetupError(str(exc)) from exc
        ensure_data_dir(data_dir)
        for mailbox in config.mailboxes.values():
            ids = owner_ids(mailbox.owner)
            if ids is None:
                self.console.warn(f"{term.mark('warn')} owner '{mailbox.owner}' of mailbox "
                                  f"'{mailbox.name}' does not resolve; create the user, then "
                                  "re-run setup to fix its directories.")
            for folder in ("inbox", "sent"):
                path = ensure_mailbox_dir(data_dir, folder, mailbox.name, ids)
                try:
                    if ids is not None:
                        os.chown(path, *ids, follow_symlinks=False)
                    os.chmod(path, 0o700)
                except OSError as exc:
                    raise SetupError(f"failed to chown {path}: {exc.strerror or exc}") from exc

    def step_install(self, number: int) -> None:
        self.begin(number)
        data_dir, explicit = self._data_dir()
        config_dir = paths.config_dir()
        config_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(config_dir, 0o755)
        config, changed = self._write_config(data_dir, explicit)
        self._prepare_mailboxes(config, data_dir)
        if self._dkim_files()[0].exists():
            self.console.say("DKIM keypair already exists.")
        else:
            self.console.say("Generating DKIM keypair...")
            self._generate_dkim()
            self.console.say("DKIM keypair generated.")
        write_readme(data_dir)
        if self.reentry:
            if changed and self.system.reload_service():
                self.console.say("Asked the running daemon to reload config.toml.")
            self.skip(number, "aimx is already installed and running")
            return
        self._install_service(data_dir)
        self.complete(number)

    def _serve_args(self) -> list[str]:
        extra = []
        host, port = self.system.smtp_host, self.system.smtp_port
        if (host, port) != ("0.0.0.0", 25):
            extra += ["--bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        if not tlscert.is_default_dir():
            extra += ["--tls-cert", str(tlscert.cert_path()), "--tls-key",
                      str(tlscert.key_path())]
        return extra

    def _install_service(self, data_dir: Path) -> None:
        init = self.system.init_system()
        if init is None:
            raise SetupError("No supported init system found (systemd or OpenRC). Start the "
                             f"daemon yourself: `aimx serve --data-dir {data_dir}`")
        try:
            exe = self.system.executable()
            if init == SYSTEMD:
                text = render_systemd_unit(exe, data_dir, serve_args=self._serve_args())
            else:
                text = render_openrc_script(exe, data_dir, serve_args=self._serve_args())
            self.console.say("Starting aimx serve...")
            target = self.system.install_service(init, text)
        except (ServiceError, OSError) as exc:
            raise SetupError(f"service install failed: {exc}") from exc
        self.console.say(f"  Installed {target}")
        self.console.out.write("  Waiting for aimx serve to bind port 25... ")
        self.console.out.flush()
        if not self.system.wait_for_port():
            self.console.say(term.mark("fail"))
            logs = "sudo journalctl -u aimx" if init == SYSTEMD else (
                "/var/log/aimx/aimx.log (or `sudo aimx logs`)")
            raise SetupError(
                f"aimx serve did not bind port 25 within {self.system.bind_wait_seconds:g} "
                f"seconds. Check {logs}, then re-run `sudo aimx setup`.")
        self.console.say(term.mark("ok"))
        self.console.say("`aimx serve` is running.")
        if init == OPENRC:
            self.console.say("Enabled at boot with `rc-update add aimx default`.")

    # -- step 6

    def step_handoff(self, number: int) -> None:
        self.console.say(term.style("🐦‍⬛ AIMX setup — complete", "bold"))
        self.console.say()
        self.states[number - 1] = "handoff"
        self.console.say(f"{self._mark('handoff')} Step {number}: {STEPS[number - 1]}")
        self.console.say("aimx speaks MCP to these agents:")
        from aimx.ops.agents import AGENTS  # the registry `aimx agents setup` works from

        for name in (agent.display for agent in AGENTS):
            self.console.say(f"  • {name}" if term.color_enabled() else f"  - {name}")
        self.console.say("Wire them up as the regular user the agent runs as (not root):")
        self.console.say()
        command = f"  {term.mark('prompt')} aimx agents setup"
        width = term.visible_width(command) + 4
        if term.color_enabled():
            top, bottom, side = "┌" + "─" * width + "┐", "└" + "─" * width + "┘", "│"
        else:
            top = bottom = "+" + "-" * width + "+"
            side = "|"
        self.console.say(f"  {top}")
        self.console.say(f"  {side}{term.pad(command, width)}{side}")
        self.console.say(f"  {bottom}")
        self.console.say()
        self.checklist()
        self.console.say(f"{self._mark('done')} AIMX has been set up successfully.")
        self.console.say(f"AIMX is now running at @{self.domain}.")
        self.console.say("Once MCP is wired, try:")
        self.console.say(f'  claude -p "Set up agent@{self.domain} and respond to me via email '
                         'when you are done"')


def run_setup(domain: str | None = None, *, verify_host: str | None = None,
              data_dir: str | None = None, public_ip: str | None = None,
              system: System | None = None, console: Console | None = None) -> int:
    """Run the wizard; raises ``SetupError`` with the operator message on failure."""
    wizard = Wizard(system=system or System(), console=console or Console(),
                    domain_arg=domain, verify_host_flag=verify_host, data_dir_flag=data_dir,
                    public_ip_flag=public_ip)
    return wizard.run()


__all__ = [
    "Wizard", "domain_problem", "new_config_text", "refresh_config_text", "run_setup",
    "sender_problem", "split_senders",
]
