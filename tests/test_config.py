"""Loading and validating config.toml: every spec 40 §2.1 rule with its exact text."""

from __future__ import annotations

import logging
import pwd
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aimx.config import (
    DEFAULT_SIGNATURE,
    Config,
    ConfigError,
    Hook,
    Mailbox,
    derived_hook_name,
    is_valid_username,
    load_config,
    log_warnings,
    owner_ids,
    parse_config_text,
    parse_resolver,
    validate_mailbox_name,
)

# A real, unprivileged account of this machine, so "owner resolves" needs no root.
EXISTING_USER = next(
    entry.pw_name for entry in pwd.getpwall()
    if entry.pw_uid != 0 and is_valid_username(entry.pw_name)
)
ORPHAN = "aimxt-no-such-user"

HEAD = 'domain = "test.com"\n'
CATCHALL = '[mailboxes.catchall]\naddress = "*@test.com"\nowner = "aimx-catchall"\n'


def mailbox(name: str, extra: str = "", owner: str | None = None) -> str:
    owner = owner or EXISTING_USER
    key = name if re.fullmatch(r"[a-z0-9_-]+", name) else f'"{name}"'
    return f'\n[mailboxes.{key}]\naddress = "{name}@test.com"\nowner = "{owner}"\n{extra}'


def hook(body: str, mailbox_name: str = "alice") -> str:
    return f"\n[[mailboxes.{mailbox_name}.hooks]]\n{body}\n"


ECHO = 'event = "on_receive"\ncmd = ["/bin/echo", "hi"]'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return caught.value.message


# --------------------------------------------------------------------------- happy paths

def test_minimal_config_takes_the_documented_defaults(tmp_path):
    config = load_config(write(tmp_path, HEAD))
    assert config.domain == "test.com"
    assert config.path == tmp_path / "config.toml"
    assert config.data_dir == Path("/var/lib/aimx")
    assert config.dkim_selector == "aimx"
    assert config.trust == "none"
    assert config.trusted_senders == ()
    assert dict(config.mailboxes) == {}
    assert config.verify_host is None
    assert config.enable_ipv6 is False
    assert config.effective_signature == "Sent from AIMX.  \nhttps://aimx.email"
    assert config.release_manifest_url is None
    assert config.dns_resolvers == ()
    assert (config.max_mailboxes_per_user, config.socket_max_connections,
            config.socket_max_connections_per_user) == (10, 1024, 64)
    assert config.warnings == ()


def test_limits_are_read_and_checked(tmp_path):
    text = HEAD + ("max_mailboxes_per_user = 0\nsocket_max_connections = 5\n"
                   "socket_max_connections_per_user = 2\n")
    config = load_config(write(tmp_path, text))
    assert (config.max_mailboxes_per_user, config.socket_max_connections,
            config.socket_max_connections_per_user) == (0, 5, 2)
    assert load_error(tmp_path, HEAD + "socket_max_connections_per_user = 0\n") == (
        "invalid socket_max_connections_per_user = 0: must be at least 1")
    assert load_error(tmp_path, HEAD + "max_mailboxes_per_user = -1\n") == (
        "invalid max_mailboxes_per_user = -1: must be at least 0")
    assert load_error(tmp_path, HEAD + 'socket_max_connections = "9"\n') == (
        "invalid type for 'socket_max_connections' in top-level table: expected an integer, "
        "found string")


def test_full_config_loads_every_field_in_file_order(tmp_path):
    text = (
        'domain = "test.com"\ndata_dir = "/srv/mail"\ndkim_selector = "s2"\n'
        'trust = "verified"\ntrusted_senders = ["*@Example.COM"]\n'
        'verify_host = "https://verify.test"\nenable_ipv6 = true\nsignature = ""\n'
        'dns_resolvers = ["127.0.0.1:5353", "[::1]:53", "9.9.9.9"]\n'
        + mailbox("zed", 'trust = "none"\ntrusted_senders = []\n')
        + mailbox("alice")
        + hook('name = "notify"\nevent = "on_receive"\ncmd = ["/bin/echo", "hi"]\n'
               "fire_on_untrusted = true\ntimeout_secs = 600")
        + hook('event = "after_send"\ncmd = ["/bin/true"]')
        + "\n" + CATCHALL
        + '\n[upgrade]\nrelease_manifest_url = "https://releases.test/m.json"\n'
    )
    config = load_config(write(tmp_path, text))
    assert list(config.mailboxes) == ["zed", "alice", "catchall"]
    assert config.data_dir == Path("/srv/mail")
    assert config.dkim_selector == "s2"
    assert config.trust == "verified"
    assert config.trusted_senders == ("*@example.com",)  # D9: case-insensitive globs
    assert config.verify_host == "https://verify.test"
    assert config.enable_ipv6 is True
    assert config.effective_signature == ""
    assert config.dns_resolvers == ("127.0.0.1:5353", "[::1]:53", "9.9.9.9")
    assert config.resolver_addresses() == (("127.0.0.1", 5353), ("::1", 53), ("9.9.9.9", 53))
    assert config.release_manifest_url == "https://releases.test/m.json"
    alice = config.mailbox("alice")
    assert alice.hooks == (
        Hook("on_receive", ("/bin/echo", "hi"), name="notify", fire_on_untrusted=True,
             timeout_secs=600),
        Hook("after_send", ("/bin/true",)),
    )
    assert alice.hooks[1].timeout_secs == 60 and alice.hooks[1].type == "cmd"
    assert config.mailbox("nope") is None
    with pytest.raises(TypeError):
        config.mailboxes["evil"] = alice  # type: ignore[index]


