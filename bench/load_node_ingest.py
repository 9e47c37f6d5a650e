#!/usr/bin/env python3
"""Load: ``radfed node ingest`` of 100,000 instances — nothing lost, latencies, memory.

Issue 9's node ingest load test, on one machine. A benchmark: it prints tables;
it does not pass or fail on speed, but it exits 1 when the accounting finds an
instance lost, duplicated or changed.

1. **Corpus.** ``--instances`` synthetic, PHI-laden instances from ``radfed.synth``,
   laid out as a hospital export (``NAME_MRN/DATE_ACCESSION/NN_MODALITY/IM*.dcm``):
   studies of 1–3 CT series (20–200 slices, 128×128, one series in eight 256×256),
   CR and DX radiographs (256×256, one or two views), ultrasound (320×240, the
   patient's name burned into the pixels; 2–8 frames) and, in three studies out of
   ten, a text SR report. Patients have 1–3 studies. Generated on all cores, not
   timed, and kept under the workdir by its parameters with a manifest of every
   instance written, so a rerun starts at once.
2. **Ingest.** ``radfed node ingest EXPORT -q --no-vet --home FRESH``, one process,
   default jobs (all cores), the page cache warmed first. It runs through a launcher
   that imports the same CLI and only times each index batch (``NodeIndex.record``:
   one transaction) and each vault append. Every second the bench reads the RSS and
   PSS of the process tree (CLI, fork server, workers) from /proc, and the index's
   row count.
3. **Nothing lost**, from the node's own vault, index and store — not from the CLI's
   summary: every generated instance has its vault record (original → new UID), is
   indexed under that UID in the study and series the vault names, and its file is in
   the store with the indexed size and sha256; nothing is quarantined, nothing is
   there twice, the store holds no file the index does not know; studies, series and
   instances per study and series are as generated.
4. **Latencies.** Throughput per window of 10,000 instances (from the index's own
   ``received_at`` stamps: it must not fall as the index grows), the index batch
   (one transaction) p50/p99 per window, the lag from an output file written to its
   index row, and the node's common queries on the finished index — list studies
   (filters, pages), one study's detail, the dashboard counts — p50/p99.
5. **Memory.** Peak RSS of the largest process (its kernel high-water mark, VmHWM,
   read with the samples: ``wait4``'s ``ru_maxrss`` would carry the bench's own RSS
   into the child across ``exec``) and of the whole tree (1 s samples, RSS summed and
   PSS summed — the workers share pages with the fork server), and flatness: the
   tree's RSS while the last 10% of instances went in against the 10–20% window, and
   the slope in MiB per 10,000 instances.

6. **C-STORE** (``--cstore``, default the first 5,000 instances): the same instances
   sent by ``--associations`` pynetdicom senders at once (one process each) to
   ``radfed node serve``, resent on a new association after no answer (as a PACS
   does), until the spool is drained; then the same accounting, the C-STORE
   latencies, the node's own handling-time histogram and its memory.

Tables go to stdout and, as each part finishes, to ``WORKDIR/load-ingest-results.md``
(samples to ``load-ingest-samples.csv``); the node homes are removed afterwards, the
corpus kept (bump ``CORPUS_VERSION`` when the generator's mix changes).

    .venv/bin/python bench/load_node_ingest.py [--instances 100000] [--seed 0]
        [--window 10000] [--repeat 200] [--jobs 0] [--cstore 5000] [--associations 4]
        [--only ingest,cstore] [--dicom-log DIR] [--workdir bench/work] [--keep-home]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import csv
import datetime as dt
import hashlib
import logging
import math
import multiprocessing
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from node_intake import RADFED, free_port, wait_for, warm

from radfed.synth.site import (
    Uids,
    ct_series,
    make_patient,
    radiograph,
    text_report,
    ultrasound,
    write,
)

BENCH = Path(__file__).resolve().parent
CORPUS_VERSION = 1
KINDS = ("CT", "CR", "DX", "US")
KIND_WEIGHTS = (40, 30, 15, 15)
CT_SIZES = (128,) * 7 + (256,)
RADIOGRAPH_SIZE = 256
PAGE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: ``radfed node ingest`` as the console script runs it, with two timers added: each
#: index batch (one transaction) and each vault append, wall and CPU time (the CPU time
#: tells a slower index from a busier machine), appended to $RADFED_BENCH_PROBE.
LAUNCHER = """
import os, sys, time
from node.deid.vault import Vault
from node.index.store import NodeIndex
probe = open(os.environ["RADFED_BENCH_PROBE"], "a", buffering=1)
def timed(kind, method):
    def wrapper(self, items, *args, **kwargs):
        items = list(items)
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return method(self, items, *args, **kwargs)
        finally:
            probe.write(f"{kind} {time.time():.6f} {time.perf_counter() - started:.6f} "
                        f"{len(items)} {time.thread_time() - cpu:.6f}\\n")
    return wrapper
