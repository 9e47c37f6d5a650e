"""The PHI-canary corpus through ``radfed node deid``, run as an operator runs it.

Twice: with every option off (the Basic Profile: nothing planted may survive)
and with the site defaults (only the K rows of the options that are on — the
patient characteristics — and times, which modified dates keep, may survive).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from protocols.deid.options import DeidOptions
from radfed.synth.canary import CanaryCorpus, write_canary_corpus
from tests.helpers import find_needles, report_lines, run_cli, walk_values

pytestmark = pytest.mark.integration

SECRET = "ab" * 32


@dataclass
class Run:
    corpus: CanaryCorpus
    dst: Path
    home: Path
    report: list[dict[str, Any]]
    stdout: str

    def outputs(self) -> list[Path]:
        return sorted(self.dst.rglob("*.dcm"))

    def pairs(self) -> list[tuple[Path, Path]]:
        """(source, output) for every written file."""
        return [
            (Path(line["source"]), self.dst / line["output"])
            for line in self.report
            if line["status"] in ("written", "unchanged")
        ]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> CanaryCorpus:
    root = tmp_path_factory.mktemp("canary") / "pacs-export"
    return write_canary_corpus(root, patients=3, ct_slices=3, ct_size=512, cr_size=2048)


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "site.secret"
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


def _deid(corpus: CanaryCorpus, base: Path, secret: Path, *extra: str) -> Run:
    dst, home = base / "out", base / "home"
    proc = run_cli(
        "node",
        "deid",
        str(corpus.root),
        str(dst),
        "--home",
        str(home),
        "--site-secret-file",
        str(secret),
        "--quiet",
        *extra,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Run(corpus, dst, home, report_lines(home), proc.stdout)


@pytest.fixture(scope="module")
def input_digest(corpus: CanaryCorpus) -> dict[str, str]:
    return _tree_digest(corpus.root)


@pytest.fixture(scope="module")
def basic(
    corpus: CanaryCorpus,
    secret_file: Path,
    input_digest: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Run:
    return _deid(corpus, tmp_path_factory.mktemp("basic"), secret_file, "--basic", "--jobs", "2")


@pytest.fixture(scope="module")
def defaults(
    corpus: CanaryCorpus,
    secret_file: Path,
    input_digest: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Run:
    return _deid(corpus, tmp_path_factory.mktemp("defaults"), secret_file, "--jobs", "2")


@pytest.fixture(params=["basic", "defaults"])
def run(request: pytest.FixtureRequest) -> Run:
    return request.getfixturevalue(request.param)


# -- nothing planted survives ---------------------------------------------------------


def test_every_file_is_written(run: Run) -> None:
    # Prepare / Execute: the run fixture. Assert:
    assert {line["status"] for line in run.report} == {"written"}
    assert len(run.outputs()) == len(run.corpus.files)


def test_basic_profile_leaves_no_canary_anywhere(basic: Run) -> None:
    needles = {**basic.corpus.needles, **basic.corpus.kept_by_defaults}
    assert len(needles) > 1000  # the corpus really plants canaries everywhere

    findings = find_needles(basic.outputs(), needles)

    assert findings == []


def test_defaults_leave_only_what_the_options_keep(defaults: Run) -> None:
    findings = find_needles(defaults.outputs(), defaults.corpus.needles)

    assert findings == []


def test_defaults_do_keep_patient_characteristics_and_times(defaults: Run, basic: Run) -> None:
    def top_values(run: Run, keyword: str) -> set[str]:
        out = set()
        for path in run.outputs():
            ds = pydicom.dcmread(path)
            if keyword in ds and ds[keyword].value not in (None, ""):
                out.add(str(ds[keyword].value))
        return out

    assert top_values(defaults, "PatientAge") == {"077Y"}
    assert top_values(defaults, "StudyTime")  # times kept with modified dates
    assert top_values(basic, "PatientAge") == set()
    assert all(v in ("", "000000") for v in top_values(basic, "StudyTime"))


def test_no_original_uid_survives(run: Run) -> None:
    originals = run.corpus.original_uids
    seen_uids = 0
    for path in run.outputs():
        data = path.read_bytes()
        ds = pydicom.dcmread(path)
        for value in walk_values(ds):
            if value.vr != "UI":
                continue
            for uid in value.raw.decode().split("\\"):
                seen_uids += 1
                assert uid not in originals, f"{path.name} {value.path} kept {uid}"
                assert uid.startswith("2.25.") or uid in pydicom.uid.UID_dictionary, uid
        assert not [u for u in originals if u.encode() in data]
    assert seen_uids > 100


def test_every_reference_points_at_an_output_instance(run: Run) -> None:
    instances = {str(pydicom.dcmread(p).SOPInstanceUID) for p in run.outputs()}
    references = [
        v.raw.decode()
        for p in run.outputs()
        for v in walk_values(pydicom.dcmread(p))
        if v.tag == 0x00081155
    ]

    assert len(references) >= 6  # CT slices reference each other; the SR references the CT
    assert set(references) <= instances


def test_study_series_and_frame_of_reference_stay_consistent(run: Run) -> None:
    by_study: dict[str, set[str]] = defaultdict(set)
    for source, output in run.pairs():
        original, new = pydicom.dcmread(source), pydicom.dcmread(output)
        by_study[str(original.StudyInstanceUID)].add(str(new.StudyInstanceUID))
        assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
        if "FrameOfReferenceUID" in original:
            assert new.FrameOfReferenceUID != original.FrameOfReferenceUID
    assert all(len(mapped) == 1 for mapped in by_study.values())


def _dates(ds: pydicom.Dataset) -> dict[int, dt.date]:
    out = {}
    for elem in ds:
        if elem.VR == "DA" and elem.value:
            value = str(elem.value)
            if len(value) == 8 and value.isdigit():
                out[int(elem.tag)] = dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    return out


def test_each_patients_dates_move_by_one_constant(defaults: Run) -> None:
    shifts: dict[str, set[int]] = defaultdict(set)
    for source, output in defaults.pairs():
        before, after = _dates(pydicom.dcmread(source)), _dates(pydicom.dcmread(output))
        for tag, date in after.items():
            assert tag in before, f"{output.name}: date {tag:08X} appeared from nowhere"
            shifts[defaults.corpus.patient_of[str(source)]].add((date - before[tag]).days)

    assert len(shifts) == 3
    assert all(len(days) == 1 for days in shifts.values()), shifts
    constants = [next(iter(days)) for days in shifts.values()]
    assert all(-3652 <= d <= -365 for d in constants)
    assert len(set(constants)) == 3  # each patient has their own shift


def test_basic_profile_keeps_no_real_date(basic: Run) -> None:
    for path in basic.outputs():
        for date in _dates(pydicom.dcmread(path)).values():
            assert date == dt.date(1900, 1, 1), f"{path.name} kept a date {date}"


def test_pixel_data_is_byte_identical(run: Run) -> None:
    checked = 0
    for source, output in run.pairs():
        expected = run.corpus.pixel_sha256.get(str(source))
        if expected is None:
            continue
        assert hashlib.sha256(pydicom.dcmread(output).PixelData).hexdigest() == expected
        checked += 1
    assert checked == len(run.corpus.pixel_sha256)


def test_burned_in_risk_is_flagged(run: Run) -> None:
    for line in run.report:
        expected = run.corpus.burned_in_risk[line["source"]]
        assert bool(line["risk"]) is expected, line


def test_deidentification_method_attributes_are_true(run: Run, basic: Run) -> None:
    options = DeidOptions.basic() if run is basic else DeidOptions()
    expected_codes = {code for code, _ in options.method_codes()}
    temporal = "REMOVED" if run is basic else "MODIFIED"
    for path in run.outputs():
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert {item.CodeValue for item in ds.DeidentificationMethodCodeSequence} == expected_codes
        assert all(i.CodingSchemeDesignator == "DCM" for i in ds.DeidentificationMethodCodeSequence)
        assert ds.LongitudinalTemporalInformationModified == temporal
        assert str(ds.PatientName) == ds.PatientID
        assert ds.PatientID.startswith("SITE-")


def test_one_pseudonym_per_patient(run: Run) -> None:
    pseudonyms: dict[str, set[str]] = defaultdict(set)
    for source, output in run.pairs():
        pseudonyms[run.corpus.patient_of[str(source)]].add(pydicom.dcmread(output).PatientID)
    assert all(len(p) == 1 for p in pseudonyms.values())
    assert len({next(iter(p)) for p in pseudonyms.values()}) == 3


def test_output_tree_is_named_from_deidentified_values_only(run: Run) -> None:
    for output in run.outputs():
        ds = pydicom.dcmread(output)
        rel = output.relative_to(run.dst).parts
        assert rel == (
            ds.PatientID,
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            f"{ds.SOPInstanceUID}.dcm",
        )
    names = "/".join(str(p.relative_to(run.dst)) for p in run.dst.rglob("*")).encode()
    assert not [n for n in run.corpus.needles if n in names]


def test_input_is_never_modified(basic: Run, defaults: Run, input_digest: dict[str, str]) -> None:
    assert _tree_digest(basic.corpus.root) == input_digest


def test_a_second_run_is_byte_identical(
    corpus: CanaryCorpus, secret_file: Path, defaults: Run, tmp_path: Path
) -> None:
    again = _deid(corpus, tmp_path, secret_file, "--jobs", "1")

    assert _tree_digest(again.dst) == _tree_digest(defaults.dst)


def test_rerun_into_the_same_destination_changes_nothing(
    corpus: CanaryCorpus, secret_file: Path, tmp_path: Path
) -> None:
    first = _deid(corpus, tmp_path, secret_file)
    before = _tree_digest(first.dst)

    second = _deid(corpus, tmp_path, secret_file)

    assert {line["status"] for line in second.report} == {"unchanged"}
    assert _tree_digest(second.dst) == before


def test_reidentification_map_is_kept_encrypted(defaults: Run) -> None:
    from node.deid.vault import MAGIC

    vault = (defaults.home / "vault" / "originals.vault").read_bytes()
    assert vault.startswith(MAGIC)
    for patient_id in defaults.corpus.mrns:
        assert patient_id.encode() not in vault
    key = defaults.home / "keys" / "vault.key"
    assert key.stat().st_mode & 0o777 == 0o600


def test_vault_maps_every_output_back_to_its_original(defaults: Run) -> None:
    from node.deid.keys import vault_key
    from node.deid.vault import Vault

    vault = Vault(defaults.home / "vault" / "originals.vault", vault_key(defaults.home / "keys"))
    by_new = {e["sop_instance_uid"][1]: e for e in vault.entries()}

    for source, output in defaults.pairs():
        original, new = pydicom.dcmread(source), pydicom.dcmread(output)
        entry = by_new[str(new.SOPInstanceUID)]
        assert entry["sop_instance_uid"][0] == original.SOPInstanceUID
        assert entry["patient_id"] == original.PatientID
        assert entry["pseudonym"] == new.PatientID
