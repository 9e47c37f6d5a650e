"""``radfed node serve`` as a process: a PACS pushes over DICOM, an operator asks over HTTP.

The PACS is stood in for by pynetdicom, a real DICOM peer on 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BasicTextSRStorage,
    CTImageStorage,
    Verification,
)

from node.settings import load_settings
from node.site import open_vault
from protocols.version import PROTOCOL_VERSION
from radfed.synth.site import Uids, ct_series, make_patient, text_report
from tests.helpers import NodeProcess, indexed_vault_records, newest_vault_records, run_cli

pytestmark = pytest.mark.integration

SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


def study(seed: int = 3) -> list[Dataset]:
    """One study: two CT series (different reconstructions) and a report."""
    patient = make_patient(random.Random(seed), 0)
    uids, rng = Uids(seed), np.random.default_rng(seed)
    study_uid = uids.new()
    when = dt.datetime(2020, 6, 1, 9, 0)
    lung = ct_series(patient, uids, study_uid, when, "ACC777", 4, 64, rng)
    soft = ct_series(patient, uids, study_uid, when, "ACC777", 3, 64, rng)
    for ds in soft:
        ds.SeriesNumber = 3
        ds.ConvolutionKernel = "SOFT"
    return [*lung, *soft, text_report(patient, uids, study_uid, when, "ACC777", lung[0])]


def pacs(calling: str = "PACS") -> AE:
    ae = AE(ae_title=calling)
    ae.maximum_pdu_size = 0
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, SYNTAXES)
    ae.add_requested_context(BasicTextSRStorage, SYNTAXES)
    return ae


def push(node: NodeProcess, datasets: list[Dataset], calling: str = "PACS") -> list[int]:
    assoc = pacs(calling).associate("127.0.0.1", node.dicom_port, ae_title="RADFED")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.fixture
def token(tmp_path: Path) -> str:
    return run_cli(
        "node", "token", "create", "ops", "--home", str(tmp_path / "home"), check=True
    ).stdout.strip()


@pytest.fixture
def node(tmp_path: Path, token: str) -> NodeProcess:
    with NodeProcess(tmp_path / "home") as running:
        yield running


def api(node: NodeProcess, token: str, path: str, **params: object) -> httpx.Response:
    return httpx.get(
        f"{node.url}/api/v1/{path}",
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def taken_in(node: NodeProcess, token: str, instances: int, timeout: float = 60) -> dict:
    """Counts once the node has taken in ``instances`` and its spool is empty."""
    deadline = time.monotonic() + timeout
    while True:
        counts = api(node, token, "counts").json()
        pending = httpx.get(f"{node.url}/healthz", timeout=10).json()["pending_instances"]
        if (counts["instances"] + counts["quarantined"] >= instances and not pending) or (
            time.monotonic() > deadline
        ):
            return counts
        time.sleep(0.2)


def vetted(node: NodeProcess, token: str, study_uid: str, timeout: float = 60) -> dict:
    """The study's detail once the background vetter has decided on it."""
    deadline = time.monotonic() + timeout
    while True:
        detail = api(node, token, f"studies/{study_uid}").json()
        if detail["status"] not in ("received", "deidentified") or time.monotonic() > deadline:
            return detail
        time.sleep(0.2)


def test_a_pushed_study_is_found_through_the_api(node: NodeProcess, token: str) -> None:
    datasets = study()

    statuses = push(node, datasets)

    assert statuses == [0] * len(datasets)
    counts = taken_in(node, token, len(datasets))
    assert counts["instances"] == 8 and counts["studies"] == 1
    assert counts["by_modality"] == {"CT": 7, "SR": 1}
    page = api(node, token, "studies", modality="CT").json()
    assert page["total"] == 1
    summary = page["items"][0]
    assert summary["series_count"] == 3 and summary["instance_count"] == 8
    assert summary["pseudonym"].startswith("SITE-")
    # The vetter holds it: an SR report is not on the default auto-approve list.
    detail = vetted(node, token, summary["study_instance_uid"])
    assert detail["status"] == "held"
    assert sorted(s["instance_count"] for s in detail["series"]) == [1, 3, 4]
    assert [h["to_status"] for h in detail["history"]] == ["received", "deidentified", "held"]
    assert "SR" in detail["history"][-1]["reason"]
    assert detail["history"][0]["actor"] == "intake:dicom"
    original_uids = {str(ds.SOPInstanceUID) for ds in datasets}
    stored = {i["sop_instance_uid"] for s in detail["series"] for i in s["instances"]}
    assert not stored & original_uids
    metrics = httpx.get(f"{node.url}/metrics", timeout=10).text
    assert 'radfed_node_instances_received_total{result="recorded",via="dicom"} 8.0' in metrics
    # Each row names the vault record the drain appended its entry to.
    settings = load_settings(node.home)
    records = indexed_vault_records(settings.index_path)
    assert set(records) == stored and None not in records.values()
    assert records == newest_vault_records(open_vault(settings))


