"""``radfed node ingest`` as an operator runs it: bad input, a killed run, a full disk."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import struct
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from node.deid import keys
from node.settings import load_settings
from node.site import open_vault
from radfed.synth.site import write_site_corpus
from tests.helpers import RADFED, ROOT, indexed_vault_records, newest_vault_records, run_cli

pytestmark = pytest.mark.integration


def index_content(home: Path) -> dict[str, list[tuple[object, ...]]]:
    """Everything the index says, without row ids and timestamps."""
    queries = {
        "patients": "SELECT pseudonym FROM patients",
        "studies": "SELECT s.study_uid, p.pseudonym, s.study_date, s.status, s.modalities, "
        "s.series_count, s.instance_count, s.size, s.burned_in_risk FROM studies s "
        "JOIN patients p ON p.id = s.patient_id",
        "series": "SELECT se.series_uid, st.study_uid, se.modality, se.body_part, "
        "se.manufacturer, se.model, se.series_number, se.instance_count FROM series se "
        "JOIN studies st ON st.id = se.study_id",
        "instances": "SELECT i.sop_uid, se.series_uid, i.sop_class_uid, i.instance_number, "
        "i.rows, i.columns, i.pixel_spacing, i.slice_thickness, i.number_of_frames, "
        "i.transfer_syntax, i.photometric, i.size, i.sha256, i.burned_in_risk, i.risk_reasons, "
        "i.path, i.received_via FROM instances i JOIN series se ON se.id = i.series_id",
        "history": "SELECT st.study_uid, c.from_status, c.to_status, c.actor, c.reason "
        "FROM status_changes c JOIN studies st ON st.id = c.study_id",
        "quarantine": "SELECT fingerprint, code, message, source_kind, size FROM quarantine",
    }
    with sqlite3.connect(home / "index.sqlite") as db:
        return {name: sorted(db.execute(sql).fetchall(), key=repr) for name, sql in queries.items()}


def same_keys(source: Path, target: Path) -> None:
    """Give a second node home the first one's secrets (same pseudonyms, same UIDs)."""
    keys.site_secret(source / "keys")
    keys.vault_key(source / "keys")
    shutil.copytree(source / "keys", target / "keys")


