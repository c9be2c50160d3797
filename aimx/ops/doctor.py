"""``aimx doctor``: one report on configuration, service, storage, ownership and DNS.

The report is built as text lines plus a list of findings (checks with an id
and a severity), so the CLI only prints and picks the exit code. Everything
that asks the machine something it cannot fake in a temp dir (is the service
running, what are this host's addresses, what does the daemon answer to
VERSION, which DNS resolver to use) comes through ``Probes``, which tests
replace.

Blocking (stat calls, DNS, one socket call); no Twisted.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from aimx import paths, term
from aimx.config import CATCHALL_OWNER, Config, Mailbox, owner_ids
from aimx.ops import dkimkeys, dnscheck, publicip
from aimx.ops.portcheck import learn_public_address, resolve_verify_host
from aimx.smtp import dnsresolve
from aimx.storage.index import count_emails
from aimx.storage.layout import FOLDERS, mailbox_dir, open_mailbox_dir

LABEL_WIDTH = 18
MAILBOX_MODE = 0o700
LEGACY_HOOK_USER = "aimx-hook"

FAIL, WARN, INFO = "fail", "warn", "info"
_BADGES = {FAIL: ("FAIL", "red"), WARN: ("WARN", "yellow"), INFO: ("INFO", "dim")}

ORPHANS_ONLY_MESSAGE = (
    "aimx doctor found mailboxes with unresolvable owners (see Ownership section)"
)
FAILING_MESSAGE = "aimx doctor found failing checks (see Checks section above)"


@attrs.frozen
class Finding:
    """One check result: ``id`` (e.g. ``MAILBOX-DIR-MISSING``), severity, text and a fix."""

    id: str
    severity: str
    message: str
    fix: str | None = None


class ProbeError(Exception):
    """The daemon answered VERSION with something other than a version."""


def _default_service_running() -> bool:
    from aimx.ops.initsystem import real_system

    return real_system().service_running()


def _default_addresses() -> tuple[str | None, str | None]:
    from aimx.ops.initsystem import real_system

    return real_system().ip_addresses()


def _default_server_version(socket_path: Path) -> tuple[str, str]:
    """(tag, git hash) from the daemon's VERSION; ``DaemonDown`` and friends escape."""
    from aimx.daemon.client import Client
    from aimx.daemon.protocol import Version

    reply = Client(socket_path, timeout=5).call(Version)
    return reply["tag"], reply["git_hash"]


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@attrs.frozen
class Probes:
    """What the report asks the machine; each is replaceable for tests."""

    service_running: Callable[[], bool] = _default_service_running
    addresses: Callable[[], tuple[str | None, str | None]] = _default_addresses
    server_version: Callable[[Path], tuple[str, str]] = _default_server_version
    resolver: Callable[[Sequence[str]], object] = dnscheck.make_resolver
    socket_path: Callable[[], Path] = paths.socket_path
    user_exists: Callable[[str], bool] = _user_exists
    # Behind NAT: the address the verifier (a URL) sees this machine at.
    public_address: Callable[[str], str] = learn_public_address


@attrs.define
class Report:
    """The printed lines and what decides the exit code."""

    lines: list[str] = attrs.field(factory=list)
    findings: list[Finding] = attrs.field(factory=list)
    orphan_owners: list[str] = attrs.field(factory=list)

    def count(self, severity: str) -> int:
        return sum(1 for finding in self.findings if finding.severity == severity)

    @property
    def failure(self) -> str | None:
        """The ``Error:`` text when doctor must exit 1, else ``None``."""
        if self.count(FAIL):
            return FAILING_MESSAGE
        if self.orphan_owners:
            return ORPHANS_ONLY_MESSAGE
        return None


# --------------------------------------------------------------------------- formatting

def field(label: str, value: str) -> str:
    """``  Label:            value`` with the value at column 18 of the section body."""
    return "  " + term.pad(f"{label}:", LABEL_WIDTH) + value


def heading(text: str) -> str:
    return term.style(text, "bold")