def test_data_dir_override_replaces_the_configured_dir(tmp_path):
    path = write(tmp_path, HEAD + 'data_dir = "/srv/mail"\n')
    assert load_config(path, data_dir_override=tmp_path / "d").data_dir == tmp_path / "d"
    config = load_config(path)
    assert config.with_data_dir("/x").data_dir == Path("/x")
    assert config.data_dir == Path("/srv/mail")


def test_default_path_follows_aimx_config_dir(instance_dirs):
    (instance_dirs["config"] / "config.toml").write_text('domain = "env.test"\n')
    assert load_config().domain == "env.test"


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert str(caught.value) == (
        f"Config file not found at {missing}. Run 'sudo aimx setup' first"
    )


def test_syntax_error_names_the_file(tmp_path):
    message = load_error(tmp_path, 'domain = "test.com"\ntrust = \n')
    assert message.startswith(f"failed to parse {tmp_path / 'config.toml'}: ")


@pytest.mark.parametrize(("domain", "why"), [
    ("", "the domain is empty"),
    ("not a domain", "a space is not allowed in a host name"),
    ("a..b", "a host name cannot have an empty label"),
    ("-mail.example.com", "label '-mail' starts or ends with a hyphen"),
    ("mail.example.com.", "a host name cannot have an empty label"),
])
def test_a_domain_that_is_not_a_host_name_stops_the_daemon_saying_so(tmp_path, domain, why):
    """Checked before anything else about the mailboxes, whose errors would mislead."""
    (tmp_path / "config.toml").write_text(
        f'domain = "{domain}"\n\n[mailboxes.catchall]\naddress = "*@{domain}"\n'
        'owner = "root"\n')
    env = {"PATH": "/usr/bin:/bin", "AIMX_CONFIG_DIR": str(tmp_path),
           "AIMX_DATA_DIR": str(tmp_path / "data"), "AIMX_RUNTIME_DIR": str(tmp_path)}
    for argv in (["serve", "--bind", "127.0.0.1:1", "--no-tls"], ["doctor"]):
        done = subprocess.run([sys.executable, "-m", "aimx.cli.main", *argv], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        assert f"invalid domain '{domain}': {why}" in done.stderr
        assert "allow_root_catchall" not in done.stderr


@pytest.mark.parametrize("domain", ["agent.example.com", "aimx.localhost", "localhost",
                                    "xn--bcher-kva.example", "bücher.example", "MAIL.Example.COM"])
def test_host_names_are_accepted_as_the_domain(tmp_path, domain):
    assert load_config(write(tmp_path, f'domain = "{domain}"\n')).domain == domain


# --------------------------------------------------------------------------- step 2: legacy

TEMPLATE_TEXT = (
    "[[hook_template]] blocks are not supported; template hooks were removed. "
    "See book/hooks.md for the supported raw-cmd schema"
)
LEGACY_ON_RECEIVE = (
    "mailbox 'alice' uses the legacy `on_receive` schema; migrate to "
    '`[[mailboxes.alice.hooks]]` with `event = "on_receive"`'
)
LEGACY_MATCH = (
    "mailbox 'alice' uses the legacy `on_receive.match` schema; migrate to "
    '`[[mailboxes.alice.hooks]]` with `event = "on_receive"`'
)
LEGACY_KEYS = {
    "run_as": "hook sets `run_as`; the field was removed — hooks now run as the mailbox's "
              "`owner`",
    "origin": "hook sets `origin`; the field was removed",
    "dangerously_support_untrusted": "hook sets `dangerously_support_untrusted`; the field was "
                                     "renamed to `fire_on_untrusted`",
    "template": "hook sets `template`; template hooks were removed. See book/hooks.md for the "
                "supported raw-cmd schema",
    "params": "hook sets `params`; template hooks were removed. See book/hooks.md for the "
              "supported raw-cmd schema",
}


@pytest.mark.parametrize("block", [
    '[[hook_template]]\nname = "x"\n',
    '[[hook_template.webhook]]\nname = "x"\n',
])
def test_hook_template_blocks_are_refused(tmp_path, block):
    assert load_error(tmp_path, HEAD + block) == TEMPLATE_TEXT


def test_legacy_on_receive_blocks_are_refused(tmp_path):
    legacy = '[[mailboxes.alice.on_receive]]\ncmd = "echo"\n'
    assert load_error(tmp_path, HEAD + mailbox("alice") + legacy) == LEGACY_ON_RECEIVE
    match = '[mailboxes.alice.on_receive.match]\nfrom = "*"\n'
    assert load_error(tmp_path, HEAD + mailbox("alice") + match) == LEGACY_MATCH


@pytest.mark.parametrize("key", sorted(LEGACY_KEYS))
def test_legacy_hook_keys_are_named(tmp_path, key):
    text = HEAD + mailbox("alice") + hook(f'{ECHO}\n{key} = "x"')
    assert load_error(tmp_path, text) == LEGACY_KEYS[key]


def test_legacy_key_in_an_inline_hook_gets_the_same_text(tmp_path):
    text = HEAD + mailbox(
        "alice", 'hooks = [{event = "on_receive", cmd = ["/bin/x"], run_as = "bob"}]\n'
    )
    assert load_error(tmp_path, text) == LEGACY_KEYS["run_as"]


def test_legacy_scan_runs_before_the_syntax_check(tmp_path):
    text = HEAD + "[[hook_template]]\nbroken = \n"
    assert load_error(tmp_path, text) == TEMPLATE_TEXT


def test_legacy_lookalikes_inside_strings_are_not_legacy(tmp_path):
    text = HEAD + 'signature = """\n[[hook_template]]\nrun_as = 1\n"""\n' + mailbox(
        "alice", 'hooks = [\n  { event = "on_receive", cmd = ["/bin/x"] },\n]\n'
    )
    config = load_config(write(tmp_path, text))
    assert config.effective_signature == "[[hook_template]]\nrun_as = 1\n"
    assert config.mailbox("alice").hooks == (Hook("on_receive", ("/bin/x",)),)


# --------------------------------------------------------------------------- step 4: stdin

def test_stdin_names_an_explicit_hook(tmp_path):
    text = HEAD + mailbox("alice") + hook(f'name = "feed"\n{ECHO}\nstdin = "email"')
    assert load_error(tmp_path, text) == (
        "hook 'feed' carries removed field 'stdin' — remove this line and restart aimx serve; "
        "the email is always piped to hooks"
    )


def test_stdin_names_an_anonymous_hook_by_its_derived_name(tmp_path):
    text = HEAD + mailbox("alice") + hook(f'{ECHO}\nstdin = "email"\nbogus = 1')
    assert load_error(tmp_path, text) == (
        "hook '9f5503741a28' carries removed field 'stdin' — remove this line and restart "
        "aimx serve; the email is always piped to hooks"
    )


# --------------------------------------------------------------------------- step 5: schema

@pytest.mark.parametrize(("text", "message"), [
    (HEAD + 'trusted_sender = ["*@x.com"]\n',
     "unknown field 'trusted_sender' in top-level table"),
    (HEAD + mailbox("alice", "trusted_sender = []\n"),
     "unknown field 'trusted_sender' in [mailboxes.alice]"),
    (HEAD + '[upgrade]\nmanifest = "x"\n', "unknown field 'manifest' in [upgrade]"),
    (HEAD + mailbox("alice") + hook(f"{ECHO}\nretries = 3"),
     "unknown field 'retries' in [[mailboxes.alice.hooks]]"),
    ('data_dir = "/x"\n', "missing required field 'domain' in top-level table"),
    ('domain = 5\n',
     "invalid type for 'domain' in top-level table: expected a string, found integer"),
    (HEAD + 'enable_ipv6 = "yes"\n',
     "invalid type for 'enable_ipv6' in top-level table: expected a boolean, found string"),
    (HEAD + "trusted_senders = ['a', 1]\n",
     "invalid type for 'trusted_senders' in top-level table: expected an array of strings, "
     "found an array containing a integer"),
    (HEAD + 'mailboxes = "alice"\n',
     "invalid type for 'mailboxes' in top-level table: expected a table, found string"),
    (HEAD + '\n[mailboxes.alice]\nowner = "x"\n',
     "missing required field 'address' in [mailboxes.alice]"),
    (HEAD + mailbox("alice", "allow_root_catchall = 1\n"),
     "invalid type for 'allow_root_catchall' in [mailboxes.alice]: expected a boolean, "
     "found integer"),
    (HEAD + mailbox("alice") + hook('event = "on_receive"\ncmd = "/bin/echo hi"'),
     "invalid type for 'cmd' in [[mailboxes.alice.hooks]]: expected an array of strings, "
     "found string"),
    (HEAD + mailbox("alice") + hook(f'{ECHO}\ntimeout_secs = "60"'),
     "invalid type for 'timeout_secs' in [[mailboxes.alice.hooks]]: expected an integer, "
     "found string"),
    (HEAD + mailbox("alice") + hook(f"{ECHO}\ntimeout_secs = true"),
     "invalid type for 'timeout_secs' in [[mailboxes.alice.hooks]]: expected an integer, "
     "found boolean"),
    (HEAD + mailbox("alice") + hook('cmd = ["/bin/x"]'),
     "missing required field 'event' in [[mailboxes.alice.hooks]]"),
    (HEAD + mailbox("alice") + hook('event = "on_receive"'),
     "missing required field 'cmd' in [[mailboxes.alice.hooks]]"),
    (HEAD + mailbox("alice") + hook('event = "on_send"\ncmd = ["/bin/x"]'),
     "invalid event 'on_send' on mailbox 'alice': expected 'on_receive' or 'after_send'"),
    (HEAD + 'dns_resolvers = ["dns.google"]\n',
     "invalid dns_resolvers entry 'dns.google': expected \"ip\" or \"ip:port\" "
     '(IPv6 with a port as "[addr]:port")'),
])
def test_schema_errors(tmp_path, text, message):
    assert load_error(tmp_path, text) == message


# --------------------------------------------------------------------------- steps 6–9

@pytest.mark.parametrize("owner_line", ['owner = "   "\n', ""])
def test_blank_or_missing_owner(tmp_path, owner_line):
    text = HEAD + f'\n[mailboxes.alice]\naddress = "alice@test.com"\n{owner_line}'
    assert load_error(tmp_path, text) == (
        "mailbox 'alice' is missing required field 'owner'; re-run 'sudo aimx setup' or "
        "hand-edit config.toml"
    )


def test_hook_rate_limits_default_read_and_overridden_per_mailbox(tmp_path):
    config = load_config(write(tmp_path, HEAD + mailbox("alice")))
    assert config.hook_rate(config.mailboxes["alice"]) == (10, 600)
    text = (HEAD + "hook_rate_limit = 3\nhook_rate_window_secs = 60\n" + mailbox("alice")
            + mailbox("bob", "hook_rate_limit = 0\n")
            + mailbox("carol", "hook_rate_window_secs = 5\n"))
    config = load_config(write(tmp_path, text))
    assert [config.hook_rate(config.mailboxes[name]) for name in ("alice", "bob", "carol")] == [
        (3, 60), (0, 60), (3, 5)]
    assert load_error(tmp_path, HEAD + "hook_rate_limit = -1\n") == (
        "invalid hook_rate_limit = -1: must be at least 0")
    assert load_error(tmp_path, HEAD + mailbox("alice", "hook_rate_window_secs = 0\n")) == (
        "invalid hook_rate_window_secs = 0: must be at least 1")
    assert load_error(tmp_path, HEAD + mailbox("alice", 'hook_rate_limit = "10"\n')) == (
        "invalid type for 'hook_rate_limit' in [mailboxes.alice]: expected an integer, "
        "found string")


def test_fire_on_automatic_is_read_and_on_receive_only(tmp_path):
    config = load_config(write(tmp_path, HEAD + mailbox("alice") + hook(
        ECHO + "\nfire_on_automatic = true") + hook('event = "on_receive"\ncmd = ["/bin/x"]')))
    assert [h.fire_on_automatic for h in config.mailboxes["alice"].hooks] == [True, False]
    body = 'name = "x"\nevent = "after_send"\ncmd = ["/bin/x"]\nfire_on_automatic = true'
    assert load_error(tmp_path, HEAD + mailbox("alice") + hook(body)) == (
        "hook 'x' on mailbox 'alice' sets `fire_on_automatic = true` on event "
        "'after_send': fire_on_automatic is on_receive only")
    assert load_error(tmp_path, HEAD + mailbox("alice") + hook(
        ECHO + '\nfire_on_automatic = "yes"')) == (
        "invalid type for 'fire_on_automatic' in [[mailboxes.alice.hooks]]: expected a "
        "boolean, found string")


def test_trust_values(tmp_path):
    assert load_error(tmp_path, HEAD + 'trust = "all"\n') == (
        "invalid top-level trust value 'all': expected one of [\"none\", \"verified\"]"
    )
    assert load_error(tmp_path, HEAD + mailbox("alice", 'trust = "Verified"\n')) == (
        "invalid trust value 'Verified' on mailbox 'alice': expected one of "
        "[\"none\", \"verified\"]"
    )


def test_catchall_cannot_carry_hooks(tmp_path):
    text = HEAD + CATCHALL + hook(ECHO, "catchall")
    assert load_error(tmp_path, text) == (
        "mailbox 'catchall' is the catchall but has hooks attached; catchall does not "
        "support hooks"
    )


@pytest.mark.parametrize(("name_line", "label"), [("", "<anonymous>"), ('name = "x"\n', "x")])
def test_fire_on_untrusted_is_on_receive_only(tmp_path, name_line, label):
    body = f'{name_line}event = "after_send"\ncmd = ["/bin/x"]\nfire_on_untrusted = true'
    assert load_error(tmp_path, HEAD + mailbox("alice") + hook(body)) == (
        f"hook '{label}' on mailbox 'alice' sets `fire_on_untrusted = true` on event "
        "'after_send': fire_on_untrusted is on_receive only"
    )


@pytest.mark.parametrize("owner", ["Alice", "1abc", "a b", "x" * 33, "a$b"])
def test_malformed_owner(tmp_path, owner):
    assert load_error(tmp_path, HEAD + mailbox("alice", owner=owner)) == (
        f"mailbox 'alice' has invalid owner '{owner}': must be 'root', 'aimx-catchall', or a "
        "valid Linux username matching [a-z_][a-z0-9_-]*[$]?"
    )


def test_orphan_owner_loads_with_a_warning(tmp_path, caplog):
    text = HEAD + mailbox("alice", owner=ORPHAN) + mailbox("bob") + mailbox("m", owner="m$")
    with caplog.at_level(logging.WARNING, logger="aimx::config"):
        config = load_config(write(tmp_path, text))
    assert config.warnings[0] == (
        f"mailbox 'alice' owner '{ORPHAN}' does not resolve via getpwnam; mailbox marked "
        "inactive — create the user or update config.toml"
    )
    assert len(config.warnings) == 2  # alice and the (machine-account shaped) m$
    assert caplog.records == []  # the parser itself never logs
    assert config.mailbox("alice").owner == ORPHAN
    with caplog.at_level(logging.WARNING, logger="aimx::config"):
        log_warnings(config)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("aimx::config", logging.WARNING, warning) for warning in config.warnings
    ]