def test_a_killed_ingest_resumes_to_the_index_of_a_clean_run(tmp_path: Path) -> None:
    corpus = tmp_path / "export"
    write_site_corpus(corpus, patients=12, ct_slices=24, ct_size=64, cr_size=64)
    total = sum(1 for p in corpus.rglob("*") if p.is_file())
    assert total >= 300
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    same_keys(killed, clean)
    proc = subprocess.Popen(
        [*RADFED, "node", "ingest", str(corpus), "--home", str(killed), "-q", "--jobs", "2"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        stored = (
            sum(1 for _ in (killed / "store").rglob("*.dcm")) if (killed / "store").exists() else 0
        )
        if stored >= total // 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "ingest finished before it could be killed: make the corpus larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    time.sleep(0.5)  # let the orphaned workers see their parent gone and exit

    run_cli("node", "ingest", str(corpus), "--home", str(killed), "-q", check=True)
    run_cli("node", "ingest", str(corpus), "--home", str(clean), "-q", check=True)

    resumed, reference = index_content(killed), index_content(clean)
    assert len(reference["instances"]) == total
    assert resumed == reference
    stored = {str(p.relative_to(killed / "store")) for p in (killed / "store").rglob("*.dcm")}
    assert stored == {row[15] for row in resumed["instances"]}
    assert run_cli("node", "audit", "verify", "--home", str(killed)).returncode == 0


def write_header(path: Path, elements: bytes) -> None:
    """A Part 10 file: preamble, a minimal meta group, then raw data set bytes."""
    ts = b"1.2.840.10008.1.2.1\x00"
    meta = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(ts)) + ts
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<L", len(meta))
    path.write_bytes(b"\x00" * 128 + b"DICM" + group_length + meta + elements)


def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b" " if vr != b"UI" else b"\x00"
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def test_bad_input_is_quarantined_with_a_reason_and_the_run_goes_on(tmp_path: Path) -> None:
    corpus = tmp_path / "export"
    write_site_corpus(corpus / "good", patients=1, ct_slices=2, ct_size=32, cr_size=32)
    bad = corpus / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not DICOM at all")
    good_file = next((corpus / "good").rglob("*.dcm"))
    (bad / "truncated.dcm").write_bytes(good_file.read_bytes()[:400])
    uids = (
        element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2")
        + element(0x0020, 0x000D, b"UI", b"1.2.3.1")
        + element(0x0020, 0x000E, b"UI", b"1.2.3.2")
    )
    write_header(bad / "no-sop-uid.dcm", uids)
    write_header(
        bad / "impossible-length.dcm",
        element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2")
        + b"\x10\x00\x10\x00PN"
        + struct.pack("<H", 60000)
        + b"DOE^JOHN",
    )
    huge = bad / "two-gigabytes.dcm"
    write_header(
        huge,
        uids
        + element(0x0008, 0x0018, b"UI", b"1.2.3.3")
        + b"\xe0\x7f\x10\x00OW\x00\x00"
        + struct.pack("<L", 0xFFFFFFF0),
    )
    with huge.open("r+b") as fh:
        fh.truncate(2 * 1024**3)  # sparse: 2 GB on paper, declaring more than it holds
    (bad / "dangling.dcm").symlink_to(tmp_path / "gone.dcm")
    home = tmp_path / "home"

    proc = run_cli("node", "ingest", str(corpus), "--home", str(home), "-q")

    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(home / "index.sqlite") as db:
        codes = dict(db.execute("SELECT message, code FROM quarantine").fetchall())
        instances = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    assert instances == 2 + 1 + 1 + 1  # CT slices, radiograph, ultrasound, report
    assert sorted(codes.values()) == sorted(
        ["not_dicom", "truncated", "malformed", "truncated", "truncated", "unreadable"]
    )
    assert any("missing SOP Instance UID" in m for m in codes)
    assert any("declares 60000 bytes" in m for m in codes)
    assert any("No such file" in m for m in codes)
    assert "quarantined (unreadable)        6" in proc.stdout


def test_a_full_disk_loses_nothing_and_a_rerun_completes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = home / "store"
    store.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(store)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}")
    try:
        corpus = tmp_path / "export"
        write_site_corpus(
            corpus, patients=1, ct_slices=12, ct_size=256, cr_size=64, with_us=False, with_sr=False
        )

        full = run_cli("node", "ingest", str(corpus), "--home", str(home), "-q", "--jobs", "1")

        assert full.returncode == 1
        assert "write_error" in full.stdout and "No space left" in full.stdout
        with sqlite3.connect(home / "index.sqlite") as db:
            paths = [r[0] for r in db.execute("SELECT path FROM instances")]
            failed = db.execute("SELECT COUNT(*) FROM quarantine WHERE code = 'write_error'")
            assert failed.fetchone()[0] > 0
        assert 0 < len(paths) < 13
        assert all((store / p).is_file() for p in paths)  # nothing refers to a missing file
        kept = {p: (store / p).read_bytes() for p in paths}

        subprocess.run(["mount", "-o", "remount,size=20m", str(store)], check=True)
        again = run_cli("node", "ingest", str(corpus), "--home", str(home), "-q")

        assert again.returncode == 0, again.stdout + again.stderr
        with sqlite3.connect(home / "index.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 13
        assert all((store / p).read_bytes() == data for p, data in kept.items())
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


def test_originals_are_kept_only_when_the_site_asks(tmp_path: Path) -> None:
    corpus = tmp_path / "export"
    write_site_corpus(
        corpus, patients=1, ct_slices=2, ct_size=32, cr_size=32, with_us=False, with_sr=False
    )
    plain, keeping = tmp_path / "plain", tmp_path / "keeping"
    keeping.mkdir()
    (keeping / "config.toml").write_text("keep_originals = true\n")

    run_cli("node", "ingest", str(corpus), "--home", str(plain), "-q", check=True)
    run_cli("node", "ingest", str(corpus), "--home", str(keeping), "-q", check=True)

    assert not (plain / "originals").exists()
    originals = sorted((keeping / "originals").rglob("*.dcm"))
    assert len(originals) == 3
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in originals)
    sources = {p.read_bytes() for p in corpus.rglob("*.dcm")}
    assert {p.read_bytes() for p in originals} == sources
    stored = {str(p.relative_to(keeping / "store")) for p in (keeping / "store").rglob("*.dcm")}
    assert {str(p.relative_to(keeping / "originals")) for p in originals} == stored


def test_each_indexed_instance_names_the_vault_record_holding_its_entry(tmp_path: Path) -> None:
    # Prepare: a node that took a folder in (two workers: outcomes come from the pool)
    corpus = tmp_path / "export"
    write_site_corpus(corpus, patients=2, ct_slices=2, ct_size=32, cr_size=32)
    home = tmp_path / "home"
    ingest = ("node", "ingest", str(corpus), "--home", str(home), "-q", "--jobs", "2", "--no-vet")
    run_cli(*ingest, check=True)
    settings = load_settings(home)
    first = indexed_vault_records(settings.index_path)

    # Execute: the same folder again (its entries go to newer records)
    run_cli(*ingest, check=True)

    # Assert: every row names the newest record that holds its entry
    again = indexed_vault_records(settings.index_path)
    assert first and None not in first.values()
    assert first.keys() == again.keys()
    assert again == newest_vault_records(open_vault(settings))
    assert min(n for n in again.values() if n is not None) > max(
        n for n in first.values() if n is not None
    )


def test_same_uid_with_different_content_is_a_conflict(tmp_path: Path) -> None:
    corpus = tmp_path / "export"
    write_site_corpus(
        corpus, patients=1, ct_slices=1, ct_size=32, cr_size=32, with_us=False, with_sr=False
    )
    home = tmp_path / "home"
    run_cli("node", "ingest", str(corpus), "--home", str(home), "-q", check=True)
    changed = tmp_path / "changed"
    source = next(corpus.rglob("CT/*.dcm"))
    ds = pydicom.dcmread(source)
    ds.WindowCenter = 40  # a kept attribute: the de-identified file differs
    changed.mkdir()
    ds.save_as(changed / "resent.dcm")

    proc = run_cli("node", "ingest", str(changed), "--home", str(home), "-q")

    assert proc.returncode == 1
    with sqlite3.connect(home / "index.sqlite") as db:
        assert db.execute("SELECT code FROM quarantine").fetchall() == [("conflict",)]
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 2
