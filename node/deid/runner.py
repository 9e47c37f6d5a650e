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
import hashlib
import json
import mmap
import multiprocessing
import os
import secrets
import shutil
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.deid.dicomio import DicomFormatError
from node.deid.engine import Deidentifier, DeidError, DeidResult
from node.deid.values import Keyed
from node.deid.vault import Vault
from protocols.deid.options import DeidOptions
from protocols.deid.profile import compile_profile
from protocols.deid.safe_private import SafePrivateKey
from protocols.storage import make_dirs, private_dir

MMAP_THRESHOLD = 256 * 1024
COPY_THRESHOLD = 64 * 1024
BATCH_FILES = 8
#: Batches queued per worker: enough that workers keep busy while the parent records a
#: batch in the index, few enough that memory stays flat.
IN_FLIGHT_PER_WORKER = 16
VAULT_BATCH = 512
FLUSH_SECONDS = 1.0
TMP_DIR = ".radfed-tmp"
#: De-identified outputs: readable by others where the umask lets them, writable by none.
DIR_MODE = 0o755
FILE_MODE = 0o644
#: What a malformed file can still make the engine raise past its own checks: the
#: file is quarantined as ``malformed`` with the error, never an exception out of a run.
PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    OverflowError,
    UnicodeError,
    MemoryError,
    struct.error,
    IndexError,
    RecursionError,
)


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
    instance: InstanceInfo | None = None
    #: The vault record that holds ``record`` once it is appended (:func:`append_records`).
    vault_record: int | None = None