NodeIndex.record = timed("index", NodeIndex.record)
Vault.append = timed("vault", Vault.append)
from radfed.cli import main
sys.argv[0] = "radfed"
sys.exit(main())
"""


# -- corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exam:
    """One planned study: its kind, instances per image series, and an SR report or not."""

    kind: str
    series: tuple[int, ...]
    report: bool
    day: int
    minute: int

    @property
    def count(self) -> int:
        return sum(self.series) + int(self.report)


@dataclass(frozen=True)
class Made:
    """One generated instance (original UIDs, as the hospital's PACS has them)."""

    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    size: int
    relpath: str


@dataclass
class Corpus:
    export: Path  # the folder tree handed to ingest
    made: list[Made]
    seconds: float = 0.0  # to generate (0 when reused)

    @property
    def size(self) -> int:
        return sum(m.size for m in self.made)


def plan(instances: int, seed: int, ct_slices: tuple[int, int] = (20, 200)) -> list[list[Exam]]:
    """Exams per patient, exactly ``instances`` in all (the same arguments, the same plan)."""
    rng = random.Random(f"load-plan-{seed}")
    patients: list[list[Exam]] = []
    remaining = instances
    while remaining > 0:
        exams: list[Exam] = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            if remaining <= 0:
                break
            kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
            if kind == "CT":
                series = [rng.randint(*ct_slices) for _ in range(rng.choice((1, 2, 2, 3)))]
            elif kind == "US":
                series = [1] * rng.randint(2, 8)
            else:
                series = [1] * rng.choice((1, 1, 2))
            report = rng.random() < 0.3
            excess = sum(series) + report - remaining
            if excess > 0 and report:
                report, excess = False, excess - 1
            while excess > 0:
                cut = min(excess, series[-1])
                series[-1] -= cut
                excess -= cut
                if series[-1] == 0:
                    series.pop()
            exam = Exam(kind, tuple(series), report, rng.randrange(0, 3000), rng.randrange(600))
            exams.append(exam)
            remaining -= exam.count
        patients.append(exams)
    return patients


def _write_patient(task: tuple[Path, int, int, list[Exam]]) -> list[Made]:
    """Write one patient's exams; runs in a generator process."""
    export, seed, index, exams = task
    rng = random.Random(f"load-{seed}-{index}")
    nprng = np.random.default_rng([seed, index])
    uids = Uids(int(f"{seed + 1}{index:06d}"))
    patient = make_patient(rng, index)
    folder = f"{patient.name.split('^')[0]}_{patient.patient_id}"
    made: list[Made] = []

    def keep(ds: object, relpath: str) -> None:
        path = write(ds, export / relpath)  # type: ignore[arg-type]
        made.append(
            Made(
                ds.SOPInstanceUID,  # type: ignore[attr-defined]
                ds.StudyInstanceUID,  # type: ignore[attr-defined]
                ds.SeriesInstanceUID,  # type: ignore[attr-defined]
                ds.Modality,  # type: ignore[attr-defined]
                path.stat().st_size,
                relpath,
            )
        )

    for number, exam in enumerate(exams):
        when = dt.datetime(2015, 1, 1, 7) + dt.timedelta(days=exam.day, minutes=exam.minute)
        study = uids.new(patient.patient_id[3:])
        acc = f"ACC{rng.randrange(10**6, 10**7)}{number}"
        where = f"{folder}/{when:%Y%m%d}_{acc}"
        first = None
        for s, count in enumerate(exam.series):
            if exam.kind == "CT":
                size = rng.choice(CT_SIZES)
                slices = ct_series(patient, uids, study, when, acc, count, size, nprng)
                for i, ds in enumerate(slices):
                    ds.SeriesNumber = s + 2
                    if s:
                        ds.SeriesDescription = f"CHEST {size} RECON {s}"
                    keep(ds, f"{where}/{s + 1:02d}_CT/IM{i:05d}.dcm")
                first = first or slices[0]
            elif exam.kind == "US":
                ds = ultrasound(patient, uids, study, when, acc, nprng)
                ds.SeriesNumber = s + 1
                keep(ds, f"{where}/{s + 1:02d}_US/IM00000.dcm")
                first = first or ds
            else:
                ds = radiograph(
                    patient, uids, study, when, acc, RADIOGRAPH_SIZE, nprng, dx=exam.kind == "DX"
                )
                ds.SeriesNumber = s + 1
                ds.ViewPosition = "LL" if s else "PA"
                keep(ds, f"{where}/{s + 1:02d}_{exam.kind}/IM00000.dcm")
                first = first or ds
        if exam.report and first is not None:
            keep(text_report(patient, uids, study, when, acc, first), f"{where}/99_SR/REPORT.dcm")
    return made


def corpus(
    workdir: Path,
    instances: int,
    seed: int = 0,
    ct_slices: tuple[int, int] = (20, 200),
    jobs: int | None = None,
) -> Corpus:
    """The generated export (reused when the same parameters made one before)."""
    folder = workdir / (
        f"load-corpus-{instances}-s{seed}-ct{ct_slices[0]}-{ct_slices[1]}-v{CORPUS_VERSION}"
    )
    export, manifest = folder / "export", folder / "manifest.tsv"
    if (folder / ".complete").exists():
        with manifest.open(encoding="utf-8") as fh:
            made = [
                Made(a, b, c, d, int(e), f)
                for a, b, c, d, e, f in (line.rstrip("\n").split("\t") for line in fh)
            ]
        return Corpus(export, made)
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    tasks = [(export, seed, i, exams) for i, exams in enumerate(plan(instances, seed, ct_slices))]
    made = []
    with ProcessPoolExecutor(jobs or os.cpu_count()) as pool:
        for rows in pool.map(_write_patient, tasks, chunksize=4):
            made.extend(rows)
    with manifest.open("w", encoding="utf-8") as fh:
        for m in made:
            fh.write(
                f"{m.sop_uid}\t{m.study_uid}\t{m.series_uid}\t{m.modality}\t{m.size}\t{m.relpath}\n"
            )
    (folder / ".complete").write_text("ok\n")
    return Corpus(export, made, time.perf_counter() - started)


# -- the ingest process and its memory --------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the process started
    indexed: int  # rows in the index's instances table
    rss: float  # MiB, summed over the process tree
    pss: float  # MiB, summed over the process tree (shared pages split)
    largest: float  # MiB, the largest process's RSS
    processes: int
    cpu_root: float  # CPU seconds so far of the root process (the CLI, the server)
    cpu_tree: float  # CPU seconds so far of the tree, processes gone included (to 1 s)


@dataclass(frozen=True)
class Batch:
    kind: str  # index | vault
    at: float  # epoch seconds when it ended
    seconds: float
    items: int
    cpu: float  # CPU seconds of the recording thread


@dataclass
class IngestRun:
    rc: int
    seconds: float
    started_at: float  # epoch seconds
    peak_largest: float  # MiB, the highest VmHWM of a process of the tree
    samples: list[Sample] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)
    output: str = ""
    growth: list[str] = field(default_factory=list)  # per process: RSS at 10–20% → 90–100%


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def memory_of(pid: int) -> tuple[float, float, float]:
    """(RSS, PSS, peak RSS so far) of one process in MiB; zeros once it is gone.

    The peak is the kernel's high-water mark of the process's memory since its
    ``exec`` (VmHWM), so a sample sees every peak that came before it.
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            status = {k: v for k, _, v in (line.partition(":") for line in fh)}
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            pss = next((int(line.split()[1]) for line in fh if line.startswith("Pss:")), 0)
        rss, hwm = int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])
    except (OSError, ValueError, IndexError, KeyError):
        return 0.0, 0.0, 0.0
    return rss / 1024, pss / 1024, hwm / 1024


def process_name(pid: int) -> str:
    """A short name for a process: what it runs, from its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    text = " ".join(a for a in argv if a)
    for needle, name in (
        ("forkserver", "fork server or worker"),
        ("resource_tracker", "resource tracker"),
        ("node serve", "radfed node serve"),
        ("node ingest", "radfed node ingest"),
        ("tesseract", "tesseract"),
    ):
        if needle in text:
            return name
    return os.path.basename(argv[0]) if argv and argv[0] else "?"