def framed_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Sequence[bool]) -> list[str]:
    """A ``+---+`` framed table; ``right`` marks right-aligned (numeric) columns."""
    widths = [max(term.visible_width(row[i]) for row in [header, *rows])
              for i in range(len(header))]
    rule = "+" + "+".join("-" * (width + 2) for width in widths) + "+"

    def line(cells: Sequence[str], align: bool) -> str:
        parts = []
        for cell, width, is_right in zip(cells, widths, right, strict=True):
            gap = " " * (width - term.visible_width(cell))
            parts.append(f" {gap}{cell} " if align and is_right else f" {cell}{gap} ")
        return "|" + "|".join(parts) + "|"

    out = [rule, line(header, False), rule]
    out += [line(row, True) for row in rows]
    out.append(rule)
    return out


def format_finding(finding: Finding) -> list[str]:
    word, colour = _BADGES[finding.severity]
    lines = [f"  [{term.style(word, colour)}] {finding.id}: {finding.message}"]
    if finding.fix:
        lines.append("         " + term.style(f"→ {finding.fix}", "dim"))
    return lines


# --------------------------------------------------------------------------- storage checks

def _lstat(path: Path) -> os.stat_result | None:
    """``lstat`` of ``path``; ``None`` when missing (``PermissionError`` escapes)."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def running_as() -> str:
    """``<user> (uid N)`` of this process, for "not checked" findings."""
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def not_checked(what: str, why: str) -> Finding:
    """What this run could not look at and why; a note, since nothing is known to be wrong."""
    return Finding("NOT-CHECKED", INFO, f"{what} not checked: {why}",
                   "run `sudo aimx doctor` for the full report")


def readable_counts(path: Path) -> tuple[int, int] | None:
    """(total, unread) of a mailbox dir; ``None`` when this user may not open it.

    ``count_emails`` reads a dir it cannot open as empty, which would
    report another user's mailbox as holding no mail.
    """
    try:
        fd = open_mailbox_dir(path)
    except PermissionError:
        return None
    except OSError:
        pass  # missing: counted as empty below
    else:
        os.close(fd)
    return count_emails(path)


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_mailbox_dirs(config: Config, mailbox: Mailbox) -> list[Finding]:
    """Existence, type, owner, group and mode of ``inbox/<n>`` and ``sent/<n>``.

    The catch-all never sends, so its ``sent/`` dir may be missing; when it
    exists it is checked like any other.
    """
    findings: list[Finding] = []
    dirs = [mailbox_dir(config.data_dir, folder, mailbox.name) for folder in FOLDERS]
    try:
        states = [_lstat(path) for path in dirs]
    except PermissionError as exc:
        return [not_checked(f"the directories of mailbox '{mailbox.name}'",
                            f"{exc.filename} is not accessible to {running_as()}")]
    ids = owner_ids(mailbox.owner)
    catchall = mailbox.is_catchall(config.domain)
    if all(state is None for state in states):
        if catchall:
            fix = "run `sudo aimx setup` again; it re-creates the catchall directories"
        else:
            fix = (f"remove the entry with `sudo aimx mailboxes delete {mailbox.name}` if it "
                   "is unused; otherwise the next delivery re-creates its inbox")
        return [Finding(
            "ORPHAN-CONFIG", WARN,
            f"mailbox '{mailbox.name}' is configured but neither {dirs[0]} nor {dirs[1]} exists",
            fix,
        )]
    for folder, path, state in zip(FOLDERS, dirs, states, strict=True):
        if state is None and catchall and folder == "sent":
            continue
        if state is None:
            owner_group = (f"-o {mailbox.owner} -g {_group_name(ids[1])} " if ids else "")
            findings.append(Finding(
                "MAILBOX-DIR-MISSING", FAIL, f"{path} is missing (mailbox '{mailbox.name}')",
                f"sudo install -d -m 0700 {owner_group}{path}",
            ))
            continue
        if not stat.S_ISDIR(state.st_mode):
            kind = "a symlink" if stat.S_ISLNK(state.st_mode) else "not a directory"
            findings.append(Finding(
                "MAILBOX-DIR-NOT-DIR", FAIL, f"{path} is {kind} (mailbox '{mailbox.name}')",
                f"move {path} out of the way and re-create it as a directory",
            ))
            continue
        if ids is not None:
            uid, gid = ids
            if state.st_uid != uid:
                findings.append(Finding(
                    "MAILBOX-DIR-OWNER-DRIFT", FAIL,
                    f"{path} is owned by uid {state.st_uid}, expected {mailbox.owner} "
                    f"(uid {uid})",
                    f"sudo chown -R {uid}:{gid} {path}",
                ))
            elif state.st_gid != gid:
                findings.append(Finding(
                    "MAILBOX-DIR-GROUP-DRIFT", WARN,
                    f"{path} has group gid {state.st_gid}, expected {_group_name(gid)} "
                    f"(gid {gid})",
                    f"sudo chgrp -R {gid} {path}",
                ))
        mode = stat.S_IMODE(state.st_mode)
        if mode != MAILBOX_MODE:
            findings.append(Finding(
                "MAILBOX-DIR-MODE-DRIFT", WARN,
                f"{path} has mode {mode:04o}, expected 0700",
                f"sudo chmod 0700 {path}",
            ))
    return findings


def check_orphan_storage(config: Config) -> list[Finding]:
    """Mailbox dirs on disk that no config entry claims."""
    findings = []
    for folder in FOLDERS:
        base = Path(config.data_dir) / folder
        try:
            names = sorted(entry.name for entry in os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError:
            findings.append(not_checked(f"unclaimed directories under {base}",
                                        f"it cannot be listed by {running_as()}"))
            continue
        for name in names:
            if name.startswith(".") or name in config.mailboxes:
                continue
            path = base / name
            findings.append(Finding(
                "ORPHAN-STORAGE", WARN,
                f"{path} belongs to no configured mailbox",
                f"register it with `sudo aimx mailboxes create {name} --owner <user>`, "
                f"or archive and remove {path}",
            ))
    return findings


def check_dkim_key_files(config: Config) -> list[Finding]:
    """Every private DKIM key: a regular file, 0600 and, when run as root, owned by root."""
    findings = []
    for name in dkimkeys.selectors(config.dkim_selector):
        path = dkimkeys.key_files(name, config.dkim_selector)[0]
        try:
            state = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(state.st_mode):
            findings.append(Finding(
                "DKIM-KEY-NOT-FILE", FAIL, f"{path} (selector '{name}') is not a regular file",
                f"replace it with the key file itself: `sudo aimx dkim-keygen --selector {name} "
                "--force` makes a new one"))
            continue
        mode = stat.S_IMODE(state.st_mode)
        if mode & 0o077:
            findings.append(Finding(
                "DKIM-KEY-MODE", FAIL,
                f"{path} (selector '{name}') has mode {mode:04o}; a private key must be 0600",
                f"sudo chmod 0600 {path}"))
        if os.geteuid() == 0 and state.st_uid != 0:
            findings.append(Finding(
                "DKIM-KEY-OWNER", FAIL,
                f"{path} (selector '{name}') is owned by uid {state.st_uid}, not root",
                f"sudo chown root:root {path}"))
    return findings


def check_load_warnings(config: Config) -> list[Finding]:
    """The loader's warnings as findings (they are also logged by the daemon)."""
    findings = []
    for warning in config.warnings:
        if "does not resolve via getpwnam" in warning:
            findings.append(Finding("ORPHAN-MAILBOX-OWNER", WARN, warning))
        elif "allow_root_catchall=true" in warning:
            findings.append(Finding("ROOT-CATCHALL-ACCEPTED", INFO, warning))
        else:
            findings.append(Finding("CONFIG-WARNING", WARN, warning))
    return findings


