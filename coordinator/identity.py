"""Who is calling: a node (certificate + signed request token) or a person (API token).

A node request must carry a ``RadFed-Node`` token (``protocols.nodeauth``)
signed with the key of a certificate the federation CA issued to that site and
not revoked; when the coordinator terminates TLS itself the same certificate
must also have been presented in the TLS handshake. A token is accepted once:
its nonce is remembered until it expires. The nonces are this process's own, so a
token made before the process started is refused (``node_token_stale``,
retryable: the node makes a new one): one spent with the coordinator that ran
before a restart cannot be spent again with this one. Revocation is read from
the registry on every request, so a revoked site is refused from its next
request on.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from coordinator import pki
from coordinator.errors import CoordinatorError
from coordinator.registry.db import Database
from coordinator.registry.models import NodeCertificate, Site
from protocols.nodeauth import NodeAuthError, read_claims, verify_token
from protocols.sqltypes import utcnow


@dataclass(frozen=True)
class NodeIdentity:
    site: str
    site_id: int
    fingerprint: str


class NonceCache:
    """Nonces seen, until their tokens expire (bounded), and the oldest token still taken.

    Tokens issued before ``floor`` (whole seconds) are not taken: their nonces may
    have been spent where this cache cannot see — before this process started, or
    in an entry forced out of a full cache (the floor then rises past it).
    """

    def __init__(self, limit: int = 200_000, started_at: float | None = None) -> None:
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit
        self.floor = int(time.time() if started_at is None else started_at)

    def stale(self, issued_at: int) -> bool:
        """Whether a token issued at ``issued_at`` may have been used out of this cache's sight."""
        return issued_at < self.floor

    def first_use(self, nonce: str, expires_at: float, issued_at: int | None = None) -> bool:
        now = time.time()
        with self._lock:
            while self._seen:
                expiry, issued = next(iter(self._seen.values()))
                if expiry >= now and len(self._seen) < self._limit:
                    break
                self._seen.popitem(last=False)
                if expiry >= now:  # forced out while it could still be replayed
                    self.floor = max(self.floor, issued + 1)
            if nonce in self._seen:
                return False
            self._seen[nonce] = (expires_at, int(now) if issued_at is None else issued_at)
            return True


def authenticate_node(
    db: Database,
    header: str | None,
    method: str,
    path: str,
    tls_cert_der: bytes | None,
    require_tls_cert: bool,
    max_age_s: int,
    nonces: NonceCache,
) -> NodeIdentity:
    """The node making this request, or a CoordinatorError saying why not."""
    if require_tls_cert and tls_cert_der is None:
        raise CoordinatorError(
            "client_certificate_required",
            "node endpoints need the node's client certificate in the TLS handshake",
        )
    if not header:
        raise CoordinatorError("unauthorized", "a node request needs a RadFed-Node token")
    try:
        claims, _, _ = read_claims(header)
    except NodeAuthError as exc:
        raise CoordinatorError("unauthorized", exc.message) from exc
    if tls_cert_der is not None:
        presented = pki.fingerprint(x509.load_der_x509_certificate(tls_cert_der))
        if presented != claims.fingerprint:
            raise CoordinatorError(
                "unauthorized", "the token was signed for another certificate than the TLS one"
            )
    with db.read() as session:
        row = session.execute(
            select(
                Site.id,
                Site.name,
                Site.revoked_at,
                NodeCertificate.revoked_at,
                NodeCertificate.not_after,
                NodeCertificate.pem,
            )
            .join(Site, Site.id == NodeCertificate.site_id)
            .where(NodeCertificate.fingerprint == claims.fingerprint)
        ).first()
    if row is None:
        raise CoordinatorError("unauthorized", "this certificate was not issued to any site")
    site_id, site_name, site_revoked, cert_revoked, not_after, cert_pem = row
    if site_name != claims.site:
        raise CoordinatorError("unauthorized", "the token names another site than the certificate")
    if site_revoked is not None or cert_revoked is not None:
        raise CoordinatorError("site_revoked", f"site {site_name}'s certificate is revoked")
    if not_after < utcnow():
        raise CoordinatorError("certificate_expired", "the node certificate has expired; re-enroll")
    public_key = x509.load_pem_x509_certificate(cert_pem.encode("ascii")).public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):  # pragma: no cover - CA checks
        raise CoordinatorError("unauthorized", "unsupported node key")
    try:
        verified = verify_token(header, public_key, method, path, max_age_s)
    except NodeAuthError as exc:
        raise CoordinatorError("unauthorized", exc.message) from exc
    if nonces.stale(verified.issued_at):
        raise CoordinatorError(
            "node_token_stale",
            "the node token was made before the coordinator last started (or is older than "
            "the tokens it still remembers); send the request again with a new one",
            retryable=True,
        )
    if not nonces.first_use(verified.nonce, verified.expires_at, verified.issued_at):
        raise CoordinatorError("unauthorized", "this node token was used already (replay)")
    return NodeIdentity(site_name, site_id, claims.fingerprint)