def growth_lines(sampler: TreeSampler, total: int) -> list[str]:
    """Each process that lived through the run: its RSS at 10–20% and at 90–100%."""
    lines = []
    for pid, seen in sampler.by_process.items():
        early = [r for n, r in seen if 0.1 * total < n <= 0.2 * total]
        late = [r for n, r in seen if n > 0.9 * total]
        if early and late:
            lines.append(
                f"{sampler.names.get(pid, '?')} {np.mean(early):.0f} → {np.mean(late):.0f} MiB"
            )
    return lines


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) one process has used; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def indexed_rows(index_path: Path) -> int:
    """Instances committed to a node index so far (0 before it exists)."""
    if not index_path.exists():
        return 0
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{index_path}?mode=ro", uri=True, timeout=1)
        ) as db:
            return int(db.execute("SELECT coalesce(max(id), 0) FROM instances").fetchone()[0])
    except sqlite3.Error:
        return 0


class TreeSampler:
    """Every ``interval`` s: the memory of a process tree and the index's row count."""

    def __init__(self, pid: int, index_path: Path, interval: float = 1.0) -> None:
        self.pid, self.index_path, self.interval = pid, index_path, interval
        self.samples: list[Sample] = []
        self._cpu: dict[int, float] = {}  # the last CPU time seen of every process, gone or not
        self.peaks: dict[int, float] = {}  # the highest VmHWM seen of every process (MiB)
        #: every process's RSS (MiB) at each sample, to tell which one grows
        self.by_process: dict[int, list[tuple[int, float]]] = {}
        self.names: dict[int, str] = {}
        self._started = time.perf_counter()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._finished.is_set():
            t = time.perf_counter() - self._started
            tree = process_tree(self.pid)
            memory = [memory_of(pid) for pid in tree]
            indexed = indexed_rows(self.index_path)
            for pid, (rss, _, hwm) in zip(tree, memory, strict=True):
                self._cpu[pid] = max(self._cpu.get(pid, 0.0), cpu_of(pid))
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), hwm)
                if rss:
                    self.by_process.setdefault(pid, []).append((indexed, rss))
                    if pid not in self.names:
                        self.names[pid] = process_name(pid)
            self.samples.append(
                Sample(
                    t,
                    indexed,
                    sum(r for r, _, _ in memory),
                    sum(p for _, p, _ in memory),
                    max((r for r, _, _ in memory), default=0.0),
                    sum(1 for r, _, _ in memory if r),
                    self._cpu.get(self.pid, 0.0),
                    sum(self._cpu.values()),
                )
            )
            self._finished.wait(max(0.0, self.interval - (time.perf_counter() - self._started - t)))

    def stop(self) -> list[Sample]:
        self._finished.set()
        self._thread.join()
        return self.samples