def ownership(config: Config, probes: Probes, report: Report) -> list[str]:
    """The Ownership lines; records orphan owners and their findings in ``report``."""
    lines = []
    named = [mb for mb in config.mailboxes.values() if not mb.is_catchall(config.domain)]
    if not named:
        return ["  " + term.style("(no non-catchall mailboxes)", "dim")]
    width = max(8, *(len(mb.name) for mb in named))
    for mailbox in named:
        ids = owner_ids(mailbox.owner)
        lead = f"  {mailbox.name:<{width}}  owner={mailbox.owner}  "
        if ids is None:
            lines.append(lead + f"{term.mark('fail')}  user not found")
            report.orphan_owners.append(mailbox.name)
            report.findings.append(Finding(
                "MAILBOX-OWNER-ORPHAN", WARN,
                f"mailbox '{mailbox.name}' is owned by '{mailbox.owner}', which is not a user "
                "on this host (mail is stored, hooks cannot run)",
                f"create the user (`sudo useradd -m {mailbox.owner}`) or change the owner "
                "in config.toml",
            ))
        else:
            lines.append(lead + f"{term.mark('ok')}  uid={ids[0]}")
    return lines


def other_checks(config: Config, probes: Probes) -> list[Finding]:
    findings = []
    catchall = config.catchall()
    if catchall is not None and catchall.owner == CATCHALL_OWNER \
            and not probes.user_exists(CATCHALL_OWNER):
        findings.append(Finding(
            "CATCHALL-USER-MISSING", FAIL,
            f"catchall mailbox '{catchall.name}' is owned by '{CATCHALL_OWNER}', but that "
            "system user does not exist",
            "run `sudo aimx setup` again; it creates the user",
        ))
    if probes.user_exists(LEGACY_HOOK_USER):
        findings.append(Finding(
            "LEGACY-AIMX-HOOK-USER", INFO,
            f"the system user '{LEGACY_HOOK_USER}' from older releases still exists; hooks "
            "now run as each mailbox's owner",
            f"remove it with `sudo userdel {LEGACY_HOOK_USER}` if nothing else uses it",
        ))
    return findings


