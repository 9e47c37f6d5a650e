"""Benchmark: de-identification throughput of RadFed against peer tools and plain I/O baselines.

What it measures
    Files/s and MB/s (input bytes, 10^6) and peak resident memory of each tool de-identifying
    the same synthetic corpus: 512x512 16-bit CT slices and 2048x2048 CR radiographs made by
    ``radfed.synth.site`` (about ten patients, fifty slices each). Every corpus file is read
    before every run, so each starts from a warm page cache, and dirty pages are flushed
    (``os.sync``) before it, so no run pays for an earlier one's writes.

Tools
    radfed1, radfedN   ``radfed node deid SRC DST --jobs 1|0 --quiet`` (one core, all cores)
    pydicom            baseline: ``dcmread`` then ``save_as``, no changes, one process
    copy               baseline: ``shutil.copyfile`` per file
    dcmanon            ``dcmanon.Anonymizer().anonymize(path)``, bytes written out (driver)
    dicom-anonymizer   its CLI ``dicom-anonymizer SRC DST`` (default actions)
    dicognito          its CLI ``dicognito SRC --output-directory DST``, started as
                       ``python -m dicognito`` (the 0.19.0 console script cannot start)
    deid               ``deid.dicom.replace_identifiers(get_files(SRC), deid=None, save=True,
                       output_folder=DST)`` with the default recipe (driver)

    Each peer is installed from PyPI into its own virtual environment under ``bench/.venvs``
    and run as shipped, with default settings. The corpus is one flat folder of uniquely named
    files: the layout every peer handles (dicom-anonymizer's CLI does not descend into
    sub-folders and deid names its outputs by input basename).

How
    Each repetition is a fresh subprocess writing into a fresh, empty output folder. A CLI is
    timed by the wall time of its whole process (start-up and imports included); a driver (a
    small script generated into the work folder, run with the tool's own interpreter) reports
    the time of its processing loop, imports excluded. The table says which. Peak RSS is
    ``ru_maxrss`` of the run's whole process tree, collected by a small launcher process that
    reaps every descendant: for RadFed's worker pool that is the largest single process of the
    tree, not their sum. The tools run in ``--repeat`` rounds (every tool once per round), and
    the median of a tool's runs is reported (peak RSS: the maximum).
    After every run the outputs are counted and parsed with pydicom; a tool that exits non-zero
    or does not write one complete DICOM file per input is reported as failed, not timed.

Usage
    .venv/bin/python bench/deid.py [--ct 500] [--cr 50] [--repeat 3] [--workdir bench/work]
                                   [--tools radfed1,radfedN,pydicom,copy,dcmanon,...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from pydicom import dcmread

from radfed.synth.site import Uids, ct_series, make_patient, radiograph, write

BENCH = Path(__file__).resolve().parent
VENVS = BENCH / ".venvs"
PROJECT_BIN = Path(sysconfig.get_path("scripts"))

SEED = 20240611
CT_SIZE = 512
CR_SIZE = 2048
SLICES_PER_PATIENT = 50
CORPUS_FORMAT = 1  # bump when the generator below changes what it writes
MB = 1_000_000
MIB = 1024 * 1024

# A driver runs one tool over every file of SRC into DST in one process and prints its loop time.
DRIVER = """\
import json
import sys
import time
from pathlib import Path

{imports}

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
start = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""
FILES = "files = sorted(p for p in src.iterdir() if p.is_file())"

# Starts a run and reports its exit status, wall time and the peak RSS of its process tree. It is
# a small process of its own because a child's ru_maxrss starts at the RSS of the process that
# forked it (this one holds numpy and the generators). As a child subreaper it also reaps the
# descendants a run leaves behind, such as multiprocessing's fork server and, through it, the
# workers, so that RUSAGE_CHILDREN covers the whole tree. The wall time ends with the run's process.
LAUNCHER = """\
import ctypes, json, os, resource, sys, time
report, argv = sys.argv[1], sys.argv[2:]
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        print(f"cannot start {argv[0]}: {exc}", file=sys.stderr, flush=True)
    os._exit(127)
_, status, _ = os.wait4(pid, 0)
wall = time.perf_counter() - start
try:
    while True:
        os.wait()
except ChildProcessError:
    pass
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(report, "w") as out:
    json.dump([os.waitstatus_to_exitcode(status), wall, peak], out)
"""


