"""De-identify a folder tree into ``DST/<pseudonym>/<study>/<series>/<instance>.dcm``.

Work is spread over a process pool with a bounded number of batches in flight,
so memory stays flat however many files there are. Each output is written to a
temporary file and published with ``link()``: a file is there whole or not at
all, and an existing identical file is left as it is (a rerun is a no-op). A
different file already holding the same name is a conflict: nothing is
overwritten. Re-identification records go to the encrypted vault in batches;
the per-file report (with source paths, so it stays in the node home) is
streamed to a JSON Lines file.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import multiprocessing
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.deid.dicomio import DicomFormatError
from node.deid.engine import Deidentifier, DeidError
from node.deid.values import Keyed
from node.deid.vault import Vault
from protocols.deid.options import DeidOptions
from protocols.deid.profile import compile_profile
from protocols.deid.safe_private import SafePrivateKey

MMAP_THRESHOLD = 64 * 1024 * 1024
BATCH_FILES = 8
VAULT_BATCH = 512
TMP_DIR = ".radfed-tmp"


@dataclass(frozen=True)
class EngineConfig:
    """What a worker needs to build its engine (picklable)."""

    options: DeidOptions
    secret: bytes
    site_prefix: str
    shift_min_days: int
    shift_max_days: int
    safe_private: frozenset[SafePrivateKey]

    def build(self) -> Deidentifier:
        keyed = Keyed(self.secret, self.site_prefix, self.shift_min_days, self.shift_max_days)
        return Deidentifier(compile_profile(self.options, self.safe_private), keyed)


@dataclass
class FileOutcome:
    """What happened to one source file."""

    source: str
    status: str  # written | unchanged | quarantined | failed
    output: str = ""
    code: str = ""
    reason: str = ""
    risk: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    record: dict[str, Any] | None = None
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class RunSummary:
    """Counts of a run; ``failed`` readable files make the run unsuccessful."""

    seen: int = 0
    written: int = 0
    unchanged: int = 0
    flagged: int = 0
    quarantined: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    quarantine_reasons: Counter[str] = field(default_factory=Counter)
    failure_reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    report_path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def add(self, outcome: FileOutcome) -> None:
        self.seen += 1
        self.bytes_in += outcome.bytes_in
        self.bytes_out += outcome.bytes_out
        if outcome.status in ("written", "unchanged"):
            if outcome.status == "written":
                self.written += 1
            else:
                self.unchanged += 1
            if outcome.risk:
                self.flagged += 1
        elif outcome.status == "quarantined":
            self.quarantined += 1
            self.quarantine_reasons[outcome.code] += 1
            self.examples.setdefault(outcome.code, outcome.reason)
        else:
            self.failed += 1
            self.failure_reasons[outcome.code] += 1
            self.examples.setdefault(outcome.code, outcome.reason)


class Writer:
    """Publishes outputs atomically under one destination root."""

    def __init__(self, dst: Path) -> None:
        self.dst = dst
        self.tmp = dst / TMP_DIR
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._dirs: set[str] = set()

    def publish(self, relpath: str, chunks: list[bytes | memoryview]) -> str:
        """Write; returns 'written', 'unchanged' or raises DeidError('conflict')."""
        final = self.dst / relpath
        parent = str(final.parent)
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
            if len(self._dirs) > 10_000:
                self._dirs.clear()
        tmp = self.tmp / f"{os.getpid()}-{secrets.token_hex(8)}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.writelines(chunks)
            try:
                os.link(tmp, final)
                return "written"
            except FileExistsError:
                if _same_content(final, chunks):
                    return "unchanged"
                raise DeidError(
                    "conflict",
                    f"{relpath} already exists with different content "
                    "(same SOP Instance UID, different file): nothing overwritten",
                ) from None
        finally:
            tmp.unlink(missing_ok=True)


def _same_content(path: Path, chunks: list[bytes | memoryview]) -> bool:
    size = sum(len(c) for c in chunks)
    try:
        if path.stat().st_size != size:
            return False
        with open(path, "rb") as fh:
            for chunk in chunks:
                if fh.read(len(chunk)) != bytes(chunk):
                    return False
    except OSError:
        return False
    return True


def process_file(engine: Deidentifier, writer: Writer, source: str) -> FileOutcome:
    """De-identify one file; every failure becomes a recorded outcome, never an exception."""
    mapped: mmap.mmap | None = None
    try:
        with open(source, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size >= MMAP_THRESHOLD:
                # Large files are mapped, not read: pixel data goes from the page cache
                # to the output without passing through Python's heap.
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                data: bytes | memoryview = memoryview(mapped)
            else:
                data = fh.read()
    except (OSError, ValueError) as exc:
        return FileOutcome(source, "quarantined", code="unreadable", reason=str(exc))
    try:
        try:
            result = engine.deidentify(data)
        except DicomFormatError as exc:
            return FileOutcome(
                source, "quarantined", code=exc.code, reason=exc.message, bytes_in=size
            )
        except DeidError as exc:
            return FileOutcome(source, "failed", code=exc.code, reason=exc.message, bytes_in=size)
        except (ValueError, OverflowError, UnicodeError, MemoryError) as exc:
            return FileOutcome(
                source,
                "quarantined",
                code="malformed",
                reason=f"{type(exc).__name__}: {exc}",
                bytes_in=size,
            )
        try:
            status = writer.publish(result.relpath, result.chunks)
        except DeidError as exc:
            return FileOutcome(source, "failed", code=exc.code, reason=exc.message, bytes_in=size)
        except OSError as exc:
            return FileOutcome(
                source,
                "failed",
                code="write_error",
                reason=f"{exc.strerror or exc}",
                bytes_in=size,
            )
        return FileOutcome(
            source,
            status,
            output=result.relpath,
            risk=result.risk,
            notes=result.notes,
            record=result.record,
            bytes_in=size,
            bytes_out=result.size,
        )
    finally:
        if mapped is not None:
            del data
            with contextlib.suppress(BufferError):  # a view still refers to it; GC closes it
                mapped.close()


# -- worker processes --------------------------------------------------------------

_worker: tuple[Deidentifier, Writer] | None = None


def _init_worker(config: EngineConfig, dst: str) -> None:
    global _worker
    _worker = (config.build(), Writer(Path(dst)))


def _run_batch(sources: list[str]) -> list[FileOutcome]:
    if _worker is None:  # pragma: no cover - the initializer always ran
        raise RuntimeError("worker not initialised")
    engine, writer = _worker
    return [process_file(engine, writer, s) for s in sources]


# -- the run ----------------------------------------------------------------------------


def iter_files(src: Path, exclude: Path | None = None) -> Iterator[str]:
    """Every regular file under ``src`` (or ``src`` itself), without following dir links."""
    if src.is_file():
        yield str(src)
        return
    excluded = os.path.realpath(exclude) if exclude is not None else None
    stack = [str(src)]
    while stack:
        top = stack.pop()
        if excluded is not None and os.path.realpath(top) == excluded:
            continue
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        dirs = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(entry.path)
                elif entry.is_file():
                    yield entry.path
            except OSError:
                continue
        stack.extend(reversed(dirs))


def _batches(files: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for path in files:
        batch.append(path)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run(
    src: Path,
    dst: Path,
    config: EngineConfig,
    jobs: int,
    vault: Vault,
    report_path: Path,
    on_progress: Callable[[FileOutcome], None] | None = None,
) -> RunSummary:
    """De-identify every file under ``src`` into ``dst``; returns the summary."""
    started = time.perf_counter()
    dst.mkdir(parents=True, exist_ok=True)
    report_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    summary = RunSummary(report_path=report_path)
    pending_records: list[dict[str, Any]] = []
    files = iter_files(src, exclude=dst)

    with open(report_path, "w", encoding="utf-8") as report:
        os.chmod(report_path, 0o600)

        def record(outcome: FileOutcome) -> None:
            summary.add(outcome)
            if outcome.record is not None:
                pending_records.append(outcome.record)
                if len(pending_records) >= VAULT_BATCH:
                    vault.append(pending_records)
                    pending_records.clear()
            line = {
                "source": outcome.source,
                "status": outcome.status,
                "output": outcome.output,
                "code": outcome.code,
                "reason": outcome.reason,
                "risk": outcome.risk,
                "notes": outcome.notes,
            }
            report.write(json.dumps(line) + "\n")
            if on_progress is not None:
                on_progress(outcome)

        try:
            if jobs <= 1:
                engine, writer = config.build(), Writer(dst)
                for path in files:
                    record(process_file(engine, writer, path))
            else:
                _run_pool(files, dst, config, jobs, record)
        finally:
            vault.append(pending_records)
            pending_records.clear()
            _clean_tmp(dst)
    summary.seconds = time.perf_counter() - started
    return summary


def _run_pool(
    files: Iterator[str],
    dst: Path,
    config: EngineConfig,
    jobs: int,
    record: Callable[[FileOutcome], None],
) -> None:
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(config, str(dst))
    ) as pool:
        in_flight: set[Future[list[FileOutcome]]] = set()
        batches = _batches(files, BATCH_FILES)
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < jobs * 4:
                batch = next(batches, None)
                if batch is None:
                    exhausted = True
                    break
                in_flight.add(pool.submit(_run_batch, batch))
            if not in_flight:
                return
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                for outcome in future.result():
                    record(outcome)


def _clean_tmp(dst: Path) -> None:
    tmp = dst / TMP_DIR
    try:
        for leftover in tmp.iterdir():
            leftover.unlink(missing_ok=True)
        tmp.rmdir()
    except OSError:
        pass


def count_files(src: Path, exclude: Path | None = None) -> int:
    """How many files a run will see (for the progress bar)."""
    return sum(1 for _ in iter_files(src, exclude))
