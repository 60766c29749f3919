"""The sandbox's own certificate authority, for HTTPS interception.

One CA per boot (ECDSA P-256). Its private key lives only in this process's memory: the
guest gets the certificate alone, and the leaf keys are handed to OpenSSL through an
anonymous memory file, never a file on disk. Leaves are minted per server name the guest
asks for (SNI), cached, backdated a day (guest clocks drift) and valid a week.

Apart from ``tls`` so that only a network that may intercept pays for importing
``cryptography`` (about 0.1 s of every process's start).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .tls import ALPN

BACKDATE = datetime.timedelta(days=1)
CA_LIFETIME = datetime.timedelta(days=30)
LEAF_LIFETIME = datetime.timedelta(days=7)
LEAF_CACHE = 256


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lanekit sandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class SandboxCA:
    """A CA whose key never leaves this object; ``certificate_pem`` is what the guest trusts."""

    def __init__(self, label: str = "lanekit sandbox CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        public = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(label))
            .issuer_name(_name(label))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.certificate_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self._leaves: dict[str, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def mint(self, server_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A leaf certificate for ``server_name`` (a DNS name or an IP address)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(server_name))
        except ValueError:
            alt = x509.DNSName(server_name)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(server_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + LEAF_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )
        return certificate, key

    def server_context(self, server_name: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf for ``server_name`` (cached)."""
        with self._lock:
            cached = self._leaves.get(server_name)
        if cached is not None:
            return cached
        certificate, key = self.mint(server_name)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(list(ALPN))
        chain = certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _load_chain_from_memory(context, chain)
        with self._lock:
            if len(self._leaves) >= LEAF_CACHE:
                self._leaves.pop(next(iter(self._leaves)))
            self._leaves[server_name] = context
        return context


def _load_chain_from_memory(context: ssl.SSLContext, pem: bytes) -> None:
    """``load_cert_chain`` wants a path: give it an anonymous memory file's."""
    fd = os.memfd_create("lanekit-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
