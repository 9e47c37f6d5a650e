"""Sites of the federation: adding one, enrolling its node, revoking it, hearing from it.

``add`` creates a site and a one-time enrollment token that expires; the token
carries the fingerprint of the federation CA, so the node can check it talks
to the right coordinator before it trusts anything it is sent. ``enroll`` spends
the token on a CSR and returns the node certificate and the CA certificate;
``revoke`` makes every later request with that site's certificate fail. Adding
or enrolling a site never touches another site's keys.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator import audit, pki
from coordinator.errors import CoordinatorError
from coordinator.registry.db import Database
from coordinator.registry.models import EnrollmentToken, NodeCertificate, Site
from coordinator.settings import CoordinatorSettings
from protocols.sqltypes import utcnow

TOKEN_PREFIX = "rfe1"  # noqa: S105 - a format tag, not a secret
#: The refusals of an enrollment token itself (unknown, spent or expired): each counts
#: as a failed authentication of the client that presented it (``coordinator.lockout``).
TOKEN_REFUSALS = frozenset(
    {"enrollment_token_invalid", "enrollment_token_used", "enrollment_token_expired"}
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Enrolled:
    site: str
    certificate_pem: str
    ca_certificate_pem: str


@dataclass(frozen=True)
class SiteState:
    name: str
    status: str
    health: str
    enrolled_at: dt.datetime | None
    last_seen: dt.datetime | None
    version: str | None
    counts: dict[str, int]
    last_error: str | None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def split_token(token: str) -> tuple[str, str]:
    """(secret, CA fingerprint) of an enrollment token ``rfe1.<secret>.<ca sha256>``."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not re.fullmatch(r"[0-9a-f]{64}", parts[2]):
        raise CoordinatorError("enrollment_token_invalid", "this is not a RadFed enrollment token")
    return parts[1], parts[2]


def _new_token(site: Site, settings: CoordinatorSettings) -> tuple[EnrollmentToken, str]:
    _, ca_cert = pki.load_ca(pki.Paths(settings.pki_dir))
    secret = secrets.token_urlsafe(32)
    row = EnrollmentToken(
        site_id=site.id,
        token_hash=_hash(secret),
        expires_at=utcnow() + dt.timedelta(hours=settings.enrollment_ttl_hours),
    )
    return row, f"{TOKEN_PREFIX}.{secret}.{pki.fingerprint(ca_cert)}"


def add(db: Database, settings: CoordinatorSettings, name: str, actor: str) -> str:
    """Create a site and return its one-time enrollment token."""
    if not _NAME.match(name):
        raise CoordinatorError(
            "bad_site_name",
            'Argument "name" must be 1-64 characters of letters, digits, ".", "_" and "-".',
        )
    with db.write() as session:
        if session.scalar(select(Site.id).where(Site.name == name)) is not None:
            raise CoordinatorError(
                "site_exists",
                f"site {name} exists; `radfed coordinator site token {name}` issues a new token",
            )
        site = Site(name=name)
        session.add(site)
        session.flush()
        row, token = _new_token(site, settings)
        session.add(row)
        audit.append(session, actor, "site.add", name, expires_at=row.expires_at.isoformat())
    return token


def new_token(db: Database, settings: CoordinatorSettings, name: str, actor: str) -> str:
    """A fresh enrollment token for an existing site (a lost key, a rebuilt node)."""
    with db.write() as session:
        site = _site(session, name)
        if site.revoked_at is not None:
            raise CoordinatorError("site_revoked", f"site {name} is revoked; add a new site")
        row, token = _new_token(site, settings)
        session.add(row)
        audit.append(session, actor, "site.token", name, expires_at=row.expires_at.isoformat())
    return token


def _site(session: Session, name: str) -> Site:
    site = session.scalar(select(Site).where(Site.name == name))
    if site is None:
        raise CoordinatorError("site_not_found", f"no site named {name}")
    return site