def test_root_and_catchall_rules(tmp_path):
    flag = "allow_root_catchall = true\n"
    assert load_error(tmp_path, HEAD + mailbox("alice", flag)) == (
        "mailbox 'alice' sets allow_root_catchall=true but is not a catchall (*@test.com); "
        "remove the flag or change the address"
    )
    assert load_error(tmp_path, HEAD + mailbox("alice", owner="root")) == (
        "mailbox 'alice' cannot be owned by root; use a regular Linux user or set "
        "'allow_root_catchall = true' on a catchall mailbox"
    )
    root_catchall = '[mailboxes.catchall]\naddress = "*@TEST.com"\nowner = "root"\n'
    assert load_error(tmp_path, HEAD + root_catchall) == (
        "catchall mailbox 'catchall' has owner='root' but allow_root_catchall=false; set "
        "allow_root_catchall=true to opt into the root-catchall escape hatch, or change owner "
        "to 'aimx-catchall' (the default)"
    )
    config = load_config(write(tmp_path, HEAD + root_catchall + flag))
    assert config.warnings == (
        "catchall mailbox 'catchall' is running with owner='root' and "
        "allow_root_catchall=true; this is a documented escape hatch — mail lands owned by "
        "uid 0",
    )


def test_reserved_owners_are_not_looked_up(tmp_path):
    config = load_config(write(tmp_path, HEAD + CATCHALL + mailbox("x", owner="aimx-catchall")))
    assert config.warnings == ()


