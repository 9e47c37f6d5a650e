#!/usr/bin/env python3
"""The coordinator under load: many nodes uploading at once, registry searches at a fixed rate.

Tables, not pass/fail. Two parts (``--only uploads,search``), each against a
real ``radfed coordinator serve`` process on 127.0.0.1 over TLS, on SQLite (the
default) or PostgreSQL (``--backend``):

**uploads** — ``--nodes`` enrolled sites (each its own node home, key and
certificate, made and enrolled as ``bench/coordinator_intake.py`` does) upload
de-identified exams without pause for ``--minutes``, through the node's own
uploader (signed manifest, PUT per file, complete). Each site's exams are its
one ingested CT template exam (``--slices`` slices of ``--size``², de-identified
by ``radfed node ingest``) with fresh generated UIDs: the UIDs are rewritten in
place (same length, so nothing else in the file moves), the files re-hashed and
the manifest signed again with the site's key, so every upload is a new exam
the coordinator checks, scans and registers in full. Sites run as threads, a
few per client process (``--procs``). Recorded: each exam's time from opening
the upload to its receipt (registered), each request's time by kind, exams,
instances and MB per second over time, failed requests by kind (the uploader
retries the retryable ones). At the end, with the coordinator stopped, the
registry is checked: every receipt's exam is there with its instances and
digests, every object is in the store and hashes right, no exam is there
twice or without a receipt, no upload was left half-done, the audit chain
verifies. The API is asked for each site's exam count before the stop.

**search** — a registry bulk-loaded by ``bench/coordinator_registry.py``'s
loader (``--exams`` × ``--instances``, 10 sites) behind the API, and an
open-loop load generator: ``--rate`` researcher requests per second for
``--seconds``, each sent at its scheduled time whatever happened to the ones
before (a mix of exam searches with filters and paging, exam details and
statistics through ``/api/v1``, a researcher API token). Latency is measured
from the scheduled send time, so a server falling behind shows as latency, not
as a lower rate (no coordinated omission). The generator is ``--generators``
processes, each an asyncio loop with a small HTTP/1.1 client on
``--connections`` keep-alive TLS connections; its CPU is measured and reported.
Several rates (``--rate 1000,100``) run one after another against the same
server: what the issue asks for, then what this machine sustains. Requests the
generator could not send before ``--seconds`` plus a 30-s drain are counted as
never sent. Each phase reports how many registry answers came from the
coordinator's answer cache (its ``/metrics``). Then, unless ``--no-floor``,
the first rate again on ``GET /healthz``: the same TLS, HTTP and middleware
stack with no authentication and no database — what this machine's cores
allow any answer at all. ``--py-spy`` samples the server's threads under the first rate (and
the first minute of uploads) and prints where they were.

In both parts the coordinator's process tree (server, its scanning processes,
the SuperLink when ``--flower``) is sampled from ``/proc`` every
``--sample-s``: peak RSS, and flatness as the slope of a linear fit after the
first minute (MiB/min) and the last minute's mean against the second's, for the
tree and the server process alone. During uploads each sample also reads the
server's C heap from its ``/metrics`` (bytes in use and free but kept, arenas,
trims): whether growth is live data or memory the allocator keeps.
``--set NAME=VALUE`` runs the coordinator with a setting changed (for example
``--set malloc_arena_max=0 --set malloc_trim_s=0``: glibc's defaults).
Everything started is stopped and the work folder removed at the end.

    .venv/bin/python bench/load_coordinator.py [--only uploads,search]
        [--backend sqlite|postgresql|both] [--nodes 50] [--minutes 10] [--procs 10]
        [--slices 4] [--size 128] [--rate 1000,100] [--seconds 60] [--exams 20000]
        [--instances 50] [--generators 2] [--connections 16] [--no-floor] [--flower]
        [--py-spy PATH] [--sample-s 5] [--set NAME=VALUE ...] [--workdir bench/work]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import math
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from coordinator_intake import RADFED, free_port, make_site, run, tree_cpu, wait_https
from coordinator_registry import PG_DSN, ROOT, percentile, pg_admin
from coordinator_registry import load as load_registry

BENCH = Path(__file__).resolve().parent
MIB = 1024 * 1024


# -- the coordinator's process tree and its memory -----------------------------------------


def _stat(pid: int | str) -> tuple[int, int]:
    """(parent pid, start time in clock ticks) of a process, from /proc/<pid>/stat."""
    fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19])


def process_tree(pid: int) -> dict[int, tuple[str, int, int]]:
    """{pid: (name, RSS bytes, start time)} of a process and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = _stat(entry.name)[0]
    tree, stack = {}, [pid]
    while stack:
        current = stack.pop()
        try:
            status = (Path("/proc") / str(current) / "status").read_text()
            started = _stat(current)[1]
        except (OSError, IndexError, ValueError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        tree[current] = (fields.get("Name", "?").strip(), rss, started)
        stack.extend(child for child, parent in parents.items() if parent == current)
    return tree


def _alive(pid: int, started: int) -> bool:
    """Whether the process ``pid`` that started at ``started`` is still there (not a reuse)."""
    try:
        return _stat(pid)[1] == started
    except (OSError, IndexError, ValueError):
        return False


@dataclass
class Sample:
    t: float  # seconds since the sampler started
    tree: int  # bytes, every process of the tree
    server: int  # bytes, the server process alone
    processes: int
    #: The server's C heap from its /metrics (bytes in_use / free / mapped, arenas, trims);
    #: empty when not read (no operator token, or the request failed under load).
    heap: dict[str, float] = field(default_factory=dict)


class MemorySampler:
    """Samples the RSS of a process tree every ``every`` seconds in a thread.

    ``heap``, when given, reads the server's C heap figures with each sample.
    """

    def __init__(
        self, pid: int, every: float, heap: Callable[[], dict[str, float]] | None = None
    ) -> None:
        self.pid, self.every, self.heap = pid, every, heap
        self.samples: list[Sample] = []
        #: Every process of the tree ever seen: pid -> (name, start time), for leftovers.
        self.seen: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.every):
                return

    def sample(self) -> None:
        tree = process_tree(self.pid)
        if not tree:
            return
        self.seen.update({pid: (name, started) for pid, (name, _, started) in tree.items()})
        heap: dict[str, float] = {}
        if self.heap is not None:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                heap = self.heap()
        self.samples.append(
            Sample(
                time.monotonic() - self._t0,
                sum(rss for _, rss, _ in tree.values()),
                tree.get(self.pid, ("", 0, 0))[1],
                len(tree),
                heap,
            )
        )

    def start(self) -> MemorySampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()


