"""DKIM keys and signatures for tests, made fresh with ``cryptography`` and dkimpy.

A ``DkimKey`` holds an RSA private key (PKCS#1 PEM, as aimx stores it) and
the TXT value to publish at ``<selector>._domainkey.<domain>`` in a test
zone served by ``tests.support.dnsserver.DnsServer``.
"""

from __future__ import annotations

import base64
import functools

import attrs
import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@attrs.frozen
class DkimKey:
    private_pem: bytes
    public_der: bytes

    @property
    def txt_record(self) -> str:
        """The DNS TXT value publishing this key (longer than 255 bytes for 2048 bits,
        so the test server splits it into several character-strings)."""
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(self.public_der).decode()

    def sign(self, message: bytes, *, domain: str, selector: str = "sel",
             headers: tuple[str, ...] = ("From", "To", "Subject", "Date", "Message-ID"),
             ) -> bytes:
        """``message`` with a dkimpy signature prepended, as a sending server would."""
        field = dkim.sign(message, selector.encode(), domain.encode(), self.private_pem,
                          canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=[h.encode() for h in headers])
        return field + message


def new_key(bits: int = 2048) -> DkimKey:
    """A fresh RSA key pair."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    public_der = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return DkimKey(private_pem, public_der)


@functools.cache
def shared_key(label: str) -> DkimKey:
    """One key per label for the whole test run: RSA generation is the slow part."""
    return new_key()
