"""The registry's HTTP routes in process, on SQLite and on PostgreSQL: parameters, views, codes.

Who may call what over real TLS is the federation test's authorization matrix;
this checks what the routes answer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from coordinator import tokens
from coordinator.api.app import create_app
from coordinator.objects import FilesystemStore
from coordinator.registry.db import Database
from coordinator.settings import CoordinatorSettings
from tests.unit.coordinator.registry_data import generate, register

with warnings.catch_warnings():
    # Starlette's test client asks for httpx2; httpx is what RadFed installs.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

SPECS = generate(30)


@dataclass
class Api:
    client: TestClient
    operator: dict[str, str]
    researcher: dict[str, str]


@pytest.fixture
def api(db: Database, settings: CoordinatorSettings) -> Iterator[Api]:
    settings = settings.model_copy(update={"small_count_k": 11})
    register(db, SPECS, FilesystemStore(settings.objects_dir))
    operator = tokens.create(db, "olga", "operator", actor="test")
    researcher = tokens.create(db, "rita", "researcher", actor="test")
    with TestClient(create_app(settings, db)) as client:
        yield Api(
            client,
            {"Authorization": f"Bearer {operator}"},
            {"Authorization": f"Bearer {researcher}"},
        )


def test_search_takes_repeated_labels_and_dates(api: Api) -> None:
    # Prepare
    expected = sorted(
        s.study_uid
        for s in SPECS
        if s.labels.get(("ricord", "covid")) == "positive"
        and s.clinical["sex"] == "F"
        and s.study_date is not None
        and str(s.study_date) >= "2020-02-01"
    )

    # Execute
    answer = api.client.get(
        "/api/v1/exams",
        params=[
            ("label", "ricord:covid=positive"),
            ("clinical", "sex=F"),
            ("date_from", "2020-02-01"),
            ("sort", "registered_at"),
            ("order", "asc"),
            ("limit", "500"),
        ],
        headers=api.researcher,
    )

    # Assert
    assert answer.status_code == 200, answer.text
    page = answer.json()
    assert page["total"] == len(expected)
    assert sorted(e["study_instance_uid"] for e in page["items"]) == expected
    times = [e["registered_at"] for e in page["items"]]
    assert times == sorted(times)


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"label": "no-colon"}, "invalid_filter"),
        ({"date_from": "2021-01-02", "date_to": "2021-01-01"}, "invalid_filter"),
        ({"limit": "501"}, "invalid_request"),
        ({"sort": "size"}, "invalid_request"),
        ({"offset": str(10**30)}, "invalid_argument"),  # was a 500 (found by the API fuzz)
    ],
)
def test_bad_search_parameters_are_422(api: Api, params: dict[str, str], code: str) -> None:
    answer = api.client.get("/api/v1/exams", params=params, headers=api.researcher)

    assert answer.status_code == 422
    assert answer.json()["code"] == code


def test_exam_detail_and_an_unknown_exam(api: Api) -> None:
    found = api.client.get(f"/api/v1/exams/{SPECS[4].study_uid}", headers=api.researcher)
    missing = api.client.get("/api/v1/exams/1.2.3.4", headers=api.researcher)

    assert found.status_code == 200
    assert found.json()["series"][0]["series_instance_uid"] == SPECS[4].series_uid(0)
    assert missing.status_code == 404 and missing.json()["code"] == "exam_not_found"


def test_statistics_are_suppressed_for_researchers_only(api: Api) -> None:
    # 30 exams over three sites: 10 each, under k = 11.
    researcher = api.client.get("/api/v1/stats/site", headers=api.researcher).json()
    operator = api.client.get("/api/v1/stats/site", headers=api.operator).json()
    by_label = api.client.get(
        "/api/v1/stats/label", params={"label": "ricord:covid"}, headers=api.operator
    ).json()
    unknown = api.client.get("/api/v1/stats/colour", headers=api.operator)

    assert {r["key"]: r["display"] for r in researcher["rows"]} == {
        "lakeside": "<11",
        "north-general": "<11",
        "st-marys": "<11",
    }
    assert {r["key"]: r["count"] for r in operator["rows"]} == {
        "lakeside": 10,
        "north-general": 10,
        "st-marys": 10,
    }
    assert {r["key"]: r["count"] for r in by_label["rows"]} == {"negative": 15, "positive": 15}
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_dimension"


def test_operators_cut_releases_and_readers_see_them(api: Api) -> None:
    # Execute
    made = api.client.post(
        "/api/v1/releases",
        json={"name": "r1", "filters": {"modality": "CT"}},
        headers=api.operator,
    )
    again = api.client.post("/api/v1/releases", json={"name": "r1"}, headers=api.operator)
    by_researcher = api.client.post("/api/v1/releases", json={"name": "r2"}, headers=api.researcher)
    typo = api.client.post(
        "/api/v1/releases", json={"name": "r3", "filters": {"sight": "x"}}, headers=api.operator
    )
    api.client.post(
        "/api/v1/releases",
        json={"name": "r2", "filters": {"modality": "CR"}, "export": False},
        headers=api.operator,
    )
    listed = api.client.get("/api/v1/releases", headers=api.researcher)
    shown = api.client.get("/api/v1/releases/r1", headers=api.researcher)
    diff = api.client.get("/api/v1/releases/r1/diff/r2", headers=api.researcher)

    # Assert
    ct = sorted(s.study_uid for s in SPECS if "CT" in s.modalities)
    cr = sorted(s.study_uid for s in SPECS if "CR" in s.modalities)
    assert made.status_code == 201, made.text
    assert made.json()["exam_count"] == len(ct) and made.json()["created_by"] == "olga"
    assert again.status_code == 409 and again.json()["code"] == "release_exists"
    assert by_researcher.status_code == 403
    assert typo.status_code == 422  # an unknown filter never means "everything"
    assert [r["name"] for r in listed.json()] == ["r1", "r2"]
    assert shown.json()["filters"]["modality"] == "CT"
    assert diff.json()["added"] == cr and diff.json()["removed"] == ct


# -- found by the API fuzz tests (tests/integration/test_api_fuzz.py) ---------------------


@pytest.mark.parametrize(
    ("caller", "status", "code"),
    [
        ("nobody", 401, "unauthorized"),
        ("researcher", 403, "forbidden"),
        ("operator", 422, "invalid_request"),
    ],
)
@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\x00"], ids=["not-json", "not-utf8"])
def test_a_body_that_cannot_be_read_is_answered_after_the_caller_is_checked(
    api: Api, caller: str, status: int, code: str, body: bytes
) -> None:
    # Prepare: FastAPI parses a body before it resolves dependencies (the caller check).
    headers = {"Content-Type": "application/json"}
    if caller != "nobody":
        headers.update(api.operator if caller == "operator" else api.researcher)

    # Execute
    answer = api.client.post("/api/v1/releases", content=body, headers=headers)

    # Assert
    assert answer.status_code == status, answer.text
    assert answer.json()["code"] == code
    if code == "invalid_request":
        assert answer.json()["message"].startswith('Argument "body"')


def test_the_openapi_document_declares_every_error_as_an_error_body(api: Api) -> None:
    spec = api.client.get("/api/v1/openapi.json").json()
    bodies = {"#/components/schemas/ErrorBody", "#/components/schemas/Rejection"}

    undeclared = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) < 400:
                    continue
                content = response.get("content", {})
                ref = content.get("application/json", {}).get("schema", {}).get("$ref")
                if set(content) != {"application/json"} or ref not in bodies:
                    undeclared.append(f"{method} {path} {status}: {content}")
            guarded = path.startswith("/api/v1/") and not path.startswith("/api/v1/enroll")
            if guarded and not {"401", "403"} <= set(operation["responses"]):
                undeclared.append(f"{method} {path}: no 401/403")

    assert not undeclared
    assert "HTTPValidationError" not in spec["components"]["schemas"]