def _slope(xs: list[float], ys: list[float]) -> float:
    """Slope of the least-squares line through (xs, ys); 0 with fewer than three points."""
    if len(xs) < 3 or max(xs) == min(xs):
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def flatness(samples: list[Sample]) -> dict[str, float]:
    """Peak, slope of a linear fit after warm-up (MiB/min), late window mean - early window mean.

    Warm-up is the first minute (the first fifth of a shorter run); the windows are a
    minute each (a third of what is left after warm-up in a shorter run): for a
    10-minute run, the second minute against the last. The same for the server process
    alone (``server_…``) and, where the samples read it, its C heap in use and free
    (``heap_…``: early and late window means, MiB).
    """
    names = ("peak", "peak_server", "slope", "early", "late", "growth", "server_slope")
    if not samples:
        return dict.fromkeys(names, 0.0)
    end = samples[-1].t
    warm = min(60.0, end * 0.2)
    window = min(60.0, max(end - warm, 0.0) / 3)
    steady = [s for s in samples if s.t >= warm] or samples
    xs = [s.t / 60 for s in steady]
    ys = [s.tree / MIB for s in steady]
    early = [s.tree / MIB for s in steady if s.t <= warm + window] or ys[:1]
    late = [s.tree / MIB for s in steady if s.t >= end - window] or ys[-1:]
    out = {
        "peak": max(s.tree for s in samples) / MIB,
        "peak_server": max(s.server for s in samples) / MIB,
        "slope": _slope(xs, ys),
        "early": statistics.fmean(early),
        "late": statistics.fmean(late),
        "growth": statistics.fmean(late) - statistics.fmean(early),
        "server_slope": _slope(xs, [s.server / MIB for s in steady]),
    }
    for state in ("in_use", "free"):
        key = f"bytes_{state}"
        first = [s.heap[key] / MIB for s in steady if key in s.heap and s.t <= warm + window]
        last = [s.heap[key] / MIB for s in steady if key in s.heap and s.t >= end - window]
        if first and last:
            out[f"heap_{state}_early"] = statistics.fmean(first)
            out[f"heap_{state}_late"] = statistics.fmean(last)
    arenas = [s.heap["arenas"] for s in samples if "arenas" in s.heap]
    if arenas:
        out["heap_arenas"] = max(arenas)
    trims = [s.heap for s in samples if "trims" in s.heap]
    if trims:
        out["heap_trims"] = trims[-1]["trims"]
        out["heap_trim_seconds"] = trims[-1]["trim_seconds"]
    return out


def memory_lines(samples: list[Sample], flat: dict[str, float], every: float) -> list[str]:
    """The flatness figures and every sample, compactly."""
    values = " ".join(f"{s.tree / MIB:.0f}" for s in samples)
    processes = sorted({s.processes for s in samples})
    lines = [
        f"coordinator tree RSS: peak **{flat['peak']:.0f} MiB** (server process alone "
        f"{flat['peak_server']:.0f} MiB), {processes[0]}–{processes[-1]} processes; "
        f"slope after warm-up **{flat['slope']:+.2f} MiB/min** (the server alone "
        f"{flat['server_slope']:+.2f}); "
        f"late vs early window {flat['late']:.0f} vs {flat['early']:.0f} MiB "
        f"(**{flat['growth']:+.0f} MiB**)",
    ]
    if "heap_in_use_early" in flat:
        trims = (
            f"; trimmed {flat['heap_trims']:.0f} times in {flat['heap_trim_seconds'] * 1000:.0f} ms"
            if "heap_trims" in flat
            else "; not trimmed"
        )
        lines.append(
            f"server C heap (its /metrics), early → late window: in use "
            f"{flat['heap_in_use_early']:.1f} → {flat['heap_in_use_late']:.1f} MiB, free but "
            f"kept {flat['heap_free_early']:.1f} → {flat['heap_free_late']:.1f} MiB; "
            f"at most {flat.get('heap_arenas', 0):.0f} arenas{trims}"
        )
    lines.append(f"samples every {every:g} s (MiB): {values}")
    return lines


# -- the coordinator ---------------------------------------------------------------------


@dataclass
class Coordinator:
    """A ``radfed coordinator serve`` process and its home."""

    home: Path
    url: str
    env: dict[str, str]
    db_url: str
    process: subprocess.Popen[bytes] | None = None
    schema: str | None = None
    log: Any = None

    @property
    def ca(self) -> Path:
        return self.home / "pki" / "ca.crt"

    def settings(self) -> Any:
        from coordinator.settings import load_settings

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return load_settings(self.home)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


#: ``--set NAME=VALUE`` coordinator settings, as RADFED_COORDINATOR_NAME variables.
EXTRA_ENV: dict[str, str] = {}


def init_coordinator(root: Path, backend: str, flower: bool) -> Coordinator:
    """A fresh federation in ``root/coordinator`` (its registry on ``backend``)."""
    home = root / "coordinator"
    shutil.rmtree(home, ignore_errors=True)
    env = {
        "RADFED_COORDINATOR_FLOWER_ENABLED": "1" if flower else "0",
        "RADFED_COORDINATOR_SUPERLINK_PORT": str(free_port()),
        **EXTRA_ENV,
    }
    schema = None
    if backend == "postgresql":
        schema = f"bench_load_{secrets.token_hex(4)}"
        pg_admin(f"CREATE SCHEMA {schema}")
        db_url = f"{PG_DSN}?options=-csearch_path%3D{schema}"
        env["RADFED_COORDINATOR_DATABASE_URL"] = db_url
    else:
        db_url = f"sqlite:///{home / 'registry.sqlite'}"
    run("coordinator", "init", "--home", str(home), env=env)
    port = free_port()
    return Coordinator(home, f"https://127.0.0.1:{port}", env, db_url, schema=schema)


def start_coordinator(coordinator: Coordinator) -> None:
    port = coordinator.url.rsplit(":", 1)[1]
    coordinator.log = open(coordinator.home.parent / "coordinator.log", "ab")  # noqa: SIM115
    coordinator.process = subprocess.Popen(
        [RADFED, "coordinator", "serve", "--home", str(coordinator.home), "--port", port],
        stdout=subprocess.DEVNULL,
        stderr=coordinator.log,
        env={**os.environ, **coordinator.env},
    )
    wait_https(f"{coordinator.url}/healthz", coordinator.ca, timeout=120)


def stop_coordinator(coordinator: Coordinator, seen: dict[int, tuple[str, int]]) -> list[str]:
    """Stop the server (SIGTERM; SIGKILL after 60 s) and wait for every process of its tree.

    ``seen`` is every process of the tree the sampler saw. One still running 10 s
    after the server exited is a leftover: it is killed (checked by its start
    time, so never a reused pid) and named in the result. Calling it again does nothing.
    """
    process = coordinator.process
    if process is None:
        return []
    coordinator.process = None
    if process.poll() is None:
        seen.update({p: (n, st) for p, (n, _, st) in process_tree(process.pid).items()})
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    if coordinator.log is not None:
        coordinator.log.close()
    others = {pid: info for pid, info in seen.items() if pid != process.pid}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p, st) for p, (_, st) in others.items()):
        time.sleep(0.2)
    leftovers = []
    for pid, (name, started) in others.items():
        if _alive(pid, started):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            leftovers.append(f"{name} ({pid})")
    return leftovers


def drop_schema(coordinator: Coordinator) -> None:
    if coordinator.schema:
        pg_admin(f"DROP SCHEMA IF EXISTS {coordinator.schema} CASCADE")


def read_metrics(coordinator: Coordinator, operator_token: str, timeout: float) -> dict[str, float]:
    """The server's ``/metrics`` (an operator token): each sample line's name → value."""
    answer = httpx.get(
        f"{coordinator.url}/metrics",
        headers={"Authorization": f"Bearer {operator_token}"},
        verify=ssl.create_default_context(cafile=str(coordinator.ca)),
        timeout=timeout,
    )
    answer.raise_for_status()
    values = {}
    for line in answer.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


#: The server's C heap figures in ``/metrics``, by the names the samples keep.
HEAP_METRICS = {
    'radfed_coordinator_heap_bytes{state="in_use"}': "bytes_in_use",
    'radfed_coordinator_heap_bytes{state="free"}': "bytes_free",
    'radfed_coordinator_heap_bytes{state="mapped"}': "bytes_mapped",
    "radfed_coordinator_heap_arenas": "arenas",
    "radfed_coordinator_heap_trims_total": "trims",
    "radfed_coordinator_heap_trim_seconds_total": "trim_seconds",
}


