"""The federation's certificate authority: the CA, the server certificate, node certificates.

Keys are EC P-384 (DESIGN.md), written 0600 through a temporary file and a
rename, so a crash never leaves half a key. The CA signs the coordinator's TLS
server certificate and one client certificate per enrolled node; a node's
certificate names its site (common name) and allows TLS client authentication
only. Revocation is kept in the registry and checked on every request.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.errors import CoordinatorError
from protocols.sqltypes import utcnow
from protocols.storage import write_private

CURVE = ec.SECP384R1()
HASH = hashes.SHA384()
#: Curves a node's key may use: P-384 (DESIGN.md), which manifest signatures need too.
ACCEPTED_CURVES = ("secp384r1",)


@dataclass(frozen=True)
class Paths:
    """Where a coordinator home keeps its PKI."""

    root: Path

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _serial() -> int:
    return x509.random_serial_number()


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def create(paths: Paths, federation: str, server_names: list[str]) -> x509.Certificate:
    """Create the CA and the server certificate; refuses to overwrite an existing CA."""
    if paths.ca_key.exists() or paths.ca_cert.exists():
        raise CoordinatorError(
            "already_initialised", f"{paths.root} already holds a federation CA; nothing changed"
        )
    now = utcnow()
    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, HASH)
    )
    write_private(paths.ca_key, _key_pem(ca_key), 0o600)
    write_private(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    issue_server_certificate(paths, server_names)
    return ca_cert


def load_ca(paths: Paths) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA's key and certificate."""
    try:
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), None)
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    except FileNotFoundError as exc:
        raise CoordinatorError(
            "not_initialised",
            f"no federation CA in {paths.root}: run `radfed coordinator init` first",
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CoordinatorError("bad_ca", f"{paths.ca_key} is not an EC key")
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    days: int,
    usage: x509.ObjectIdentifier,
) -> x509.CertificateBuilder:
    now = utcnow()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )


def issue_server_certificate(paths: Paths, server_names: list[str]) -> x509.Certificate:
    """(Re)issue the coordinator's TLS certificate for ``server_names``; nodes keep theirs."""
    if not server_names:
        raise CoordinatorError("bad_server_names", 'Argument "server_names" may not be empty.')
    ca_key, ca_cert = load_ca(paths)
    key = ec.generate_private_key(CURVE)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])])
    cert = (
        _leaf(ca_key, ca_cert, subject, key.public_key(), 397, ExtendedKeyUsageOID.SERVER_AUTH)
        .add_extension(_san(server_names), critical=False)
        .sign(ca_key, HASH)
    )
    write_private(paths.server_key, _key_pem(key), 0o600)
    write_private(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert


def issue_node_certificate(paths: Paths, csr_pem: str, site: str, days: int) -> x509.Certificate:
    """Sign a node's CSR: the certificate names ``site`` whatever the CSR asked for."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise CoordinatorError("bad_csr", 'Argument "csr_pem" is not a PEM CSR.') from exc
    if not csr.is_signature_valid:
        raise CoordinatorError("bad_csr", "the CSR's signature does not verify")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or (
        public_key.curve.name not in ACCEPTED_CURVES
    ):
        raise CoordinatorError("bad_csr", "the node key must be EC P-384")
    ca_key, ca_cert = load_ca(paths)
    subject = x509.Name(
        [
            *ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "node"),
            x509.NameAttribute(NameOID.COMMON_NAME, site),
        ]
    )
    return _leaf(ca_key, ca_cert, subject, public_key, days, ExtendedKeyUsageOID.CLIENT_AUTH).sign(
        ca_key, HASH
    )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
