"""Sites, enrollment, revocation and node identity, on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select, update

from coordinator import audit, pki, sites, tokens
from coordinator.errors import CoordinatorError
from coordinator.identity import NonceCache, authenticate_node
from coordinator.registry.db import Database
from coordinator.registry.models import AuditEntry, EnrollmentToken, NodeCertificate
from coordinator.settings import CoordinatorSettings
from protocols.nodeauth import make_token


def csr_for(key: ec.EllipticCurvePrivateKey, cn: str = "radfed-node") -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA384())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def enrolled_node(
    db: Database, settings: CoordinatorSettings, name: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    token = sites.add(db, settings, name, "olga")
    done = sites.enroll(db, settings, token, csr_for(key, cn="evil-other-site"))
    return key, x509.load_pem_x509_certificate(done.certificate_pem.encode("ascii"))


def identify(
    db: Database,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    site: str,
    nonces: NonceCache | None = None,
    tls: bytes | None = None,
) -> str:
    header = make_token(key, site, pki.fingerprint(cert), "POST", "/api/v1/node/heartbeat")
    return authenticate_node(
        db,
        header,
        "POST",
        "/api/v1/node/heartbeat",
        tls if tls is not None else cert.public_bytes(serialization.Encoding.DER),
        require_tls_cert=True,
        max_age_s=300,
        nonces=nonces or NonceCache(),
    ).site


def test_a_node_certificate_names_its_site_and_chains_to_the_federation_ca(
    db: Database, settings: CoordinatorSettings
) -> None:
    # Execute
    key, cert = enrolled_node(db, settings, "st-marys")

    # Assert
    _, ca = pki.load_ca(pki.Paths(settings.pki_dir))
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "st-marys"
    assert cert.public_key() == key.public_key()
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert identify(db, key, cert, "st-marys") == "st-marys"
    states = {s.name: (s.status, s.health) for s in sites.states(db, settings)}
    assert states == {"st-marys": ("active", "never")}


def test_a_token_is_spent_once(db: Database, settings: CoordinatorSettings) -> None:
    # Prepare
    token = sites.add(db, settings, "st-marys", "olga")
    sites.enroll(db, settings, token, csr_for(ec.generate_private_key(ec.SECP384R1())))

    # Execute
    with pytest.raises(CoordinatorError) as reused:
        sites.enroll(db, settings, token, csr_for(ec.generate_private_key(ec.SECP384R1())))

    # Assert
    assert reused.value.code == "enrollment_token_used"
    with db.read() as session:
        certs = session.scalars(select(NodeCertificate)).all()
        refused = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "site.enroll.refused")
        ).all()
    assert len(certs) == 1
    assert [(r.subject, r.details) for r in refused] == [
        ("st-marys", '{"reason":"enrollment_token_used"}')
    ]


def test_an_expired_or_forged_token_is_refused(db: Database, settings: CoordinatorSettings) -> None:
    # Prepare
    token = sites.add(db, settings, "st-marys", "olga")
    with db.write() as session:
        session.execute(
            update(EnrollmentToken).values(
                expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            )
        )
    secret, ca = token.split(".")[1:]
    forged = f"rfe1.{secret[:-2]}xx.{ca}"
    csr = csr_for(ec.generate_private_key(ec.SECP384R1()))

    # Execute
    codes = []
    for attempt in (token, forged, "not a token"):
        with pytest.raises(CoordinatorError) as caught:
            sites.enroll(db, settings, attempt, csr)
        codes.append(caught.value.code)

    # Assert
    assert codes == [
        "enrollment_token_expired",
        "enrollment_token_invalid",
        "enrollment_token_invalid",
    ]
    assert [s.status for s in sites.states(db, settings)] == ["pending"]


@pytest.mark.parametrize("kind", ["rsa", "p521", "garbage", "bad-signature"])
def test_a_csr_the_federation_does_not_accept_spends_nothing(
    db: Database, settings: CoordinatorSettings, kind: str
) -> None:
    # Prepare
    from cryptography.hazmat.primitives.asymmetric import rsa

    token = sites.add(db, settings, "st-marys", "olga")
    if kind == "rsa":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "n")]))
            .sign(rsa_key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )
    elif kind == "p521":
        csr = csr_for(ec.generate_private_key(ec.SECP521R1()))
    elif kind == "garbage":
        csr = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    else:
        good = x509.load_pem_x509_csr(csr_for(ec.generate_private_key(ec.SECP384R1())).encode())
        der = bytearray(good.public_bytes(serialization.Encoding.DER))
        der[-5] ^= 0xFF  # inside the signature
        csr = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()

    # Execute
    with pytest.raises(CoordinatorError) as caught:
        sites.enroll(db, settings, token, csr)

    # Assert
    assert caught.value.code == "bad_csr"
    key = ec.generate_private_key(ec.SECP384R1())
    assert sites.enroll(db, settings, token, csr_for(key)).site == "st-marys"  # still valid


def test_revocation_refuses_the_next_request_and_leaves_other_sites_alone(
    db: Database, settings: CoordinatorSettings
) -> None:
    # Prepare
    key_a, cert_a = enrolled_node(db, settings, "site-a")
    key_b, cert_b = enrolled_node(db, settings, "site-b")
    ca_before = (settings.pki_dir / "ca.crt").read_bytes()
    assert identify(db, key_a, cert_a, "site-a") == "site-a"

    # Execute
    sites.revoke(db, "site-a", "olga", reason="laptop stolen")
    key_c, cert_c = enrolled_node(db, settings, "site-c")

    # Assert
    with pytest.raises(CoordinatorError) as refused:
        identify(db, key_a, cert_a, "site-a")
    assert refused.value.code == "site_revoked"
    assert identify(db, key_b, cert_b, "site-b") == "site-b"  # not re-keyed, still good
    assert identify(db, key_c, cert_c, "site-c") == "site-c"
    assert (settings.pki_dir / "ca.crt").read_bytes() == ca_before
    with pytest.raises(CoordinatorError) as again:
        sites.new_token(db, settings, "site-a", "olga")
    assert again.value.code == "site_revoked"
    states = {s.name: s.status for s in sites.states(db, settings)}
    assert states == {"site-a": "revoked", "site-b": "active", "site-c": "active"}


def test_re_enrolling_retires_the_old_certificate(
    db: Database, settings: CoordinatorSettings
) -> None:
    # Prepare
    old_key, old_cert = enrolled_node(db, settings, "st-marys")
    new_key = ec.generate_private_key(ec.SECP384R1())

    # Execute
    token = sites.new_token(db, settings, "st-marys", "olga")
    done = sites.enroll(db, settings, token, csr_for(new_key))

    # Assert
    new_cert = x509.load_pem_x509_certificate(done.certificate_pem.encode())
    assert identify(db, new_key, new_cert, "st-marys") == "st-marys"
    with pytest.raises(CoordinatorError) as old:
        identify(db, old_key, old_cert, "st-marys")
    assert old.value.code == "site_revoked"


def test_a_node_token_is_bound_to_its_key_certificate_request_and_time(
    db: Database, settings: CoordinatorSettings
) -> None:
    # Prepare
    key, cert = enrolled_node(db, settings, "st-marys")
    other_key, other_cert = enrolled_node(db, settings, "other")
    fp = pki.fingerprint(cert)
    der = cert.public_bytes(serialization.Encoding.DER)
    nonces = NonceCache()
    path = "/api/v1/node/heartbeat"

    def check(header: str | None, tls: bytes | None = der, method: str = "POST") -> str:
        try:
            return authenticate_node(
                db, header, method, path, tls, require_tls_cert=True, max_age_s=300, nonces=nonces
            ).site
        except CoordinatorError as exc:
            return exc.code + ": " + exc.message

    good = make_token(key, "st-marys", fp, "POST", path)

    # Execute / Assert
    assert check(good) == "st-marys"
    assert check(good).startswith("unauthorized: this node token was used already")
    assert check(make_token(key, "st-marys", fp, "POST", path), tls=None).startswith(
        "client_certificate_required"
    )
    assert check(None).startswith("unauthorized")
    assert "another request" in check(make_token(key, "st-marys", fp, "GET", path))
    assert "another request" in check(make_token(key, "st-marys", fp, "POST", "/api/v1/x"))
    assert "signature does not verify" in check(make_token(other_key, "st-marys", fp, "POST", path))
    assert "another site" in check(make_token(key, "other", fp, "POST", path))
    assert "another certificate than the TLS one" in check(
        make_token(key, "st-marys", fp, "POST", path),
        tls=other_cert.public_bytes(serialization.Encoding.DER),
    )
    stale = make_token(key, "st-marys", fp, "POST", path, now=time.time() - 600)
    assert check(stale).startswith("unauthorized: the node token has expired")
    assert check("Bearer abc").startswith("unauthorized")


def test_heartbeats_make_a_site_healthy_stale_or_in_error(
    db: Database, settings: CoordinatorSettings
) -> None:
    # Prepare
    enrolled_node(db, settings, "st-marys")
    site_id = 1

    # Execute
    sites.heartbeat(db, site_id, "0.1.0", {"approved": 3, "held": 1}, None)
    fresh = sites.states(db, settings)[0]
    sites.heartbeat(db, site_id, "0.1.0", {"approved": 3}, "vetting: OSError: disk full")
    failing = sites.states(db, settings)[0]
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.stale_after_s + 1)
    with db.read() as session:
        from coordinator.registry.models import Site

        row = session.get(Site, site_id)
        assert row is not None
        stale = sites.health(row, settings.stale_after_s, now=later)

    # Assert
    assert (fresh.health, fresh.counts, fresh.version) == (
        "ok",
        {"approved": 3, "held": 1},
        "0.1.0",
    )
    assert (failing.health, failing.last_error) == ("error", "vetting: OSError: disk full")
    assert stale == "stale"


def test_api_tokens_are_stored_hashed_and_die_when_revoked(db: Database) -> None:
    # Execute
    token = tokens.create(db, "rita", "researcher", "cli")
    found = tokens.check(db, token)
    tokens.check(db, token)  # the same session: no second login
    tokens.revoke(db, "rita", "cli")

    # Assert
    assert found == ("rita", "researcher")
    assert tokens.check(db, token) is None
    assert tokens.check(db, token + "x") is None
    with db.read() as session:
        from coordinator.registry.models import ApiToken

        stored = session.scalars(select(ApiToken.token_hash)).all()
        assert audit.verify(session).entries == 3
        actions = session.execute(
            select(AuditEntry.action, AuditEntry.actor).order_by(AuditEntry.seq)
        ).all()
    assert [tuple(a) for a in actions] == [
        ("token.create", "cli"),
        ("login", "rita"),
        ("token.revoke", "cli"),
    ]
    assert token not in stored and tokens.token_hash(token) in stored
    with pytest.raises(CoordinatorError) as bad:
        tokens.create(db, "x", "admin", "cli")
    assert bad.value.code == "bad_role"
    assert tokens.create(db, "rita", "operator", "cli").startswith("rfc_")  # name free again