def heap_probe(coordinator: Coordinator, operator_token: str) -> Callable[[], dict[str, float]]:
    """A reader of the server's C heap figures from its ``/metrics``."""

    def read() -> dict[str, float]:
        values = read_metrics(coordinator, operator_token, timeout=10)
        return {short: values[name] for name, short in HEAP_METRICS.items() if name in values}

    return read


def researcher_token(
    coordinator: Coordinator, name: str = "bench-researcher", role: str = "researcher"
) -> str:
    from coordinator import tokens
    from coordinator.registry.db import Database

    db = Database.open(coordinator.db_url)
    try:
        return tokens.create(db, name, role, actor="bench")
    finally:
        db.close()


def cache_counts(coordinator: Coordinator, operator_token: str) -> tuple[float, float]:
    """(hits, misses) of the coordinator's registry answer cache, from its ``/metrics``."""
    values = read_metrics(coordinator, operator_token, timeout=60)
    return (
        values.get("radfed_coordinator_registry_cache_hits_total", 0.0),
        values.get("radfed_coordinator_registry_cache_misses_total", 0.0),
    )


# -- uploads: the client side ------------------------------------------------------------


def _same_length_uid(uid: str, rng: random.Random) -> str:
    """A new generated (2.25) UID of exactly ``uid``'s length (nothing else in the file moves)."""
    digits = len(uid) - len("2.25.")
    if not uid.startswith("2.25.") or digits < 30:
        raise ValueError(f"template UID {uid} is not a generated 2.25 UID")
    return "2.25." + str(rng.randrange(10 ** (digits - 1), 10**digits))


class ExamMaker:
    """New exams of one site: its ingested template exam with fresh UIDs, signed again."""

    def __init__(self, home: Path, client: Any, scratch: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from node import federation
        from node.settings import load_settings
        from node.share.manifest import package
        from node.site import open_index

        settings = load_settings(home)
        files = federation.files(settings)
        index = open_index(settings)
        try:
            template = package(
                index, settings, study_uid_of(home), client.site, files.key, files.cert
            )
        finally:
            index.db.close()
        self.manifest = template.signed.manifest.model_dump(mode="json")
        self.data = {sha: path.read_bytes() for sha, path in template.files.items()}
        self.key = serialization.load_pem_private_key(files.key.read_bytes(), None)
        self.cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(secrets.randbits(64))

    def make(self) -> Any:
        """A new exam (an ``ExamPackage``), its files written to the scratch folder."""
        from node.share.manifest import ExamPackage
        from protocols.api.coordinator import ExamManifest
        from protocols.signing import sign_manifest
        from protocols.sqltypes import utcnow

        manifest = json.loads(json.dumps(self.manifest))
        exam = manifest["exam"]
        # Old UID -> new one, the same length: the study, each series, each instance.
        swaps = {exam["study_instance_uid"]: ""}
        for series in exam["series"]:
            swaps[series["series_instance_uid"]] = ""
            swaps.update((i["sop_instance_uid"], "") for i in series["instances"])
        swaps = {old: _same_length_uid(old, self.rng) for old in swaps}
        exam["study_instance_uid"] = swaps[exam["study_instance_uid"]]
        written = {}
        for series in exam["series"]:
            series["series_instance_uid"] = swaps[series["series_instance_uid"]]
            for instance in series["instances"]:
                data = self.data[instance["sha256"]]
                for old, new in swaps.items():
                    data = data.replace(old.encode(), new.encode())
                instance["sop_instance_uid"] = swaps[instance["sop_instance_uid"]]
                sha = hashlib.sha256(data).hexdigest()
                instance["sha256"] = sha
                written[sha] = self.scratch / f"{sha}.dcm"
                written[sha].write_bytes(data)
        manifest["created_at"] = utcnow().isoformat()
        signed = sign_manifest(ExamManifest.model_validate(manifest), self.key, self.cert)
        return ExamPackage(signed, written)


def study_uid_of(home: Path) -> str:
    import sqlite3

    with sqlite3.connect(home / "index.sqlite") as db:
        return str(db.execute("SELECT study_uid FROM studies ORDER BY id").fetchone()[0])


def _kind(method: str, path: str) -> str:
    if method == "PUT":
        return "put file"
    if path.endswith("/complete"):
        return "complete"
    if method == "POST":
        return "open (manifest)"
    return "status"


@dataclass
class SiteLog:
    """What one site's uploads did."""

    exams: list[dict[str, Any]] = field(default_factory=list)
    requests: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)


_SETUP = threading.Lock()