# --------------------------------------------------------------------------- step 10

def named(name: str, extra: str = "") -> str:
    return f'name = "{name}"\nevent = "on_receive"\ncmd = ["/bin/{name}"]\n{extra}'


@pytest.mark.parametrize(("body", "message"), [
    (named("bad name"),
     "invalid hook name 'bad name' on mailbox 'alice': must match "
     "[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127}"),
    (named("-dash"),
     "invalid hook name '-dash' on mailbox 'alice': must match "
     "[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127}"),
    ('event = "on_receive"\ncmd = []',
     "hook '<anonymous>' on mailbox 'alice' has empty `cmd`: `cmd` must be a non-empty argv "
     'array, e.g. `cmd = ["/bin/echo", "hi"]`'),
    ('name = "h"\nevent = "on_receive"\ncmd = ["  "]',
     "hook 'h' on mailbox 'alice' has blank `cmd[0]`"),
    ('event = "on_receive"\ncmd = ["echo", "hi"]',
     "hook '<anonymous>' on mailbox 'alice' has non-absolute `cmd[0]` 'echo': hooks run in "
     "working directory / with a fixed PATH, so name the program by its absolute path (e.g. "
     "`/bin/echo` instead of `echo`)"),
    (named("h", 'type = "webhook"'),
     "hook 'h' on mailbox 'alice' has unsupported type 'webhook': only `cmd` is supported"),
    (named("h", "timeout_secs = 0"),
     "hook 'h' on mailbox 'alice' has `timeout_secs = 0`: must be > 0"),
    (named("h", "timeout_secs = 601"),
     "hook 'h' on mailbox 'alice' has `timeout_secs = 601` which exceeds the max of 600"),
])
def test_hook_field_rules(tmp_path, body, message):
    assert load_error(tmp_path, HEAD + mailbox("alice") + hook(body)) == message


