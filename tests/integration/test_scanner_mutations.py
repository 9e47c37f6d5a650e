"""The PHI scanner against a de-identifier that fails on purpose, and against correct outputs.

Mutation testing of the scanner: each engine action is disabled in turn (its
outcome becomes KEEP), private elements are all kept, or the source's file
meta is spliced back. On the canary corpus every mutant must leave a leak the
scanner reports, on the node (with the originals from the correct engine's
vault records) and on the coordinator (without). A mutant that changes nothing
on the corpus is asserted to change nothing: no case passes silently.

The other way round, the correct engine's outputs of the canary corpus, of a
synthetic site and of pydicom's test files must give no finding at MEDIUM or
above, with and without the originals.
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from node.deid.dicomio import DicomFormatError
from node.deid.engine import Deidentifier, DeidError, DeidResult
from node.deid.values import Keyed
from protocols.deid.options import DeidOptions
from protocols.deid.profile import CompiledProfile, Outcome, compile_profile
from protocols.phi.findings import PhiFinding, Severity
from protocols.phi.scanner import Originals, at_least, scan
from radfed.synth.canary import write_canary_corpus
from radfed.synth.site import write_site_corpus

pytestmark = pytest.mark.integration

SECRET = b"m" * 32
SITE = "SITE"
#: A SOP class no standard registers: Keep Class UID must map it.
PRIVATE_CLASS = "1.2.826.0.1.3680043.10.1043.77.1"
PYDICOM_FILES = Path(os.path.dirname(get_testdata_file("CT_small.dcm")))
OPTIONS = {
    "defaults": DeidOptions(),
    "basic": DeidOptions.basic(),
    "options-on": DeidOptions().with_settings(
        [
            "retain-device-identity",
            "retain-institution-identity",
            "retain-safe-private",
            "clean-descriptors",
            "clean-structured-content",
            "clean-graphics",
        ]
    ),
}


# -- the mutants ---------------------------------------------------------------------------------


class OutcomeKept(Deidentifier):
    """The engine with one outcome of the profile turned into KEEP."""

    def __init__(self, profile: CompiledProfile, keyed: Keyed, disabled: Outcome) -> None:
        super().__init__(profile, keyed)
        self.disabled = disabled

    def _outcome(self, tag: int, vr: str, iod: int, nested: bool) -> Outcome:
        outcome = super()._outcome(tag, vr, iod, nested)
        return Outcome.KEEP if outcome is self.disabled else outcome


class PrivateKept(Deidentifier):
    """The engine keeping every private element (creators included)."""

    def _private(self, ctx: Any, el: Any, creators: Any, used: Any, out: Any) -> None:
        out.append((el.tag, el.start, el.end, None))


class MetaKept(Deidentifier):
    """The engine with the source's preamble and file meta spliced back in."""

    def deidentify(self, data: bytes | memoryview) -> DeidResult:
        result = super().deidentify(data)
        result.pieces[0] = bytes(data[: _meta_end(bytes(data))])
        return result


def _meta_end(data: bytes) -> int:
    """End of group 0002 (always explicit VR little endian)."""
    pos = 132
    while int.from_bytes(data[pos : pos + 2], "little") == 0x0002:
        if data[pos + 4 : pos + 6] in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
            pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6 : pos + 8], "little")
    return pos


#: Mutant -> what it disables, and the finding kinds its leak must produce.
MUTANTS: dict[str, tuple[Outcome | str, set[str]]] = {
    "remove": (Outcome.REMOVE, {"not_removed", "person_name"}),
    "empty": (Outcome.EMPTY, {"not_emptied"}),
    "dummy": (Outcome.DUMMY, {"not_replaced"}),
    "map-uid": (Outcome.MAP_UID, {"not_replaced", "original_uid"}),
    "shift": (Outcome.SHIFT, {"date_not_shifted"}),
    "pseudonym": (Outcome.PSEUDONYM, {"person_name", "not_emptied", "malformed"}),
    "keep-class-uid": (Outcome.KEEP_CLASS_UID, {"not_replaced", "original_uid"}),
    "private": ("private", {"private_not_allowed"}),
    "file-meta": ("file-meta", {"file_meta", "original_uid"}),
}
#: Kinds only the node sees: they need the originals.
NODE_ONLY = {"date_not_shifted", "original_value"}
#: (options, mutant) where the mutation has nothing to act on in this corpus.
NO_EFFECT = {("basic", "shift")}  # the Basic Profile shifts no date: it removes or empties them