@dataclass(frozen=True)
class InstanceInfo:
    """What the node index records about a written instance (all de-identified)."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    pseudonym: str
    sop_class_uid: str
    transfer_syntax: str
    sha256: str
    attributes: dict[str, str | int | float | None]


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
    """Publishes outputs atomically under one destination root.

    A file is written under a temporary name in ``DST/.radfed-tmp`` and linked to
    its final name once complete, so a crash never leaves a partial output and an
    existing file is never replaced. Spans copied from the input go file to file
    in the kernel (``copy_file_range``).
    """

    def __init__(self, dst: Path, originals: Path | None = None, durable: bool = False) -> None:
        self.dst = dst
        self.originals = originals
        #: fsync each file and its folder before reporting it written (C-STORE needs it).
        self.durable = durable
        # One scratch folder per process: writers do not contend for one directory.
        self.tmp = dst / TMP_DIR / str(os.getpid())
        make_dirs(self.tmp, 0o700)
        self._root = os.path.realpath(dst)
        self._dirs: set[str] = set()

    def publish(self, result: DeidResult, source_fd: int | None = None) -> str:
        """Write; returns 'written', 'unchanged' or raises DeidError('conflict')."""
        final = self.dst / result.relpath
        parent = str(final.parent)
        if parent not in self._dirs:
            created = not os.path.isdir(parent)
            # A link planted in the store (a folder named like a pseudonym, say) must
            # not carry a write, or a new folder, out of it.
            existing = final.parent
            while not os.path.lexists(existing) and existing != self.dst:
                existing = existing.parent
            self._inside(existing, result.relpath)
            # Never writable by others, whatever the umask: a folder anyone may write
            # to is one where anyone may plant a file or a link under a future name.
            make_dirs(final.parent, DIR_MODE)
            self._inside(final.parent, result.relpath)
            if created and self.durable:
                # New folders must survive a crash too: sync each one's entry upwards.
                for folder in (final.parent, *final.parent.parents):
                    if folder == self.dst.parent:
                        break
                    fsync_dir(folder)
            self._dirs.add(parent)
            if len(self._dirs) > 10_000:
                self._dirs.clear()
        tmp = self.tmp / f"{os.getpid()}-{secrets.token_hex(8)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            try:
                _write_pieces(fd, result, source_fd)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, final)
                if self.durable:
                    fsync_dir(final.parent)
                self._keep_original(result, source_fd)
                return "written"
            except FileExistsError:
                if _same_content(final, result.chunks):
                    self._keep_original(result, source_fd)
                    return "unchanged"
                raise DeidError(
                    "conflict",
                    f"{result.relpath} already exists with different content "
                    "(same SOP Instance UID, different file): nothing overwritten",
                ) from None
        finally:
            tmp.unlink(missing_ok=True)

    def _inside(self, folder: Path, relpath: str) -> None:
        real = os.path.realpath(folder)
        if real != self._root and not real.startswith(self._root + os.sep):
            raise DeidError(
                "unsafe_path",
                f"{relpath}: its folder leads out of the output folder "
                "(a symbolic link in it?); nothing written",
            )

    def _keep_original(self, result: DeidResult, source_fd: int | None) -> None:
        """With the site's keep-originals setting: the source file, beside its copy's name."""
        if self.originals is None or source_fd is None:
            return
        final = self.originals / result.relpath
        if final.exists():
            return
        private_dir(final.parent)
        tmp = self.tmp / f"{os.getpid()}-{secrets.token_hex(8)}.orig"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            size = os.fstat(source_fd).st_size
            view = (
                result.source
                if isinstance(result.source, memoryview)
                else memoryview(result.source)
            )
            _copy_range(source_fd, fd, 0, size, view)
            os.close(fd)
            fd = -1
            with contextlib.suppress(FileExistsError):
                os.link(tmp, final)
        finally:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a new file's name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pieces(fd: int, result: DeidResult, source_fd: int | None) -> None:
    view = result.source if isinstance(result.source, memoryview) else memoryview(result.source)
    pending: list[bytes | memoryview] = []
    for piece in result.pieces:
        if isinstance(piece, bytes):
            pending.append(piece)
            continue
        offset, length = piece
        if source_fd is not None and length >= COPY_THRESHOLD:
            _write_all(fd, pending)
            pending = []
            _copy_range(source_fd, fd, offset, length, view)
        else:
            pending.append(view[offset : offset + length])
    _write_all(fd, pending)


def _write_all(fd: int, buffers: list[bytes | memoryview]) -> None:
    while buffers:
        written = os.writev(fd, buffers[:512])
        while buffers and written >= len(buffers[0]):
            written -= len(buffers[0])
            buffers = buffers[1:]
        if written and buffers:
            buffers[0] = memoryview(buffers[0])[written:]


def _copy_range(source_fd: int, fd: int, offset: int, length: int, view: memoryview) -> None:
    """Copy input bytes to the output in the kernel; plain writes where that is refused."""
    while length > 0:
        try:
            copied = os.copy_file_range(source_fd, fd, length, offset)
        except OSError:
            copied = 0
        if copied <= 0:
            _write_all(fd, [view[offset : offset + length]])
            return
        offset += copied
        length -= copied


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


def _read(fd: int, size: int) -> bytes:
    parts = []
    while size > 0:
        part = os.read(fd, size)
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def process_file(
    engine: Deidentifier, writer: Writer, source: str, hash_output: bool = False
) -> FileOutcome:
    """De-identify one file; every failure becomes a recorded outcome, never an exception.

    With ``hash_output`` the outcome carries the sha256 of the written file and what
    the index records about it.
    """
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError as exc:
        return FileOutcome(source, "quarantined", code="unreadable", reason=str(exc))
    mapped: mmap.mmap | None = None
    try:
        size = os.fstat(fd).st_size
        try:
            if size >= MMAP_THRESHOLD:
                # Mapped, not read: parsing touches the header pages only, and pixel
                # data goes from file to file without passing through Python.
                mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                data: bytes | memoryview = memoryview(mapped)
            else:
                data = _read(fd, size)
        except (OSError, ValueError) as exc:
            return FileOutcome(source, "quarantined", code="unreadable", reason=str(exc))
        return _deidentify_and_publish(engine, writer, source, data, fd, size, hash_output)
    finally:
        if mapped is not None:
            with contextlib.suppress(BufferError):  # a view still refers to it; GC closes it
                mapped.close()
        os.close(fd)


def process_data(
    engine: Deidentifier, writer: Writer, data: bytes, source: str, hash_output: bool = False
) -> FileOutcome:
    """:func:`process_file` for bytes already in memory (an instance received over DICOM)."""
    return _deidentify_and_publish(engine, writer, source, data, None, len(data), hash_output)


def _deidentify_and_publish(
    engine: Deidentifier,
    writer: Writer,
    source: str,
    data: bytes | memoryview,
    fd: int | None,
    size: int,
    hash_output: bool,
) -> FileOutcome:
    try:
        result = engine.deidentify(data)
    except DicomFormatError as exc:
        return FileOutcome(source, "quarantined", code=exc.code, reason=exc.message, bytes_in=size)
    except DeidError as exc:
        return FileOutcome(source, "failed", code=exc.code, reason=exc.message, bytes_in=size)
    except PARSE_ERRORS as exc:
        return FileOutcome(
            source,
            "quarantined",
            code="malformed",
            reason=f"{type(exc).__name__}: {exc}",
            bytes_in=size,
        )
    try:
        status = writer.publish(result, fd)
    except DeidError as exc:
        return FileOutcome(
            source,
            "failed",
            output=result.relpath,
            code=exc.code,
            reason=exc.message,
            bytes_in=size,
        )
    except OSError as exc:
        return FileOutcome(
            source, "failed", code="write_error", reason=f"{exc.strerror or exc}", bytes_in=size
        )
    instance = None
    if hash_output:
        digest = hashlib.sha256()
        for chunk in result.chunks:
            digest.update(chunk)
        instance = InstanceInfo(
            sop_instance_uid=result.sop_instance_uid,
            study_instance_uid=result.study_instance_uid,
            series_instance_uid=result.series_instance_uid,
            pseudonym=result.pseudonym,
            sop_class_uid=result.sop_class_uid,
            transfer_syntax=result.transfer_syntax,
            sha256=digest.hexdigest(),
            attributes=result.attributes,
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
        instance=instance,
    )


# -- worker processes --------------------------------------------------------------

_worker: tuple[Deidentifier, Writer, bool] | None = None


def _init_worker(
    config: EngineConfig, dst: str, hash_output: bool, originals: Path | None, durable: bool
) -> None:
    from node.deid.pool_guard import die_with_parent

    die_with_parent()  # the worker's parent is the fork server
    if durable:
        # The listener's drain: receiving (what a sender waits on) goes first.
        os.nice(10)
    global _worker
    _worker = (config.build(), Writer(Path(dst), originals, durable), hash_output)


def _run_batch(sources: list[str]) -> list[FileOutcome]:
    if _worker is None:  # pragma: no cover - the initializer always ran
        raise RuntimeError("worker not initialised")
    engine, writer, hash_output = _worker
    return [process_file(engine, writer, s, hash_output) for s in sources]


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
                elif entry.is_file() or (entry.is_symlink() and not entry.is_dir()):
                    yield entry.path  # a dangling link too: it is reported unreadable
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
    sources: list[Path],
    dst: Path,
    config: EngineConfig,
    jobs: int,
    vault: Vault,
    report_path: Path,
    on_progress: Callable[[FileOutcome], None] | None = None,
    on_batch: Callable[[list[FileOutcome]], None] | None = None,
    hash_output: bool = False,
    originals: Path | None = None,
) -> RunSummary:
    """De-identify every file under ``sources`` into ``dst``; returns the summary.

    Outcomes are handled in batches: the batch's re-identification records are
    appended to the vault (durably) first, then ``on_batch`` sees the outcomes —
    the node index commits them there — so nothing is recorded whose mapping
    could be lost.
    """
    started = time.perf_counter()
    make_dirs(dst, DIR_MODE)
    private_dir(report_path.parent)
    summary = RunSummary(report_path=report_path)
    pending: list[FileOutcome] = []
    last_flush = time.monotonic()
    files = (path for src in sources for path in iter_files(src, exclude=dst))

    with open(report_path, "w", encoding="utf-8") as report:
        os.chmod(report_path, 0o600)

        def flush() -> None:
            nonlocal last_flush
            append_records(vault, pending)
            if on_batch is not None:
                # The index may settle an outcome here (a conflict with a copy a
                # reviewer masked is "unchanged"), so the summary and the report
                # are written after it.
                on_batch(pending)
            for outcome in pending:
                summary.add(outcome)
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
            report.flush()
            pending.clear()
            last_flush = time.monotonic()

        def record(outcome: FileOutcome) -> None:
            pending.append(outcome)
            if on_progress is not None:
                on_progress(outcome)
            if len(pending) >= VAULT_BATCH or time.monotonic() - last_flush > FLUSH_SECONDS:
                flush()

        try:
            if jobs <= 1:
                engine, writer = config.build(), Writer(dst, originals)
                for path in files:
                    record(process_file(engine, writer, path, hash_output))
            else:
                _run_pool(files, dst, config, jobs, record, hash_output, originals)
            flush()
        finally:
            _clean_tmp(dst)
    summary.seconds = time.perf_counter() - started
    return summary


def append_records(vault: Vault, outcomes: list[FileOutcome]) -> None:
    """Append the outcomes' re-identification records to the vault, as one record.

    Each outcome with a record notes the vault record's number, which the node
    index keeps so that reading an instance's originals decrypts that record alone.
    """
    number = vault.append([o.record for o in outcomes if o.record is not None])
    for outcome in outcomes:
        if outcome.record is not None:
            outcome.vault_record = number


def _executor(
    config: EngineConfig,
    dst: Path,
    jobs: int,
    hash_output: bool,
    originals: Path | None,
    durable: bool = False,
) -> ProcessPoolExecutor:
    # Workers fork from a server that has already imported the engine: no per-worker
    # import cost, and no fork of this (threaded, progress-bar drawing) process.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["node.deid.pool_guard", "node.deid.runner"])
    return ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=context,
        initializer=_init_worker,
        initargs=(config, str(dst), hash_output, originals, durable),
    )


class IntakePool:
    """A long-lived pool of de-identification workers (the DICOM listener's spool drain)."""

    def __init__(
        self,
        config: EngineConfig,
        dst: Path,
        jobs: int,
        originals: Path | None = None,
        durable: bool = True,
    ) -> None:
        self._executor = _executor(config, dst, jobs, True, originals, durable)

    def process(self, sources: list[str]) -> list[FileOutcome]:
        """Process files (hashed, indexable outcomes), in the order given."""
        futures = [
            self._executor.submit(_run_batch, sources[i : i + BATCH_FILES])
            for i in range(0, len(sources), BATCH_FILES)
        ]
        return [outcome for future in futures for outcome in future.result()]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _run_pool(
    files: Iterator[str],
    dst: Path,
    config: EngineConfig,
    jobs: int,
    record: Callable[[FileOutcome], None],
    hash_output: bool,
    originals: Path | None,
) -> None:
    with _executor(config, dst, jobs, hash_output, originals) as pool:
        in_flight: set[Future[list[FileOutcome]]] = set()
        batches = _batches(files, BATCH_FILES)
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < jobs * IN_FLIGHT_PER_WORKER:
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
    """Remove the scratch folders (and anything a killed run left in them)."""
    shutil.rmtree(dst / TMP_DIR, ignore_errors=True)


def count_files(sources: list[Path], exclude: Path | None = None) -> int:
    """How many files a run will see (for the progress bar)."""
    return sum(1 for src in sources for _ in iter_files(src, exclude))