class StartLine:
    """Every site ready before any starts: ``<folder>/ready/<site>`` files, then ``go``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "ready").mkdir(parents=True, exist_ok=True)

    def ready(self, site: str) -> None:
        (self.folder / "ready" / site).touch()

    def count(self) -> int:
        return len(list((self.folder / "ready").iterdir()))

    def go(self, at: float) -> None:
        tmp = self.folder / "go.tmp"
        tmp.write_text(repr(at))
        tmp.replace(self.folder / "go")

    def wait(self, timeout: float = 900) -> float:
        """The start time (wall clock), once the run has been started."""
        deadline = time.monotonic() + timeout
        while not (self.folder / "go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the run was never started")
            time.sleep(0.02)
        return float((self.folder / "go").read_text())


def upload_site(home: str, line: StartLine, seconds: float, scratch: str, log: SiteLog) -> None:
    """One site: ready, then exams back to back for ``seconds`` (the last one finishes)."""
    from node import federation
    from node.errors import NodeError
    from node.settings import load_settings
    from node.share.upload import send_exam
    from protocols.api.coordinator import Receipt

    try:
        with _SETUP:  # node settings are read through a class attribute: one site at a time
            settings = load_settings(Path(home))
            client = federation.CoordinatorClient(settings)
            maker = ExamMaker(Path(home), client, Path(scratch))
    finally:
        line.ready(Path(home).name)  # a site that failed here is not waited for
    start = line.wait()
    deadline = start + seconds
    with client:
        plain = client.request

        def timed(method: str, path: str, **kwargs: Any) -> httpx.Response:
            kind = _kind(method, path)
            began = time.perf_counter()
            try:
                response = plain(method, path, **kwargs)
            except NodeError as exc:
                log.errors[f"{kind}: {exc.code}"] += 1
                raise
            log.requests[kind].append((time.perf_counter() - began) * 1000)
            if response.status_code >= 400:
                try:
                    code = response.json().get("code", "")
                except ValueError:
                    code = ""
                log.errors[f"{kind}: HTTP {response.status_code} {code}".rstrip()] += 1
            return response

        client.request = timed  # type: ignore[method-assign]
        while time.time() < start:
            time.sleep(0.01)
        while time.time() < deadline:
            package = maker.make()
            manifest = package.signed.manifest
            record: dict[str, Any] = {
                "site": client.site,
                "study_uid": manifest.study_instance_uid,
                "instances": {i.sop_instance_uid: i.sha256 for i in manifest.instances()},
                "bytes": manifest.total_size,
                "sent_at": time.time(),
            }
            began = time.perf_counter()
            try:
                outcome = send_exam(client, package)
            except NodeError as exc:
                record["outcome"] = f"failed: {exc.code}"
                log.errors[f"exam: {exc.code}"] += 1
            else:
                if isinstance(outcome, Receipt):
                    record["outcome"] = "duplicate" if outcome.duplicate else "receipt"
                    record["receipt"] = outcome.model_dump(mode="json")
                else:
                    record["outcome"] = f"refused: {outcome.code}"
                    log.errors[f"exam refused: {outcome.code}"] += 1
            record["seconds"] = time.perf_counter() - began
            record["done_at"] = time.time()
            log.exams.append(record)
            for path in package.files.values():
                path.unlink(missing_ok=True)


def upload_worker(
    homes: list[str], folder: str, seconds: float, scratch: str
) -> tuple[list[dict[str, Any]], dict[str, list[float]], dict[str, int], float, list[str]]:
    """A client process, a thread per site: exams, request ms by kind, errors, CPU s, crashes."""
    import resource

    logs = [SiteLog() for _ in homes]
    crashes: list[str] = []

    def guarded(home: str, log: SiteLog) -> None:
        try:
            site_scratch = str(Path(scratch) / Path(home).name)
            upload_site(home, StartLine(Path(folder)), seconds, site_scratch, log)
        except Exception as exc:  # a site that stops is reported, never hidden
            where = traceback.extract_tb(exc.__traceback__)[-1]
            crashes.append(
                f"{Path(home).name}: {type(exc).__name__}: {exc} "
                f"({Path(where.filename).name}:{where.lineno})"
            )

    threads = [
        threading.Thread(target=guarded, args=(home, log), daemon=True)
        for home, log in zip(homes, logs, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    requests: dict[str, list[float]] = defaultdict(list)
    errors: Counter[str] = Counter()
    exams = []
    for log in logs:
        exams.extend(log.exams)
        errors.update(log.errors)
        for kind, times in log.requests.items():
            requests[kind].extend(times)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return exams, dict(requests), dict(errors), usage.ru_utime + usage.ru_stime, crashes


# -- uploads: the run and the checks -----------------------------------------------------


def prepare_sites(root: Path, nodes: int, slices: int, size: int) -> list[Path]:
    """``nodes`` node homes with one ingested CT exam each (cached under ``root``)."""
    jobs = max(1, min(nodes, os.cpu_count() or 1))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(
            pool.map(
                make_site,
                [root] * nodes,
                range(nodes),
                [1] * nodes,
                [slices] * nodes,
                [size] * nodes,
            )
        )


def enroll_sites(coordinator: Coordinator, homes: list[Path]) -> None:
    """Add a site per node home and enroll the node (in this process: no CLI start-up each)."""
    from coordinator import sites
    from coordinator.registry.db import Database
    from node import federation
    from node.settings import load_settings

    settings = coordinator.settings()
    db = Database.open(coordinator.db_url)
    try:
        for i, home in enumerate(homes):
            shutil.rmtree(home / "keys" / "federation", ignore_errors=True)
            token = sites.add(db, settings, f"site{i:02d}", actor="bench")
            federation.enroll(load_settings(home), coordinator.url, token)
    finally:
        db.close()


def api_counts(coordinator: Coordinator, token: str, names: list[str]) -> dict[str, int]:
    """Each site's registered exams, as the registry API answers a researcher."""
    context = ssl.create_default_context(cafile=str(coordinator.ca))
    counts = {}
    with httpx.Client(
        base_url=coordinator.url,
        verify=context,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    ) as client:
        for name in names:
            answer = client.get("/api/v1/exams", params={"site": name, "limit": 1})
            answer.raise_for_status()
            counts[name] = int(answer.json()["total"])
    return counts


def verify_registry(coordinator: Coordinator, exams: list[dict[str, Any]]) -> dict[str, Any]:
    """What the registry holds against what the clients were told; every problem listed."""
    from sqlalchemy import func, select

    from coordinator import audit
    from coordinator.registry.db import Database
    from coordinator.registry.models import Exam, ExamInstance, Site, Upload

    store = coordinator.settings().store()
    db = Database.open(coordinator.db_url)
    problems: list[str] = []
    try:
        with db.read() as session:
            rows = session.execute(
                select(
                    Exam.id, Exam.study_uid, Site.name, Exam.instance_count, Exam.manifest_sha256
                ).join(Site, Site.id == Exam.site_id)
            ).all()
            instances: dict[int, dict[str, str]] = defaultdict(dict)
            for exam_id, sop, sha in session.execute(
                select(ExamInstance.exam_id, ExamInstance.sop_uid, ExamInstance.sha256)
            ):
                instances[exam_id][sop] = sha
            uploads = dict(
                session.execute(select(Upload.status, func.count()).group_by(Upload.status)).all()
            )
            chain = audit.verify(session)
    finally:
        db.close()
    registered: dict[str, Any] = {}
    for exam_id, uid, site, count, digest in rows:
        if uid in registered:
            problems.append(f"{uid} registered twice")
        registered[uid] = (site, count, digest, instances.get(exam_id, {}))
        if len(instances.get(exam_id, {})) != count:
            problems.append(f"{uid}: {len(instances.get(exam_id, {}))} instance rows of {count}")
    receipts = [e for e in exams if "receipt" in e]
    failed = [e for e in exams if "receipt" not in e]
    sent = {e["study_uid"] for e in exams}
    for exam in receipts:
        found = registered.get(exam["study_uid"])
        receipt = exam["receipt"]
        if found is None:
            problems.append(f"LOST: {exam['study_uid']} of {exam['site']} has a receipt")
            continue
        site, count, digest, held = found
        if site != exam["site"] or count != len(exam["instances"]) or held != exam["instances"]:
            problems.append(f"{exam['study_uid']}: registered differently from what was sent")
        if digest != receipt["manifest_sha256"] or receipt["instances"] != count:
            problems.append(f"{exam['study_uid']}: receipt and registry differ")
    # An exam a client saw fail is either not in the registry at all (no exam row, no
    # instance row) or registered whole, as sent (its node's retry gets a duplicate receipt).
    registered_sops = {sop for held in instances.values() for sop in held}
    unreceipted, half = [], []
    for exam in failed:
        found = registered.get(exam["study_uid"])
        if found is not None and found[3] == exam["instances"] and found[0] == exam["site"]:
            unreceipted.append(exam["study_uid"])
        elif found is not None or registered_sops & exam["instances"].keys():
            half.append(exam["study_uid"])
    problems += [f"{uid}: the client saw a failure, the registry holds part of it" for uid in half]
    strangers = [uid for uid in registered if uid not in sent]
    problems += [f"{uid}: registered, never sent by a client" for uid in strangers]
    missing_objects = damaged = 0
    checked = 0
    for _, _, _, held in registered.values():
        for sha in held.values():
            checked += 1
            try:
                with store.open(sha) as handle:
                    if hashlib.sha256(handle.read()).hexdigest() != sha:
                        damaged += 1
            except Exception:
                missing_objects += 1
    if missing_objects or damaged:
        problems.append(f"objects: {missing_objects} missing, {damaged} damaged of {checked}")
    used = {sha for _, _, _, held in registered.values() for sha in held.values()}
    unused = sum(1 for sha in store.iter_hashes() if sha not in used)
    left_open = uploads.get("open", 0) + uploads.get("complete", 0)
    if left_open:
        problems.append(f"{left_open} upload(s) left open")
    elif unused:  # what a refused or abandoned upload held is deleted when it closes
        problems.append(f"{unused} object(s) in the store that no registered exam uses")
    if not chain.ok:
        problems.append(f"audit chain broken at entry {chain.broken_at}")
    return {
        "receipts": len(receipts),
        "registered": len(registered),
        "lost": sum(1 for e in receipts if e["study_uid"] not in registered),
        "failed": len(failed),
        "half_registered": len(half),
        "registered_without_receipt": len(unreceipted),
        "unused_objects": unused,
        "strangers": len(strangers),
        "objects_checked": checked,
        "uploads": uploads,
        "audit_entries": chain.entries,
        "audit_ok": chain.ok,
        "problems": problems,
    }


