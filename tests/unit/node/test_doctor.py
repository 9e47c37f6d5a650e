"""``radfed node doctor``'s local checks: certificate expiry and free disk."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from node import doctor
from node.federation import FederationFiles
from node.settings import load_settings


def certificate(root: Path, days: float) -> FederationFiles:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "st-marys")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=400))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA384())
    )
    root.mkdir(parents=True)
    (root / "node.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return FederationFiles(root)


@pytest.mark.parametrize(
    ("days", "ok", "says"),
    [(200, True, "valid until"), (10, False, "expires in"), (-1, False, "expired on")],
)
def test_certificate_expiry_is_reported_with_a_fix(
    tmp_path: Path, days: float, ok: bool, says: str
) -> None:
    check = doctor._certificate(certificate(tmp_path / "federation", days))

    assert check.ok is ok and says in check.detail
    assert ok or "radfed coordinator site token" in check.fix


def test_little_free_disk_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**12, 10**12 - 10**8, 10**8))

    check = doctor._disk(load_settings(tmp_path / "home"))

    assert not check.ok and "0.1 GB free" in check.detail and "RADFED_NODE_HOME" in check.fix
