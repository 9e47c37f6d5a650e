"""The coordinator's wire models: what a manifest may hold, and the helpers on them."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import pytest
from pydantic import ValidationError

from protocols.api.coordinator import (
    DeidRecord,
    EnrollRequest,
    ExamManifest,
    Heartbeat,
    Rejection,
    StatsTable,
    UploadFileState,
    UploadPublic,
    UploadStatus,
)
from protocols.api.errors import ErrorBody
from protocols.deid.options import DeidOptions
from protocols.version import DEID_PROFILE_VERSION, PROTOCOL_VERSION

CR = "1.2.840.10008.5.1.4.1.1.1"


def instance(n: int, size: int = 1000) -> dict[str, Any]:
    return {
        "sop_instance_uid": f"2.25.{1000 + n}",
        "sop_class_uid": CR,
        "size": size,
        "sha256": hashlib.sha256(f"file {n}".encode()).hexdigest(),
    }


def manifest_data() -> dict[str, Any]:
    """A valid manifest as JSON-ready data: two series, three instances."""
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
                    "body_part": "CHEST",
                    "series_number": 1,
                    "instances": [instance(1, 1000), instance(2, 2000)],
                },
                {
                    "series_instance_uid": "2.25.12",
                    "modality": "CR",
                    "instances": [instance(3, 3000)],
                },
            ],
        },
        "deid": DeidRecord.of(DeidOptions(), DEID_PROFILE_VERSION).model_dump(),
        "labels": [{"scheme": "cxr_appearance", "name": "appearance", "value": "typical"}],
        "clinical": {"age_years": "61", "sex": "F"},
        "created_at": "2025-02-01T09:30:00+00:00",
    }


def test_a_valid_manifest_lists_its_files_and_size() -> None:
    manifest = ExamManifest.model_validate(manifest_data())

    files = manifest.files()

    assert manifest.study_instance_uid == "2.25.1"
    assert manifest.instance_count == 3
    assert manifest.total_size == 6000
    assert sorted(f.sop_instance_uid for f in files.values()) == [
        "2.25.1001",
        "2.25.1002",
        "2.25.1003",
    ]
    assert all(sha == entry.sha256 for sha, entry in files.items())


@pytest.mark.parametrize(
    "sha256",
    ["A" * 64, "a" * 63, "a" * 65, "g" * 64, "", "a" * 62 + " a"],
    ids=["uppercase", "short", "long", "not-hex", "empty", "space"],
)
def test_a_bad_sha256_is_refused(sha256: str) -> None:
    data = manifest_data()
    data["exam"]["series"][0]["instances"][0]["sha256"] = sha256

    with pytest.raises(ValidationError, match="sha256"):
        ExamManifest.model_validate(data)


@pytest.mark.parametrize(
    "uid",
    ["1.2.03", "1..2", "1.2.", ".1.2", "1.2.abc", "1.2.3 ", "1." + "2" * 63, ""],
    ids=[
        "leading-zero",
        "empty-part",
        "trailing-dot",
        "leading-dot",
        "letters",
        "space",
        "65",
        "empty",
    ],
)
@pytest.mark.parametrize("field", ["sop_instance_uid", "sop_class_uid"])
def test_a_bad_instance_uid_is_refused(field: str, uid: str) -> None:
    data = manifest_data()
    data["exam"]["series"][0]["instances"][0][field] = uid

    with pytest.raises(ValidationError, match=field):
        ExamManifest.model_validate(data)


def test_a_bad_study_or_series_uid_is_refused() -> None:
    bad_study, bad_series = manifest_data(), manifest_data()
    bad_study["exam"]["study_instance_uid"] = "1.2.840.0x1"
    bad_series["exam"]["series"][1]["series_instance_uid"] = "1.02"

    with pytest.raises(ValidationError, match="study_instance_uid"):
        ExamManifest.model_validate(bad_study)
    with pytest.raises(ValidationError, match="series_instance_uid"):
        ExamManifest.model_validate(bad_series)


def test_a_64_character_uid_is_accepted() -> None:
    data = manifest_data()
    uid = "2.25." + "1" * 59
    data["exam"]["series"][0]["instances"][0]["sop_instance_uid"] = uid

    manifest = ExamManifest.model_validate(data)

    assert len(uid) == 64 and uid in {i.sop_instance_uid for i in manifest.instances()}


def test_a_sop_instance_uid_in_two_series_is_refused() -> None:
    data = manifest_data()
    data["exam"]["series"][1]["instances"][0]["sop_instance_uid"] = "2.25.1001"

    with pytest.raises(
        ValidationError, match=r"sop_instance_uid 2\.25\.1001 appears more than once"
    ):
        ExamManifest.model_validate(data)


def test_a_repeated_series_uid_is_refused() -> None:
    data = manifest_data()
    data["exam"]["series"][1]["series_instance_uid"] = "2.25.11"

    with pytest.raises(
        ValidationError, match=r"series_instance_uid 2\.25\.11 appears more than once"
    ):
        ExamManifest.model_validate(data)


def test_the_same_file_twice_is_refused() -> None:
    data = manifest_data()
    data["exam"]["series"][1]["instances"][0]["sha256"] = instance(1)["sha256"]

    with pytest.raises(ValidationError, match=r"sha256 [0-9a-f]{64} appears more than once"):
        ExamManifest.model_validate(data)


def test_an_exam_without_instances_is_refused() -> None:
    no_series, empty_series = manifest_data(), manifest_data()
    no_series["exam"]["series"] = []
    empty_series["exam"]["series"][1]["instances"] = []

    with pytest.raises(ValidationError, match="series"):
        ExamManifest.model_validate(no_series)
    with pytest.raises(ValidationError, match="instances"):
        ExamManifest.model_validate(empty_series)


def test_an_empty_file_is_refused() -> None:
    data = manifest_data()
    data["exam"]["series"][0]["instances"][0]["size"] = 0

    with pytest.raises(ValidationError, match="size"):
        ExamManifest.model_validate(data)


def test_an_unknown_field_is_refused_at_any_depth() -> None:
    top, nested = manifest_data(), manifest_data()
    top["patient_name"] = "DOE^JANE"
    nested["exam"]["series"][0]["instances"][0]["patient_id"] = "12345"

    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ExamManifest.model_validate(top)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ExamManifest.model_validate(nested)


def test_a_manifest_is_frozen() -> None:
    manifest = ExamManifest.model_validate(manifest_data())

    with pytest.raises(ValidationError, match="frozen"):
        manifest.site = "elsewhere"  # type: ignore[misc]


def test_created_at_needs_a_timezone_and_is_kept_in_utc() -> None:
    naive, offset = manifest_data(), manifest_data()
    naive["created_at"] = "2025-02-01T09:30:00"
    offset["created_at"] = "2025-02-01T11:30:00+02:00"

    manifest = ExamManifest.model_validate(offset)

    assert manifest.created_at == dt.datetime(2025, 2, 1, 9, 30, tzinfo=dt.UTC)
    assert manifest.created_at.utcoffset() == dt.timedelta(0)
    with pytest.raises(ValidationError, match="timezone"):
        ExamManifest.model_validate(naive)


def test_a_bad_site_name_is_refused() -> None:
    data = manifest_data()
    data["site"] = "St Mary's"

    with pytest.raises(ValidationError, match="site"):
        ExamManifest.model_validate(data)


def test_the_deid_record_round_trips_the_options() -> None:
    options = DeidOptions().with_settings(["retain-device-identity", "clean-graphics"])

    record = DeidRecord.of(options, DEID_PROFILE_VERSION)

    assert record.to_options() == options
    assert record.options["retain_device_identity"] is True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"retain_everything": True}, "unknown: \\['retain_everything'\\]"),
        ({"retain_uids": None}, "retain_uids"),
        ({"retain_longitudinal_full_dates": True}, "mutually exclusive"),
    ],
    ids=["unknown", "not-bool", "contradiction"],
)
def test_bad_deid_options_are_refused(change: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {**DeidOptions().model_dump(), **change}

    with pytest.raises(ValidationError, match=message):
        DeidRecord(profile_version=DEID_PROFILE_VERSION, options=options)


def test_deid_options_must_all_be_named() -> None:
    options = DeidOptions().model_dump()
    del options["clean_graphics"]

    with pytest.raises(ValidationError, match="missing: \\['clean_graphics'\\]"):
        DeidRecord(profile_version=DEID_PROFILE_VERSION, options=options)


def test_an_upload_lists_what_is_missing() -> None:
    done = UploadFileState(sha256="a" * 64, size=10, received=10, complete=True)
    half = UploadFileState(sha256="b" * 64, size=10, received=5, complete=False)
    upload = UploadPublic(
        upload_id="u1",
        study_instance_uid="2.25.1",
        status=UploadStatus.OPEN,
        files=[done, half],
        created_at=dt.datetime(2025, 2, 1, tzinfo=dt.UTC),
    )

    missing = upload.missing()

    assert missing == [half]


def test_a_file_cannot_have_received_more_than_its_size() -> None:
    with pytest.raises(ValidationError, match="exceeds size"):
        UploadFileState(sha256="a" * 64, size=10, received=11, complete=False)


def test_a_rejection_is_an_error_body_with_reasons_and_findings() -> None:
    body = {
        "code": "phi_found",
        "message": "PHI found in 1 instance",
        "retryable": False,
        "reasons": [{"code": "phi_found", "message": "a person name", "location": "a" * 64}],
        "findings": [
            {
                "source": "scanner",
                "severity": "high",
                "kind": "person_name",
                "location": "(0008,0090)",
                "message": "a person name",
                "excerpt": "DO**",
                "sop_instance_uid": "2.25.1001",
            }
        ],
    }

    rejection = Rejection.model_validate(body)
    error = ErrorBody.model_validate(rejection.model_dump(include={"code", "message", "retryable"}))

    assert isinstance(rejection, ErrorBody)
    assert rejection.findings[0].sop_instance_uid == "2.25.1001"
    assert rejection.reasons[0].location == "a" * 64
    assert error.code == "phi_found" and not error.retryable


def test_small_counts_are_suppressed_below_k() -> None:
    table = StatsTable.of("site", {"b": 4, "a": 12, "c": 5, "d": 0}, k=5)

    rows = [(row.key, row.count, row.display) for row in table.rows]

    assert rows == [("a", 12, "12"), ("b", None, "<5"), ("c", 5, "5"), ("d", 0, "0")]


def test_the_enrollment_token_stays_out_of_reprs() -> None:
    request = EnrollRequest(
        token="one-time-token-1234",
        csr_pem="-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n",
    )

    assert "one-time-token-1234" not in repr(request)
    with pytest.raises(ValidationError, match="csr_pem"):
        EnrollRequest(token="one-time-token-1234", csr_pem="not a csr")


def test_a_heartbeat_refuses_negative_counts() -> None:
    sent_at = dt.datetime(2025, 2, 1, tzinfo=dt.UTC)

    ok = Heartbeat(
        software_version="0.1.0", protocol_version="1.1", counts={"held": 2}, sent_at=sent_at
    )

    assert ok.counts == {"held": 2} and ok.last_error is None
    with pytest.raises(ValidationError, match="counts"):
        Heartbeat(
            software_version="0.1.0", protocol_version="1.1", counts={"held": -1}, sent_at=sent_at
        )
