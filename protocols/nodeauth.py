"""How a node proves who it is on every request: a short-lived token signed with its key.

The coordinator does not depend on the TLS layer exposing the client
certificate (uvicorn does not, and sites may sit behind a TLS-terminating
proxy), so every node request carries ``Authorization: RadFed-Node <token>``:
``base64url(claims).base64url(signature)``, the claims canonical JSON naming
the site, the fingerprint of its enrolled certificate, the method and path of
this request, a nonce, and when it was made and expires. The signature is
ECDSA over the claims' bytes with the node key (SHA-384 for P-384 keys, SHA-256
for P-256). The coordinator checks it against the enrolled certificate and the
revocation list, the method and path, the time window and the nonce (no replay).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

SCHEME = "RadFed-Node"
#: How long a token is valid after it is made.
LIFETIME_S = 120


class NodeAuthError(ValueError):
    """A node token that cannot be accepted; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Claims:
    site: str
    fingerprint: str
    method: str
    path: str
    nonce: str
    issued_at: int
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _hash_for(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()


def make_token(
    key: ec.EllipticCurvePrivateKey,
    site: str,
    fingerprint: str,
    method: str,
    path: str,
    now: float | None = None,
) -> str:
    """The ``Authorization`` header value for one request."""
    issued = int(time.time() if now is None else now)
    claims = {
        "v": 1,
        "site": site,
        "fp": fingerprint,
        "m": method.upper(),
        "p": path,
        "n": secrets.token_hex(16),
        "iat": issued,
        "exp": issued + LIFETIME_S,
    }
    payload = _b64(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    signature = key.sign(payload.encode("ascii"), ec.ECDSA(_hash_for(key)))
    return f"{SCHEME} {payload}.{_b64(signature)}"


def read_claims(header: str) -> tuple[Claims, bytes, bytes]:
    """The claims of a header value, unverified, with the signed bytes and the signature."""
    scheme, _, token = header.partition(" ")
    if scheme != SCHEME or "." not in token:
        raise NodeAuthError("bad_node_token", f"expected `Authorization: {SCHEME} <token>`")
    payload, _, signature = token.strip().partition(".")
    try:
        raw = json.loads(_unb64(payload))
        claims = Claims(
            site=str(raw["site"]),
            fingerprint=str(raw["fp"]),
            method=str(raw["m"]),
            path=str(raw["p"]),
            nonce=str(raw["n"]),
            issued_at=int(raw["iat"]),
            expires_at=int(raw["exp"]),
        )
        signature_bytes = _unb64(signature)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise NodeAuthError("bad_node_token", "the node token cannot be read") from exc
    if raw.get("v") != 1:
        raise NodeAuthError("bad_node_token", "unknown node token version")
    return claims, payload.encode("ascii"), signature_bytes


def verify_token(
    header: str,
    public_key: ec.EllipticCurvePublicKey,
    method: str,
    path: str,
    max_age_s: int,
    now: float | None = None,
) -> Claims:
    """Check a token's signature, request binding and time window (not the nonce)."""
    claims, signed, signature = read_claims(header)
    try:
        public_key.verify(signature, signed, ec.ECDSA(_hash_for(public_key)))
    except InvalidSignature as exc:
        raise NodeAuthError("bad_node_token", "the node token's signature does not verify") from exc
    if claims.method != method.upper() or claims.path != path:
        raise NodeAuthError("bad_node_token", "the node token was made for another request")
    moment = time.time() if now is None else now
    if claims.expires_at < moment or claims.issued_at > moment + max_age_s:
        raise NodeAuthError("expired_node_token", "the node token has expired (check the clock)")
    if claims.expires_at - claims.issued_at > max_age_s:
        raise NodeAuthError("bad_node_token", "the node token is valid for too long")
    return claims
