"""A receipt marks a study shared only if it is the receipt of the exam the node sent.

The integration suite swaps receipts the real coordinator issued; here every
field a receipt binds is changed in turn.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from node.errors import NodeError
from node.share.manifest import ExamPackage
from node.share.upload import check_receipt
from protocols.api.coordinator import (
    DeidRecord,
    ExamEntry,
    ExamManifest,
    InstanceEntry,
    Receipt,
    SeriesEntry,
)
from protocols.deid.options import DeidOptions
from protocols.signing import manifest_digest, sign_manifest
from protocols.version import DEID_PROFILE_VERSION, PROTOCOL_VERSION


def package(study: str) -> ExamPackage:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "st-marys")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    manifest = ExamManifest(
        protocol_version=PROTOCOL_VERSION,
        site="st-marys",
        exam=ExamEntry(
            pseudonym="SITE-ABC",
            study_instance_uid=study,
            modalities=["CR"],
            series=[
                SeriesEntry(
                    series_instance_uid=f"{study}.1",
                    modality="CR",
                    instances=[
                        InstanceEntry(
                            sop_instance_uid=f"{study}.1.{n}",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                            size=10,
                            sha256=f"{n:064x}",
                        )
                        for n in (1, 2)
                    ],
                )
            ],
        ),
        deid=DeidRecord.of(DeidOptions(), DEID_PROFILE_VERSION),
        created_at=now,
    )
    return ExamPackage(signed=sign_manifest(manifest, key, cert), files={})


def receipt_of(exam: ExamPackage, **changes: object) -> Receipt:
    manifest = exam.signed.manifest
    fields: dict[str, object] = {
        "study_instance_uid": manifest.study_instance_uid,
        "site": manifest.site,
        "instances": manifest.instance_count,
        "manifest_sha256": manifest_digest(manifest),
        "registered_at": dt.datetime.now(dt.UTC),
        **changes,
    }
    return Receipt.model_validate(fields)


def test_the_receipt_of_the_exam_sent_is_taken() -> None:
    exam = package("2.25.1")
    receipt = receipt_of(exam)
    # registered before from another packaging of the same files: its digest differs
    earlier = receipt_of(exam, manifest_sha256="f" * 64, duplicate=True)

    assert check_receipt(receipt, exam) is receipt
    assert check_receipt(earlier, exam) is earlier


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"study_instance_uid": "2.25.2"}, "study"),
        ({"site": "other-site"}, "site"),
        ({"instances": 1}, "instances"),
        ({"manifest_sha256": "f" * 64}, "manifest"),
    ],
)
def test_a_receipt_for_anything_else_is_refused(changes: dict[str, object], named: str) -> None:
    exam = package("2.25.1")

    with pytest.raises(NodeError) as caught:
        check_receipt(receipt_of(exam, **changes), exam)

    assert (caught.value.code, caught.value.retryable) == ("receipt_mismatch", False)
    assert named in caught.value.message


def test_another_exams_receipt_is_refused() -> None:
    sent, other = package("2.25.1"), package("2.25.2")

    with pytest.raises(NodeError, match="not for the exam sent"):
        check_receipt(receipt_of(other), sent)