# --------------------------------------------------------------------------- sections

def signing_key_files(config: Config) -> tuple[Path, Path]:
    return dkimkeys.key_files(config.dkim_selector, config.dkim_selector)


def configuration_section(config: Config) -> list[str]:
    present = signing_key_files(config)[0].exists()
    dkim = "present" if present else "MISSING - run `aimx dkim-keygen`"
    senders = ", ".join(config.trusted_senders) if config.trusted_senders else "(none)"
    lines = [
        heading("Configuration"),
        field("Domain", config.domain),
        field("Config file", str(config.path)),
        field("Data directory", str(config.data_dir)),
        field("DKIM selector", config.dkim_selector),
        field("DKIM key", dkim),
    ]
    others = [name for name in dkimkeys.selectors(config.dkim_selector)
              if name != config.dkim_selector]
    if others:
        lines.append(field("DKIM keys", f"{config.dkim_selector} (signing), "
                                        + ", ".join(others)))
    return lines + [
        field("Global trust", config.trust),
        field("Trusted senders", senders),
    ]


def other_selector_checks(config: Config, resolver: object) -> list[dnscheck.DnsCheck]:
    """One DNS line per key that does not sign (yet, or any more)."""
    checks = []
    for name in dkimkeys.selectors(config.dkim_selector):
        if name == config.dkim_selector:
            continue
        public = dkimkeys.local_public_b64(files=dkimkeys.key_files(name, config.dkim_selector))
        checks.append(dnscheck.check_dkim_key(resolver, config.domain, name, public,
                                              label=f"DKIM {name} (not signing)"))
    return checks


def service_section(probes: Probes) -> list[str]:
    from aimx.daemon.client import ConnectFailed, DaemonDown, MalformedReply
    from aimx.daemon.protocol import ApiError
    from aimx.version import version_info

    running = probes.service_running()
    info = version_info()
    socket_path = probes.socket_path()
    if not running and not socket_path.exists():
        server = term.style("(daemon not running)", "dim")
    else:
        try:
            tag, git_hash = probes.server_version(socket_path)
            server = f"{tag} ({git_hash})"
            # A daemon that answers is running, whether or not a service manager
            # started it (`aimx serve` by hand, `make run`, a second instance).
            running = True
        except DaemonDown:
            server = term.style(f"(daemon not reachable on {socket_path})", "dim")
        except (ApiError, ConnectFailed, MalformedReply, ProbeError, OSError) as exc:
            server = term.style(f"(daemon probe failed: {exc})", "dim")
    state = term.style("running", "green") if running else term.style("not running", "yellow")
    return [
        heading("Service"),
        field("SMTP server", state),
        field("Client version", f"{info.tag} ({info.git_hash})"),
        field("Server version", server),
    ]


def mailboxes_section(config: Config, report: Report) -> list[str]:
    """The counts table; a mailbox this user may not read shows ``?`` and is a NOT-CHECKED note."""
    rows = []
    messages = unread_total = 0
    unreadable = []
    for mailbox in config.mailboxes.values():
        counts = readable_counts(mailbox_dir(config.data_dir, "inbox", mailbox.name))
        if counts is None:
            unreadable.append(mailbox.name)
            total = unread = "?"
        else:
            messages += counts[0]
            unread_total += counts[1]
            total, unread = str(counts[0]), str(counts[1])
        rows.append([mailbox.name, mailbox.address, total, unread,
                     config.effective_trust(mailbox), str(len(config.effective_senders(mailbox))),
                     str(len(mailbox.hooks))])
    summary = f"{len(rows)} ({messages} messages, {unread_total} unread"
    if unreadable:
        summary += f"; {len(unreadable)} not readable"
        listed = ", ".join(f"'{name}'" for name in unreadable)
        report.findings.append(not_checked(
            f"message counts of mailbox{'es' if len(unreadable) > 1 else ''} {listed}",
            f"mailbox directories are readable by their owners only; this run is "
            f"{running_as()}"))
    lines = [heading("Mailboxes"), field("Total", summary + ")")]
    if rows:
        header = ["Mailbox", "Address", "Total", "Unread", "Trust", "Senders", "Hooks"]
        right = [False, False, True, True, False, True, True]
        lines += ["  " + line for line in framed_table(header, rows, right)]
    return lines


