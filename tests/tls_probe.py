"""TLS handshakes that offer exactly one protocol version (and, up to TLS 1.2, chosen suites).

The client lowers its own OpenSSL security level (``@SECLEVEL=0``) and pins
``minimum_version``/``maximum_version``, so that it really offers TLS 1.0 or a
CBC suite: a refusal then comes from the server. A server with
``permissive_context`` accepts everything this OpenSSL can speak; a test shows
each weak offer succeeding against it before asserting that a RadFed server
refuses the same offer, so the test cannot pass because the client never
offered the weak protocol at all.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

V = ssl.TLSVersion
#: Errors of a client that could not even make its offer (not a server's refusal).
CLIENT_SIDE = {"NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE", "NO_SUITABLE_SIGNATURE_ALGORITHM"}


@dataclass(frozen=True)
class Handshake:
    """What one handshake came to: the version and suite agreed, or the error."""

    accepted: bool
    version: str = ""
    cipher: str = ""
    error: str = ""


def pin(context: ssl.SSLContext, version: ssl.TLSVersion, lowest: bool = True) -> None:
    """Make ``context`` speak ``version`` only (``lowest=False``: that version and below)."""
    with warnings.catch_warnings():  # TLSv1 and TLSv1_1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        if lowest:
            context.minimum_version = version
        context.maximum_version = version


def offer(
    host: str,
    port: int,
    version: ssl.TLSVersion,
    ciphers: str = "ALL",
    context: ssl.SSLContext | None = None,
) -> Handshake:
    """Handshake offering ``version`` only (``ciphers`` apply up to TLS 1.2)."""
    if context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        pin(context, version)
        context.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    try:
        with (
            socket.create_connection((host, port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            cipher = tls.cipher()
            return Handshake(True, str(tls.version()), cipher[0] if cipher else "")
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
        if reason in CLIENT_SIDE:
            raise AssertionError(f"the client could not offer {version.name}: {exc}") from exc
        return Handshake(False, error=reason)
    except (ConnectionResetError, BrokenPipeError) as exc:
        return Handshake(False, error=type(exc).__name__)


def refused(handshake: Handshake) -> bool:
    """The server refused (an alert or a closed connection, after the client's offer)."""
    return not handshake.accepted and bool(handshake.error)


def self_signed(
    directory: Path, name: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` with ``key``: (certificate, key) paths."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def permissive_context(*chains: tuple[Path, Path]) -> ssl.SSLContext:
    """A server context that accepts any version and suite this OpenSSL has (give it an
    EC and an RSA certificate, so RSA and ECDSA suites can both be agreed)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = V.MINIMUM_SUPPORTED
    context.set_ciphers("ALL:@SECLEVEL=0")
    for cert, key in chains:
        context.load_cert_chain(str(cert), str(key))
    return context


@contextlib.contextmanager
def serving(context: ssl.SSLContext) -> Iterator[int]:
    """A TLS server with ``context`` on 127.0.0.1 (its port), completing handshakes only."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.settimeout(5)
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(sock.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        sock.close()


#: Weak offers a RadFed server must refuse: (version, the suites offered up to TLS 1.2).
WEAK = [
    (V.TLSv1, "ALL"),
    (V.TLSv1_1, "ALL"),
    (V.TLSv1_2, "ECDHE-ECDSA-AES256-SHA384"),  # CBC (HMAC-SHA384)
    (V.TLSv1_2, "ECDHE-ECDSA-AES128-SHA"),  # CBC with SHA-1
    (V.TLSv1_2, "ECDHE-ECDSA-AES128-CCM"),  # AEAD, but not on our list
    (V.TLSv1_2, "AES128-GCM-SHA256"),  # RSA key exchange: no forward secrecy
]
#: Offers a RadFed server must accept (our keys are EC: the ECDSA suites).
STRONG = [
    (V.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256"),
    (V.TLSv1_2, "ECDHE-ECDSA-AES256-GCM-SHA384"),
    (V.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305"),
    (V.TLSv1_3, "ALL"),
]
