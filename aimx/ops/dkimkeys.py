"""The DKIM key pairs on disk and the DNS records that publish them.

A key is an RSA 2048 private key in PKCS#1 PEM plus its SubjectPublicKeyInfo
PEM; the TXT record's ``p=`` is the base64 of that SPKI in DER. Each selector
has its own pair, ``<config dir>/dkim/<selector>.private.key`` and
``.public.key``; an install that has never rotated keeps its one pair as
``private.key`` / ``public.key`` (see ``aimx.paths.dkim_key_paths``).
``dkim_selector`` in ``config.toml`` names the key the daemon signs with.
``aimx dkim-keygen``, ``aimx dkim``, ``aimx setup`` and ``aimx doctor`` all
read keys through this module, so the record they print and the key the
daemon signs with cannot disagree.

Pure: no Twisted; blocking file I/O only.
"""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from aimx import paths
from aimx.fsutil import fsync_dir, write_atomic

PRIVATE_KEY_NAME = paths.UNNAMED_PRIVATE_KEY
PUBLIC_KEY_NAME = paths.UNNAMED_PUBLIC_KEY
NAMED_PRIVATE_SUFFIX = ".private.key"
KEY_BITS = 2048
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o755
TXT_STRING_MAX = 255


@attrs.frozen
class KeyPair:
    """A key pair as PEM bytes, before or after it reaches the disk."""

    private_pem: bytes
    public_pem: bytes

    @property
    def public_b64(self) -> str:
        return public_b64_from_pem(self.public_pem)


def private_key_path(dkim_dir: os.PathLike[str] | str | None = None) -> Path:
    return Path(dkim_dir or paths.dkim_dir()) / PRIVATE_KEY_NAME


def public_key_path(dkim_dir: os.PathLike[str] | str | None = None) -> Path:
    return Path(dkim_dir or paths.dkim_dir()) / PUBLIC_KEY_NAME


def new_keypair(bits: int = KEY_BITS) -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1 "BEGIN RSA PRIVATE KEY"
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair(private_pem, public_pem)


def install_keypair(pair: KeyPair, dkim_dir: os.PathLike[str] | str | None = None,
                    files: tuple[Path, Path] | None = None) -> None:
    """Write both key files (private 0600, public 0644), creating the dir 0755.

    ``files`` is a selector's (private, public) pair from ``key_files``; by
    default the pair of an install that has never rotated. Raises ``OSError``
    (``PermissionError`` for EACCES) untouched, so callers can word the
    operator message.
    """
    directory = Path(dkim_dir or paths.dkim_dir())
    private, public = files or (directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME)
    if not directory.is_dir():
        directory.mkdir(parents=True, mode=DIR_MODE)
        os.chmod(directory, DIR_MODE)
    write_atomic(private, pair.private_pem, PRIVATE_MODE)
    write_atomic(public, pair.public_pem, PUBLIC_MODE)


def public_b64_from_pem(public_pem: bytes) -> str:
    """``p=`` for a public key PEM: base64 of the DER SubjectPublicKeyInfo."""
    key = serialization.load_pem_public_key(public_pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def local_public_b64(dkim_dir: os.PathLike[str] | str | None = None,
                     files: tuple[Path, Path] | None = None) -> str | None:
    """``p=`` of an installed key, or ``None`` when there is none.

    ``files`` picks a selector's pair (``key_files``); by default the pair of
    an install that has never rotated. The public file is preferred; when
    only the private one is present (an interrupted write, a hand-copied
    key) the public half is derived from it.
    """
    private_path, public_path = files or (private_key_path(dkim_dir), public_key_path(dkim_dir))
    try:
        return public_b64_from_pem(public_path.read_bytes())
    except (OSError, ValueError):
        pass
    try:
        private = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public_b64_from_pem(public_pem)


# --------------------------------------------------------------------------- selectors

def key_files(selector: str, signing_selector: str,
              dkim_dir: os.PathLike[str] | str | None = None) -> tuple[Path, Path]:
    """(private, public) of ``selector``'s key; ``ValueError`` for an invalid selector."""
    return paths.dkim_key_paths(selector, signing_selector, dkim_dir)


def selectors(signing_selector: str,
              dkim_dir: os.PathLike[str] | str | None = None) -> list[str]:
    """Every selector with a private key on disk, the signing one first, then by name."""
    directory = Path(dkim_dir or paths.dkim_dir())
    found = set()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            name = entry.name
            if name.endswith(NAMED_PRIVATE_SUFFIX):
                selector = name[:-len(NAMED_PRIVATE_SUFFIX)]
                if paths.dkim_selector_problem(selector) is None:
                    found.add(selector)
    if key_files(signing_selector, signing_selector, directory)[0].exists():
        found.add(signing_selector)
    return sorted(found, key=lambda name: (name != signing_selector, name))


def name_unnamed_key(selector: str, dkim_dir: os.PathLike[str] | str | None = None) -> bool:
    """Give ``private.key`` / ``public.key`` their selector's name; returns whether it moved.

    Done before the signing selector changes, so the key stays findable by its
    own selector. Public first: at every step ``key_files`` still finds the
    private half (named, or the unnamed one while it belongs to ``selector``).
    """
    directory = Path(dkim_dir or paths.dkim_dir())
    unnamed_private, unnamed_public = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    named_private, named_public = key_files(selector, "", directory)
    if not unnamed_private.exists() or named_private.exists():
        return False
    if unnamed_public.exists() and not named_public.exists():
        os.rename(unnamed_public, named_public)
    os.rename(unnamed_private, named_private)
    fsync_dir(directory)
    return True


def remove_key(selector: str, dkim_dir: os.PathLike[str] | str | None = None) -> None:
    """Delete the named key files of ``selector`` (callers refuse the signing one)."""
    directory = Path(dkim_dir or paths.dkim_dir())
    for path in key_files(selector, "", directory):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    fsync_dir(directory)


def record_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"


def record_value(public_b64: str) -> str:
    return f"v=DKIM1; k=rsa; p={public_b64}"


def split_txt(value: str, limit: int = TXT_STRING_MAX) -> list[str]:
    """Cut a TXT value into character-strings of at most ``limit`` bytes.

    A single DNS character-string holds 255 bytes; a 2048-bit key's record is
    longer, so zone files need it as several quoted strings that resolvers
    join back together.
    """
    raw = value.encode("utf-8")
    return [raw[i:i + limit].decode("utf-8") for i in range(0, len(raw), limit)] or [""]


def quoted_txt(value: str, limit: int = TXT_STRING_MAX) -> str:
    """The zone-file form: ``"part1" "part2"``."""
    return " ".join(f'"{part}"' for part in split_txt(value, limit))