def test_longest_hook_name_and_timeout_bounds_are_accepted(tmp_path):
    body = named("n" * 128, "timeout_secs = 600")
    text = HEAD + mailbox("alice") + hook(body) + hook(named("b", "timeout_secs = 1"))
    assert [h.timeout_secs for h in load_config(write(tmp_path, text)).mailbox("alice").hooks] \
        == [600, 1]


def test_duplicate_explicit_names(tmp_path):
    text = HEAD + mailbox("alice") + hook(named("x")) + mailbox("bob") + hook(
        'name = "x"\nevent = "after_send"\ncmd = ["/bin/y"]', "bob")
    assert load_error(tmp_path, text) == (
        "duplicate hook name 'x' on mailboxes 'alice' and 'bob': hook names must be unique "
        "across the mailboxes of one owner"
    )


def test_duplicate_anonymous_hooks(tmp_path):
    text = HEAD + mailbox("alice") + hook(ECHO) + mailbox("bob") + hook(ECHO, "bob")
    assert load_error(tmp_path, text) == (
        "anonymous hooks on mailboxes 'alice' and 'bob' have identical event/cmd and derive "
        "the same name '9f5503741a28': set an explicit `name` on at least one to disambiguate"
    )


def test_explicit_name_colliding_with_a_derived_one(tmp_path):
    text = HEAD + mailbox("alice") + hook(ECHO) + mailbox("bob") + hook(
        'name = "9f5503741a28"\nevent = "after_send"\ncmd = ["/bin/z"]', "bob")
    assert load_error(tmp_path, text) == (
        "explicit hook name '9f5503741a28' collides with the derived name of an anonymous hook "
        "(mailboxes 'alice' and 'bob'): rename the explicit hook or set an explicit `name` on "
        "the anonymous one"
    )


