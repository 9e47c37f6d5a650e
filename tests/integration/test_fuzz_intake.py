"""Malformed DICOM through the node's whole intake path: folder ingest and C-STORE.

Inputs come from ``tests/fuzz_dicom.py`` (valid synthetic files broken at the byte
and element level; hypothesis draws them derandomized, the corpora are fixed), so a
run is reproducible and a failure names the input that caused it. What must hold:
nothing escapes, the node neither dies nor hangs, memory stays bounded, every
file is either taken in whole or quarantined with a reason code, nothing is left
half-written in the store, and the PHI scanner never calls an unreadable file clean.
The longer campaign is ``bench/fuzz_dicom.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.deid.dicomio import DicomFormatError
from node.deid.runner import EngineConfig
from node.intake.ingest import ingest
from node.intake.listener import TRANSFER_SYNTAXES
from node.settings import load_settings
from node.site import engine_config, open_index
from node.vetting.policy import VettingPolicy
from node.vetting.vet import vet_pending
from protocols.deid.options import DeidOptions
from protocols.phi.scanner import scan
from tests import fuzz_dicom as fz
from tests.helpers import RADFED, ROOT, NodeProcess, run_cli

pytestmark = pytest.mark.integration

#: The quarantine reason codes intake gives (the engine's and the writer's).
CODES = frozenset(
    {"not_dicom", "truncated", "malformed", "too_large", "pixel_data_size", "bad_charset"}
    | {"value_too_long", "conflict", "unreadable"}
)
MEMORY_LIMIT = 1 << 30
DRAWN = itertools.count()
EXAMPLES = 120
FAST_FAMILIES = tuple(f for f in fz.ALL_FAMILIES if f != "deflate_bomb")
CHECKED = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def corpus(size: int, start: int = 0) -> list[fz.Malformed]:
    """Every family over every seed kind in turn, one deflate bomb, two valid files."""
    families = FAST_FAMILIES
    out = [
        fz.make(families[i % len(families)], fz.SEED_KINDS[(i // len(families)) % 5], start + i)
        for i in range(size)
    ]
    out.append(fz.make("deflate_bomb", "ct", start + size))
    out.extend(fz.make("valid", kind, start + size + 1) for kind in ("cr", "sr"))
    return out


def fully_read(source: Path | bytes) -> Dataset:
    """pydicom reads it, every element at every depth decoded (raises otherwise)."""
    ds = pydicom.dcmread(
        source if isinstance(source, Path) else pydicom.filebase.DicomBytesIO(source)
    )
    ds.walk(lambda _ds, elem: elem.value)
    return ds


def readable(data: bytes) -> bool:
    try:
        fully_read(data)
    except Exception:
        return False
    return True


class PeakMemory:
    """The highest VmHWM of a process and its descendants, polled while it runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def bytes(self) -> int:
        self.sample()
        return max(self.peak.values(), default=0)

    def sample(self) -> None:
        for pid in _tree(self.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak[pid] = max(self.peak.get(pid, 0), int(line.split()[1]) * 1024)

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()


def _tree(pid: int) -> Iterator[int]:
    yield pid
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            yield from _tree(int(child))


def report_lines(home: Path) -> list[dict[str, Any]]:
    """The per-file report of the newest run in a node home (ingest or deid)."""
    newest = max((home / "runs").glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    return [json.loads(line) for line in newest.read_text().splitlines()]


def quarantine_codes(home: Path) -> list[str]:
    with sqlite3.connect(home / "index.sqlite") as db:
        return [row[0] for row in db.execute("SELECT code FROM quarantine ORDER BY rowid")]


def assert_store_whole(home: Path) -> None:
    """Every file in the store is an indexed instance with its recorded hash; no scraps."""
    store = home / "store"
    with sqlite3.connect(home / "index.sqlite") as db:
        indexed = dict(db.execute("SELECT path, sha256 FROM instances").fetchall())
    files = {str(p.relative_to(store)): p for p in store.rglob("*") if p.is_file()}
    assert not [f for f in files if f.startswith(".radfed-tmp") or f.endswith(".part")]
    assert sorted(files) == sorted(indexed)
    for relpath, path in files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == indexed[relpath], relpath
        fully_read(path)


# -- folder ingest, in process, one drawn input at a time --------------------------------------


@pytest.fixture(scope="module")
def node_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-node") / "home"


@pytest.fixture(scope="module")
def engine(node_home: Path) -> EngineConfig:
    return engine_config(load_settings(node_home))


@CHECKED
@given(case=fz.malformed(FAST_FAMILIES))
def test_each_malformed_file_is_taken_in_whole_or_quarantined_with_its_reason(
    node_home: Path, engine: EngineConfig, case: fz.Malformed
) -> None:
    # Prepare
    node_settings = load_settings(node_home)
    index = open_index(node_settings)
    source = node_home.parent / "in" / f"{case.name}-{next(DRAWN)}.dcm"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(case.data)
    before = len(quarantine_codes(node_home))

    # Execute
    result = ingest(
        [source], node_settings, index, engine, 1, node_home / "runs" / "deid-fuzz.jsonl"
    )

    # Assert
    index.db.close()
    (line,) = [o for o in report_lines(node_home) if o["source"] == str(source)]
    assert result.run.seen == 1
    if line["status"] in ("quarantined", "failed"):
        assert line["code"] in CODES and line["reason"], line
        assert quarantine_codes(node_home)[before:] == [line["code"]]
    else:
        assert line["status"] in ("written", "unchanged"), line
        fully_read(node_settings.store_dir / line["output"])
    # An input the node could not take in is never called clean by the scanner either.
    if line["status"] == "quarantined" or not readable(case.data):
        findings = scan(case.data, DeidOptions())
        assert findings, case.name
        if not readable(case.data):
            assert any(f.kind in ("unreadable", "malformed") for f in findings), case.name


@CHECKED
@given(case=fz.malformed(FAST_FAMILIES))
def test_the_scanner_never_calls_a_broken_de_identified_file_clean(
    engine: EngineConfig, case: fz.Malformed
) -> None:
    # Prepare: the seed, de-identified (clean), then broken the same way.
    deidentifier = engine.build()
    clean = deidentified(deidentifier, case.kind, case.number)
    broken = fz.make_from(clean, case.family, case.kind, case.number)

    # Execute
    findings = scan(broken, DeidOptions(), site_prefix=engine.site_prefix)

    # Assert
    if not readable(broken):
        assert any(f.kind in ("unreadable", "malformed") for f in findings), case.name


def deidentified(deidentifier: object, kind: str, number: int) -> bytes:
    result = deidentifier.deidentify(fz.seed_bytes(kind, number))  # type: ignore[attr-defined]
    return b"".join(bytes(chunk) for chunk in result.chunks)


def test_a_de_identified_seed_is_clean(engine: EngineConfig) -> None:
    for kind in fz.SEED_KINDS:
        clean = deidentified(engine.build(), kind, 1)

        findings = scan(clean, DeidOptions(), site_prefix=engine.site_prefix)

        assert findings == [], kind


# -- folder ingest: radfed node ingest as a process ---------------------------------------------


def test_radfed_node_ingest_takes_a_malformed_folder_without_dying(tmp_path: Path) -> None:
    # Prepare
    cases = corpus(100)
    folder = tmp_path / "export"
    folder.mkdir()
    for case in cases:
        (folder / f"{case.name}.dcm").write_bytes(case.data)
    home = tmp_path / "home"

    # Execute
    started = time.monotonic()
    proc = subprocess.Popen(
        [*RADFED, "node", "ingest", str(folder), "--home", str(home), "-q", "--jobs", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    with PeakMemory(proc.pid) as memory:
        _, err = proc.communicate(timeout=180)
    seconds = time.monotonic() - started

    # Assert
    report = report_lines(home)
    failed = [line for line in report if line["status"] == "failed"]
    assert proc.returncode == (1 if failed else 0), err
    assert "Traceback" not in err
    assert sorted(line["source"] for line in report) == sorted(
        str(folder / f"{c.name}.dcm") for c in cases
    )
    bad = [line for line in report if line["status"] in ("quarantined", "failed")]
    assert all(line["code"] in CODES and line["reason"] for line in bad)
    assert sorted(quarantine_codes(home)) == sorted(line["code"] for line in bad)
    bomb = next(line for line in report if "deflate_bomb" in line["source"])
    assert bomb["code"] == "too_large"
    assert_store_whole(home)
    assert memory.bytes < MEMORY_LIMIT, f"{memory.bytes >> 20} MiB"
    assert seconds < 150


# -- C-STORE into radfed node serve -------------------------------------------------------------


def on_the_wire(case: fz.Malformed, folder: Path) -> Path:
    """A file pynetdicom can send: the input's meta when it names a syntax the node takes,
    else a valid meta; the body (or the whole input) goes over the wire unchanged."""
    seed = fz.seed_bytes(case.kind, case.number)
    data = case.data
    syntax = fz.transfer_syntax(data) if data[128:132] == b"DICM" else ""
    if syntax in TRANSFER_SYNTAXES and fz.meta_end(data) < len(data):
        wire = fz.with_meta(seed, syntax.encode())
        wire = wire[: fz.meta_end(wire)] + data[fz.meta_end(data) :]
    else:
        wire = seed[: fz.meta_end(seed)] + data
    path = folder / f"{case.name}.dcm"
    path.write_bytes(wire)
    return path


def test_c_store_of_malformed_instances_never_stops_the_node(tmp_path: Path) -> None:
    # Prepare
    cases = corpus(80, start=10_000)
    folder = tmp_path / "wire"
    folder.mkdir()
    paths = [on_the_wire(case, folder) for case in cases]
    token = run_cli(
        "node", "token", "create", "ops", "--home", str(tmp_path / "home"), check=True
    ).stdout.strip()
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are, never re-encoded
    ae = AE(ae_title="FUZZER")
    ae.maximum_pdu_size = 0
    ae.add_requested_context(Verification)
    # One context per class and syntax: the node accepts one syntax per context.
    for sop_class in sorted({str(fz.seed_dataset(kind).SOPClassUID) for kind in fz.SEED_KINDS}):
        for syntax in TRANSFER_SYNTAXES:
            ae.add_requested_context(sop_class, syntax)

    with NodeProcess(tmp_path / "home") as node:
        assert node.proc is not None
        with PeakMemory(node.proc.pid) as memory:
            # Execute
            statuses = []
            assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="RADFED")
            try:
                for path in paths:
                    if not assoc.is_established:
                        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="RADFED")
                    reply = assoc.send_c_store(path)
                    statuses.append(int(reply.Status) if "Status" in reply else -1)
            finally:
                if assoc.is_established:
                    assoc.release()
            counts = settled(node, token, len(paths))

            # Assert
            assert node.proc.poll() is None, node.log.read_text()
            health = httpx.get(f"{node.url}/healthz", timeout=10).json()
            assert health["dicom_listener"] and health["pending_instances"] == 0
            assert set(statuses) <= {0x0000, 0xC000}, statuses
            assert counts["instances"] + counts["quarantined"] == len(paths), counts
            assert statuses.count(0xC000) <= counts["quarantined"]
            assert counts["by_status"].get("deidentified", 0) == 0, counts  # all vetted
            assert memory.bytes < MEMORY_LIMIT, f"{memory.bytes >> 20} MiB"
    assert "Traceback" not in node.log.read_text()
    assert_store_whole(tmp_path / "home")


def settled(node: NodeProcess, token: str, sent: int, timeout: float = 90) -> dict:
    """Counts once every instance sent is taken in or quarantined and vetting is done."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {token}"}
    while True:
        counts = httpx.get(f"{node.url}/api/v1/counts", headers=headers, timeout=30).json()
        pending = httpx.get(f"{node.url}/healthz", timeout=10).json()["pending_instances"]
        done = counts["instances"] + counts["quarantined"] >= sent and not pending
        if (done and not counts["by_status"].get("deidentified")) or time.monotonic() > deadline:
            return counts
        time.sleep(0.25)


# -- what the fuzzing found: each a minimal reproducer -----------------------------------------


def test_file_meta_cut_inside_a_long_element_header_is_quarantined_as_truncated(
    engine: EngineConfig, tmp_path: Path
) -> None:
    # Prepare: the meta's first element (OB, a 12-byte header) cut after 11 bytes.
    data = fz.seed_bytes("cr", 1)[: 132 + 12 + 11]
    source = tmp_path / "cut.dcm"
    source.write_bytes(data)
    home = tmp_path / "home"
    node_settings = load_settings(home)
    index = open_index(node_settings)

    # Execute
    result = ingest([source], node_settings, index, engine, 1, home / "runs" / "cut.jsonl")

    # Assert (it used to raise struct.error out of the run)
    assert result.run.quarantine_reasons == {"truncated": 1}


def test_a_deflate_bomb_is_quarantined_without_being_inflated_whole(engine: EngineConfig) -> None:
    # Prepare: 1.6 MB that inflates to 1.5 GiB.
    bomb = fz.make("deflate_bomb", "ct", 1).data
    # The child's own high-water mark (VmHWM): ru_maxrss would include the parent's
    # peak, which Linux carries across exec (a pytest worker can be far above 600 MiB).
    code = (
        "import sys; from node.deid.dicomio import DicomFormatError\n"
        "from tests.integration.test_fuzz_intake import build\n"
        "try:\n    build().deidentify(sys.stdin.buffer.read())\n"
        "except DicomFormatError as exc:\n    print(exc.code)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "print(int(hwm.split()[1]) * 1024)\n"
    )

    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", code], input=bomb, capture_output=True, timeout=60, cwd=ROOT
    )
    findings = scan(bomb, DeidOptions())

    # Assert (it used to take 3 GiB and 15 s; the scanner ran past two minutes)
    code_out, peak = proc.stdout.decode().split()
    assert code_out == "too_large", proc.stderr.decode()[-2000:]
    assert int(peak) < 600 << 20
    assert [f.kind for f in findings] == ["unreadable"]
    assert "inflates to more than" in findings[0].message


def build() -> Any:
    """The engine of a throwaway site (for the subprocess above)."""
    from protocols.deid.safe_private import DEFAULT_SAFE_PRIVATE

    return EngineConfig(DeidOptions(), b"k" * 32, "SITE", 1, 30, DEFAULT_SAFE_PRIVATE).build()


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("cr", lambda d: fz.replace_value(d, 0x00280010, b"\x00\x10"), "need"),
        ("us", lambda d: fz.with_meta(d, b"1.2.840.10008.1.2.4.50"), "encapsulated"),
        ("ct", lambda d: fz.replace_value(d, 0x00280008, b"99999"), "frame(s)"),
    ],
)
def test_pixel_data_of_the_wrong_size_is_quarantined(
    engine: EngineConfig, kind: str, change: Any, message: str
) -> None:
    # Prepare
    data = change(fz.seed_bytes(kind, 2))

    # Execute
    with pytest.raises(DicomFormatError) as raised:
        engine.build().deidentify(data)

    # Assert (it used to be taken in, and failed later in the vetter or in training)
    assert raised.value.code == "pixel_data_size"
    assert message in raised.value.message


def test_a_character_set_no_reader_can_look_up_is_quarantined(engine: EngineConfig) -> None:
    # Prepare: Specific Character Set with a NUL and bytes outside a code string.
    data = fz.replace_value(fz.seed_bytes("ct_implicit", 4), 0x00080005, b"ISO\x00\xe9IR 100")

    # Execute
    with pytest.raises(DicomFormatError) as raised:
        engine.build().deidentify(data)

    # Assert (it used to be kept as it was, and pydicom could not read the output)
    assert raised.value.code == "bad_charset"


def test_undecodable_pixels_hold_their_study_and_vetting_goes_on(
    engine: EngineConfig, tmp_path: Path
) -> None:
    # Prepare: an ultrasound (burned-in risk: OCR reads its pixels) whose JPEG is not one,
    # and a second study behind it.
    folder = tmp_path / "in"
    folder.mkdir()
    seed = fz.seed_bytes("us", 3)
    pixels = next(s for s in fz.spans(seed) if s.tag == fz.PIXEL_DATA)
    item = struct.Struct("<HHL")
    value = item.pack(0xFFFE, 0xE000, 0) + item.pack(0xFFFE, 0xE000, 8) + b"\xff\xd8garbg\x00"
    head = struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF)
    broken = seed[: pixels.start] + head + value + item.pack(0xFFFE, 0xE0DD, 0)
    (folder / "us.dcm").write_bytes(fz.with_meta(broken, b"1.2.840.10008.1.2.4.50"))
    (folder / "sr.dcm").write_bytes(fz.seed_bytes("sr", 3))
    home = tmp_path / "home"
    node_settings = load_settings(home)
    index = open_index(node_settings)
    ingest([folder], node_settings, index, engine, 1, home / "runs" / "deid-us.jsonl")
    assert index.counts().instances == 2

    # Execute (it used to raise: every vetting pass failed on this file, no study moved)
    summary = vet_pending(index, node_settings, VettingPolicy(), node_settings.deid)

    # Assert
    assert summary.studies == 1 and summary.held == 1
    with sqlite3.connect(home / "index.sqlite") as db:
        kinds = [row[0] for row in db.execute("SELECT kind FROM findings WHERE source = 'ocr'")]
    assert kinds == ["unreadable"]
