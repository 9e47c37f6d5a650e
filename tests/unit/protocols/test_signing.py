"""Manifest signatures: canonical bytes, signing with a node key, and every way to break one."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocols.api.coordinator import DeidRecord, ExamManifest, SignedManifest, UploadCreate
from protocols.deid.options import DeidOptions
from protocols.signing import (
    ALGORITHM,
    SignatureError,
    canonical_bytes,
    cert_fingerprint,
    manifest_digest,
    sign_manifest,
    verify_manifest,
)
from protocols.version import DEID_PROFILE_VERSION, PROTOCOL_VERSION

CR = "1.2.840.10008.5.1.4.1.1.1"
Identity = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


def self_signed(curve: ec.EllipticCurve, name: str) -> Identity:
    key = ec.generate_private_key(curve)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    return key, certificate


@pytest.fixture(scope="module")
def node() -> Identity:
    return self_signed(ec.SECP384R1(), "st-mary")


@pytest.fixture(scope="module")
def other() -> Identity:
    return self_signed(ec.SECP384R1(), "elsewhere")


def instance(n: int) -> dict[str, Any]:
    return {
        "sop_instance_uid": f"2.25.{1000 + n}",
        "sop_class_uid": CR,
        "size": 1000 * n,
        "sha256": hashlib.sha256(f"file {n}".encode()).hexdigest(),
    }


def manifest_data() -> dict[str, Any]:
    return {
        "protocol_version": PROTOCOL_VERSION,
        "site": "st-mary",
        "exam": {
            "pseudonym": "SITE-7K2M4Q9X1ABC",
            "study_instance_uid": "2.25.1",
            "study_date": "2019-03-04",
            "modalities": ["CR"],
            "body_part": "CHEST",
            "series": [
                {
                    "series_instance_uid": "2.25.11",
                    "modality": "CR",
                    "series_number": 1,
                    "instances": [instance(1), instance(2)],
                }
            ],
        },
        "deid": DeidRecord.of(DeidOptions(), DEID_PROFILE_VERSION).model_dump(),
        "labels": [{"scheme": "cxr_appearance", "name": "appearance", "value": "typical"}],
        "clinical": {"age_years": "61", "sex": "F", "note": "Zürich"},
        "created_at": "2025-02-01T09:30:00.123456+00:00",
    }


def tampered(signed: SignedManifest, change: Callable[[dict[str, Any]], None]) -> SignedManifest:
    """The same signature over a manifest changed by ``change``, as it would arrive."""
    data = json.loads(signed.model_dump_json())
    change(data["manifest"])
    return SignedManifest.model_validate(data)


def test_a_signed_manifest_verifies(node: Identity) -> None:
    key, certificate = node
    manifest = ExamManifest.model_validate(manifest_data())

    signed = sign_manifest(manifest, key, certificate)

    assert signed.algorithm == ALGORITHM == "ecdsa-p384-sha384"
    assert signed.signer_fingerprint == cert_fingerprint(certificate)
    assert verify_manifest(signed, certificate) == manifest


def test_a_signed_manifest_verifies_after_travelling_as_json(node: Identity) -> None:
    key, certificate = node
    signed = sign_manifest(ExamManifest.model_validate(manifest_data()), key, certificate)
    body = UploadCreate(signed=signed).model_dump_json()

    received = UploadCreate.model_validate_json(body)

    assert verify_manifest(received.signed, certificate) == signed.manifest


def _change_sha256(m: dict[str, Any]) -> None:
    m["exam"]["series"][0]["instances"][0]["sha256"] = "0" * 64


def _add_file(m: dict[str, Any]) -> None:
    m["exam"]["series"][0]["instances"].append(instance(3))


def _drop_file(m: dict[str, Any]) -> None:
    m["exam"]["series"][0]["instances"].pop()


def _change_site(m: dict[str, Any]) -> None:
    m["site"] = "elsewhere"


def _change_size(m: dict[str, Any]) -> None:
    m["exam"]["series"][0]["instances"][1]["size"] += 1


def _change_label(m: dict[str, Any]) -> None:
    m["labels"][0]["value"] = "atypical"


def _add_clinical(m: dict[str, Any]) -> None:
    m["clinical"]["smoker"] = "yes"


def _turn_option_on(m: dict[str, Any]) -> None:
    m["deid"]["options"]["retain_uids"] = True


def _move_created_at(m: dict[str, Any]) -> None:
    m["created_at"] = "2025-02-01T09:30:00.123457Z"


def _reorder_instances(m: dict[str, Any]) -> None:
    m["exam"]["series"][0]["instances"].reverse()


@pytest.mark.parametrize(
    "change",
    [
        _change_sha256,
        _add_file,
        _drop_file,
        _change_site,
        _change_size,
        _change_label,
        _add_clinical,
        _turn_option_on,
        _move_created_at,
        _reorder_instances,
    ],
)
def test_a_manifest_changed_after_signing_fails(
    node: Identity, change: Callable[[dict[str, Any]], None]
) -> None:
    key, certificate = node
    signed = sign_manifest(ExamManifest.model_validate(manifest_data()), key, certificate)

    forged = tampered(signed, change)

    with pytest.raises(SignatureError) as caught:
        verify_manifest(forged, certificate)
    assert caught.value.code == "bad_signature"


def test_a_signature_from_another_key_fails(node: Identity, other: Identity) -> None:
    key, certificate = node
    manifest = ExamManifest.model_validate(manifest_data())
    genuine = sign_manifest(manifest, key, certificate)
    theirs = sign_manifest(manifest, other[0], other[1])

    swapped = genuine.model_copy(update={"signature": theirs.signature})

    with pytest.raises(SignatureError) as caught:
        verify_manifest(swapped, certificate)
    assert caught.value.code == "bad_signature"


def test_a_fingerprint_of_another_certificate_fails(node: Identity, other: Identity) -> None:
    key, certificate = node
    signed = sign_manifest(ExamManifest.model_validate(manifest_data()), key, certificate)
    relabelled = signed.model_copy(update={"signer_fingerprint": cert_fingerprint(other[1])})

    with pytest.raises(SignatureError) as wrong_label:
        verify_manifest(relabelled, certificate)
    with pytest.raises(SignatureError) as wrong_certificate:
        verify_manifest(signed, other[1])

    assert wrong_label.value.code == "fingerprint_mismatch"
    assert wrong_certificate.value.code == "fingerprint_mismatch"


def test_an_unknown_algorithm_fails(node: Identity) -> None:
    key, certificate = node
    signed = sign_manifest(ExamManifest.model_validate(manifest_data()), key, certificate)

    downgraded = signed.model_copy(update={"algorithm": "ecdsa-p256-sha256"})

    with pytest.raises(SignatureError, match="ecdsa-p256-sha256") as caught:
        verify_manifest(downgraded, certificate)
    assert caught.value.code == "unknown_algorithm"
    assert isinstance(caught.value, ValueError) and not caught.value.retryable


def test_a_signature_that_is_not_base64_fails(node: Identity) -> None:
    key, certificate = node
    signed = sign_manifest(ExamManifest.model_validate(manifest_data()), key, certificate)
    data = signed.model_dump()
    data["signature"] = "abcde"  # the model's character set, but not a base64 length

    with pytest.raises(SignatureError) as caught:
        verify_manifest(SignedManifest.model_validate(data), certificate)
    assert caught.value.code == "malformed_signature"


def test_a_certificate_with_another_curve_fails(node: Identity) -> None:
    key, certificate = node
    _, p256 = self_signed(ec.SECP256R1(), "p256")
    signed = sign_manifest(ExamManifest.model_validate(manifest_data()), key, certificate)

    claimed = signed.model_copy(update={"signer_fingerprint": cert_fingerprint(p256)})

    with pytest.raises(SignatureError) as caught:
        verify_manifest(claimed, p256)
    assert caught.value.code == "unsupported_key"


def test_signing_refuses_a_key_that_is_not_the_certificates(
    node: Identity, other: Identity
) -> None:
    manifest = ExamManifest.model_validate(manifest_data())
    p256_key, p256_certificate = self_signed(ec.SECP256R1(), "p256")

    with pytest.raises(ValueError, match='"certificate"'):
        sign_manifest(manifest, node[0], other[1])
    with pytest.raises(ValueError, match='"private_key"'):
        sign_manifest(manifest, p256_key, p256_certificate)


def test_canonical_bytes_ignore_field_and_dict_order() -> None:
    data = manifest_data()
    shuffled = {key: copy.deepcopy(data[key]) for key in reversed(list(data))}
    shuffled["exam"] = {key: shuffled["exam"][key] for key in reversed(list(shuffled["exam"]))}
    shuffled["clinical"] = dict(reversed(list(shuffled["clinical"].items())))
    options = shuffled["deid"]["options"]
    shuffled["deid"]["options"] = dict(reversed(list(options.items())))

    one = canonical_bytes(ExamManifest.model_validate(data))
    two = canonical_bytes(ExamManifest.model_validate(shuffled))

    assert one == two


def test_canonical_bytes_are_compact_sorted_utf8_json() -> None:
    manifest = ExamManifest.model_validate(manifest_data())

    raw = canonical_bytes(manifest)
    decoded = json.loads(raw.decode("utf-8"))

    assert (
        raw
        == json.dumps(decoded, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    assert b" " not in raw and b"\n" not in raw  # no value here holds whitespace
    assert "Zürich".encode() in raw
    assert decoded["created_at"] == "2025-02-01T09:30:00.123456Z"
    assert decoded["exam"]["study_date"] == "2019-03-04"


def test_one_instant_has_one_canonical_spelling() -> None:
    utc, offset = manifest_data(), manifest_data()
    utc["created_at"] = "2025-02-01T09:30:00Z"
    offset["created_at"] = "2025-02-01T10:30:00+01:00"

    one = canonical_bytes(ExamManifest.model_validate(utc))
    two = canonical_bytes(ExamManifest.model_validate(offset))

    assert one == two
    assert b'"created_at":"2025-02-01T09:30:00.000000Z"' in one


def test_the_digest_is_the_sha256_of_the_canonical_bytes() -> None:
    manifest = ExamManifest.model_validate(manifest_data())
    changed = manifest_data()
    changed["site"] = "elsewhere"

    digest = manifest_digest(manifest)

    assert digest == hashlib.sha256(canonical_bytes(manifest)).hexdigest()
    assert digest != manifest_digest(ExamManifest.model_validate(changed))


def test_the_fingerprint_is_the_sha256_of_the_der_certificate(node: Identity) -> None:
    _, certificate = node

    fingerprint = cert_fingerprint(certificate)

    assert fingerprint == certificate.fingerprint(hashes.SHA256()).hex()
    assert len(fingerprint) == 64 and fingerprint == fingerprint.lower()