class ToolError(Exception):
    """A tool could not be installed or did not de-identify the whole corpus."""

    def __init__(self, reason: str, complete: int | None = None) -> None:
        super().__init__(reason)
        self.complete = complete  # complete outputs it wrote, when it ran


Argv = Callable[[Path, Path, Path, Path], list[str]]  # (bin dir, src, dst, scratch) -> argv


@dataclass(frozen=True)
class Tool:
    name: str
    role: str  # "radfed", "peer" or "baseline"
    package: str | None = None  # PyPI package, installed into bench/.venvs/<package>
    distribution: str = ""  # what a tool of the project venv runs, for its version
    imports: str = ""  # a driver's imports ...
    body: str = ""  # ... and its loop; empty for a CLI
    cli: Argv | None = None

    @property
    def measured(self) -> str:
        return "wall" if self.cli else "loop"


def radfed_cli(jobs: int) -> Argv:
    def argv(bindir: Path, src: Path, dst: Path, scratch: Path) -> list[str]:
        return [
            str(bindir / "radfed"),
            "node",
            "deid",
            str(src),
            str(dst),
            "--jobs",
            str(jobs),
            "--quiet",
            "--home",
            str(scratch / "home"),
        ]

    return argv


def dicom_anonymizer_cli(bindir: Path, src: Path, dst: Path, scratch: Path) -> list[str]:
    return [str(bindir / "dicom-anonymizer"), str(src), str(dst)]


def dicognito_cli(bindir: Path, src: Path, dst: Path, scratch: Path) -> list[str]:
    return [str(bindir / "python"), "-m", "dicognito", str(src), "--output-directory", str(dst)]


TOOLS = {
    tool.name: tool
    for tool in (
        Tool("radfed1", "radfed", distribution="radfed", cli=radfed_cli(1)),
        Tool("radfedN", "radfed", distribution="radfed", cli=radfed_cli(0)),
        Tool(
            "pydicom",
            "baseline",
            distribution="pydicom",
            imports="from pydicom import dcmread",
            body=f"{FILES}\nfor path in files:\n    dcmread(path).save_as(dst / path.name)",
        ),
        Tool(
            "copy",
            "baseline",
            imports="import shutil",
            body=f"{FILES}\nfor path in files:\n    shutil.copyfile(path, dst / path.name)",
        ),
        Tool(
            "dcmanon",
            "peer",
            package="dcmanon",
            imports="from dcmanon import Anonymizer",
            body=(
                f"{FILES}\nanonymizer = Anonymizer()\nfor path in files:\n"
                "    (dst / path.name).write_bytes(anonymizer.anonymize(str(path)))"
            ),
        ),
        Tool("dicom-anonymizer", "peer", package="dicom-anonymizer", cli=dicom_anonymizer_cli),
        Tool("dicognito", "peer", package="dicognito", cli=dicognito_cli),
        Tool(
            "deid",
            "peer",
            package="deid",
            imports="from deid.dicom import get_files, replace_identifiers",
            body=(
                "files = list(get_files(str(src)))\n"
                "replace_identifiers(dicom_files=files, deid=None, save=True, "
                "output_folder=str(dst))"
            ),
        ),
    )
}


@dataclass(frozen=True)
class Corpus:
    root: Path
    files: int
    bytes: int
    names: frozenset[str]  # the patients' names and IDs planted in the files
    ids: frozenset[str]
    description: str