def _engine(name: str, options: DeidOptions) -> Deidentifier:
    profile, keyed = compile_profile(options), Keyed(SECRET, SITE)
    disabled = MUTANTS[name][0] if name in MUTANTS else None
    if isinstance(disabled, Outcome):
        return OutcomeKept(profile, keyed, disabled)
    if disabled == "private":
        return PrivateKept(profile, keyed)
    if disabled == "file-meta":
        return MetaKept(profile, keyed)
    return Deidentifier(profile, keyed)


def _run(engine: Deidentifier, files: list[Path]) -> list[tuple[bytes, dict[str, Any]]]:
    out = []
    for path in files:
        result = engine.deidentify(path.read_bytes())
        out.append((b"".join(bytes(c) for c in result.chunks), result.record))
    return out


def _kinds(findings: list[PhiFinding]) -> set[str]:
    return {f.kind for f in findings}


def _values(ds: Dataset, prefix: str = "") -> Iterator[tuple[str, str, object]]:
    """(path, VR, value) of every element at every depth."""
    for elem in ds:
        path = f"{prefix}{elem.tag}"
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value):
                yield from _values(item, f"{path}[{index}]/")
        else:
            yield path, elem.VR, elem.value


def _changed_vrs(correct: bytes, mutated: bytes) -> set[str]:
    """VRs of the elements a mutation changed (added, removed or rewritten)."""
    before = {p: (vr, v) for p, vr, v in _values(pydicom.dcmread(io.BytesIO(correct)))}
    after = {p: (vr, v) for p, vr, v in _values(pydicom.dcmread(io.BytesIO(mutated)))}
    return {
        (before.get(p) or after[p])[0]
        for p in set(before) | set(after)
        if before.get(p) != after.get(p)
    }


# -- the canary corpus ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def canary(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The canary corpus, and last one instance of a private SOP class."""
    root = tmp_path_factory.mktemp("canary") / "export"
    corpus = write_canary_corpus(root, patients=1, ct_slices=1, ct_size=64, cr_size=64)
    # One instance of a private SOP class, so that Keep Class UID has a UID to map.
    source = next(p for p in corpus.files if p.parent.name in ("US", "SC"))
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = PRIVATE_CLASS
    ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.77"
    ds.file_meta.MediaStorageSOPClassUID = PRIVATE_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    extra = root / "private-class.dcm"
    ds.save_as(extra, enforce_file_format=True)
    return [*corpus.files, extra]


@pytest.fixture(scope="module", params=["defaults", "basic", "options-on"])
def correct(
    request: pytest.FixtureRequest, canary: list[Path]
) -> tuple[str, list[tuple[bytes, dict[str, Any]]]]:
    """The correct engine's outputs and vault records for one set of options."""
    name = str(request.param)
    return name, _run(_engine("correct", OPTIONS[name]), canary)


@pytest.mark.parametrize("view", ["node", "coordinator"])
@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_every_disabled_action_leaves_a_leak_the_scanner_reports(
    correct: tuple[str, list[tuple[bytes, dict[str, Any]]]],
    canary: list[Path],
    mutant: str,
    view: str,
) -> None:
    # Prepare
    options_name, good = correct
    options = OPTIONS[options_name]
    originals = Originals.from_records(r for _, r in good) if view == "node" else None

    # Execute
    outputs = _run(_engine(mutant, options), canary)
    changed = [(g, m) for (g, _), (m, _) in zip(good, outputs, strict=True) if g != m]
    new_findings = []
    for before, after in changed:
        already = scan(before, options, site_prefix=SITE, originals=originals)
        known = {(f.kind, f.location) for f in already}
        found = scan(after, options, site_prefix=SITE, originals=originals)
        new_findings.append([f for f in found if (f.kind, f.location) not in known])

    # Assert
    if (options_name, mutant) in NO_EFFECT:
        assert changed == [], "the mutation was expected to have nothing to act on"
        return
    assert changed, f"the {mutant} mutant changed no output: the corpus does not exercise it"
    expected = MUTANTS[mutant][1]
    if view == "coordinator":
        expected = expected - NODE_ONLY
        if not expected:
            # Unshifted dates look like any dates without the originals: the mutant must
            # have changed nothing but dates, which only the node can tell.
            assert {vr for g, m in changed for vr in _changed_vrs(g, m)} <= {"DA", "DT"}
            return
    reported = set().union(*(_kinds(findings) for findings in new_findings))
    assert expected <= reported, f"{mutant}: missing {expected - reported}"
    for findings in new_findings:
        # Every output the mutation changed is held for something new: a HIGH finding.
        assert at_least(findings, Severity.HIGH), f"{mutant}: a changed output passed"