def test_hooks_of_different_owners_may_share_names(tmp_path):
    # A file-wide rule would tell one user, through a refused create, what another's
    # hooks are called and which commands they run.
    text = (HEAD + mailbox("alice") + hook(ECHO) + hook(named("x"))
            + mailbox("bob", owner=ORPHAN) + hook(ECHO, "bob") + hook(named("x"), "bob"))
    config = load_config(write(tmp_path, text))
    assert [h.effective_name for h in config.mailbox("bob").hooks] == ["9f5503741a28", "x"]
    # The same owner's mailboxes still share one namespace.
    text = HEAD + mailbox("alice") + hook(named("x")) + mailbox("bob") + hook(named("x"), "bob")
    assert load_error(tmp_path, text).startswith("duplicate hook name 'x' on mailboxes")


def test_duplicates_within_one_mailbox(tmp_path):
    text = HEAD + mailbox("alice") + hook(named("x")) + hook(named("x"))
    assert load_error(tmp_path, text) == (
        "duplicate hook name 'x' on mailbox 'alice': hook names must be unique "
        "across the mailboxes of one owner"
    )


@pytest.mark.parametrize(("text", "line", "message"), [
    # line 1 is the domain; mailbox("alice") starts with a blank line, then its header (3)
    (HEAD + mailbox("alice") + '\n[mailboxes.zed]\nowner = "root"\n', 7,
     "missing required field 'address' in [mailboxes.zed]"),
    (HEAD + mailbox("alice", 'colour = "red"\n'), 6,
     "unknown field 'colour' in [mailboxes.alice]"),
    (HEAD + mailbox("alice") + hook(named("a")) + hook(named("b", "timeout_secs = 0")), 13,
     "hook 'b' on mailbox 'alice' has `timeout_secs = 0`: must be > 0"),
    (HEAD + mailbox("alice") + hook(named("x")) + hook(named("x")), 13,
     "duplicate hook name 'x' on mailbox 'alice': hook names must be unique across the "
     "mailboxes of one owner"),
    (HEAD + mailbox("alice", owner="Zed"), 3,
     "mailbox 'alice' has invalid owner 'Zed': must be 'root', 'aimx-catchall', or a valid "
     "Linux username matching [a-z_][a-z0-9_-]*[$]?"),
    ('trust = "sometimes"\n' + HEAD, 1,
     "invalid top-level trust value 'sometimes': expected one of [\"none\", \"verified\"]"),
])
def test_an_error_in_the_file_names_the_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}, line {line}: {message}"
    # Checking text that is not (yet) on disk reports the problem alone.
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text, path)
    assert str(caught.value) == message


def test_first_failure_in_file_order_wins(tmp_path):
    # Both mailboxes are broken; the one written first is reported, every time.
    text = HEAD + mailbox("zeta", owner="Zeta") + mailbox("alpha", owner="Alpha")
    assert load_error(tmp_path, text).startswith("mailbox 'zeta' has invalid owner")
    # A later step never pre-empts an earlier one: trust (7) beats owners (9).
    text = HEAD + mailbox("zeta", owner="Zeta") + mailbox("alpha", 'trust = "x"\n')
    assert load_error(tmp_path, text).startswith("invalid trust value 'x' on mailbox 'alpha'")


def test_parse_config_text_validates_without_a_file(tmp_path):
    config = parse_config_text(HEAD, tmp_path / "virtual.toml", data_dir_override="/d")
    assert config.path == tmp_path / "virtual.toml"
    assert config.data_dir == Path("/d")
    assert not (tmp_path / "virtual.toml").exists()


# --------------------------------------------------------------------------- names

