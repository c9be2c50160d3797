"""``aimx dkim-keygen [--selector S] [--force]``: make a DKIM key pair, print its record.

Without ``--selector`` (or with the signing one) this is the key the daemon
signs with. Another selector gets a key of its own beside it, which signs
nothing until ``aimx dkim rotate`` makes it the signing key. Only the domain
and selector are needed from ``config.toml``, so a config that fails full
validation (say, a hook typo) does not stop an operator from making a key.
"""

from __future__ import annotations

import argparse
import errno
import sys
import tomllib
from typing import Any

from aimx import paths, term
from aimx.cli.main import CommandError, UsageError, describe
from aimx.config import ConfigError, load_config
from aimx.ops import dkimkeys


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "dkim-keygen", parents=parents,
        description=describe("dkim-keygen"),
        help="generate the DKIM key pair",
    )
    parser.add_argument("--selector", metavar="S",
                        help="selector of the key (default: the config's dkim_selector, the "
                             "signing key); another selector adds a key beside the signing "
                             "one, see `aimx dkim rotate`")
    parser.add_argument("--force", action="store_true", help="replace an existing key pair")
    return parser


def domain_and_selector() -> tuple[str, str]:
    """(domain, dkim_selector) from config.toml; falls back to a bare read of the keys."""
    path = paths.config_path()
    try:
        config = load_config(path)
        return config.domain, config.dkim_selector
    except ConfigError as exc:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            raise CommandError(str(exc)) from None
        domain, selector = data.get("domain"), data.get("dkim_selector", "aimx")
        if not isinstance(domain, str) or not domain or not isinstance(selector, str):
            raise CommandError(str(exc)) from None
        return domain, selector


def print_record(selector: str, domain: str, public_b64: str) -> None:
    value = dkimkeys.record_value(public_b64)
    print("Add this DNS TXT record:")
    print(f"  {dkimkeys.record_name(selector, domain)}")
    print(f"  {value}")
    parts = dkimkeys.split_txt(value)
    if len(parts) > 1:
        print()
        print(term.style(
            f"The value is {len(value.encode())} bytes; a DNS string holds at most 255. Most "
            "providers split it for you. For a zone file, or a provider that asks for it "
            "split, use:", "dim"))
        print(f"  {dkimkeys.quoted_txt(value)}")


def run(args: argparse.Namespace) -> int:
    domain, signing = domain_and_selector()
    selector = args.selector or signing
    problem = paths.dkim_selector_problem(selector)
    if problem is not None:
        raise UsageError(f"invalid selector '{selector}': {problem}")
    directory = paths.dkim_dir()
    files = dkimkeys.key_files(selector, signing, directory)
    made = False
    if files[0].exists() and not args.force:
        print("Warning: DKIM keys already exist. Use --force to overwrite.", file=sys.stderr)
    else:
        try:
            dkimkeys.install_keypair(dkimkeys.new_keypair(), directory, files)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise CommandError(
                    f"Permission denied writing to {directory}. Run `sudo aimx dkim-keygen`, "
                    "or set `AIMX_CONFIG_DIR=<writable-path>` and rerun `aimx dkim-keygen` "
                    "for development.") from None
            raise CommandError(f"cannot write DKIM keys to {directory}: "
                               f"{exc.strerror or exc}") from None
        made = True
        print("DKIM keypair generated successfully.")
        print()
    public = dkimkeys.local_public_b64(directory, files)
    if public is None:
        raise CommandError(f"cannot read the DKIM public key in {directory}")
    print_record(selector, domain, public)
    if made and selector != signing:
        print()
        print(f"Outgoing mail is still signed with selector '{signing}'. Once the record "
              f"above resolves, run `sudo aimx dkim rotate {selector}`.")
    return 0