# -- correct outputs: no finding ------------------------------------------------------------------


def _serious(
    outputs: list[tuple[bytes, dict[str, Any]]],
    options: DeidOptions,
    originals: Originals | None,
    names: list[str],
) -> list[str]:
    problems = []
    for (data, _), name in zip(outputs, names, strict=True):
        for f in at_least(
            scan(data, options, site_prefix=SITE, originals=originals), Severity.MEDIUM
        ):
            problems.append(f"{name}: {f.severity.name} {f.kind} at {f.location}: {f.message}")
    return problems


@pytest.mark.parametrize("view", ["node", "coordinator"])
def test_correct_canary_outputs_have_no_finding(
    correct: tuple[str, list[tuple[bytes, dict[str, Any]]]], canary: list[Path], view: str
) -> None:
    # Prepare: the canary corpus itself (the private-class instance is checked below).
    options_name, outputs = correct
    originals = Originals.from_records(r for _, r in outputs) if view == "node" else None

    # Execute
    names = [p.name for p in canary[:-1]]
    problems = _serious(outputs[:-1], OPTIONS[options_name], originals, names)

    # Assert
    assert problems == []


def test_a_private_sop_class_is_mapped_in_the_file_meta_too(
    correct: tuple[str, list[tuple[bytes, dict[str, Any]]]],
) -> None:
    options_name, outputs = correct
    data, _ = outputs[-1]

    findings = scan(data, OPTIONS[options_name], site_prefix=SITE)

    assert at_least(findings, Severity.MEDIUM) == []


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("site") / "export"
    return write_site_corpus(root, patients=3, ct_slices=2, ct_size=64, cr_size=64).files


@pytest.mark.parametrize("view", ["node", "coordinator"])
@pytest.mark.parametrize("options_name", sorted(OPTIONS))
def test_correct_site_outputs_have_no_finding(
    site: list[Path], options_name: str, view: str
) -> None:
    # Prepare
    options = OPTIONS[options_name]
    outputs = _run(_engine("correct", options), site)
    originals = Originals.from_records(r for _, r in outputs) if view == "node" else None

    # Execute
    problems = _serious(outputs, options, originals, [p.name for p in site])

    # Assert
    assert problems == []


@pytest.mark.parametrize("view", ["node", "coordinator"])
@pytest.mark.parametrize("options_name", sorted(OPTIONS))
def test_correct_outputs_of_pydicom_test_files_have_no_finding(
    options_name: str, view: str
) -> None:
    # Prepare: every file the engine de-identifies (it quarantines the rest).
    options = OPTIONS[options_name]
    engine = _engine("correct", options)
    problems: list[str] = []
    scanned = 0

    # Execute: the node knows each instance's own record.
    for path in sorted(p for p in PYDICOM_FILES.rglob("*") if p.is_file()):
        try:
            result = engine.deidentify(path.read_bytes())
        except (DicomFormatError, DeidError):
            continue
        data = b"".join(bytes(c) for c in result.chunks)
        originals = Originals.from_records([result.record]) if view == "node" else None
        scanned += 1
        problems.extend(_serious([(data, result.record)], options, originals, [path.name]))

    # Assert
    assert scanned > 100
    assert problems == []


def test_a_512_ct_scans_in_well_under_50_ms(tmp_path: Path) -> None:
    # Prepare
    files = write_site_corpus(
        tmp_path / "export", patients=1, ct_slices=1, ct_size=512, with_us=False, with_sr=False
    ).files
    ct = next(p for p in files if p.parent.name == "CT")
    [(data, record)] = _run(_engine("correct", OPTIONS["defaults"]), [ct])
    originals = Originals.from_records([record])
    scan(data, OPTIONS["defaults"], site_prefix=SITE, originals=originals)  # warm caches

    # Execute
    timings = []
    for _ in range(7):
        start = time.perf_counter()
        findings = scan(data, OPTIONS["defaults"], site_prefix=SITE, originals=originals)
        timings.append(time.perf_counter() - start)

    # Assert
    assert findings == []
    assert len(data) > 512 * 512 * 2
    assert statistics.median(timings) < 0.05