@pytest.mark.parametrize(("name", "message"), [
    ("", "Mailbox name cannot be empty"),
    ("a..b", "Mailbox name cannot contain '..'"),
    (".a", "Mailbox name cannot start or end with '.'"),
    ("a.", "Mailbox name cannot start or end with '.'"),
    ("catchall", "Mailbox name 'catchall' is reserved for the wildcard catchall slot"),
    ("aimx-catchall", "Mailbox name 'aimx-catchall' is reserved for the wildcard catchall slot"),
    ("Alice", "Mailbox name contains invalid character 'A'; allowed: [a-z0-9._-]"),
    ("a b", "Mailbox name contains invalid character ' '; allowed: [a-z0-9._-]"),
    ("a" * 65, "Mailbox name is too long (max 64 characters)"),
])
def test_rejected_mailbox_names(name, message):
    assert validate_mailbox_name(name) == message


@pytest.mark.parametrize("name", ["-x", "a_b.c-d", "a" * 64, "alice"])
def test_accepted_mailbox_names(name):
    assert validate_mailbox_name(name) is None


@pytest.mark.parametrize(("event", "cmd", "flag", "expected"), [
    ("on_receive", ["/bin/echo", "hi"], False, "9f5503741a28"),
    ("on_receive", ["/bin/echo", "hi"], True, "3afd24f09cdd"),
    ("after_send", ["/bin/echo", "hi"], False, "b040e42b7c27"),
    ("on_receive", ["/bin/echo", "a b"], False, "998053293ba5"),
    ("on_receive", ["/bin/echo a", "b"], False, "c5c7ef53bf71"),
])
def test_derived_hook_name_vectors(event, cmd, flag, expected):
    assert derived_hook_name(event, cmd, flag) == expected
    assert Hook(event, cmd, fire_on_untrusted=flag).effective_name == expected


def test_effective_names_in_a_loaded_config(tmp_path):
    text = HEAD + mailbox("alice") + hook(ECHO) + hook(named("mine")) + mailbox("bob") \
        + hook('event = "after_send"\ncmd = ["/bin/echo", "hi"]', "bob")
    config = load_config(write(tmp_path, text))
    assert [(m.name, h.effective_name) for m, h in config.all_hooks()] == [
        ("alice", "9f5503741a28"), ("alice", "mine"), ("bob", "b040e42b7c27"),
    ]
    assert [h.effective_name for h in config.hooks_for("alice", "on_receive")] == [
        "9f5503741a28", "mine",
    ]
    assert config.hooks_for("alice", "after_send") == ()
    assert config.hooks_for("ghost", "on_receive") == ()
    found = config.find_hook("b040e42b7c27")
    assert found is not None and found[0].name == "bob"
    assert config.find_hook("nope") is None


# --------------------------------------------------------------------------- routing, policy

@pytest.fixture
def routed(tmp_path) -> Config:
    text = HEAD + mailbox("alice") + mailbox("a.b") + "\n" + CATCHALL.replace(
        "*@test.com", "*@Test.Com")
    return load_config(write(tmp_path, text))


@pytest.mark.parametrize(("rcpt", "expected"), [
    ("alice@test.com", "alice"),
    ("alice@TEST.COM", "alice"),
    ("Alice@test.com", "alice"),
    ("ALICE@test.com", "alice"),
    ("A.B@test.com", "a.b"),
    ("carol@test.com", "catchall"),
    ("alice+tag@test.com", "catchall"),
    ("\u212alice@test.com", "catchall"),  # KELVIN SIGN is not an ASCII "k"
    ('alice@odd"@test.com', "alice"),  # local part = text before the first @
])
def test_route(routed, rcpt, expected):
    assert routed.route(rcpt).name == expected


def test_route_without_a_catchall_is_none(tmp_path):
    config = load_config(write(tmp_path, HEAD + mailbox("alice")))
    assert config.route("carol@test.com") is None
    assert config.route("ALICE@test.com").name == "alice"
    assert config.catchall() is None


@pytest.mark.parametrize(("domain", "local"), [
    ("test.com", True), ("TEST.COM", True), ("Test.Com", True),
    ("sub.test.com", False), ("com", False), ("other.com", False), ("test.com.evil", False),
])
def test_is_local_domain(routed, domain, local):
    assert routed.is_local_domain(domain) is local


def test_catchall_detection_is_case_insensitive(routed):
    assert routed.catchall().name == "catchall"
    assert routed.mailbox("catchall").is_catchall("TEST.com")
    assert not routed.mailbox("alice").is_catchall("test.com")


def test_trust_and_senders_inherit_unless_the_mailbox_overrides(tmp_path):
    text = (
        HEAD + 'trust = "verified"\ntrusted_senders = ["*@corp.test"]\n'
        + mailbox("plain")
        + mailbox("strict", 'trust = "none"\ntrusted_senders = []\n')
        + mailbox("own", 'trusted_senders = ["Boss@Corp.Test"]\n')
    )
    config = load_config(write(tmp_path, text))
    plain, strict, own = (config.mailbox(n) for n in ("plain", "strict", "own"))
    assert config.effective_trust(plain) == "verified"
    assert config.effective_trust(strict) == "none"
    assert config.effective_senders(plain) == ("*@corp.test",)
    assert config.effective_senders(strict) == ()  # an empty list still replaces
    assert config.effective_senders(own) == ("boss@corp.test",)