def test_what_is_stored_is_de_identified(node: NodeProcess, token: str) -> None:
    datasets = study(seed=4)
    push(node, datasets)
    taken_in(node, token, len(datasets))

    stored = list((node.home / "store").rglob("*.dcm"))

    assert len(stored) == len(datasets)
    names = {str(ds.PatientName) for ds in datasets}
    for path in stored:
        data = path.read_bytes()
        assert not any(name.encode() in data for name in names)
        assert b"ACC777" not in data
    assert not list((node.home / "spool").glob("*.dcm"))
    assert not (node.home / "originals").exists()


def test_c_echo_is_answered(node: NodeProcess) -> None:
    assoc = pacs().associate("127.0.0.1", node.dicom_port, ae_title="RADFED")

    status = assoc.send_c_echo()
    assoc.release()

    assert status.Status == 0


def test_an_instance_that_cannot_be_taken_in_is_refused_and_quarantined(
    node: NodeProcess, token: str
) -> None:
    broken = study()[0]
    del broken.StudyInstanceUID

    (status,) = push(node, [broken])

    assert status == 0xC000
    page = api(node, token, "quarantine").json()
    assert page["total"] == 1
    assert page["items"][0]["code"] == "malformed"
    assert "missing Study Instance UID" in page["items"][0]["message"]
    assert page["items"][0]["source_kind"] == "dicom"
    assert api(node, token, "counts").json()["instances"] == 0


def test_an_acknowledged_instance_survives_a_crash(node: NodeProcess, token: str) -> None:
    datasets = study(seed=5)
    assert push(node, datasets) == [0] * len(datasets)

    node.kill()  # SIGKILL: no chance to flush anything
    with NodeProcess(node.home) as restarted:
        counts = taken_in(restarted, token, len(datasets))

    assert counts["instances"] == len(datasets)
    assert all((node.home / "store" / p).exists() for p in _paths(node.home))


