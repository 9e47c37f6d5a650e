"""``radfed demo`` end to end, as the README's first command runs it.

One run, kept small (one PACS patient per site, one training round; the demo's
defaults are three rounds, run by the training test's three-round run), with
``--keep-running``: while it waits for Ctrl-C, the coordinator and node UIs
answer; on SIGINT everything stops and no process of the demo is left. The
summary it saved is checked against the services' own databases, and nothing
the generated exports planted (names, MRNs, accession numbers, institutions)
reached the coordinator: every file under its home and every fetched file is
searched, DICOM element by element and as raw bytes.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from safetensors.numpy import load_file

from tests.helpers import ROOT, find_needles

pytestmark = pytest.mark.integration

#: Original header values that identify someone; each must stay on its node.
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PatientAddress",
    "OtherPatientIDs",
    "PerformingPhysicianName",
    "OperatorsName",
)


def _needles(exports: list[Path]) -> dict[bytes, str]:
    """Identifying values of the generated originals (names split into their parts too)."""
    needles: dict[bytes, str] = {}
    for root in exports:
        for path in root.rglob("*"):
            if not path.is_file() or path.suffix == ".txt":
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue
            for keyword in IDENTIFYING:
                value = str(ds.get(keyword) or "")
                for part in {value, *value.replace("^", " ").split()}:
                    if len(part) >= 5:
                        needles[part.encode()] = f"{keyword} of {path.name}"
    return needles


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(132)[128:] == b"DICM"


def _demo_processes(workdir: Path) -> list[str]:
    found = subprocess.run(
        ["pgrep", "-af", str(workdir)], capture_output=True, text=True, check=False
    ).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def test_the_demo_runs_the_whole_flow_keeps_running_until_interrupted_and_leaks_nothing(
    tmp_path: Path,
) -> None:
    # Prepare
    workdir = tmp_path / "demo"
    output = tmp_path / "demo.out"
    argv = [
        *(sys.executable, "-m", "radfed.cli", "demo", "--workdir", str(workdir)),
        *("--patients", "1", "--ct-slices", "4", "--cohort", "16", "--rounds", "1"),
        "--keep-running",
    ]

    # Execute: run until it says it is up, browse, then Ctrl-C.
    with open(output, "w") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "160"},
        )
    try:
        deadline = time.monotonic() + 540
        while "press Ctrl-C to stop" not in output.read_text():
            assert proc.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(1)
        summary = json.loads((workdir / "summary.json").read_text())
        ca = summary["urls"]["coordinator_ca"]
        coordinator_up = httpx.get(
            f"{summary['urls']['coordinator']}/healthz",
            verify=ssl.create_default_context(cafile=ca),
        )
        nodes_up = [httpx.get(f"{s['ui']}/healthz") for s in summary["sites"]]
        login_page = httpx.get(f"{summary['sites'][0]['ui']}/login")
        credentials = (workdir / "credentials.txt").stat().st_mode & 0o777
        proc.send_signal(signal.SIGINT)
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = output.read_text()

    # Assert: every stage ran and the summary says what happened.
    assert code == 0, text
    for stage in range(1, 9):
        assert f"{stage}. " in text, f"stage {stage} missing:\n{text}"
    assert "everything the demo started was stopped" in text
    assert coordinator_up.status_code == 200 and all(n.status_code == 200 for n in nodes_up)
    assert login_page.status_code == 200 and credentials == 0o600
    assert [s["site"] for s in summary["sites"]] == ["north", "south"]
    shared_total = 0
    for site in summary["sites"]:
        states = site["by_status"]
        # The burned-in ultrasound stays held; the README in the export is quarantined.
        assert states.get("held", 0) >= 1 and site["quarantined"] >= 1, site
        assert states.get("shared", 0) >= 16 and not states.get("approved"), site
        shared_total += states["shared"]
        index = workdir / site["site"] / "node-home" / "index.sqlite"
        # The exam approved through the node API in review went on to be shared.
        (uid,) = [r["study_instance_uid"] for r in summary["reviewed"] if r["site"] == site["site"]]
        with sqlite3.connect(index) as db:
            reviewed = db.execute(
                "SELECT status FROM studies WHERE study_uid = ?", (uid,)
            ).fetchall()
            approvers = db.execute(
                "SELECT actor FROM status_changes c JOIN studies s ON s.id = c.study_id "
                "WHERE s.study_uid = ? AND c.from_status = 'held' AND c.to_status = 'approved'",
                (uid,),
            ).fetchall()
        assert reviewed == [("shared",)] and approvers == [("reviewer:demo-operator",)], (
            reviewed,
            approvers,
        )
    assert summary["registry"]["exams"] == shared_total
    assert summary["release"]["name"] == "v1.0"
    assert summary["release"]["exams"] == shared_total
    run = summary["run"]
    assert run["status"] == "finished" and not run["degraded"]
    assert len(run["rounds"]) == 1 and sorted(run["rounds"][0]["trained"]) == ["north", "south"]
    assert "eval-accuracy" in run["rounds"][0]["central_metrics"]
    model = Path(run["model"])
    assert load_file(str(model)), "the fetched model holds no tensors"
    provenance = json.loads(Path(run["provenance"]).read_text())
    assert provenance["cohort"]["release"] == "v1.0" and provenance["sites"] == ["north", "south"]
    # Nothing is left running.
    assert _demo_processes(workdir) == []
    # Nothing identifying reached the coordinator or the researcher's downloads.
    needles = _needles([workdir / s / "pacs-export" for s in ("north", "south")])
    needles |= _needles([workdir / s / "cxr-cohort" for s in ("north", "south")])
    assert len(needles) > 10
    received = [p for p in (workdir / "coordinator").rglob("*") if p.is_file()]
    received += [p for p in (workdir / "models").rglob("*") if p.is_file()]
    dicom = [p for p in received if _is_dicom(p)]
    assert len(dicom) >= shared_total
    assert find_needles(dicom, needles) == []
    leaks = [
        f"{path}: {needle!r} ({why})"
        for path in received
        for needle, why in needles.items()
        if needle in path.read_bytes()
    ]
    assert leaks == []