def dns_section(config: Config, probes: Probes, public_ip: str | None = None) -> list[str]:
    lines = [heading("DNS")]
    domain = config.domain.lower().rstrip(".")
    if domain == "localhost" or domain.endswith(".localhost"):
        # RFC 6761: such names never resolve on the internet (the dev instance uses one).
        return lines + [f"  skipped - {config.domain} is a local-only name; no DNS records "
                        "can be published for it"]
    own, ipv6 = probes.addresses()
    verify_host = resolve_verify_host(None, config)
    chosen = publicip.choose(own, flag=public_ip, configured=config.public_ip,
                             learn=lambda: probes.public_address(verify_host),
                             verifier=verify_host)
    ipv4 = chosen.address
    if ipv4 is None:
        return lines + ["  skipped - could not determine server IP"]
    if chosen.note:
        lines.append("  " + chosen.note)
    local_key = dkimkeys.local_public_b64(files=signing_key_files(config))
    try:
        resolver = probes.resolver(config.dns_resolvers)
    except dnsresolve.DnsError as exc:
        return lines + [f"  skipped - {exc}"]
    checks = dnscheck.check_dns(resolver, config.domain, ipv4, ipv6=ipv6,
                                enable_ipv6=config.enable_ipv6, selector=config.dkim_selector,
                                dkim_public_b64=local_key)
    after_dkim = next(i for i, check in enumerate(checks) if check.is_dkim) + 1
    checks[after_dkim:after_dkim] = other_selector_checks(config, resolver)
    return lines + dnscheck.format_checks(checks, dkim_add_hint=local_key is not None)


def logs_section() -> list[str]:
    return [heading("Logs"), "  " + term.style(
        "Run `aimx logs` for recent log lines, or `aimx logs --follow` to watch them.", "dim")]


def checks_section(report: Report) -> list[str]:
    lines = [heading("Checks")]
    if not report.findings:
        return lines + ["  " + term.style("All checks passed.", "green")]
    order = {FAIL: 0, WARN: 1, INFO: 2}
    for finding in sorted(report.findings, key=lambda f: order[f.severity]):
        lines += format_finding(finding)
    lines.append(f"  Summary: {report.count(FAIL)} fail, {report.count(WARN)} warn, "
                 f"{report.count(INFO)} info")
    return lines


def unreadable_config_report(config_path: Path, probes: Probes | None = None) -> Report:
    """What a user who may not read ``config.toml`` can still learn: the Service section."""
    probes = probes or Probes()
    report = Report()
    report.findings.append(not_checked(
        "configuration, mailboxes, ownership and DNS",
        f"{config_path} is not readable by {running_as()}"))
    report.lines = [*service_section(probes), "", *checks_section(report)]
    return report


def build_report(config: Config, probes: Probes | None = None,
                 public_ip: str | None = None) -> Report:
    """Run every section and check; nothing is printed here."""
    probes = probes or Probes()
    report = Report()
    owner_lines = ownership(config, probes, report)
    for mailbox in config.mailboxes.values():
        report.findings += check_mailbox_dirs(config, mailbox)
    report.findings += check_orphan_storage(config)
    report.findings += check_dkim_key_files(config)
    report.findings += other_checks(config, probes)
    report.findings += check_load_warnings(config)
    sections = [
        configuration_section(config),
        service_section(probes),
        mailboxes_section(config, report),
        [heading("Ownership"), *owner_lines],
        dns_section(config, probes, public_ip),
        logs_section(),
        checks_section(report),
    ]
    for index, section in enumerate(sections):
        if index:
            report.lines.append("")
        report.lines += section
    return report
