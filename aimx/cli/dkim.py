"""``aimx dkim list | rotate NEW [--force] | retire OLD``: several DKIM keys, one signing.

Rotation without a gap: ``aimx dkim-keygen --selector NEW`` adds a key,
the operator publishes its record, ``rotate`` switches signing to it once DNS
serves the matching key, and ``retire`` deletes the old key after mail signed
with it has been verified. ``dkim_selector`` in ``config.toml`` names the
signing key throughout; the daemon picks a change up on SIGHUP.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from aimx import paths, term
from aimx.cli.mailboxes import load_config
from aimx.cli.main import CommandError, UsageError, describe
from aimx.config import Config
from aimx.configedit import ConfigEditError, set_dkim_selector
from aimx.ops import dkimkeys, dnscheck
from aimx.ops.initsystem import real_system
from aimx.smtp import dnsresolve

SHOWN_KEY_CHARS = 24


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "dkim", parents=parents, description=describe("dkim"),
        help="list, rotate and retire DKIM keys")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)
    verbs.add_parser("list", parents=parents,
                     help="show every selector with a key, its DNS state and which one signs")
    rotate = verbs.add_parser(
        "rotate", parents=parents,
        help="sign with SELECTOR's key from now on (once DNS publishes it)")
    rotate.add_argument("selector", metavar="SELECTOR")
    rotate.add_argument("--force", action="store_true",
                        help="switch even though DNS does not publish the key yet")
    retire = verbs.add_parser("retire", parents=parents,
                              help="delete the key of a selector that no longer signs")
    retire.add_argument("selector", metavar="SELECTOR")
    return parser


def checked_selector(selector: str) -> str:
    problem = paths.dkim_selector_problem(selector)
    if problem is not None:
        raise UsageError(f"invalid selector '{selector}': {problem}")
    return selector


def dns_check(config: Config, selector: str, public: str | None) -> dnscheck.DnsCheck:
    """Whether DNS publishes ``public`` under ``selector``, through the config's resolvers."""
    try:
        resolver = dnscheck.make_resolver(config.dns_resolvers)
    except dnsresolve.DnsError as exc:
        return dnscheck.DnsCheck("DKIM", dnscheck.FAIL, f"DNS resolver unusable: {exc}")
    return dnscheck.check_dkim_key(resolver, config.domain, selector, public)


def short(value: str) -> str:
    return value if len(value) <= SHOWN_KEY_CHARS else value[:SHOWN_KEY_CHARS] + "…"


def published_keys(config: Config, selector: str) -> list[str]:
    """The ``p=`` values DNS serves for ``selector`` (for the refusal message)."""
    try:
        records = dnscheck.dkim_records(dnscheck.make_resolver(config.dns_resolvers),
                                        config.domain, selector)
    except dnsresolve.DnsError:
        return []
    found = []
    for record in records:
        for part in record.split(";"):
            name, sep, value = part.partition("=")
            if sep and name.strip().lower() == "p":
                found.append("".join(value.split()))
    return found


# --------------------------------------------------------------------------- verbs

def run_list(config: Config) -> int:
    signing = config.dkim_selector
    names = dkimkeys.selectors(signing)
    if not names:
        raise CommandError(f"no DKIM key in {paths.dkim_dir()}. Run `sudo aimx dkim-keygen`.")
    width = max(len(name) for name in names)
    for name in names:
        files = dkimkeys.key_files(name, signing)
        public = dkimkeys.local_public_b64(files=files)
        check = dns_check(config, name, public)
        state = {dnscheck.PASS: term.mark("ok") + " published",
                 dnscheck.WARN: term.mark("warn") + " " + check.reason}.get(
            check.status, term.mark("fail") + " " + check.reason)
        role = "signing" if name == signing else "       "
        print(f"  {name:<{width}}  {role}  {state}  ({files[0]})")
    return 0


def run_rotate(config: Config, selector: str, force: bool) -> int:
    old = config.dkim_selector
    if selector == old:
        raise CommandError(f"selector '{selector}' already signs outgoing mail")
    files = dkimkeys.key_files(selector, old)
    public = dkimkeys.local_public_b64(files=files)
    if not files[0].exists() or public is None:
        raise CommandError(f"there is no key for selector '{selector}'. Create it with "
                           f"`sudo aimx dkim-keygen --selector {selector}`, publish its "
                           "record, then rotate.")
    name = dkimkeys.record_name(selector, config.domain)
    if force:
        print(f"Not checking DNS (--force): receivers cannot verify mail signed with "
              f"'{selector}' until {name} publishes its key.")
    else:
        check = dns_check(config, selector, public)
        if check.status != dnscheck.PASS:
            found = published_keys(config, selector)
            seen = ("DNS serves p=" + ", p=".join(short(key) for key in found)) if found else \
                "DNS serves no DKIM key there"
            raise CommandError(
                f"DNS does not publish the key of selector '{selector}' yet: {check.reason} "
                f"at {name} ({seen}; the local key is p={short(public)}). Publish "
                f"`{dkimkeys.record_value(public)}` as TXT at {name}, wait for it to resolve "
                "and run this again (or pass --force to switch anyway).")
        print(f"DNS publishes the key of selector '{selector}' at {name}.")
    try:
        dkimkeys.name_unnamed_key(old)
    except OSError as exc:
        raise CommandError(f"cannot name the key of selector '{old}' in {paths.dkim_dir()}: "
                           f"{exc.strerror or exc}") from None
    try:
        set_dkim_selector(config.path, selector)
    except ConfigEditError as exc:
        raise CommandError(exc.reason) from None
    print(f"dkim_selector is now '{selector}' in {config.path}.")
    how = real_system().reload_daemon()
    if how is None:
        print("No running daemon found; it signs with the new key when it starts.")
    else:
        print(f"Asked the daemon to reload ({how}).")
    print(f"Keep the record of '{old}' published until mail signed with it has been "
          f"delivered and checked (a few days), then run `sudo aimx dkim retire {old}`.")
    return 0


def run_retire(config: Config, selector: str) -> int:
    if selector == config.dkim_selector:
        raise CommandError(f"selector '{selector}' signs outgoing mail; rotate to another "
                           "selector before retiring it")
    files = dkimkeys.key_files(selector, config.dkim_selector)
    if not any(os.path.lexists(path) for path in files):
        raise CommandError(f"there is no key for selector '{selector}' in {paths.dkim_dir()}")
    try:
        dkimkeys.remove_key(selector)
    except OSError as exc:
        raise CommandError(f"cannot remove the key of selector '{selector}': "
                           f"{exc.strerror or exc}") from None
    print(f"Removed the key of selector '{selector}'. You can now delete the TXT record "
          f"{dkimkeys.record_name(selector, config.domain)}.")
    return 0


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    if args.verb == "list":
        return run_list(config)
    selector = checked_selector(args.selector)
    if args.verb == "rotate":
        return run_rotate(config, selector, args.force)
    return run_retire(config, selector)
