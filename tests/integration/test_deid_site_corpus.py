"""A realistic site export (CT, CR/DX, US, SR) through ``radfed node deid``: valid objects out."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest

from radfed.synth.site import write_site_corpus
from tests.helpers import iod_errors, report_lines, run_cli

pytestmark = pytest.mark.integration

ALL_ON = [
    "--option",
    "retain-device-identity",
    "--option",
    "retain-institution-identity",
    "--option",
    "retain-safe-private",
    "--option",
    "clean-descriptors",
    "--option",
    "clean-structured-content",
    "--option",
    "clean-graphics",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site") / "export"
    write_site_corpus(root, patients=2, ct_slices=3, ct_size=64, cr_size=128)
    return root


@pytest.fixture(scope="module", params=["defaults", "basic", "options-on"])
def site_run(
    request: pytest.FixtureRequest, site: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    base = tmp_path_factory.mktemp(request.param)
    extra = {"defaults": [], "basic": ["--basic"], "options-on": ALL_ON}[request.param]
    proc = run_cli(
        "node",
        "deid",
        str(site),
        str(base / "out"),
        "--home",
        str(base / "home"),
        "--quiet",
        *extra,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"dst": base / "out", "report": report_lines(base / "home"), "mode": request.param}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_outputs_add_no_iod_errors(site_run: dict[str, Any]) -> None:
    new = {}
    for line in site_run["report"]:
        added = iod_errors(site_run["dst"] / line["output"]) - iod_errors(Path(line["source"]))
        if added:
            new[Path(line["source"]).name] = sorted(added)

    assert new == {}


def test_every_modality_comes_through(site_run: dict[str, Any]) -> None:
    modalities = {
        pydicom.dcmread(site_run["dst"] / line["output"]).Modality for line in site_run["report"]
    }
    assert modalities == {"CT", "CR", "DX", "US", "SR"}


def test_options_change_what_is_kept(site_run: dict[str, Any]) -> None:
    ct = next(
        pydicom.dcmread(site_run["dst"] / line["output"])
        for line in site_run["report"]
        if "/CT/" in line["source"]
    )
    if site_run["mode"] == "options-on":
        assert ct.InstitutionName == "Springfield General Hospital"
        assert ct.DeviceSerialNumber == "SN-778899"
        assert ct.private_block(0x0043, "GEMS_PARM_01")[0x39].value == [1000, 8, 0, 0]
        assert 0x00091001 not in ct  # a private name is never safe
    else:
        assert "InstitutionName" not in ct and "DeviceSerialNumber" not in ct
        assert not any(elem.tag.is_private for elem in ct)
