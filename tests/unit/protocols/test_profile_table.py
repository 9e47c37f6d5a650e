"""The generated Table E.1-1 matches its generator and the standard's data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protocols.deid import table

ROOT = Path(__file__).resolve().parents[3]
STANDARD = ROOT.parent / "shared" / "standard" / "ps3.15-table-E.1-1.json"


@pytest.mark.skipif(not STANDARD.exists(), reason="../shared/standard is not beside this clone")
def test_committed_table_is_what_the_generator_makes() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_deid_profile.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not STANDARD.exists(), reason="../shared/standard is not beside this clone")
def test_every_row_of_the_standard_is_in_the_table() -> None:
    rows = json.loads(STANDARD.read_text())
    generated = {pattern: basic for pattern, _, _, basic, _ in table.ROWS}

    assert len(table.ROWS) == len(rows) == 621
    for row in rows:
        pattern = "private" if row["id"].startswith("gggg") else row["id"].lower()
        assert generated[pattern] == row["basicProfile"], row


def test_generator_drift_is_detected(tmp_path: Path) -> None:
    # Prepare: a copy of the committed files with one action changed by hand.
    if not STANDARD.exists():
        pytest.skip("../shared/standard is not beside this clone")
    target = tmp_path / "protocols" / "deid"
    target.mkdir(parents=True)
    for name in ("table_e1_1.json", "dictionary.json"):
        (target / name).write_text((ROOT / "protocols" / "deid" / name).read_text())
    text = (target / "table_e1_1.json").read_text()
    edited = text.replace(
        '"AccessionNumber", "Accession Number", "Z"', '"AccessionNumber", "Accession Number", "K"'
    )
    assert edited != text
    (target / "table_e1_1.json").write_text(edited)

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "gen_deid_profile.py"),
            "--check",
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    assert proc.returncode == 1
    assert "out of date: protocols/deid/table_e1_1.json" in proc.stderr


def test_header_names_generator_and_source() -> None:
    assert "tools/gen_deid_profile.py" in table.GENERATED_BY
    assert "ps3.15-table-E.1-1.json" in table.GENERATED_FROM


def test_types_cover_the_combined_actions() -> None:
    combined = [p for p, kw, _, basic, _ in table.ROWS if kw and "/" in basic]
    assert combined
    assert all(p in table.REQUIRED_TYPES for p in combined)
    # Institution Name is Type 3 in General Equipment: removable at the top of a CT.
    ct = table.SOP_CLASS_IOD["1.2.840.10008.5.1.4.1.1.2"]
    assert ct not in table.REQUIRED_TYPES["00080080"][1]
    # Patient ID is Type 2 in the Patient module of every image IOD.
    assert table.REQUIRED_TYPES["00100020"][1][ct] == 2