def enroll(db: Database, settings: CoordinatorSettings, token: str, csr_pem: str) -> Enrolled:
    """Spend an enrollment token on a CSR: the node's certificate, or a clear refusal."""
    secret, _ = split_token(token)
    paths = pki.Paths(settings.pki_dir)
    _, ca_cert = pki.load_ca(paths)
    now = utcnow()
    refusal: CoordinatorError | None = None
    with db.write() as session:
        row = session.scalar(
            select(EnrollmentToken).where(EnrollmentToken.token_hash == _hash(secret))
        )
        site = session.get(Site, row.site_id) if row is not None else None
        if row is None or site is None:
            refusal = CoordinatorError("enrollment_token_invalid", "unknown enrollment token")
        elif row.used_at is not None:
            refusal = CoordinatorError(
                "enrollment_token_used", "this enrollment token was used already; ask for a new one"
            )
        elif row.expires_at < now:
            refusal = CoordinatorError(
                "enrollment_token_expired", "this enrollment token has expired; ask for a new one"
            )
        elif site.revoked_at is not None:
            refusal = CoordinatorError("site_revoked", f"site {site.name} is revoked")
        if refusal is not None:
            # Recorded and committed: a refused enrollment is worth an operator's look.
            audit.append(
                session,
                "enroll",
                "site.enroll.refused",
                site.name if site else "?",
                reason=refusal.code,
            )
    if refusal is not None or site is None:
        raise refusal or CoordinatorError("enrollment_token_invalid", "unknown enrollment token")
    # The certificate is made outside the transaction; the token is spent inside the
    # next one only if nobody spent it in between.
    cert = pki.issue_node_certificate(paths, csr_pem, site.name, settings.node_cert_days)
    with db.write() as session:
        row = session.scalar(
            select(EnrollmentToken)
            .where(
                EnrollmentToken.token_hash == _hash(secret),
                EnrollmentToken.used_at.is_(None),
            )
            .with_for_update()
        )
        site = session.get(Site, row.site_id) if row is not None else None
        if row is None or site is None or site.revoked_at is not None:
            raise CoordinatorError(
                "enrollment_token_used", "this enrollment token was used already; ask for a new one"
            )
        # A site re-enrolling (new key) retires its earlier certificates.
        for old in session.scalars(
            select(NodeCertificate).where(
                NodeCertificate.site_id == site.id, NodeCertificate.revoked_at.is_(None)
            )
        ):
            old.revoked_at = now
        fingerprint = pki.fingerprint(cert)
        session.add(
            NodeCertificate(
                site_id=site.id,
                serial=format(cert.serial_number, "x"),
                fingerprint=fingerprint,
                pem=pki.pem(cert),
                not_after=cert.not_valid_after_utc,
            )
        )
        row.used_at = now
        site.enrolled_at = now
        audit.append(
            session, f"site:{site.name}", "site.enroll", site.name, certificate=fingerprint
        )
        return Enrolled(site.name, pki.pem(cert), pki.pem(ca_cert))


def revoke(db: Database, name: str, actor: str, reason: str = "") -> None:
    """Refuse the site's certificates from the next request on."""
    now = utcnow()
    with db.write() as session:
        site = _site(session, name)
        if site.revoked_at is not None:
            raise CoordinatorError("site_revoked", f"site {name} is revoked already")
        site.revoked_at = now
        for cert in session.scalars(
            select(NodeCertificate).where(
                NodeCertificate.site_id == site.id, NodeCertificate.revoked_at.is_(None)
            )
        ):
            cert.revoked_at = now
        for token in session.scalars(
            select(EnrollmentToken).where(
                EnrollmentToken.site_id == site.id, EnrollmentToken.used_at.is_(None)
            )
        ):
            token.used_at = now  # an unspent token dies with the site
        audit.append(session, actor, "site.revoke", name, reason=reason)


def heartbeat(
    db: Database,
    site_id: int,
    version: str,
    counts: dict[str, int],
    last_error: str | None,
) -> None:
    with db.write() as session:
        site = session.get(Site, site_id)
        if site is None:  # pragma: no cover - identity checked before
            raise CoordinatorError("site_not_found", "unknown site")
        site.last_seen = utcnow()
        site.version = version[:32]
        site.counts = json.dumps(counts, sort_keys=True)
        site.last_error = last_error[:2000] if last_error else None


def health(site: Site, stale_after_s: int, now: dt.datetime | None = None) -> str:
    """never, ok, stale or error."""
    if site.last_seen is None:
        return "never"
    if (now or utcnow()) - site.last_seen > dt.timedelta(seconds=stale_after_s):
        return "stale"
    return "error" if site.last_error else "ok"


def states(db: Database, settings: CoordinatorSettings) -> list[SiteState]:
    with db.read() as session:
        rows = session.scalars(select(Site).order_by(Site.name)).all()
        return [
            SiteState(
                name=s.name,
                status="revoked" if s.revoked_at else ("active" if s.enrolled_at else "pending"),
                health=health(s, settings.stale_after_s),
                enrolled_at=s.enrolled_at,
                last_seen=s.last_seen,
                version=s.version,
                counts=json.loads(s.counts or "{}"),
                last_error=s.last_error,
            )
            for s in rows
        ]