def _paths(home: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(home / "index.sqlite") as db:
        return [row[0] for row in db.execute("SELECT path FROM instances")]


def test_api_needs_a_valid_token(node: NodeProcess, token: str) -> None:
    anonymous = httpx.get(f"{node.url}/api/v1/counts", timeout=10)
    wrong = api(node, token + "x", "counts")
    missing = api(node, token, "studies/1.2.3")
    health = httpx.get(f"{node.url}/healthz", timeout=10).json()

    assert anonymous.status_code == 401
    assert anonymous.json() == {
        "code": "unauthorized",
        "message": "an API token is required (Authorization: Bearer)",
        "retryable": False,
    }
    assert wrong.status_code == 401 and wrong.json()["code"] == "unauthorized"
    assert missing.status_code == 404 and missing.json()["code"] == "study_not_found"
    assert health["dicom_listener"] is True and health["protocol_version"] == PROTOCOL_VERSION
    bad = api(node, token, "studies", limit=0)
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"
    assert '"limit"' in bad.json()["message"]


def test_the_token_is_checked_before_the_body_and_errors_are_documented(
    node: NodeProcess, token: str
) -> None:
    # Prepare: found by the API fuzz tests (FastAPI parses a body before the token check).
    url = f"{node.url}/api/v1/studies/1.2.3/approve"
    json_type = {"Content-Type": "application/json"}
    ops = {**json_type, "Authorization": f"Bearer {token}"}

    # Execute
    anonymous = httpx.post(url, content=b"{not json", headers=json_type, timeout=10)
    wrong = httpx.post(
        url, content=b"{not json", headers={**ops, "Authorization": "Bearer x"}, timeout=10
    )
    not_utf8 = httpx.post(url, content=b"\xff\xfe", headers=ops, timeout=10)
    long_run = httpx.post(
        f"{node.url}/api/v1/training/runs/{'r' * 65}/approve", json={}, headers=ops, timeout=10
    )
    spec = httpx.get(f"{node.url}/api/v1/openapi.json", timeout=10).json()

    # Assert
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "unauthorized"
    assert wrong.status_code == 401 and wrong.json()["code"] == "unauthorized"
    assert not_utf8.status_code == 422 and not_utf8.json()["code"] == "invalid_request"
    assert long_run.status_code == 422 and long_run.json()["code"] == "bad_run"
    responses = spec["paths"]["/api/v1/studies/{study_uid}/approve"]["post"]["responses"]
    assert set(responses) == {"200", "401", "403", "404", "409", "422", "429"}
    assert responses["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_api_and_listener_bind_loopback_by_default(node: NodeProcess) -> None:
    loopback_v4 = "0100007F"  # 127.0.0.1, little-endian hex

    assert _listening_addresses(node.api_port) == {loopback_v4}
    assert _listening_addresses(node.dicom_port) == {loopback_v4}


def test_associations_from_unlisted_ae_titles_are_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('ae_allowlist = ["PACS"]\n')
    with NodeProcess(home) as node:
        refused = pacs("MALLORY").associate("127.0.0.1", node.dicom_port, ae_title="RADFED")
        allowed = pacs("PACS").associate("127.0.0.1", node.dicom_port, ae_title="RADFED")

        assert refused.is_rejected
        assert allowed.is_established
        allowed.release()


def test_the_node_stops_cleanly_and_resumes_its_spool(tmp_path: Path, token: str) -> None:
    node = NodeProcess(tmp_path / "home").start()
    spool = node.home / "spool"
    left = study(seed=6)[0]
    left.save_as(spool / "000-left-by-a-crash.dcm", enforce_file_format=True)

    assert node.stop() == 0
    with NodeProcess(node.home) as again:
        counts = taken_in(again, token, 1)

    assert counts["instances"] == 1  # taken in at start-up
    assert not list(spool.glob("*.dcm"))
    assert pydicom.dcmread(next((node.home / "store").rglob("*.dcm"))).PatientIdentityRemoved


def test_the_training_policy_and_run_decisions_over_http(
    node: NodeProcess, token: str, tmp_path: Path
) -> None:
    # Prepare
    reviewer = run_cli(
        "node",
        "token",
        "create",
        "rita",
        "--role",
        "reviewer",
        "--home",
        str(node.home),
        check=True,
    ).stdout.strip()
    url = f"{node.url}/api/v1/training"
    ops = {"Authorization": f"Bearer {token}"}
    app = "c" * 64

    # Execute
    default = httpx.get(f"{url}/policy", headers=ops, timeout=10)
    saved = httpx.put(
        f"{url}/policy",
        headers=ops,
        timeout=10,
        json={"apps": [app.upper()], "manual_approval": True, "eligible": "shared"},
    )
    refused = httpx.put(f"{url}/policy", headers=ops, timeout=10, json={"apps": ["nope"]})
    by_reviewer = httpx.put(
        f"{url}/policy",
        timeout=10,
        json={"apps": []},
        headers={"Authorization": f"Bearer {reviewer}"},
    )
    read_by_reviewer = httpx.get(
        f"{url}/policy", timeout=10, headers={"Authorization": f"Bearer {reviewer}"}
    )
    approved = httpx.post(
        f"{url}/runs/run-0007/approve", headers=ops, timeout=10, json={"reason": "IRB 2026-114"}
    )
    declined = httpx.post(f"{url}/runs/run-0008/decline", headers=ops, timeout=10, json={})
    listed = httpx.get(f"{url}/runs", headers=ops, timeout=10)
    reviewer_approves = httpx.post(
        f"{url}/runs/run-0009/approve",
        json={},
        timeout=10,
        headers={"Authorization": f"Bearer {reviewer}"},
    )

    # Assert
    assert default.json() == {"apps": [], "manual_approval": False, "eligible": "approved"}
    assert saved.status_code == 200 and saved.json()["apps"] == [app]
    assert refused.status_code == 422 and refused.json()["code"] == "invalid_request"
    assert by_reviewer.status_code == 403
    assert read_by_reviewer.json() == saved.json()  # the refused changes changed nothing
    assert (node.home / "training.toml").read_text().count(app) == 1
    assert approved.json()["status"] == "accepted" and approved.json()["reason"] == "IRB 2026-114"
    assert declined.json()["status"] == "declined"
    assert {r["run"]: r["status"] for r in listed.json()} == {
        "run-0007": "accepted",
        "run-0008": "declined",
    }
    assert reviewer_approves.status_code == 403
    audit = run_cli("node", "audit", "verify", "--home", str(node.home))
    assert audit.returncode == 0