def stop_group(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """End a process started in its own session, and everything it started."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_ingest(
    export: Path, home: Path, jobs: int | None = None, interval: float = 1.0
) -> IngestRun:
    """``radfed node ingest`` into ``home`` as one process, sampled every ``interval`` s."""
    home.mkdir(parents=True, exist_ok=True)
    probe = home.parent / f"{home.name}-probe.txt"
    log = home.parent / f"{home.name}-ingest-output.txt"
    probe.unlink(missing_ok=True)
    argv = [sys.executable, "-c", LAUNCHER, "node", "ingest", str(export), "-q", "--no-vet"]
    argv += ["--home", str(home), *(["--jobs", str(jobs)] if jobs else [])]
    env = {**os.environ, "RADFED_BENCH_PROBE": str(probe), "COLUMNS": "120"}
    started_at, started = time.time(), time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    sampler = TreeSampler(proc.pid, home / "index.sqlite", interval)
    try:
        proc.wait()
    finally:
        samples = sampler.stop()
        stop_group(proc)  # only when interrupted
    seconds = time.perf_counter() - started
    batches = []
    if probe.exists():
        for line in probe.read_text().splitlines():
            kind, at, spent, items, cpu = line.split()
            batches.append(Batch(kind, float(at), float(spent), int(items), float(cpu)))
    return IngestRun(
        proc.returncode,
        seconds,
        started_at,
        max(sampler.peaks.values(), default=math.nan),
        samples,
        batches,
        log.read_text(errors="replace"),
        growth_lines(sampler, indexed_rows(home / "index.sqlite")),
    )


# -- the DICOM listener ---------------------------------------------------------------------


@dataclass
class CStoreRun:
    sent: int
    associations: int
    seconds: float  # first C-STORE sent to the last acknowledged
    drained: float  # first C-STORE sent to the spool empty (all indexed)
    started_at: float  # epoch seconds
    latencies: list[float]  # each C-STORE request to its response, s
    statuses: Counter[int]
    samples: list[Sample]
    events: list[str]  # associations lost or refused, C-STOREs without a response
    handled: dict[str, int]  # the node's own C-STORE handling times: bucket → count
    log: str  # the node's output
    growth: list[str]  # per process: RSS at 10–20% → at 90–100%


#: A C-STORE is sent again after no response or a lost association, as a PACS does.
SEND_TRIES = 3
#: How long the node may take to index its spool once the senders are done.
DRAIN_TIMEOUT = 600


#: What pynetdicom logs when its association thread takes a response off the queue that
#: ``send_c_store`` was waiting for (``Association._serve_request``).
_TAKEN = "Received unexpected C-STORE service message"


class _Ring(logging.Handler):
    """One sender's last ``size`` pynetdicom log records, formatted with ms times.

    It also counts the responses pynetdicom's own association thread took from under
    ``send_c_store``: pynetdicom 3.0.4 pauses that thread for a request by clearing an
    event and waiting for an ``_is_paused`` flag, which the thread resets only *after*
    leaving its wait — a request sent in between lets the thread read the response
    off the queue, log it as unexpected and drop it, and ``send_c_store`` waits out
    its DIMSE timeout. The node did answer; this tells that case from one it did not.
    """

    def __init__(self, size: int, level: int) -> None:
        super().__init__(level)
        self.records: collections.deque[str] = collections.deque(maxlen=size)
        self.taken = 0
        self.setFormatter(
            logging.Formatter("%(asctime)s.%(msecs)03d %(threadName)s %(message)s", "%H:%M:%S")
        )

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        self.taken += _TAKEN in message
        self.records.append(message)


def _send_part(
    task: tuple[int, list[str], float, str],
) -> tuple[float, float, list[float], list[int], list[str]]:
    """One association sending its share of the files; runs in a sender process.

    Returns when it began and ended (epoch), each C-STORE's latency, each instance's
    final status (-1: none after every try), and what went wrong along the way. With a
    ``dicom_log`` folder, the sender keeps pynetdicom's last debug records and writes
    them there when a C-STORE gets no response.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    from radfed.synth.site import BASIC_TEXT_SR, CR_IMAGE, CT_IMAGE, DX_IMAGE, US_IMAGE

    port, paths, start, dicom_log = task
    # Warnings always (to see a response taken by the sender's own pynetdicom thread);
    # every debug record too with a dicom_log folder.
    ring = _Ring(400, logging.DEBUG) if dicom_log else _Ring(20, logging.WARNING)
    logger = logging.getLogger("pynetdicom")
    logger.handlers[:] = [ring]
    logger.setLevel(ring.level)
    logger.propagate = False
    ae = AE(ae_title="LOADTEST")
    ae.maximum_pdu_size = 0
    for sop_class in (CT_IMAGE, CR_IMAGE, DX_IMAGE, US_IMAGE, BASIC_TEXT_SR):
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            ae.add_requested_context(sop_class, syntax)
    time.sleep(max(0.0, start - time.time()))  # all associations begin together
    latencies: list[float] = []
    statuses: list[int] = []
    events: list[str] = []
    assoc = None
    first = time.time()
    try:
        for path in paths:
            ds = pydicom.dcmread(path)
            status = -1
            for _ in range(SEND_TRIES):
                if assoc is None or not assoc.is_established:
                    if assoc is not None:
                        events.append(f"{time.time() - first:.1f} s: association lost")
                    assoc = ae.associate("127.0.0.1", port, ae_title="RADFED")
                    if not assoc.is_established:
                        events.append(f"{time.time() - first:.1f} s: association refused")
                        assoc = None
                        time.sleep(1.0)
                        continue
                t = time.perf_counter()
                taken = ring.taken
                reply = assoc.send_c_store(ds)
                latencies.append(time.perf_counter() - t)
                if "Status" in reply:
                    status = int(reply.Status)
                    break
                events.append(
                    f"{time.time() - first:.1f} s: no response after {latencies[-1]:.1f} s "
                    f"({ds.Modality}, {ds.file_meta.TransferSyntaxUID.name}, {path})"
                    + (
                        " — the node's response came and the sender's own pynetdicom thread "
                        "took it (pynetdicom's race)"
                        if ring.taken > taken
                        else ""
                    )
                )
                if dicom_log:
                    dump = Path(dicom_log) / f"sender-{os.getpid()}-{len(events)}.log"
                    dump.write_text("\n".join(ring.records) + "\n")
                    events[-1] += f"; pynetdicom's last records in {dump}"
            statuses.append(status)
    finally:
        if assoc is not None and assoc.is_established:
            assoc.release()
    return first, time.time(), latencies, statuses, events


def handling_histogram(metrics: str) -> dict[str, int]:
    """The node's ``radfed_node_cstore_seconds`` histogram (arrival to spooled): bucket → count.

    Buckets are cumulative in Prometheus; here each holds only its own range.
    """
    cumulative = []
    for line in metrics.splitlines():
        if line.startswith("radfed_node_cstore_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            cumulative.append((le, int(float(line.rsplit(" ", 1)[1]))))
    out, below = {}, 0
    for le, count in cumulative:
        out["> 5 s" if le == "+Inf" else f"≤ {float(le):g} s"] = count - below
        below = count
    return out


def run_cstore(
    export: Path,
    made: Sequence[Made],
    home: Path,
    associations: int = 4,
    dicom_log: Path | None = None,
) -> CStoreRun:
    """Send ``made`` to ``radfed node serve`` over ``associations`` parallel associations."""
    api, dicom = free_port(), free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = home.parent / f"{home.name}-serve-output.txt"
    argv = [RADFED, "node", "serve", "--home", str(home)]
    argv += ["--api-port", str(api), "--dicom-port", str(dicom)]
    with log.open("w") as out:
        node = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    health = f"http://127.0.0.1:{api}/healthz"
    sampler = None
    try:
        wait_for(lambda: httpx.get(health, timeout=1).json()["dicom_listener"], "radfed node serve")
        sampler = TreeSampler(node.pid, home / "index.sqlite")
        paths = [str(export / m.relpath) for m in made]
        parts = [paths[i::associations] for i in range(associations)]
        # Spawned senders (not forked from this threaded process), started together.
        begin = time.time() + 3.0
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(associations, mp_context=spawn) as pool:
            tasks = [(dicom, part, begin, str(dicom_log or "")) for part in parts]
            results = list(pool.map(_send_part, tasks))
        started_at = min(r[0] for r in results)
        sent = max(r[1] for r in results) - started_at
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while httpx.get(health, timeout=10).json()["pending_instances"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        drained = time.time() - started_at if time.monotonic() <= deadline else math.nan
        # The spool is empty once the last batch is committed; one more sample to see it.
        time.sleep(1.0)
        handled = handling_histogram(httpx.get(f"http://127.0.0.1:{api}/metrics", timeout=10).text)
    finally:
        samples = sampler.stop() if sampler is not None else []
        stop_group(node, grace=60)
    return CStoreRun(
        len(paths),
        associations,
        sent,
        drained,
        started_at,
        [t for _, _, latencies, _, _ in results for t in latencies],
        Counter(s for _, _, _, statuses, _ in results for s in statuses),
        samples,
        [f"association {n}, {e}" for n, (*_, events) in enumerate(results) for e in events],
        handled,
        log.read_text(errors="replace"),
        growth_lines(sampler, len(paths)) if sampler is not None else [],
    )


# -- nothing lost ---------------------------------------------------------------------------


@dataclass
class Accounting:
    """What the node holds against what was generated."""

    generated: int = 0
    vault_records: int = 0
    vault_repeats: int = 0  # records of an instance already recorded (the same mapping)
    indexed: int = 0
    stored: int = 0  # indexed, file present with the indexed size and sha256
    quarantined: int = 0
    duplicates: int = 0
    strays: int = 0  # store files the index does not know
    studies: tuple[int, int] = (0, 0)  # generated, indexed
    series: tuple[int, int] = (0, 0)
    problems: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    received: list[float] = field(default_factory=list)  # epoch, per instance in index order
    lags: list[float] = field(default_factory=list)  # s from file written to row, same order

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, kind: str, example: str, count: int = 1) -> None:
        self.problems[kind] += count
        self.examples.setdefault(kind, example)


def _epoch(stamp: object) -> float:
    """An index timestamp (UTC, as stored) as epoch seconds."""
    moment = stamp if isinstance(stamp, dt.datetime) else dt.datetime.fromisoformat(str(stamp))
    return moment.replace(tzinfo=dt.UTC).timestamp()


def _file_facts(path: Path) -> tuple[int, str, float] | None:
    try:
        data = path.read_bytes()
        mtime = path.stat().st_mtime
    except OSError:
        return None
    return len(data), hashlib.sha256(data).hexdigest(), mtime


def account(home: Path, made: Sequence[Made]) -> Accounting:
    """Check every generated instance against the node's vault, index and store."""
    from node.settings import load_settings
    from node.site import open_index

    settings = load_settings(home)
    index = open_index(settings)
    acct = Accounting(generated=len(made))
    wanted = {m.sop_uid: m for m in made}
    if len(wanted) != len(made):
        acct.problem("generator made duplicate SOP Instance UIDs", "")

    # The vault: original → new UIDs, one record per instance.
    new_uid: dict[str, str] = {}
    new_study: dict[str, str] = {}
    new_series: dict[str, str] = {}
    for entry in index.vault.entries():
        acct.vault_records += 1
        old, new = entry["sop_instance_uid"]
        if old not in wanted:
            acct.problem("vault record of an instance not generated", old)
            continue
        if old in new_uid:
            # An instance taken in twice (a resent C-STORE) is recorded twice, to the same
            # new UIDs; two different mappings of one original would be a fault.
            acct.vault_repeats += 1
            if new_uid[old] != new:
                acct.problem("vault: one original instance, two new UIDs", old)
        new_uid[old] = new
        new_study[old] = entry["study_instance_uid"][1]
        new_series[old] = entry["series_instance_uid"][1]

    # The index, row by row, in commit order.
    with index.db.read() as session:
        rows = (
            session.connection()
            .exec_driver_sql(
                "SELECT i.sop_uid, i.path, i.size, i.sha256, i.received_at, st.study_uid, "
                "se.series_uid FROM instances i JOIN studies st ON st.id = i.study_id "
                "JOIN series se ON se.id = i.series_id ORDER BY i.id"
            )
            .all()
        )
        study_rows = (
            session.connection()
            .exec_driver_sql("SELECT study_uid, instance_count, series_count FROM studies")
            .all()
        )
        series_rows = (
            session.connection()
            .exec_driver_sql("SELECT series_uid, instance_count FROM series")
            .all()
        )
    acct.indexed = len(rows)
    by_new = {}
    for row in rows:
        if row[0] in by_new:
            acct.duplicates += 1
            acct.problem("indexed twice", row[0])
        by_new[row[0]] = row
    old_of = {new: old for old, new in new_uid.items()}
    for sop, *_ in rows:
        if sop not in old_of:
            acct.problem("indexed, but no vault record of a generated instance", sop)

    # Every generated instance: vault → index → store.
    store = settings.store_dir
    with ThreadPoolExecutor(4) as pool:
        facts = dict(
            zip(
                (r[0] for r in rows),
                pool.map(lambda r: _file_facts(store / r[1]), rows),
                strict=True,
            )
        )
    for m in made:
        new = new_uid.get(m.sop_uid)
        if new is None:
            acct.problem("LOST: no vault record", m.relpath)
            continue
        row = by_new.get(new)
        if row is None:
            acct.problem("LOST: not indexed", m.relpath)
            continue
        if (row[5], row[6]) != (new_study[m.sop_uid], new_series[m.sop_uid]):
            acct.problem("indexed under another study or series than the vault's", m.relpath)
        fact = facts[new]
        if fact is None:
            acct.problem("LOST: indexed, file missing from the store", row[1])
        elif (fact[0], fact[1]) != (row[2], row[3]):
            acct.problem("stored file differs from its index row (size or sha256)", row[1])
        else:
            acct.stored += 1
    for row in rows:
        acct.received.append(_epoch(row[4]))
        fact = facts[row[0]]
        acct.lags.append(acct.received[-1] - fact[2] if fact else math.nan)

    # Studies and series as generated, with their instance counts.
    expect_study = Counter(new_study.values())
    expect_series = Counter(new_series.values())
    study_of_series = {new_series[old]: new_study[old] for old in new_series}
    series_per_study = Counter(study_of_series.values())
    acct.studies = (len({m.study_uid for m in made}), len(study_rows))
    acct.series = (len({m.series_uid for m in made}), len(series_rows))
    if acct.studies[0] != acct.studies[1]:
        acct.problem("study count differs", f"{acct.studies[0]} generated, {acct.studies[1]}")
    if acct.series[0] != acct.series[1]:
        acct.problem("series count differs", f"{acct.series[0]} generated, {acct.series[1]}")
    for uid, instances, series in study_rows:
        if (instances, series) != (expect_study.get(uid), series_per_study.get(uid)):
            acct.problem("a study's instance or series count differs", uid)
    for uid, instances in series_rows:
        if instances != expect_series.get(uid):
            acct.problem("a series' instance count differs", uid)

    # Quarantine (none for valid input) and strays in the store.
    counts = index.counts()
    acct.quarantined = counts.quarantined
    if counts.quarantined:
        for entry in index.quarantine(limit=500).items:
            acct.problem(f"quarantined: {entry.code}", entry.message)
    if counts.instances != len(rows):
        acct.problem("counts() disagrees with the instance rows", str(counts.instances))
    indexed_paths = {r[1] for r in rows}
    on_disk = 0
    for folder, _, files in os.walk(store):
        for name in files:
            on_disk += 1
            relpath = os.path.relpath(os.path.join(folder, name), store)
            if relpath not in indexed_paths:
                acct.strays += 1
                acct.problem("file in the store the index does not know", relpath)
    index.db.close()
    return acct


# -- figures --------------------------------------------------------------------------------


def pct(values: Iterable[float], p: float) -> float:
    """The ``p``-quantile (nearest rank) of ``values``; nan when there are none."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def _ms(value: float) -> str:
    return (
        "-" if math.isnan(value) else f"{value * 1000:.0f}" if value >= 1 else f"{value * 1000:.1f}"
    )


def _mib(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def write_samples(samples: Sequence[Sample], path: Path) -> None:
    """Every sample, one CSV row each."""
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(
            [
                "t_s",
                "indexed",
                "tree_rss_mib",
                "tree_pss_mib",
                "largest_rss_mib",
                "processes",
                "root_cpu_s",
                "tree_cpu_s",
            ]
        )
        for x in samples:
            out.writerow(
                [
                    f"{x.t:.1f}",
                    x.indexed,
                    f"{x.rss:.1f}",
                    f"{x.pss:.1f}",
                    f"{x.largest:.1f}",
                    x.processes,
                    f"{x.cpu_root:.2f}",
                    f"{x.cpu_tree:.2f}",
                ]
            )


def window_rows(run: IngestRun, acct: Accounting, window: int) -> tuple[list[str], list[float]]:
    """One table row per window of ``window`` instances in index order; and their rates.

    CPU per instance, next to the wall times, tells an index that gets slower as it
    grows from a machine that got busier.
    """
    received, n = acct.received, len(acct.received)
    # Batches commit instances in index order: a batch belongs to the window of its last one.
    ends: list[int] = []
    batches: list[Batch] = []
    for b in run.batches:
        if b.kind == "index":
            ends.append((ends[-1] if ends else 0) + b.items)
            batches.append(b)
    marks = [x.indexed for x in run.samples]
    lines, rates = [], []
    for start in range(0, n, window):
        stop = min(start + window, n)
        t0 = received[start - 1] if start else received[0]
        t1 = received[stop - 1]
        count = stop - start - (0 if start else 1)
        rate = count / (t1 - t0) if t1 > t0 else math.nan
        rates.append(rate)
        batch = batches[bisect.bisect_right(ends, start) : bisect.bisect_right(ends, stop - 1) + 1]
        seconds = [b.seconds for b in batch]
        index_cpu = sum(b.cpu for b in batch) / max(1, sum(b.items for b in batch))
        # The tree's CPU between the samples that saw the window start and end.
        a = bisect.bisect_left(marks, max(start, 1))
        z = bisect.bisect_left(marks, stop)
        tree_cpu = math.nan
        if z < len(marks) and z > a and marks[z] > marks[a]:
            tree_cpu = (run.samples[z].cpu_tree - run.samples[a].cpu_tree) / (marks[z] - marks[a])
        lags = acct.lags[start:stop]
        rss = [x.rss for x in run.samples if start < x.indexed <= stop]
        lines.append(
            f"| {start + 1:,}–{stop:,} | {t1 - run.started_at:.1f} | {rate:,.0f} | "
            f"{_ms(pct(seconds, 0.5))} | {_ms(pct(seconds, 0.99))} | "
            f"{index_cpu * 1e6:.0f} | {_ms(tree_cpu)} | "
            f"{_ms(pct(lags, 0.5))} | {_ms(pct(lags, 0.99))} | "
            f"{_mib(max(rss, default=math.nan))} |"
        )
    return [
        "| instances (index order) | last indexed at s | instances/s | index batch p50 ms | "
        "p99 ms | index CPU µs / instance | tree CPU ms / instance | file → row lag p50 ms | "
        "p99 ms | tree RSS max MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *lines,
    ], rates


def memory_lines(run: IngestRun, total: int) -> tuple[list[str], dict[str, float]]:
    """Peak and flatness, and the samples compactly."""
    samples = run.samples
    early = [s.rss for s in samples if 0.1 * total < s.indexed <= 0.2 * total]
    late = [s.rss for s in samples if s.indexed > 0.9 * total]
    steady = [s for s in samples if s.indexed > 0.1 * total]
    slope = math.nan
    if len(steady) >= 3 and len({s.indexed for s in steady}) > 1:
        slope = float(np.polyfit([s.indexed for s in steady], [s.rss for s in steady], 1)[0])
    figures = {
        "peak_tree_rss": max((s.rss for s in samples), default=math.nan),
        "peak_tree_pss": max((s.pss for s in samples), default=math.nan),
        "peak_largest": run.peak_largest,
        "early": float(np.mean(early)) if early else math.nan,
        "late": float(np.mean(late)) if late else math.nan,
        "slope_per_10k": slope * 10_000,
    }
    step = max(1, math.ceil(len(samples) / 120))
    shown = samples[::step]
    every = (samples[-1].t - samples[0].t) / max(1, len(samples) - 1) * step if samples else 0
    lines = [
        "| peak RSS, largest process MiB (VmHWM) | tree RSS peak MiB | tree PSS peak MiB | "
        "tree RSS at 10–20% MiB | at 90–100% MiB | slope MiB / 10k instances |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {run.peak_largest:.0f} | {figures['peak_tree_rss']:.0f} | "
        f"{figures['peak_tree_pss']:.0f} | {_mib(figures['early'])} | {_mib(figures['late'])} | "
        f"{figures['slope_per_10k']:+.1f} |",
        "",
        "Per process, RSS while 10–20% went in → while the last 10% did: "
        + ("; ".join(run.growth) or "too few samples")
        + ".",
        "",
        f"Tree RSS MiB, one sample every {every:.0f} s ({len(samples)} samples; processes: "
        f"{max((s.processes for s in samples), default=0)} at most):",
        "",
        "    " + " ".join(f"{s.rss:.0f}" for s in shown),
        "",
        "Instances indexed at the same moments (thousands):",
        "",
        "    " + " ".join(f"{s.indexed / 1000:.1f}" for s in shown),
    ]
    return lines, figures


def search_latency(home: Path, repeat: int = 200) -> list[str]:
    """The node's common queries on the finished index, as the API runs them."""
    from node.index.store import StudyQuery
    from node.settings import load_settings
    from node.site import open_index
    from protocols.api.node import StudyStatus

    index = open_index(load_settings(home))
    with index.db.read() as session:
        sql = session.connection().exec_driver_sql
        total = int(sql("SELECT count(*) FROM studies").scalar_one())
        biggest = sql("SELECT study_uid FROM studies ORDER BY instance_count DESC LIMIT 1").scalar()
        smallest = sql("SELECT study_uid FROM studies ORDER BY instance_count, id LIMIT 1").scalar()
        busiest = sql(
            "SELECT p.pseudonym FROM studies s JOIN patients p ON p.id = s.patient_id "
            "GROUP BY p.id ORDER BY count(*) DESC LIMIT 1"
        ).scalar()
        biggest_n = sql(
            "SELECT instance_count FROM studies WHERE study_uid = ?", (biggest,)
        ).scalar()
    deep = max(0, (total // 2) // 50 * 50)
    queries: dict[str, Callable[[], object]] = {
        "list studies, newest first, page 1 (50)": lambda: index.search(StudyQuery()),
        f"list studies, page at offset {deep}": lambda: index.search(StudyQuery(offset=deep)),
        "status deidentified, by received, oldest first": lambda: index.search(
            StudyQuery(status=(StudyStatus.DEIDENTIFIED,), sort="received_at", order="asc")
        ),
        "modality CT, study date 2017–2019": lambda: index.search(
            StudyQuery(
                modality="CT",
                study_date_from=dt.date(2017, 1, 1),
                study_date_to=dt.date(2019, 12, 31),
            )
        ),
        "modality CT, 256 rows, slice thickness ≥ 2 mm": lambda: index.search(
            StudyQuery(modality="CT", rows=256, slice_thickness_min=2.0)
        ),
        "DX, body part CHEST": lambda: index.search(StudyQuery(modality="DX", body_part="CHEST")),
        "burned-in risk (US)": lambda: index.search(StudyQuery(burned_in_risk=True)),
        "one patient's studies (pseudonym)": lambda: index.search(StudyQuery(pseudonym=busiest)),
        f"study detail, largest study ({biggest_n} instances)": lambda: index.study(biggest),
        "study detail, one-instance study": lambda: index.study(smallest),
        "dashboard counts": index.counts,
    }
    lines = [
        "| query | matches | p50 ms | p99 ms | max ms |",
        "|-------|--------:|-------:|-------:|-------:|",
    ]
    for name, query in queries.items():
        result = query()  # warm
        matches = getattr(result, "total", None)
        if matches is None:
            matches = getattr(result, "instance_count", getattr(result, "instances", "-"))
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            query()
            times.append(time.perf_counter() - t)
        lines.append(
            f"| {name} | {matches} | {pct(times, 0.5) * 1000:.1f} | "
            f"{pct(times, 0.99) * 1000:.1f} | {max(times) * 1000:.1f} |"
        )
    index.db.close()
    return lines


def accounting_lines(acct: Accounting) -> list[str]:
    lines = [
        "| generated | vault records (repeats) | indexed | stored, size + sha256 match | "
        "quarantined | duplicates | strays in store | studies (generated / indexed) | series |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {acct.generated:,} | {acct.vault_records:,} ({acct.vault_repeats}) | "
        f"{acct.indexed:,} | {acct.stored:,} | "
        f"{acct.quarantined} | {acct.duplicates} | {acct.strays} | "
        f"{acct.studies[0]:,} / {acct.studies[1]:,} | {acct.series[0]:,} / {acct.series[1]:,} |",
        "",
    ]
    if acct.ok:
        lines.append(
            "**Nothing lost**: every generated instance has its vault record, its index row "
            "under the vault's new UIDs and its file in the store with the indexed size and "
            "sha256; no duplicates, no strays, nothing quarantined; studies, series and their "
            "instance counts as generated."
        )
    else:
        lines.append("**NOT all accounted for:**")
        lines += [
            f"* {kind}: {n} (e.g. {acct.examples[kind]})" for kind, n in acct.problems.items()
        ]
    return lines


# -- main -----------------------------------------------------------------------------------


def ingest_section(made: Corpus, scratch: Path, args: argparse.Namespace) -> tuple[list[str], bool]:
    """Ingest the whole corpus with the CLI, account for it, query it: report lines, ok."""
    total = len(made.made)
    window = min(args.window, max(total // 10, 1))
    home = scratch / "ingest-home"
    os.sync()
    print("== ingest", flush=True)
    run = run_ingest(made.export, home, args.jobs or None)
    print(f"exit status {run.rc}, {run.seconds:.1f} s; accounting", flush=True)
    acct = account(home, made.made)
    print("searches", flush=True)
    searches = search_latency(home, args.repeat)
    if not args.keep_home:
        shutil.rmtree(home, ignore_errors=True)

    first = acct.received[0] - run.started_at if acct.received else math.nan
    last = acct.received[-1] - run.started_at if acct.received else math.nan
    mem, figures = memory_lines(run, total)
    windows, rates = window_rows(run, acct, window)
    inner = rates[1:-1] or rates  # the first window holds the start, the last the tail
    index_batches = [b.seconds for b in run.batches if b.kind == "index"]
    vault_batches = [b.seconds for b in run.batches if b.kind == "vault"]
    items = [b.items for b in run.batches if b.kind == "index"]
    parent_cpu = max((x.cpu_root for x in run.samples), default=math.nan)
    tree_cpu = max((x.cpu_tree for x in run.samples), default=math.nan)
    write_samples(run.samples, args.workdir / "load-ingest-samples.csv")
    return [
        "### Ingest",
        "",
        "| run | instances | seconds | instances/s | MB/s | exit status | first indexed at s | "
        "last indexed at s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| `radfed node ingest -q --no-vet`, jobs: {args.jobs or 'default (all cores)'} | "
        f"{total:,} | {run.seconds:.1f} | {total / run.seconds:,.0f} | "
        f"{made.size / 1e6 / run.seconds:.0f} | {run.rc} | {first:.1f} | {last:.1f} |",
        "",
        f"Index batches (one transaction each): {len(index_batches)} of "
        f"{pct(items, 0.5):.0f} instances (median); p50 {_ms(pct(index_batches, 0.5))} ms, "
        f"p99 {_ms(pct(index_batches, 0.99))} ms, max "
        f"{_ms(max(index_batches, default=math.nan))} ms. Vault appends (fsynced): p50 "
        f"{_ms(pct(vault_batches, 0.5))} ms, p99 {_ms(pct(vault_batches, 0.99))} ms. "
        f"From an output file written to its index row: p50 {_ms(pct(acct.lags, 0.5))} ms, "
        f"p99 {_ms(pct(acct.lags, 0.99))} ms.",
        "",
        f"CPU: {tree_cpu:.0f} s for the whole process tree ({tree_cpu / total * 1000:.2f} ms per "
        f"instance), of which the CLI process (walk, vault, index; the workers de-identify) "
        f"{parent_cpu:.0f} s — {sum(b.cpu for b in run.batches if b.kind == 'index'):.0f} s "
        "in index batches.",
        "",
        "#### Nothing lost",
        "",
        *accounting_lines(acct),
        "",
        f"#### Throughput and latency per window of {window:,} instances",
        "",
        *windows,
        "",
        f"Windows but the first and last: median {pct(inner, 0.5):,.0f} instances/s, lowest "
        f"{min(inner, default=math.nan):,.0f}, last / first of them "
        f"{inner[-1] / inner[0] if inner else math.nan:.0%}.",
        "",
        "#### Memory of the ingest process tree",
        "",
        *mem,
        "",
        "Tree RSS while the last 10% went in vs the 10–20% window: "
        f"{figures['late'] - figures['early']:+.0f} MiB "
        f"({(figures['late'] - figures['early']) / figures['early']:+.0%}).",
        "",
        f"#### Searches on the finished index ({args.repeat} runs each)",
        "",
        *searches,
    ], acct.ok and run.rc == 0


def cstore_section(made: Corpus, scratch: Path, args: argparse.Namespace) -> tuple[list[str], bool]:
    """The first ``--cstore`` instances through ``radfed node serve``: report lines, ok."""
    subset = made.made[: args.cstore]
    home = scratch / "serve-home"
    print(f"== C-STORE of {len(subset):,} over {args.associations} associations", flush=True)
    if args.dicom_log:
        args.dicom_log.mkdir(parents=True, exist_ok=True)
    run = run_cstore(made.export, subset, home, args.associations, args.dicom_log)
    print(f"sent in {run.seconds:.1f} s; accounting", flush=True)
    acct = account(home, subset)
    if not args.keep_home:
        shutil.rmtree(home, ignore_errors=True)
    size = sum(m.size for m in subset)
    ok = run.statuses == Counter({0: len(subset)}) and not math.isnan(run.drained)
    peak = max((x.rss for x in run.samples), default=math.nan)
    early = [x.rss for x in run.samples if 0.1 * len(subset) < x.indexed <= 0.2 * len(subset)]
    late = [x.rss for x in run.samples if x.indexed > 0.9 * len(subset)]
    lines = [
        "### C-STORE to the running node",
        "",
        f"The first {len(subset):,} instances of the corpus ({size / 1e6:.0f} MB) sent by "
        f"{args.associations} pynetdicom associations at once (one process each) to "
        "`radfed node serve` on 127.0.0.1; each C-STORE is answered once the instance is "
        "checked, spooled and fsynced, and the node's drain takes the spool in behind "
        f"(its vetter too). A C-STORE without a response is sent again, up to {SEND_TRIES} "
        "times, on a new association when the old one is lost.",
        "",
        "| associations | instances | sent in s | instances/s | C-STORE p50 ms | p99 ms | "
        "max ms | all indexed at s | final statuses | lost associations, no responses "
        "(of them taken by the sender's pynetdicom) | node tree RSS peak MiB | "
        "at 10–20% / 90–100% |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        f"| {run.associations} | {run.sent:,} | {run.seconds:.1f} | "
        f"{run.sent / run.seconds:,.0f} | {_ms(pct(run.latencies, 0.5))} | "
        f"{_ms(pct(run.latencies, 0.99))} | {_ms(max(run.latencies, default=math.nan))} | "
        f"{run.drained:.1f} | "
        + ", ".join(f"{status:#06x}: {n}" for status, n in run.statuses.items())
        + f" | {sum('lost' in e for e in run.events)}, "
        f"{sum('no response' in e for e in run.events)} "
        f"({sum('pynetdicom thread took it' in e for e in run.events)}) | {_mib(peak)} | "
        f"{_mib(float(np.mean(early)) if early else math.nan)} / "
        f"{_mib(float(np.mean(late)) if late else math.nan)} |",
        "",
        "",
        "The node's own time from a C-STORE arriving to its answer (engine check, spool, "
        "fsync; its `radfed_node_cstore_seconds` histogram): "
        + ", ".join(f"{k}: {v}" for k, v in run.handled.items() if v)
        + ".",
        "",
        *accounting_lines(acct),
    ]
    step = max(1, math.ceil(len(run.samples) / 120))
    lines += [
        "",
        "Per process, RSS while 10–20% went in → while the last 10% did: "
        + ("; ".join(run.growth) or "too few samples")
        + ".",
        "",
        f"Node tree RSS MiB / instances indexed (thousands), one sample every {step} s:",
        "",
        "    " + " ".join(f"{x.rss:.0f}/{x.indexed / 1000:.1f}" for x in run.samples[::step]),
    ]
    if run.events:
        lines += ["", "What went wrong on the way:", "", *(f"* {e}" for e in run.events[:20])]
        tail = run.log.strip().splitlines()[-30:]
        lines += ["", "The node's last output lines:", "", *(f"    {t}" for t in tail)]
    return lines, ok and acct.ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=200, help="runs of each search query")
    parser.add_argument("--jobs", type=int, default=0, help="ingest workers (default: the node's)")
    parser.add_argument(
        "--cstore", type=int, default=5000, help="instances of the corpus sent over DICOM too"
    )
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument(
        "--dicom-log",
        type=Path,
        default=None,
        help="folder for each sender's last pynetdicom debug records when a C-STORE goes "
        "unanswered (off by default: the debug records cost the senders CPU)",
    )
    parser.add_argument("--only", default="ingest,cstore", help="ingest, cstore or both")
    parser.add_argument("--workdir", type=Path, default=BENCH / "work")
    parser.add_argument("--keep-home", action="store_true", help="keep the node homes afterwards")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sections = {"ingest": ingest_section, "cstore": cstore_section}
    only = args.only.split(",")
    if unknown := set(only) - set(sections):
        parser.error(f'Argument "--only": unknown {", ".join(sorted(unknown))}')

    print(f"== corpus of {args.instances:,} instances", flush=True)
    made = corpus(args.workdir, args.instances, args.seed)
    took = f", generated in {made.seconds:.0f} s" if made.seconds else ", reused"
    print(f"{made.export} ({made.size / 1e9:.2f} GB{took})", flush=True)
    warm(made.export)
    kinds = Counter(m.modality for m in made.made)
    load = os.getloadavg()
    header = [
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}; load average (1 min) {load[0]:.1f} at the start.",
        "",
        f"Parameters: --instances {args.instances} --seed {args.seed} --window {args.window} "
        f"--repeat {args.repeat} --jobs {args.jobs or 'default'} --cstore {args.cstore} "
        f"--associations {args.associations} --only {args.only}",
        "",
        f"Corpus: {args.instances:,} instances (seed {args.seed}) in "
        f"{len({m.study_uid for m in made.made}):,} studies, "
        f"{len({m.series_uid for m in made.made}):,} series, "
        f"{len({m.relpath.split('/')[0] for m in made.made}):,} patients; "
        + ", ".join(f"{k} {v:,}" for k, v in kinds.most_common())
        + f"; {made.size / 1e9:.2f} GB, page cache warm.",
    ]
    results = args.workdir / "load-ingest-results.md"
    results.write_text("\n".join(header) + "\n")
    print("\n".join(["", *header]), flush=True)
    scratch = args.workdir / "load-ingest-run"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    ok = True
    try:
        for name in only:
            lines, fine = sections[name](made, scratch, args)
            ok = ok and fine
            lines = ["", *lines, "", f"(load average {os.getloadavg()[0]:.1f} after this part)"]
            with results.open("a") as fh:  # each part is kept as soon as it is measured
                fh.write("\n".join(lines) + "\n")
            print("\n".join(lines), flush=True)
    finally:
        if not args.keep_home:
            shutil.rmtree(scratch, ignore_errors=True)
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"written to {results}; bench driver peak RSS {driver:.0f} MiB")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