@dataclass(frozen=True)
class Run:
    seconds: float  # the measured time: loop time for a driver, wall time for a CLI
    wall: float  # the whole process, start-up included
    maxrss_mib: float


@dataclass(frozen=True)
class Result:
    tool: Tool
    version: str
    runs: tuple[Run, ...] = ()
    kept_phi: int = 0  # outputs of the last run still carrying an original name or ID
    failure: str = ""
    complete: int | None = None  # complete outputs of a failed run

    @property
    def seconds(self) -> float:
        return statistics.median(run.seconds for run in self.runs)

    @property
    def wall(self) -> float:
        return statistics.median(run.wall for run in self.runs)

    @property
    def maxrss_mib(self) -> float:
        return max(run.maxrss_mib for run in self.runs)


# --- corpus -------------------------------------------------------------------------------------


def split(total: int, parts: int) -> list[int]:
    """``total`` items over ``parts`` as evenly as possible."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def generate_corpus(root: Path, ct: int, cr: int) -> list[tuple[str, str]]:
    """Write the CT series and radiographs into ``root``; return the patients' (name, ID)."""
    rng = random.Random(SEED)
    np_rng = np.random.default_rng(SEED)
    uids = Uids(SEED)
    count = max(1, math.ceil(ct / SLICES_PER_PATIENT))
    patients = [make_patient(rng, index) for index in range(count)]
    first_day = dt.datetime(2021, 3, 1, 8, 0)
    for index, (patient, slices) in enumerate(zip(patients, split(ct, count), strict=True)):
        when = first_day + dt.timedelta(days=7 * index)
        study = uids.new(patient.patient_id[3:])
        accession = f"ACC{rng.randrange(10**6, 10**7)}"
        series = ct_series(patient, uids, study, when, accession, slices, CT_SIZE, np_rng)
        for number, ds in enumerate(series):
            write(ds, root / f"p{index:02d}-ct-{number:04d}.dcm")
    for number in range(cr):
        index = number % count
        patient = patients[index]
        when = first_day + dt.timedelta(days=7 * index + 2 + number // count)
        study = uids.new(patient.patient_id[3:])
        accession = f"ACC{rng.randrange(10**6, 10**7)}"
        ds = radiograph(patient, uids, study, when, accession, CR_SIZE, np_rng)
        write(ds, root / f"p{index:02d}-cr-{number:04d}.dcm")
    return [(patient.name, patient.patient_id) for patient in patients]


def ensure_corpus(workdir: Path, ct: int, cr: int) -> Corpus:
    """The corpus for these parameters: reused when its marker matches, else written afresh."""
    root = workdir / "corpus"
    marker = workdir / "corpus.json"
    params = {
        "format": CORPUS_FORMAT,
        "seed": SEED,
        "ct": ct,
        "cr": cr,
        "ct_size": CT_SIZE,
        "cr_size": CR_SIZE,
    }
    saved = json.loads(marker.read_text()) if marker.exists() else {}
    if saved.get("params") != params or not root.is_dir():
        print(f"generating corpus: {ct} CT {CT_SIZE}x{CT_SIZE}, {cr} CR {CR_SIZE}x{CR_SIZE} ...")
        started = time.perf_counter()
        marker.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        tmp = workdir / "corpus.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        patients = generate_corpus(tmp, ct, cr)
        tmp.rename(root)
        saved = {"params": params, "patients": patients}
        marker.write_text(json.dumps(saved, indent=1))
        print(f"generated in {time.perf_counter() - started:.0f} s")
    files = [path for path in root.iterdir() if path.is_file()]
    size = sum(path.stat().st_size for path in files)
    patients = saved["patients"]
    return Corpus(
        root=root,
        files=len(files),
        bytes=size,
        names=frozenset(name for name, _ in patients),
        ids=frozenset(patient_id for _, patient_id in patients),
        description=(
            f"{len(files)} files, {size / MB:.0f} MB: {ct} CT {CT_SIZE}x{CT_SIZE} and "
            f"{cr} CR {CR_SIZE}x{CR_SIZE}, 16-bit, explicit VR little endian, "
            f"{len(patients)} patients"
        ),
    )


def warm_cache(root: Path) -> None:
    """Read every corpus file once, so each run starts with the corpus in the page cache."""
    for path in root.iterdir():
        with path.open("rb") as stream:
            while stream.read(MIB):
                pass


# --- tools --------------------------------------------------------------------------------------


def run_quiet(argv: list[str], what: str) -> str:
    """Run a set-up command; its stdout, or ToolError with the gist of its error output."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        gist = (errors or proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ToolError(f"{what}: {gist[:120]}")
    return proc.stdout


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install(package: str) -> str:
    """Install ``package`` into its own venv (once); return its installed version."""
    venv = VENVS / package
    freeze = venv / "bench-freeze.txt"
    if not freeze.exists():
        print(f"installing {package} into {venv} ...")
        shutil.rmtree(venv, ignore_errors=True)
        run_quiet([sys.executable, "-m", "venv", str(venv)], "venv")
        run_quiet([str(venv / "bin" / "pip"), "install", "--quiet", package], "pip install")
        frozen = run_quiet([str(venv / "bin" / "python"), "-m", "pip", "freeze"], "pip freeze")
        freeze.write_text(frozen)
    for line in freeze.read_text().splitlines():
        name, _, version = line.partition("==")
        if canonical(name) == canonical(package):
            return version
    raise ToolError(f"install: {package} missing from {venv}")


def bin_dir(tool: Tool) -> Path:
    return VENVS / tool.package / "bin" if tool.package else PROJECT_BIN


def prepare(tool: Tool) -> Result:
    """Install a peer; name the version each tool runs."""
    if tool.package:
        try:
            return Result(tool, install(tool.package))
        except ToolError as exc:
            return Result(tool, "", failure=str(exc))
    return Result(tool, metadata.version(tool.distribution) if tool.distribution else "")


def command(tool: Tool, workdir: Path, src: Path, dst: Path, scratch: Path) -> list[str]:
    """The argv of one run: the tool's CLI, or its driver script (written into the work dir)."""
    bindir = bin_dir(tool)
    if tool.cli:
        return tool.cli(bindir, src, dst, scratch)
    driver = workdir / "drivers" / f"drive_{tool.name}.py"  # not named like the module it uses
    driver.parent.mkdir(parents=True, exist_ok=True)
    driver.write_text(DRIVER.format(imports=tool.imports, body=tool.body))
    return [str(bindir / "python"), str(driver), str(src), str(dst)]


# --- measuring ----------------------------------------------------------------------------------


def last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[-1][:120] if lines else "no output"


def execute(argv: list[str], scratch: Path) -> tuple[int, float, float]:
    """Run ``argv`` in ``scratch``: (exit status, wall seconds, peak RSS MiB of its tree)."""
    report = scratch / "launcher.json"
    launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *argv]
    with (scratch / "stdout.log").open("wb") as out, (scratch / "stderr.log").open("wb") as err:
        subprocess.run(launcher, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=scratch)
    status, wall, maxrss_kib = json.loads(report.read_text())
    return status, wall, maxrss_kib * 1024 / MIB