def test_signature_unset_set_and_disabled(tmp_path):
    assert load_config(write(tmp_path, HEAD)).effective_signature == DEFAULT_SIGNATURE
    assert load_config(write(tmp_path, HEAD + 'signature = "-- bot"\n')).effective_signature \
        == "-- bot"
    assert load_config(write(tmp_path, HEAD + 'signature = ""\n')).effective_signature == ""


def test_config_built_in_code_accepts_a_mailbox_list(tmp_path):
    alice = Mailbox("alice", "alice@test.com", EXISTING_USER)
    config = Config(tmp_path / "c.toml", "test.com", mailboxes=[alice])
    assert config.route("Alice@test.com") is alice


# --------------------------------------------------------------------------- resolvers, owners

@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("::1", ("::1", 53)),
    ("[::1]", ("::1", 53)),
    ("[::1]:5353", ("::1", 5353)),
    ("[2001:db8::53]:53", ("2001:db8::53", 53)),
])
def test_parse_resolver(text, expected):
    assert parse_resolver(text) == expected


@pytest.mark.parametrize("text", [
    "", "dns.google", "dns.google:53", "1.2.3.4:", "1.2.3.4:0", "1.2.3.4:65536",
    "[1.2.3.4]:53", "[::1]:x", " 1.2.3.4", "1.2.3.4:53:53", "300.1.1.1",
])
def test_parse_resolver_rejects(text):
    with pytest.raises(ValueError, match="invalid dns_resolvers entry"):
        parse_resolver(text)


def test_owner_ids():
    entry = pwd.getpwnam(EXISTING_USER)
    assert owner_ids("root") == (0, 0)
    assert owner_ids(EXISTING_USER) == (entry.pw_uid, entry.pw_gid)
    assert owner_ids(ORPHAN) is None


# -- PROXY protocol on the SMTP listener ------------------------------------------------


def test_proxy_protocol_keys_load_as_networks(tmp_path):
    path = write(tmp_path, HEAD + "smtp_proxy_protocol = true\n"
                 'smtp_trusted_proxies = ["10.0.0.0/8", "192.0.2.7", "fd00::/64", "::1"]\n')
    config = load_config(path)
    assert config.smtp_proxy_protocol is True
    assert [str(net) for net in config.trusted_proxy_networks()] == \
        ["10.0.0.0/8", "192.0.2.7/32", "fd00::/64", "::1/128"]
    assert load_config(write(tmp_path, HEAD)).smtp_proxy_protocol is False


@pytest.mark.parametrize(("text", "message"), [
    (HEAD + "smtp_proxy_protocol = true\n",
     "smtp_proxy_protocol = true needs smtp_trusted_proxies: list the "
     'addresses or networks of the proxies that send the PROXY header, e.g. ["10.0.0.0/8"]'),
    (HEAD + 'smtp_proxy_protocol = true\nsmtp_trusted_proxies = ["10.0.0.1/8"]\n',
     "invalid smtp_trusted_proxies entry '10.0.0.1/8': expected an IP address or a "
     'network such as "10.0.0.0/8" (no host bits set after the /)'),
    (HEAD + 'smtp_trusted_proxies = ["proxy.example"]\n',
     "invalid smtp_trusted_proxies entry 'proxy.example': expected an IP address or "
     'a network such as "10.0.0.0/8" (no host bits set after the /)'),
    (HEAD + 'smtp_proxy_protocol = "yes"\n',
     "invalid type for 'smtp_proxy_protocol' in top-level table: expected a boolean, "
     "found string"),
])
def test_proxy_protocol_config_errors(tmp_path, text, message):
    assert load_error(tmp_path, text) == message


def test_proxy_protocol_without_proxies_names_the_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, HEAD + "\nsmtp_proxy_protocol = true\n"))
    assert str(caught.value).startswith(f"{tmp_path / 'config.toml'}, line 3: ")


def test_trusted_proxies_without_the_protocol_warn(tmp_path):
    config = load_config(write(tmp_path, HEAD + 'smtp_trusted_proxies = ["10.0.0.0/8"]\n'))
    assert config.warnings == ("smtp_trusted_proxies is set but smtp_proxy_protocol is not "
                               "true: the list is ignored and every connection is plain SMTP",)


@pytest.mark.parametrize("selector", ["mail_2024", "s1.aimx", "2026-12"])
def test_selectors_accepted_before_rotation_existed_still_load(tmp_path, selector):
    config = load_config(write(tmp_path, HEAD + f'dkim_selector = "{selector}"\n'))
    assert config.dkim_selector == selector


@pytest.mark.parametrize("selector", ["../key", "a/b", "", "-x"])
def test_a_selector_that_could_name_a_path_is_refused(tmp_path, selector):
    assert "invalid dkim_selector" in load_error(tmp_path, HEAD + f'dkim_selector = "{selector}"\n')
