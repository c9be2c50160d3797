"""The self-signed STARTTLS certificate ``aimx setup`` creates.

Sending MTAs do opportunistic TLS and do not verify the certificate, so a
self-signed one is enough to get mail encrypted in transit. It carries the
domain both as CN and as a ``DNS:`` subjectAltName, because modern TLS
stacks ignore the CN when they do check names.

``AIMX_TLS_DIR`` moves the pair away from ``/etc/ssl/aimx`` (tests, and a
second instance on one host).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from aimx.fsutil import write_atomic

DEFAULT_TLS_DIR = Path("/etc/ssl/aimx")
TLS_DIR_ENV = "AIMX_TLS_DIR"
CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
VALID_DAYS = 3650
KEY_BITS = 2048
CERT_MODE = 0o644
KEY_MODE = 0o600


def tls_dir() -> Path:
    value = os.environ.get(TLS_DIR_ENV)
    return Path(value) if value else DEFAULT_TLS_DIR


def cert_path(directory: os.PathLike[str] | str | None = None) -> Path:
    return Path(directory or tls_dir()) / CERT_NAME


def key_path(directory: os.PathLike[str] | str | None = None) -> Path:
    return Path(directory or tls_dir()) / KEY_NAME


def is_default_dir(directory: os.PathLike[str] | str | None = None) -> bool:
    return Path(directory or tls_dir()) == DEFAULT_TLS_DIR


def make_self_signed(domain: str, days: int = VALID_DAYS) -> tuple[bytes, bytes]:
    """(certificate PEM, PKCS#8 key PEM) for ``domain``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def generate(domain: str, directory: os.PathLike[str] | str | None = None,
             days: int = VALID_DAYS) -> tuple[Path, Path]:
    """Write ``cert.pem`` (0644) and ``key.pem`` (0600) atomically; returns their paths.

    The key goes first: a cert without its key is useless, while a key
    without a cert is simply regenerated next time.
    """
    target = Path(directory or tls_dir())
    target.mkdir(parents=True, exist_ok=True, mode=0o755)
    cert_pem, key_pem = make_self_signed(domain, days)
    write_atomic(target / KEY_NAME, key_pem, KEY_MODE)
    write_atomic(target / CERT_NAME, cert_pem, CERT_MODE)
    return target / CERT_NAME, target / KEY_NAME
