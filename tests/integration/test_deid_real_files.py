"""Real images shipped by pydicom and by deid-data, through ``radfed node deid``.

These files come from many vendors and writers (every transfer syntax, odd
encodings, broken files). Every readable one must come out de-identified and
readable, with no person name, original UID or identifier left; the rest must
be quarantined with a reason — never a crash, never a half-written file.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import deid_data
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.helpers import find_needles, iod_errors, report_lines, run_cli, walk_values

pytestmark = pytest.mark.integration

PYDICOM_FILES = Path(os.path.dirname(get_testdata_file("CT_small.dcm")))
DEID_DATA = Path(deid_data.__file__).parent / "data"


def _identifiers(path: Path) -> dict[bytes, str]:
    """Values of an input that must not reach its output: names, IDs, UIDs, dates."""
    try:
        ds = pydicom.dcmread(path)
    except Exception:
        return {}
    out: dict[bytes, str] = {}
    for value in walk_values(ds):
        text = value.raw.strip(b" \x00")
        if value.vr == "PN" and len(text.rstrip(b"^")) >= 6 and value.tag >> 16 != 0x0002:
            # The whole name and its longer components: shorter strings (MARY is a
            # substring of PRIMARY, abcd of pixel bytes) would match by coincidence.
            out[text.rstrip(b"^")] = f"{path.name} {value.path} (PN)"
            for part in re.split(rb"[\^=\\]", text):
                if len(part.strip()) >= 6:
                    out[part.strip()] = f"{path.name} {value.path} (PN part)"
        elif value.vr == "UI" and value.tag not in (0x00020010, 0x00020012):
            for uid in text.split(b"\\"):
                if uid and uid.decode("latin-1") not in pydicom.uid.UID_dictionary and len(uid) > 8:
                    out[uid] = f"{path.name} {value.path} (UID)"
        elif value.tag in (0x00100020, 0x00080050) and len(text) >= 6:
            out[text] = f"{path.name} {value.path}"
    return out


@pytest.fixture(scope="module", params=["pydicom", "deid-data"])
def real_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    base = tmp_path_factory.mktemp(request.param)
    src = base / "in"
    shutil.copytree(PYDICOM_FILES if request.param == "pydicom" else DEID_DATA, src)
    proc = run_cli(
        "node",
        "deid",
        str(src),
        str(base / "out"),
        "--home",
        str(base / "home"),
        "--quiet",
        "--jobs",
        "2",
    )
    return {"proc": proc, "src": src, "dst": base / "out", "report": report_lines(base / "home")}


def test_every_file_is_accounted_for(real_run: dict[str, Any]) -> None:
    report = real_run["report"]
    files = [p for p in real_run["src"].rglob("*") if p.is_file()]

    assert sorted(line["source"] for line in report) == sorted(str(p) for p in files)
    written = [line for line in report if line["status"] == "written"]
    assert len(written) >= 10
    for line in report:
        if line["status"] == "quarantined":
            assert line["code"] in (
                "not_dicom",
                "truncated",
                "malformed",
                "unreadable",
                "pixel_data_size",
            )
            assert line["reason"]
    assert real_run["proc"].returncode == (
        1 if any(line["status"] == "failed" for line in report) else 0
    )
    assert "files seen" in real_run["proc"].stdout


def test_outputs_read_back_and_keep_their_pixels(real_run: dict[str, Any]) -> None:
    for line in real_run["report"]:
        if line["status"] != "written":
            continue
        out = pydicom.dcmread(real_run["dst"] / line["output"])
        original = pydicom.dcmread(line["source"], force=True)
        out.walk(lambda _ds, elem: elem.value)  # every element decodes
        if "PixelData" in original:
            assert out.PixelData == original.PixelData, line["source"]
        assert out.PatientIdentityRemoved == "YES"


def test_no_name_id_or_uid_survives(real_run: dict[str, Any]) -> None:
    checked = 0
    for line in real_run["report"]:
        if line["status"] != "written":
            continue
        needles = _identifiers(Path(line["source"]))
        checked += len(needles)
        out = real_run["dst"] / line["output"]
        assert find_needles([out], needles) == [], line["source"]
    assert checked > 50


def test_nothing_is_left_half_written(real_run: dict[str, Any]) -> None:
    dst: Path = real_run["dst"]
    assert not (dst / ".radfed-tmp").exists()
    written = {line["output"] for line in real_run["report"] if line["status"] == "written"}
    on_disk = {str(p.relative_to(dst)) for p in dst.rglob("*.dcm")}
    assert on_disk == written


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_deidentification_adds_noiod_errors(real_run: dict[str, Any]) -> None:
    """dciodvfy (dicom3tools): an output may not have an error its input did not have."""
    new_errors = {}
    for line in real_run["report"]:
        if line["status"] != "written":
            continue
        before = iod_errors(Path(line["source"]))
        after = iod_errors(real_run["dst"] / line["output"])
        if after - before:
            new_errors[Path(line["source"]).name] = sorted(after - before)
    assert new_errors == {}
