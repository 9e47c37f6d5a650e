"""Canonical bytes of an exam manifest, and the node's signature over them.

The canonical form is the manifest as JSON with sorted keys, no whitespace,
UTF-8, dates as ISO 8601 and instants in UTC with microseconds
(``2025-01-31T09:30:00.000000Z``). It is built from the model's values, not
from the JSON that arrived, so both sides compute the same bytes however the
manifest travelled. The node signs ``SIGNING_CONTEXT + canonical bytes`` with
its EC P-384 key (ECDSA with SHA-384); the context keeps a manifest signature
from being taken for anything else the same key signs. Checking that the
certificate is enrolled, valid and not revoked is the coordinator's job.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocols.api.coordinator import ExamManifest, SignedManifest

#: The one manifest signature algorithm: ECDSA on P-384 with SHA-384, DER-encoded.
ALGORITHM: Final = "ecdsa-p384-sha384"
#: Prefixed to the canonical bytes before signing (domain separation).
SIGNING_CONTEXT: Final = b"radfed/exam-manifest\x00"

SignatureErrorCode = Literal[
    "unknown_algorithm",  # the manifest names an algorithm we do not accept
    "fingerprint_mismatch",  # signed by another certificate than the one given
    "unsupported_key",  # the certificate's key is not EC P-384
    "malformed_signature",  # not base64
    "bad_signature",  # does not verify: the manifest changed or another key signed it
]


class SignatureError(ValueError):
    """A signed manifest that does not verify; ``code`` says why. Never worth retrying."""

    retryable: Final = False

    def __init__(self, code: SignatureErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: SignatureErrorCode = code
        self.message = message


def canonical_bytes(manifest: ExamManifest) -> bytes:
    """The manifest's canonical JSON encoding, the bytes that are signed and digested."""
    return json.dumps(
        _plain(manifest.model_dump(mode="python")),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


def manifest_digest(manifest: ExamManifest) -> str:
    """SHA-256 (hex) of the canonical bytes: the manifest's identity in receipts."""
    return hashlib.sha256(canonical_bytes(manifest)).hexdigest()


def cert_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 (hex) of the certificate's DER encoding."""
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def sign_manifest(
    manifest: ExamManifest,
    private_key: ec.EllipticCurvePrivateKey,
    certificate: x509.Certificate,
) -> SignedManifest:
    """Sign ``manifest`` with the node's key; ``certificate`` must hold its public key."""
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
        private_key.curve, ec.SECP384R1
    ):
        raise ValueError('Argument "private_key" must be an EC P-384 private key.')
    if _spki(private_key.public_key()) != _spki(certificate.public_key()):
        raise ValueError('Argument "certificate" does not hold the public key of "private_key".')
    signature = private_key.sign(SIGNING_CONTEXT + canonical_bytes(manifest), _ECDSA)
    return SignedManifest(
        manifest=manifest,
        signature=base64.b64encode(signature).decode("ascii"),
        signer_fingerprint=cert_fingerprint(certificate),
        algorithm=ALGORITHM,
    )


def verify_manifest(signed: SignedManifest, certificate: x509.Certificate) -> ExamManifest:
    """The manifest, once its signature verifies against ``certificate``.

    Raises
    ------
    SignatureError
        The algorithm is unknown, the fingerprint is not ``certificate``'s, the
        certificate's key is not EC P-384, or the signature does not verify.
    """
    if signed.algorithm != ALGORITHM:
        raise SignatureError(
            "unknown_algorithm",
            f'Signature algorithm "{signed.algorithm}" is not supported; use "{ALGORITHM}".',
        )
    if not hmac.compare_digest(signed.signer_fingerprint, cert_fingerprint(certificate)):
        raise SignatureError(
            "fingerprint_mismatch",
            "The manifest was signed with another certificate than the site's.",
        )
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP384R1
    ):
        raise SignatureError("unsupported_key", "The certificate's key is not EC P-384.")
    try:
        signature = base64.b64decode(signed.signature, validate=True)
    except binascii.Error:
        raise SignatureError("malformed_signature", "The signature is not base64.") from None
    try:
        public_key.verify(signature, SIGNING_CONTEXT + canonical_bytes(signed.manifest), _ECDSA)
    except InvalidSignature:
        raise SignatureError("bad_signature", "The manifest signature does not verify.") from None
    return signed.manifest


_ECDSA: Final = ec.ECDSA(hashes.SHA384())


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _plain(value: Any) -> Any:
    """JSON-ready values, with one spelling for dates and instants."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dt.datetime):
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} has no canonical form")
        utc = value.astimezone(dt.UTC).replace(tzinfo=None)
        return utc.isoformat(timespec="microseconds") + "Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if value is None or isinstance(value, str | bool | int):
        return value
    raise TypeError(f"{type(value).__name__} has no canonical JSON form")
