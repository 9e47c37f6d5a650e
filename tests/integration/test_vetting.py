"""Vetting end to end: ingest, scan, OCR, policy, masking, review decisions over the API."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from radfed.synth.site import write_site_corpus
from tests.helpers import NodeProcess, run_cli

pytestmark = pytest.mark.integration


def statuses(home: Path) -> dict[str, str]:
    with sqlite3.connect(home / "index.sqlite") as db:
        return dict(db.execute("SELECT study_uid, status FROM studies").fetchall())


def modalities(home: Path) -> dict[str, str]:
    with sqlite3.connect(home / "index.sqlite") as db:
        return dict(db.execute("SELECT study_uid, modalities FROM studies").fetchall())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vet") / "export"
    write_site_corpus(root, patients=2, ct_slices=2, ct_size=64, cr_size=64)
    return root


@pytest.fixture
def home(tmp_path: Path, corpus: Path) -> Path:
    home = tmp_path / "home"
    run_cli("node", "ingest", str(corpus), "--home", str(home), "-q", check=True)
    return home


def test_policy_approves_the_low_risk_and_holds_the_rest(home: Path) -> None:
    by_modality = {modalities(home)[uid]: status for uid, status in statuses(home).items()}

    assert by_modality["DX"] == "approved"  # clean, low-risk, nothing flagged
    assert by_modality["CR\\US"] == "held"  # ultrasound, text burned in
    assert by_modality["CT\\SR"] == "held"  # SR is not on the auto-approve list
    with sqlite3.connect(home / "index.sqlite") as db:
        ocr = db.execute(
            "SELECT severity, location, excerpt FROM findings WHERE kind = 'burned_in_text'"
        ).fetchall()
        reasons = [
            r[0] for r in db.execute("SELECT reason FROM status_changes WHERE actor = 'policy'")
        ]
    assert ocr, "OCR should find the name burned into the ultrasound"
    assert any("burned-in" in r or "finding" in r for r in reasons)


def test_nothing_identifying_is_kept_in_the_index_in_clear(home: Path, corpus: Path) -> None:
    names = {str(pydicom.dcmread(p).PatientName).split("^")[0] for p in corpus.rglob("*.dcm")}
    ids = {str(pydicom.dcmread(p).PatientID) for p in corpus.rglob("*.dcm")}

    raw = b"".join(p.read_bytes() for p in home.glob("index.sqlite*"))

    assert not [n for n in names | ids if n.encode() in raw]


def test_scan_cli_passes_the_store_and_fails_an_original(
    home: Path, corpus: Path, tmp_path: Path
) -> None:
    clean = run_cli("node", "scan", str(home / "store"), "--home", str(home))
    leaky_dir = tmp_path / "leaky"
    leaky_dir.mkdir()
    shutil.copy(next(corpus.rglob("CT/*.dcm")), leaky_dir / "original.dcm")
    leaky = run_cli("node", "scan", str(leaky_dir), "--home", str(home))

    assert clean.returncode == 0, clean.stdout
    assert leaky.returncode == 1
    assert "person_name" in leaky.stdout and "original_uid" in leaky.stdout


def test_a_mask_replaces_the_stored_copy_and_a_rerun_keeps_it(home: Path, corpus: Path) -> None:
    from node.settings import load_settings
    from node.site import open_index
    from node.vetting.vet import apply_mask

    settings = load_settings(home)
    index = open_index(settings)
    with sqlite3.connect(home / "index.sqlite") as db:
        instance_id, path = db.execute(
            "SELECT i.id, i.path FROM instances i JOIN series s ON s.id = i.series_id "
            "WHERE s.modality = 'US'"
        ).fetchone()
    before = (home / "store" / path).read_bytes()

    result = apply_mask(
        index, settings, instance_id, [(0, 0, 320, 30)], by="ann", source="reviewer"
    )

    after = pydicom.dcmread(home / "store" / path)
    assert result.clean and after.BurnedInAnnotation == "NO"
    assert "113101" in {item.CodeValue for item in after.DeidentificationMethodCodeSequence}
    assert (home / "store" / path).read_bytes() != before
    assert not any(p.read_bytes() == before for p in (home / "store").rglob("*") if p.is_file())
    with sqlite3.connect(home / "index.sqlite") as db:
        open_ocr = db.execute(
            "SELECT COUNT(*) FROM findings WHERE kind = 'burned_in_text' AND resolved_at IS NULL"
        ).fetchone()[0]
    assert open_ocr == 0

    again = run_cli("node", "ingest", str(corpus), "--home", str(home), "-q")

    assert again.returncode == 0, again.stdout + again.stderr
    assert pydicom.dcmread(home / "store" / path).BurnedInAnnotation == "NO"
    with sqlite3.connect(home / "index.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0] == 0


@pytest.fixture
def node(home: Path) -> Iterator[NodeProcess]:
    (home / "policy.toml").write_text("[review]\ntwo_person = true\n")
    with NodeProcess(home) as running:
        yield running


def test_two_reviewers_approve_and_a_rejection_needs_a_reason(node: NodeProcess) -> None:
    tokens = {
        name: run_cli(
            "node",
            "token",
            "create",
            name,
            "--role",
            "reviewer",
            "--home",
            str(node.home),
            check=True,
        ).stdout.strip()
        for name in ("alice", "bob")
    }
    held = [uid for uid, status in statuses(node.home).items() if status == "held"]

    def post(who: str, uid: str, action: str, reason: str = "") -> httpx.Response:
        return httpx.post(
            f"{node.url}/api/v1/studies/{uid}/{action}",
            json={"reason": reason},
            headers={"Authorization": f"Bearer {tokens[who]}"},
            timeout=30,
        )

    first = post("alice", held[0], "approve", "looked at every image")
    twice = post("alice", held[0], "approve")
    second = post("bob", held[0], "approve")
    no_reason = post("bob", held[1], "reject")
    rejected = post("bob", held[1], "reject", "report names the referring physician")

    assert first.status_code == 200 and first.json()["status"] == "held"
    assert "second reviewer" in first.json()["message"]
    assert twice.status_code == 409 and twice.json()["code"] == "already_reviewed"
    assert second.json() == {"status": "approved", "message": "approved by alice, bob"}
    assert no_reason.status_code == 422 and no_reason.json()["code"] == "reason_required"
    assert rejected.json()["status"] == "rejected"
    findings = httpx.get(
        f"{node.url}/api/v1/studies/{held[0]}/findings",
        headers={"Authorization": f"Bearer {tokens['alice']}"},
        timeout=30,
    )
    assert findings.status_code == 200 and isinstance(findings.json(), list)
    assert run_cli("node", "audit", "verify", "--home", str(node.home)).returncode == 0


def test_a_study_still_receiving_instances_is_not_vetted_yet(tmp_path: Path, corpus: Path) -> None:
    from node.settings import load_settings
    from node.site import open_index
    from node.vetting.policy import VettingPolicy
    from node.vetting.vet import vet_pending

    home = tmp_path / "home"
    run_cli("node", "ingest", str(corpus), "--home", str(home), "-q", "--no-vet", check=True)
    settings = load_settings(home)
    index = open_index(settings)
    taken_in = statuses(home)

    early = vet_pending(index, settings, VettingPolicy(), settings.deid, stable_seconds=3600)
    unchanged = statuses(home)
    later = vet_pending(index, settings, VettingPolicy(), settings.deid, stable_seconds=0)

    assert set(taken_in.values()) == {"deidentified"}
    assert early.studies == 0 and unchanged == taken_in
    assert later.studies == len(taken_in) == 4
    assert "deidentified" not in statuses(home).values()
