"""A throwaway PKI for the mutual-TLS tests (Python and Java), written with `cryptography`.

    python tests/python/pki.py DIR     # writes DIR/*.pem (scripts/test.sh, for the JDBC test)

Files: ca.pem (the client and server CA), server.pem / server.key (localhost, 127.0.0.1),
client certificates as <name>.pem / <name>.key: analyst (CN=analyst), etl (CN=etl),
expired (CN=etl, validity in the past), other-ca (CN=etl, issued by another CA).
Keys are EC P-256 in PKCS#8 PEM (what rustls, Go and Java's netty all read).
"""

from __future__ import annotations

import datetime
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Ca:
    def __init__(self, cn: str):
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(_name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, cn: str, *, server: bool = False, expired: bool = False) -> tuple[bytes, bytes]:
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (
            (now - datetime.timedelta(days=60), now - datetime.timedelta(days=30))
            if expired
            else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return _pem_cert(cert), _pem_key(key)


def write(directory: Path) -> Path:
    """Writes the PKI described in the module docstring; returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = Ca("Airlock test CA")
    other = Ca("Another CA")
    (directory / "ca.pem").write_bytes(_pem_cert(ca.cert))
    files = {
        "server": ca.issue("localhost", server=True),
        "analyst": ca.issue("analyst"),
        "etl": ca.issue("etl"),
        "expired": ca.issue("etl", expired=True),
        "other-ca": other.issue("etl"),
    }
    for name, (cert, key) in files.items():
        (directory / f"{name}.pem").write_bytes(cert)
        (directory / f"{name}.key").write_bytes(key)
    return directory


if __name__ == "__main__":
    print(write(Path(sys.argv[1])))
