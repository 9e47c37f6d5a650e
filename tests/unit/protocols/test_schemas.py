"""The wire models match the published schemas of the current protocol version."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from protocols.version import PROTOCOL_VERSION

ROOT = Path(__file__).resolve().parents[3]


def test_wire_models_match_the_published_protocol() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_schemas.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_published_file_names_its_version() -> None:
    published = ROOT / "protocols" / "schemas" / f"protocol-{PROTOCOL_VERSION}.json"
    document = json.loads(published.read_text())

    assert document["protocol_version"] == PROTOCOL_VERSION
    assert "protocols.api.node.StudyDetail" in document["schemas"]
    assert "protocols.api.errors.ErrorBody" in document["schemas"]


def test_a_drifted_schema_is_refused_until_the_version_is_bumped(tmp_path: Path) -> None:
    published = ROOT / "protocols" / "schemas" / f"protocol-{PROTOCOL_VERSION}.json"
    document = json.loads(published.read_text())
    document["schemas"]["protocols.api.errors.ErrorBody"]["properties"].pop("retryable")
    drifted = json.dumps(document, indent=1, sort_keys=True) + "\n"
    (tmp_path / published.name).write_text(drifted)
    tool = [sys.executable, str(ROOT / "tools" / "gen_schemas.py"), "--dir", str(tmp_path)]

    check = subprocess.run([*tool, "--check"], capture_output=True, text=True, check=False)
    overwrite = subprocess.run(tool, capture_output=True, text=True, check=False)

    assert check.returncode == 1 and "bump PROTOCOL_VERSION" in check.stderr
    assert overwrite.returncode == 1  # a published version is never rewritten
    assert (tmp_path / published.name).read_text() == drifted