@dataclass
class UploadReport:
    params: dict[str, Any]
    exams: list[dict[str, Any]]
    requests: dict[str, list[float]]
    errors: dict[str, int]
    crashes: list[str]
    seconds: float
    server_cpu: float
    clients_cpu: float
    samples: list[Sample]
    flat: dict[str, float]
    check: dict[str, Any]
    api_counts: dict[str, int]
    leftovers: list[str]
    start: float
    profile: list[str]
    coordinator: Coordinator | None = None


def run_uploads(
    workdir: Path,
    nodes: int,
    seconds: float,
    procs: int,
    slices: int = 4,
    size: int = 128,
    backend: str = "sqlite",
    flower: bool = False,
    sample_s: float = 5.0,
    py_spy_binary: str | None = None,
    keep: bool = False,
) -> UploadReport:
    """The uploads part, start to end; everything it started is stopped when it returns.

    ``keep``: leave the stopped coordinator's home (and schema) for ``report.coordinator``.
    """
    root = workdir / f"load-uploads-{secrets.token_hex(3)}"
    sites_root = workdir / f"load-sites-{slices}x{size}"
    root.mkdir(parents=True)
    sites_root.mkdir(parents=True, exist_ok=True)
    print(f"preparing {nodes} node homes, one {slices}-slice {size}² CT exam each", flush=True)
    homes = prepare_sites(sites_root, nodes, slices, size)
    coordinator = init_coordinator(root, backend, flower)
    sampler: MemorySampler | None = None
    seen: dict[int, tuple[str, int]] = {}
    try:
        start_coordinator(coordinator)
        assert coordinator.process is not None
        enroll_sites(coordinator, homes)
        token = researcher_token(coordinator)
        operator = researcher_token(coordinator, "bench-operator", "operator")
        procs = max(1, min(procs, nodes))
        groups = [[str(h) for h in homes[i::procs]] for i in range(procs)]
        print(
            f"{nodes} sites enrolled; uploading for {seconds:.0f} s from {procs} client processes",
            flush=True,
        )
        sampler = MemorySampler(
            coordinator.process.pid, sample_s, heap_probe(coordinator, operator)
        )
        line = StartLine(root / "start")
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            pending = pool.starmap_async(
                upload_worker,
                [(g, str(line.folder), seconds, str(root / "scratch")) for g in groups],
            )
            # Client processes import, connect and package their templates first.
            waited = time.monotonic() + 600
            while line.count() < nodes and time.monotonic() < waited and not pending.ready():
                time.sleep(0.1)
            start = time.time() + 0.5
            line.go(start)
            while time.time() < start:
                time.sleep(0.01)
            sampler.start()
            cpu_before = tree_cpu(coordinator.process.pid)
            spy = None
            if py_spy_binary:
                spy = py_spy(
                    py_spy_binary, coordinator.process.pid, min(seconds, 60), root / "spy.raw"
                )
            results = pending.get(timeout=seconds + 900)
            server_cpu = tree_cpu(coordinator.process.pid) - cpu_before
            took = time.time() - start
        sampler.stop()
        seen.update(sampler.seen)
        profile = []
        if spy is not None:
            spy.wait(120)
            if (root / "spy.raw").exists():
                profile = profile_lines(root / "spy.raw")
        counts = api_counts(coordinator, token, [f"site{i:02d}" for i in range(nodes)])
        leftovers = stop_coordinator(coordinator, seen)
        exams = [e for r in results for e in r[0]]
        requests: dict[str, list[float]] = defaultdict(list)
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r[2])
            for kind, times in r[1].items():
                requests[kind].extend(times)
        check = verify_registry(coordinator, exams)
        return UploadReport(
            params={
                "nodes": nodes,
                "seconds": seconds,
                "procs": procs,
                "slices": slices,
                "size": size,
                "backend": backend,
                "flower": flower,
                "sample_s": sample_s,
            },
            exams=exams,
            requests=dict(requests),
            errors=dict(errors),
            crashes=[c for r in results for c in r[4]],
            seconds=took,
            server_cpu=server_cpu,
            clients_cpu=sum(r[3] for r in results),
            samples=sampler.samples,
            flat=flatness(sampler.samples),
            check=check,
            api_counts=counts,
            leftovers=leftovers,
            start=start,
            profile=profile,
            coordinator=coordinator if keep else None,
        )
    finally:
        if sampler is not None:
            seen.update(sampler.seen)
        stop_coordinator(coordinator, seen)
        if not keep:
            drop_schema(coordinator)
            shutil.rmtree(root, ignore_errors=True)


