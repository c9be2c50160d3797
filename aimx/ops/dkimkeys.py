"""The DKIM key pair on disk and the DNS record that publishes it.

``<config dir>/dkim/private.key`` is an RSA 2048 key in PKCS#1 PEM (what the
daemon signs with), ``public.key`` its SubjectPublicKeyInfo PEM. The TXT
record's ``p=`` is the base64 of that SPKI in DER. ``aimx dkim-keygen``,
``aimx setup`` and ``aimx doctor`` all read the key through this module, so
the record they print and the key the daemon signs with cannot disagree.

Pure: no Twisted; blocking file I/O only.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from aimx import paths
from aimx.fsutil import write_atomic

PRIVATE_KEY_NAME = "private.key"
PUBLIC_KEY_NAME = "public.key"
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


def key_exists(dkim_dir: os.PathLike[str] | str | None = None) -> bool:
    """Whether a private key is installed (the one file the daemon cannot run without)."""
    return private_key_path(dkim_dir).exists()


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


def install_keypair(pair: KeyPair, dkim_dir: os.PathLike[str] | str | None = None) -> None:
    """Write both key files (private 0600, public 0644), creating the dir 0755.

    Raises ``OSError`` (``PermissionError`` for EACCES) untouched, so callers
    can word the operator message.
    """
    directory = Path(dkim_dir or paths.dkim_dir())
    if not directory.is_dir():
        directory.mkdir(parents=True, mode=DIR_MODE)
        os.chmod(directory, DIR_MODE)
    write_atomic(directory / PRIVATE_KEY_NAME, pair.private_pem, PRIVATE_MODE)
    write_atomic(directory / PUBLIC_KEY_NAME, pair.public_pem, PUBLIC_MODE)


def generate(dkim_dir: os.PathLike[str] | str | None = None, force: bool = False) -> bool:
    """Create a key pair unless one exists (or ``force``); returns whether one was made."""
    if key_exists(dkim_dir) and not force:
        return False
    install_keypair(new_keypair(), dkim_dir)
    return True


def public_b64_from_pem(public_pem: bytes) -> str:
    """``p=`` for a public key PEM: base64 of the DER SubjectPublicKeyInfo."""
    key = serialization.load_pem_public_key(public_pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def local_public_b64(dkim_dir: os.PathLike[str] | str | None = None) -> str | None:
    """``p=`` of the installed key, or ``None`` when there is none.

    ``public.key`` is preferred; when only ``private.key`` is present (an
    interrupted write, a hand-copied key) the public half is derived from it.
    """
    try:
        return public_b64_from_pem(public_key_path(dkim_dir).read_bytes())
    except (OSError, ValueError):
        pass
    try:
        private = serialization.load_pem_private_key(
            private_key_path(dkim_dir).read_bytes(), password=None
        )
    except (OSError, ValueError, TypeError):
        return None
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public_b64_from_pem(public_pem)


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
