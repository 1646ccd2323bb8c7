"""A throwaway PKI for TLS tests, made with ``cryptography``: a server CA
with server certificates for 127.0.0.1, and a client CA (standing in for
Cloudflare's origin-pull CA) with client certificates.  EC P-256 keys keep
generation to a few milliseconds."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "Pki"]


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    der: bytes


def _name(cn: str, org: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


class _Ca:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = _name(name, "Test CA")
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, cn: str, org: str | None, *, server: bool, subject: x509.Name | None = None
    ) -> tuple[x509.Certificate, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject or _name(cn, org))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert, key_pem


class Pki:
    """Files under ``root``; certificates are written (and overwritten) on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server_ca = _Ca("server-ca")
        self.client_ca = _Ca("client-ca")
        self.foreign_ca = _Ca("foreign-ca")
        self.server_ca_file = self._write("server-ca.pem", self._pem(self.server_ca.cert))
        self.client_ca_file = self._write("client-ca.pem", self._pem(self.client_ca.cert))

    @staticmethod
    def _pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def _write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic, as a certificate manager would do it
        return path

    def server(self, cn: str, name: str = "server") -> Issued:
        cert, key = self.server_ca.issue(cn, None, server=True)
        return Issued(
            self._write(f"{name}.crt", self._pem(cert)),
            self._write(f"{name}.key", key),
            cert.public_bytes(serialization.Encoding.DER),
        )

    def client(
        self,
        cn: str,
        org: str | None,
        *,
        foreign: bool = False,
        subject: x509.Name | None = None,
    ) -> Issued:
        """A client certificate; ``subject`` overrides the CN-then-O name."""
        ca = self.foreign_ca if foreign else self.client_ca
        cert, key = ca.issue(cn, org, server=False, subject=subject)
        label = f"client-{cn}-{'foreign' if foreign else 'ok'}"
        return Issued(
            self._write(f"{label}.crt", self._pem(cert)),
            self._write(f"{label}.key", key),
            cert.public_bytes(serialization.Encoding.DER),
        )

    def client_context(self, client: Issued | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.server_ca_file))
        if client is not None:
            ctx.load_cert_chain(client.cert, client.key)
        return ctx