def check_outputs(dst: Path, corpus: Corpus) -> tuple[int, int]:
    """(complete DICOM outputs, outputs still carrying a planted name or ID) under ``dst``."""
    complete = kept = 0
    for path in dst.rglob("*"):
        if not path.is_file():
            continue
        try:
            ds = dcmread(path)
            expected = ds.Rows * ds.Columns * ds.BitsAllocated // 8
            if len(ds.PixelData) < expected:
                continue
        except Exception:  # anything unreadable or incomplete is simply not a good output
            continue
        complete += 1
        if str(ds.get("PatientName", "")) in corpus.names or ds.get("PatientID") in corpus.ids:
            kept += 1
    return complete, kept


def driver_seconds(stdout: Path) -> float:
    """The loop time a driver printed last."""
    try:
        return float(json.loads(last_line(stdout))["seconds"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ToolError(f"driver printed no timing: {last_line(stdout)}") from exc


def run_once(tool: Tool, corpus: Corpus, workdir: Path, scratch: Path) -> tuple[Run, int]:
    """One fresh run of ``tool`` into an empty folder, checked: (the run, outputs keeping PHI)."""
    shutil.rmtree(scratch, ignore_errors=True)
    dst = scratch / "out"
    dst.mkdir(parents=True)
    os.sync()  # no write-back of earlier runs' outputs during this one
    argv = command(tool, workdir, corpus.root, dst, scratch)
    status, wall, maxrss = execute(argv, scratch)
    complete, kept = check_outputs(dst, corpus)
    if status != 0:
        raise ToolError(f"exit {status}: {last_line(scratch / 'stderr.log')}", complete)
    if complete != corpus.files:
        raise ToolError(f"exit 0, {complete} complete outputs for {corpus.files} inputs", complete)
    seconds = wall if tool.cli else driver_seconds(scratch / "stdout.log")
    shutil.rmtree(scratch)
    return Run(seconds, wall, maxrss), kept


def benchmark(prepared: list[Result], corpus: Corpus, workdir: Path, repeat: int) -> list[Result]:
    """Run every tool ``repeat`` times, in rounds, so a passing disturbance hits all tools alike."""
    failed = {r.tool.name: r for r in prepared if r.failure}
    runs: dict[str, list[Run]] = {r.tool.name: [] for r in prepared}
    kept: dict[str, int] = {}
    for index in range(repeat):
        print(f"round {index + 1}/{repeat}")
        for result in prepared:
            tool = result.tool
            if tool.name in failed:
                continue
            print(f"  {tool.name} ...", end="", flush=True)
            warm_cache(corpus.root)
            try:
                run, kept[tool.name] = run_once(tool, corpus, workdir, workdir / "runs" / tool.name)
            except ToolError as exc:
                print(f" failed: {exc}")
                failed[tool.name] = Result(
                    tool, result.version, failure=str(exc), complete=exc.complete
                )
                continue
            runs[tool.name].append(run)
            print(f" {run.seconds:.2f} s ({tool.measured}), {run.maxrss_mib:.0f} MiB")
    return [
        failed.get(r.tool.name)
        or Result(r.tool, r.version, tuple(runs[r.tool.name]), kept[r.tool.name])
        for r in prepared
    ]


# --- report -------------------------------------------------------------------------------------

HEADERS = [
    "tool",
    "version",
    "files/s",
    "MB/s",
    "peak RSS MiB",
    "outputs ok",
    "name/ID kept",
    "measured",
    "s (median)",
    "wall s",
    "vs fastest peer",
    "vs pydicom r+w",
    "note",
]


def fastest_peer(results: list[Result]) -> Result | None:
    peers = [r for r in results if r.tool.role == "peer" and not r.failure]
    return min(peers, key=lambda r: r.seconds) if peers else None


def timed(results: list[Result], name: str) -> Result | None:
    return next((r for r in results if r.tool.name == name and not r.failure), None)


def ratio(result: Result, reference: Result | None) -> str:
    return f"{reference.seconds / result.seconds:.2f}x" if reference else "n/a"


def row(result: Result, corpus: Corpus, peer: Result | None, base: Result | None) -> list[str]:
    tool, files = result.tool, corpus.files
    if result.failure:
        outputs = "-" if result.complete is None else f"{result.complete}/{files}"
        dashes = ["-"] * 3
        return [tool.name, result.version or "-", *dashes, outputs, "-", tool.measured,
                *dashes, "-", f"failed: {result.failure}"]  # fmt: skip
    return [
        tool.name,
        result.version or "-",
        f"{files / result.seconds:.1f}",
        f"{corpus.bytes / MB / result.seconds:.1f}",
        f"{result.maxrss_mib:.0f}",
        f"{files}/{files}",
        f"{result.kept_phi}/{files}",
        tool.measured,
        f"{result.seconds:.2f}",
        f"{result.wall:.2f}",
        ratio(result, peer),
        ratio(result, base),
        "peak RSS: largest process of the pool" if tool.name == "radfedN" else "",
    ]


def targets(results: list[Result], peer: Result | None, base: Result | None) -> list[str]:
    """The issue's targets, each with the measured ratio and whether it is met."""
    checks = [
        ("RadFed, all cores, >= 2x the fastest peer", "radfedN", peer, 2.0),
        ("RadFed, one core, >= 1x the fastest peer", "radfed1", peer, 1.0),
        ("RadFed, one core, >= 80% of plain pydicom read+write", "radfed1", base, 0.8),
    ]
    lines = []
    for label, name, reference, goal in checks:
        result = timed(results, name)
        if result is None or reference is None:
            lines.append(f"- {label}: not measured")
            continue
        achieved = reference.seconds / result.seconds
        verdict = "met" if achieved >= goal else "NOT met"
        lines.append(f"- {label} ({reference.tool.name}): {achieved:.2f}x, {verdict}")
    return lines


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.partition(":")[2].strip() for line in lines if line.startswith("model name")]
    return models[0] if models else platform.machine()


def report(results: list[Result], corpus: Corpus, repeat: int, argv: list[str], load: float) -> str:
    peer = fastest_peer(results)
    base = timed(results, "pydicom")
    table = markdown_table(HEADERS, [row(r, corpus, peer, base) for r in results])
    return "\n".join(
        [
            f"Corpus: {corpus.description}.",
            f"Machine: {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}; "
            f"median of {repeat} run(s), warm page cache; 1-min load average {load:.1f} at the "
            f"start, {os.getloadavg()[0]:.1f} at the end (any other work skews the numbers); "
            f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.",
            f"Command: `{' '.join(['python', 'bench/deid.py', *argv])}`",
            "",
            table,
            "",
            "measured: `loop` is a driver's own processing time (imports excluded), `wall` a CLI's "
            "whole process; throughput and ratios use the measured time. `wall s`: every tool's "
            "whole process, start-up and imports included. Ratios are speed ratios (>1: faster). "
            "name/ID kept: outputs still carrying a planted patient name or ID (the baselines "
            "change nothing).",
            "",
            "Targets:",
            *targets(results, peer, base),
        ]
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=500, help="CT slices (512x512)")
    parser.add_argument("--cr", type=int, default=50, help="CR radiographs (2048x2048)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool (median reported)")
    parser.add_argument("--workdir", type=Path, default=BENCH / "work")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated tool names")
    args = parser.parse_args(argv)
    unknown = [name for name in args.tools.split(",") if name not in TOOLS]
    if unknown:
        parser.error(f"unknown tools {unknown}; choose from {', '.join(TOOLS)}")
    if args.ct < 0 or args.cr < 0 or args.ct + args.cr == 0 or args.repeat < 1:
        parser.error("need --ct/--cr >= 0 with at least one file, and --repeat >= 1")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    started, load = time.perf_counter(), os.getloadavg()[0]
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = ensure_corpus(workdir, args.ct, args.cr)
    print(f"corpus: {corpus.root}: {corpus.description}")
    prepared = [prepare(TOOLS[name]) for name in args.tools.split(",")]
    for result in prepared:
        if result.failure:
            print(f"{result.tool.name}: {result.failure}")
    results = benchmark(prepared, corpus, workdir, args.repeat)
    text = report(results, corpus, args.repeat, argv, load)
    print()
    print(text)
    output = workdir / "deid-results.md"
    output.write_text(text + "\n")
    print(f"\nwritten to {output}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