def _ms(times: list[float]) -> str:
    """p50 | p99 | max of ``times`` (ms; an infinite one, unanswered, shows as ∞)."""
    if not times:
        return "- | - | -"
    ordered = sorted(times)
    cells = (ordered[(len(ordered) - 1) // 2], percentile(ordered, 0.99), ordered[-1])
    return " | ".join("∞" if math.isinf(v) else f"{v:.0f}" for v in cells)


def upload_tables(report: UploadReport, bucket_s: float) -> list[str]:
    exams = report.exams
    done = [e for e in exams if "receipt" in e]
    instances = sum(len(e["instances"]) for e in done)
    megabytes = sum(e["bytes"] for e in done) / 1e6
    p = report.params
    lines = [
        f"### Uploads: {p['nodes']} nodes for {p['seconds'] / 60:g} min ({p['backend']})",
        "",
        f"{p['nodes']} sites as threads in {p['procs']} client processes, exams of "
        f"{p['slices']} CT slices {p['size']}²; Flower {'on' if p['flower'] else 'off'}; "
        f"{report.seconds:.0f} s from the first exam to the last receipt",
        "",
        "| what | count | per second | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| exam: open → files → complete → registered | {len(done)} | "
        f"{len(done) / report.seconds:.1f} | {_ms([e['seconds'] * 1000 for e in done])} |",
    ]
    for kind in ("open (manifest)", "put file", "complete", "status"):
        times = report.requests.get(kind, [])
        if times:
            lines.append(
                f"| request: {kind} | {len(times)} | {len(times) / report.seconds:.1f} | "
                f"{_ms(times)} |"
            )
    lines += [
        f"| instances registered | {instances} | {instances / report.seconds:.1f} | | | |",
        f"| MB registered | {megabytes:.0f} | {megabytes / report.seconds:.2f} | | | |",
        "",
        (
            "(PostgreSQL's own processes are not in the coordinator's tree: not counted)\n"
            if p["backend"] == "postgresql"
            else ""
        )
        + f"CPU: coordinator tree {report.server_cpu:.0f} s "
        f"({report.server_cpu / report.seconds:.2f} cores, "
        f"{report.server_cpu / max(instances, 1) * 1000:.1f} ms/instance); clients "
        f"{report.clients_cpu:.0f} s ({report.clients_cpu / report.seconds:.2f} cores); "
        f"{os.cpu_count()} cores in all",
        "",
    ]
    # Over time.
    buckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in done:
        buckets[int((e["done_at"] - report.start) // bucket_s)].append(e)
    lines += [
        f"| minute (bucket {bucket_s:g} s) | exams/s | instances/s | MB/s | exam p50 ms "
        "| exam p99 ms | tree RSS MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in range(max(buckets, default=-1) + 1):
        group = buckets.get(b, [])
        # the last bucket is the tail: the exams in flight at the deadline finishing
        span = min(bucket_s, report.seconds - b * bucket_s)
        times = sorted(e["seconds"] * 1000 for e in group)
        rss = [s.tree / MIB for s in report.samples if b * bucket_s <= s.t < (b + 1) * bucket_s]
        lines.append(
            f"| {b * bucket_s / 60:.1f}{' (tail)' if span < bucket_s else ''} | "
            f"{len(group) / span:.1f} | "
            f"{sum(len(e['instances']) for e in group) / span:.1f} | "
            f"{sum(e['bytes'] for e in group) / 1e6 / span:.2f} | "
            f"{statistics.median(times) if times else 0:.0f} | "
            f"{percentile(times, 0.99) if times else 0:.0f} | "
            f"{max(rss) if rss else 0:.0f} |"
        )
    lines.append("")
    outcomes = Counter(e["outcome"] for e in exams)
    lines.append("exam outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    lines.append(
        "failed requests by kind (retryable ones are retried by the uploader): "
        + (", ".join(f"{k} ×{v}" for k, v in sorted(report.errors.items())) or "none")
    )
    if report.crashes:
        lines.append("site threads that stopped: " + "; ".join(report.crashes))
    lines.append("")
    c = report.check
    api_total = sum(report.api_counts.values())
    lines += [
        "| nothing lost | |",
        "| --- | ---: |",
        f"| receipts (clients) | {c['receipts']} |",
        f"| exams in the registry | {c['registered']} |",
        f"| exams counted through the API (per site, summed) | {api_total} |",
        f"| receipts whose exam is missing (lost) | {c['lost']} |",
        f"| exams the clients saw fail | {c['failed']} |",
        f"| … registered whole all the same (a retry gets a duplicate receipt) "
        f"| {c['registered_without_receipt']} |",
        f"| … partly in the registry (half-done) | {c['half_registered']} |",
        f"| exams registered that no client sent | {c['strangers']} |",
        f"| objects of registered exams re-hashed in the store | {c['objects_checked']} |",
        f"| objects in the store no registered exam uses | {c['unused_objects']} |",
        f"| uploads by status | {', '.join(f'{k} {v}' for k, v in sorted(c['uploads'].items()))} |",
        f"| audit chain | {c['audit_entries']} entries, {'ok' if c['audit_ok'] else 'BROKEN'} |",
        f"| processes left after the stop | {', '.join(report.leftovers) or 'none'} |",
        "",
    ]
    lines += memory_lines(report.samples, report.flat, report.params["sample_s"])
    verdict = "nothing lost" if not c["problems"] and api_total == c["registered"] else "PROBLEMS"
    lines.append("")
    lines.append(
        f"**{verdict}**" + ("" if not c["problems"] else ": " + "; ".join(c["problems"][:20]))
    )
    if report.profile:
        lines += ["", *report.profile]
    return lines


# -- search: the load generator ----------------------------------------------------------

#: What the floor phase asks for: answered by the same stack (TLS, HTTP/1.1, the
#: middlewares, FastAPI) with no authentication and no database.
FLOOR_PATH = "/healthz"

#: (name, weight, path, params) of the researcher requests; "{uid}" and "{page}" are filled in.
MIX: list[tuple[str, int, str, dict[str, Any]]] = [
    ("everything, newest study first, page 1", 12, "/api/v1/exams", {}),
    ("site (a large one)", 8, "/api/v1/exams", {"site": "site-01"}),
    ("site (a small one)", 4, "/api/v1/exams", {"site": "site-10"}),
    ("modality CT", 8, "/api/v1/exams", {"modality": "CT"}),
    ("modality SR (rare)", 2, "/api/v1/exams", {"modality": "SR"}),
    ("body part HEAD", 4, "/api/v1/exams", {"body_part": "HEAD"}),
    ("label cxr:appearance=typical", 6, "/api/v1/exams", {"label": "cxr:appearance=typical"}),
    (
        "two labels",
        4,
        "/api/v1/exams",
        {"label": ["ricord:covid=positive", "ct:severity=severe"]},
    ),
    ("clinical icu=yes", 4, "/api/v1/exams", {"clinical": "icu=yes"}),
    (
        "study dates, one year",
        6,
        "/api/v1/exams",
        {"date_from": "2019-01-01", "date_to": "2019-12-31"},
    ),
    (
        "combined: site, CT, CHEST, label, clinical, dates",
        4,
        "/api/v1/exams",
        {
            "site": "site-02",
            "modality": "CT",
            "body_part": "CHEST",
            "label": "ricord:covid=positive",
            "clinical": "sex=F",
            "date_from": "2016-01-01",
            "date_to": "2022-12-31",
        },
    ),
    ("paging: CR, pages 2-40 by study date", 8, "/api/v1/exams", {"modality": "CR", "page": 40}),
    (
        "paging: everything, pages 2-200, by registration",
        4,
        "/api/v1/exams",
        {"sort": "registered_at", "order": "asc", "page": 200},
    ),
    (
        "page of 500, withdrawn included",
        1,
        "/api/v1/exams",
        {"limit": 500, "include_withdrawn": "true"},
    ),
    ("exam detail", 18, "/api/v1/exams/{uid}", {}),
    ("stats by site", 2, "/api/v1/stats/site", {}),
    ("stats by modality", 2, "/api/v1/stats/modality", {}),
    ("stats by label cxr:appearance", 1, "/api/v1/stats/label", {"label": "cxr:appearance"}),
]


def request_targets(count: int, exams: int, seed: int) -> list[tuple[int, str]]:
    """``count`` (mix index, path with query) drawn from ``MIX`` by weight."""
    rng = random.Random(seed)
    weights = [w for _, w, _, _ in MIX]
    chosen = rng.choices(range(len(MIX)), weights=weights, k=count)
    targets = []
    for index in chosen:
        _, _, path, params = MIX[index]
        params = dict(params)
        pages = params.pop("page", None)
        if pages:
            params["offset"] = 50 * rng.randrange(1, pages)
        if "{uid}" in path:
            path = path.replace("{uid}", f"{ROOT}.1.{rng.randrange(1, exams + 1)}")
        query = urlencode(params, doseq=True)
        targets.append((index, f"{path}?{query}" if query else path))
    return targets


#: Outcomes of a request that got no HTTP status.
NOT_SENT, UNANSWERED, TIMED_OUT, BROKEN = -1, -2, -3, 0
OUTCOMES = {
    NOT_SENT: "not sent when the drain ended",
    UNANSWERED: "sent, unanswered when the drain ended",
    TIMED_OUT: "no answer in 60 s",
    BROKEN: "connection failed",
}


class _Connection:
    """One keep-alive HTTP/1.1 connection over TLS (GET only, Content-Length bodies)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, headers: bytes) -> None:
        self.host, self.port, self.context, self.headers = host, port, context, headers
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, target: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.context
            )
        assert self.reader is not None
        self.writer.write(b"GET " + target.encode() + b" HTTP/1.1\r\n" + self.headers)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        await self.reader.readexactly(length)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _generate(
    url: str,
    ca: str,
    token: str,
    targets: list[tuple[int, str]],
    rate: float,
    start: float,
    connections: int,
    drain_s: float,
) -> list[tuple[int, float, float, int]]:
    """Send ``targets[i]`` at ``start + i / rate`` (wall clock); (mix index, at, ms, status)."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca)
    headers = (
        f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\n\r\n"
    ).encode()
    queue: asyncio.Queue[tuple[int, str, float]] = asyncio.Queue()
    results: list[tuple[int, float, float, int]] = []
    loop = asyncio.get_running_loop()
    # Scheduled times are on the loop's clock: offset from the wall clock once.
    origin = loop.time() + (start - time.time())

    async def connection_worker() -> None:
        conn = _Connection(host, int(port), context, headers)
        try:
            while True:
                index, target, due = await queue.get()
                try:
                    status = await asyncio.wait_for(conn.get(target), 60)
                except asyncio.CancelledError:  # the drain ended with this one unanswered
                    results.append((index, due - origin, float("inf"), UNANSWERED))
                    raise
                except TimeoutError:
                    conn.close()
                    status = TIMED_OUT
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    conn.close()
                    status = BROKEN  # reconnect for the next request
                results.append((index, due - origin, (loop.time() - due) * 1000, status))
                queue.task_done()
        finally:
            conn.close()

    workers = [asyncio.create_task(connection_worker()) for _ in range(connections)]
    interval = 1.0 / rate
    sent = 0
    while sent < len(targets):
        now = loop.time()
        # Everything due by now goes on the queue, stamped with its scheduled time.
        while sent < len(targets) and origin + sent * interval <= now:
            queue.put_nowait((*targets[sent], origin + sent * interval))
            sent += 1
        if sent < len(targets):
            await asyncio.sleep(max(0.0, origin + sent * interval - loop.time()))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(queue.join(), drain_s)
    while not queue.empty():  # never sent before the drain ended: counted, not dropped
        index, _, due = queue.get_nowait()
        results.append((index, due - origin, float("inf"), NOT_SENT))
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    return results


def search_worker(
    url: str,
    ca: str,
    token: str,
    targets: list[tuple[int, str]],
    rate: float,
    start: float,
    connections: int,
    drain_s: float,
) -> tuple[list[tuple[int, float, float, int]], float]:
    """One generator process: its results and the CPU seconds it used."""
    import resource

    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    before = resource.getrusage(resource.RUSAGE_SELF)
    results = asyncio.run(_generate(url, ca, token, targets, rate, start, connections, drain_s))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return results, cpu


@dataclass
class Phase:
    """One offered rate, sent for ``seconds``."""

    rate: float
    results: list[tuple[int, float, float, int]]  # (mix index, due s, ms, status)
    generator_cpu: float
    server_cpu: float
    seconds: float  # from the first scheduled send until the last answer (or the drain's end)
    what: str = "registry mix"
    cache: tuple[float, float] = (0.0, 0.0)  # registry answers from the cache, computed anew


@dataclass
class SearchReport:
    params: dict[str, Any]
    phases: list[Phase]
    load_seconds: float
    samples: list[Sample]
    flat: dict[str, float]
    leftovers: list[str]
    profile: list[str]


def offer(
    coordinator: Coordinator,
    token: str,
    rate: float,
    seconds: float,
    exams: int,
    generators: int,
    connections: int,
    drain_s: float,
    seed: int,
    path: str | None = None,
) -> Phase:
    """``rate`` requests per second for ``seconds`` from ``generators`` processes.

    The registry mix (``MIX``), or ``path`` alone every time.
    """
    assert coordinator.process is not None
    count = int(rate * seconds)
    targets = [(-10, path)] * count if path else request_targets(count, exams, seed)
    # Generator g sends requests g, g + G, g + 2G, ...: together, one every 1/rate s.
    start = time.time() + 3.0
    offset = 1.0 / rate
    with multiprocessing.get_context("spawn").Pool(generators) as pool:
        pending = pool.starmap_async(
            search_worker,
            [
                (
                    coordinator.url,
                    str(coordinator.ca),
                    token,
                    targets[g::generators],
                    rate / generators,
                    start + g * offset,
                    connections,
                    drain_s,
                )
                for g in range(generators)
            ],
        )
        while time.time() < start:
            time.sleep(0.02)
        cpu_before = tree_cpu(coordinator.process.pid)
        outputs = pending.get(timeout=seconds + drain_s + 120)
        server_cpu = tree_cpu(coordinator.process.pid) - cpu_before
        took = time.time() - start
    results = []
    for g, (part, _) in enumerate(outputs):
        results.extend((i, at + g * offset, ms, status) for i, at, ms, status in part)
    what = f"GET {path} (the HTTP floor)" if path else "registry mix"
    return Phase(rate, results, sum(cpu for _, cpu in outputs), server_cpu, took, what)


def py_spy(binary: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """``py-spy record`` of the server (every thread) for ``seconds``, raw stacks to ``out``."""
    return subprocess.Popen(
        [
            *(binary, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100"),
            *("--format", "raw", "-o", str(out), "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_lines(raw: Path, top: int = 25) -> list[str]:
    """Where the busy server threads were: RadFed's own functions (inclusive), and leaves."""
    import re

    busy, inclusive, leaves = 0, Counter[str](), Counter[str]()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if "wait (threading.py)" in frames[-1] or "select (selectors.py)" in frames[-1]:
            continue  # an idle thread
        busy += int(count)
        leaves[frames[-1]] += int(count)
        for frame in set(frames):
            if re.search(r"\((coordinator|protocols)/", frame):
                inclusive[frame] += int(count)
    lines = [
        f"py-spy: {busy} samples of busy server threads (wall clock: I/O waits count)",
        "",
        "| RadFed function (with what it calls) | share |",
        "| --- | ---: |",
    ]
    lines += [f"| `{f}` | {n / busy:.1%} |" for f, n in inclusive.most_common(top)]
    lines += ["", "| innermost frame (self) | share |", "| --- | ---: |"]
    lines += [f"| `{f}` | {n / busy:.1%} |" for f, n in leaves.most_common(15)]
    return lines


def run_search(
    workdir: Path,
    rates: list[float],
    seconds: float,
    exams: int = 20_000,
    instances: int = 50,
    sites: int = 10,
    generators: int = 2,
    connections: int = 16,
    backend: str = "sqlite",
    flower: bool = False,
    sample_s: float = 5.0,
    drain_s: float = 30.0,
    py_spy_binary: str | None = None,
    floor: bool = True,
) -> SearchReport:
    """The search part, start to end: one registry and server, each rate in turn.

    Everything it started is stopped when it returns.
    """
    from coordinator.registry.db import Database

    root = workdir / f"load-search-{secrets.token_hex(3)}"
    root.mkdir(parents=True)
    coordinator = init_coordinator(root, backend, flower)
    sampler: MemorySampler | None = None
    seen: dict[int, tuple[str, int]] = {}
    try:
        db = Database.open(coordinator.db_url)
        try:
            load_seconds = load_registry(db, exams, instances, sites)
        finally:
            db.close()
        print(
            f"{backend}: {exams} exams, {exams * instances} instances loaded in "
            f"{load_seconds:.0f} s",
            flush=True,
        )
        token = researcher_token(coordinator)
        operator = researcher_token(coordinator, "bench-operator", "operator")
        start_coordinator(coordinator)
        assert coordinator.process is not None
        sampler = MemorySampler(coordinator.process.pid, sample_s).start()
        phases, profile = [], []
        # The registry mix at each rate; then, with ``floor``, a path that costs the
        # server no authentication and no database at the first rate.
        plan: list[tuple[float, str | None]] = [(rate, None) for rate in rates]
        if floor and rates:
            plan.append((rates[0], FLOOR_PATH))
        for n, (rate, path) in enumerate(plan):
            print(f"{rate:g} requests/s for {seconds:g} s {path or ''}", flush=True)
            spy = None
            if py_spy_binary and n == 0:
                spy = py_spy(py_spy_binary, coordinator.process.pid, seconds, root / "spy.raw")
            before = cache_counts(coordinator, operator)
            phase = offer(
                coordinator,
                token,
                rate,
                seconds,
                exams,
                max(1, generators),
                connections,
                drain_s,
                seed=5 + n,
                path=path,
            )
            after = cache_counts(coordinator, operator)
            phase.cache = (after[0] - before[0], after[1] - before[1])
            phases.append(phase)
            if spy is not None:
                spy.wait(60)
                if (root / "spy.raw").exists():
                    profile = profile_lines(root / "spy.raw")
        sampler.stop()
        seen.update(sampler.seen)
        leftovers = stop_coordinator(coordinator, seen)
        return SearchReport(
            params={
                "seconds": seconds,
                "exams": exams,
                "instances": instances,
                "generators": max(1, generators),
                "connections": connections,
                "backend": backend,
                "flower": flower,
                "sample_s": sample_s,
            },
            phases=phases,
            load_seconds=load_seconds,
            samples=sampler.samples,
            flat=flatness(sampler.samples),
            leftovers=leftovers,
            profile=profile,
        )
    finally:
        if sampler is not None:
            seen.update(sampler.seen)
        stop_coordinator(coordinator, seen)
        drop_schema(coordinator)
        shutil.rmtree(root, ignore_errors=True)


def search_tables(report: SearchReport) -> list[str]:
    p = report.params
    window = p["seconds"]
    lines = [
        f"### Registry search, open loop, {window:g} s per rate ({p['backend']})",
        "",
        f"registry {p['exams']} exams × {p['instances']} instances "
        f"(loaded in {report.load_seconds:.0f} s); {p['generators']} generator processes × "
        f"{p['connections']} keep-alive TLS connections; Flower {'on' if p['flower'] else 'off'}; "
        "latency from each request's scheduled send time",
        "",
        "| requests | offered /s | due | answered 200 | answered /s in the window "
        "| answered /s in all | p50 ms | p99 ms | max ms | other outcomes "
        "| registry answers from the cache | coordinator CPU ms/answer "
        "| generator CPU ms/request sent |",
        "| --- |" + " ---: |" * 8 + " --- | ---: | ---: | ---: |",
    ]
    for phase in report.phases:
        results = phase.results
        answered = [r for r in results if r[3] == 200]
        in_window = [r for r in answered if r[1] + r[2] / 1000 <= window]
        statuses = Counter(r[3] for r in results if r[3] != 200)
        other = ", ".join(f"{OUTCOMES.get(k, k)} ×{v}" for k, v in sorted(statuses.items()))
        # Every request due counts, an unanswered one as infinitely late.
        late = [r[2] if r[3] == 200 else float("inf") for r in results]
        sent = sum(1 for r in results if r[3] != NOT_SENT)
        hits, misses = phase.cache
        cached = f"{hits / (hits + misses):.0%} of {hits + misses:.0f}" if hits + misses else "–"
        lines.append(
            f"| {phase.what} | {phase.rate:g} | {len(results)} | {len(answered)} | "
            f"{len(in_window) / window:.0f} | {len(answered) / phase.seconds:.0f} | "
            f"{_ms(late)} | {other or 'none'} | {cached} | "
            f"{phase.server_cpu / max(len(answered), 1) * 1000:.1f} | "
            f"{phase.generator_cpu / max(sent, 1) * 1000:.2f} |"
        )
    lines += ["", "By request (every rate together):", ""]
    lines += [
        "| request | due | answered 200 | p50 ms (answered) | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_kind: dict[int, list[tuple[int, float, float, int]]] = defaultdict(list)
    for phase in report.phases:
        for r in phase.results:
            by_kind[r[0]].append(r)
    for index, (name, _, _, _) in enumerate(MIX):
        group = by_kind.get(index, [])
        ok = [r[2] for r in group if r[3] == 200]
        lines.append(f"| {name} | {len(group)} | {len(ok)} | {_ms(ok)} |")
    lines.append("")
    for phase in report.phases:
        lines.append(
            f"{phase.what}, {phase.rate:g}/s: coordinator tree {phase.server_cpu:.0f} s of CPU in "
            f"{phase.seconds:.0f} s ({phase.server_cpu / phase.seconds:.2f} cores), load "
            f"generator {phase.generator_cpu:.0f} s ({phase.generator_cpu / phase.seconds:.2f} "
            f"cores); {os.cpu_count()} cores in all"
        )
    if p["backend"] == "postgresql":
        lines.append("(PostgreSQL's own processes are not in the coordinator's tree: not counted)")
    lines.append("")
    lines += memory_lines(report.samples, report.flat, p["sample_s"])
    lines.append(f"processes left after the stop: {', '.join(report.leftovers) or 'none'}")
    if report.profile:
        lines += ["", *report.profile]
    return lines


# -- main --------------------------------------------------------------------------------


def header() -> str:
    """Date, machine and load before the run."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores ({model}), "
        f"Python {sys.version.split()[0]}; load average before the run "
        f"{os.getloadavg()[0]:.1f}; clients, load generators and the coordinator share the cores"
        + "".join(f"; {name}={value}" for name, value in sorted(EXTRA_ENV.items()))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", default="uploads,search")
    parser.add_argument("--backend", default="sqlite", help="sqlite, postgresql or both")
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--procs", type=int, default=10, help="client processes (uploads)")
    parser.add_argument("--slices", type=int, default=4, help="CT slices per exam")
    parser.add_argument("--size", type=int, default=128, help="pixels per side")
    parser.add_argument(
        "--rate", default="1000,100", help="searches per second; several: one after another"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="of searching")
    parser.add_argument("--exams", type=int, default=20_000, help="registry size (search)")
    parser.add_argument("--instances", type=int, default=50, help="per exam (search)")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the HTTP floor phase (GET /healthz)"
    )
    parser.add_argument("--connections", type=int, default=16, help="per generator")
    parser.add_argument("--flower", action="store_true", help="run the SuperLink too")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument(
        "--py-spy", help="py-spy binary: profile the server (first minute, first rate)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a coordinator setting for the run (e.g. malloc_arena_max=0); repeatable",
    )
    parser.add_argument("--workdir", type=Path, default=BENCH / "work")
    args = parser.parse_args()
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f'Argument "--set" takes NAME=VALUE, not {item!r}.')
        EXTRA_ENV[f"RADFED_COORDINATOR_{name.upper()}"] = value
    parts = {p.strip() for p in args.only.split(",")}
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(header(), flush=True)
    try:
        for backend in backends:
            if "uploads" in parts:
                report = run_uploads(
                    args.workdir,
                    args.nodes,
                    args.minutes * 60,
                    args.procs,
                    args.slices,
                    args.size,
                    backend,
                    args.flower,
                    args.sample_s,
                    args.py_spy,
                )
                bucket = 60.0 if args.minutes >= 5 else max(10.0, args.minutes * 60 / 6)
                print("", *upload_tables(report, bucket), "", sep="\n", flush=True)
            if "search" in parts:
                search = run_search(
                    args.workdir,
                    [float(r) for r in args.rate.split(",")],
                    args.seconds,
                    args.exams,
                    args.instances,
                    generators=args.generators,
                    connections=args.connections,
                    backend=backend,
                    flower=args.flower,
                    sample_s=args.sample_s,
                    py_spy_binary=args.py_spy,
                    floor=not args.no_floor,
                )
                print("", *search_tables(search), "", sep="\n", flush=True)
    finally:
        shutil.rmtree(args.workdir / f"load-sites-{args.slices}x{args.size}", ignore_errors=True)
        with contextlib.suppress(OSError):
            args.workdir.rmdir()  # only when nothing else is in it


if __name__ == "__main__":
    main()
