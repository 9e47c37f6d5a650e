"""The node's DICOM listener: the PACS pushes (C-STORE) and checks (C-ECHO) here.

Receiving and taking in are two steps, so a PACS never waits on the index:

1. On C-STORE the instance is checked by the de-identification engine (what the
   engine would refuse is refused now, 0xC000 with the reason, and quarantined),
   then written to the spool (under a ``.part`` name, renamed to ``.dcm`` once
   whole) and fsynced with its folder entry. Only then is success returned: from
   that moment the instance survives a crash; a ``.part`` left by one was never
   acknowledged and is removed at start-up (the sender sends it again).
2. A drain thread takes the spool in batches through exactly the path of a folder
   import — the same runner, engine and writer (fsynced), the vault, then one
   index transaction per batch — and removes each spool file once its outcome is
   committed. At start-up whatever a crash left in the spool is taken in first.

Storage SOP classes are accepted with the common transfer syntaxes (implicit and
explicit little endian, big endian, deflate, JPEG baseline/extended/lossless,
JPEG-LS, JPEG 2000, RLE, HTJ2K) without decoding. Associations from calling AE
titles outside the site's allowlist, when it has one, are refused.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.deid.dicomio import DicomFormatError
from node.deid.engine import DeidError
from node.deid.runner import (
    PARSE_ERRORS,
    EngineConfig,
    FileOutcome,
    IntakePool,
    append_records,
    fsync_dir,
)
from node.index.store import NodeIndex
from node.metrics import NodeMetrics
from node.settings import NodeSettings

log = logging.getLogger("radfed.node.dicom")

TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
DRAIN_BATCH = 256
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


#: The suffix of a spool file still being written (the drain takes ``*.dcm`` only).
PART = ".part"


class DicomListener:
    """A threaded storage SCP feeding the node's intake through its spool."""

    def __init__(
        self,
        settings: NodeSettings,
        index: NodeIndex,
        config: EngineConfig,
        metrics: NodeMetrics,
        on_recorded: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_recorded = on_recorded
        self.index = index
        self.metrics = metrics
        self.config = config
        self.checker = config.build()
        self._check_lock = threading.Lock()  # the engine is not thread-safe
        self.spool = settings.spool_dir
        self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._drainer: threading.Thread | None = None
        self._server: ThreadedAssociationServer | None = None
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_pdu_size = 0  # unlimited: several times faster for large images
        self.ae.network_timeout = 60
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = 60
        if settings.ae_allowlist:
            self.ae.require_calling_aet = list(settings.ae_allowlist)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                self.ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Start draining and listening; returns the address bound (port 0 picks one)."""
        self._clear_parts()
        self._drainer = threading.Thread(target=self._drain_loop, name="spool-drain")
        self._drainer.start()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        server = self.ae.start_server(
            (self.settings.dicom_host, self.settings.dicom_port),
            block=False,
            evt_handlers=handlers,
        )
        if server is None:  # pragma: no cover - block=False always returns the server
            raise RuntimeError("the DICOM listener did not start")
        self._server = server
        host, port = server.server_address[:2]
        log.info("dicom listener on %s:%s as %s", host, port, self.settings.ae_title)
        return str(host), int(port)

    @property
    def running(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        """Stop listening, finish the batch in hand, stop draining."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()
        self._stopping.set()
        self._wake.set()
        if self._drainer is not None:
            self._drainer.join(120)

    def pending(self) -> int:
        """Instances received and acknowledged but not yet taken in (the queue)."""
        return sum(1 for _ in self.spool.glob("*.dcm"))

    # -- receiving --------------------------------------------------------------------

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_rejected(self, event: Any) -> None:
        log.warning("association refused (calling AE title not allowed)")
        self.metrics.errors.labels(kind="association_refused").inc()

    def _on_store(self, event: Any) -> int | Dataset:
        started = time.perf_counter()
        calling = str(event.assoc.requestor.ae_title).strip()
        data = event.encoded_dataset(include_meta=True)
        status = self.receive(data, calling)
        self.metrics.store_seconds.observe(time.perf_counter() - started)
        return status

    def receive(self, data: bytes, calling_ae: str) -> int | Dataset:
        """Check, spool durably, acknowledge: the C-STORE status to return."""
        try:
            with self._check_lock:
                self.checker.deidentify(data)
        except (DicomFormatError, DeidError) as exc:
            return self._refuse(data, exc.code, exc.message, calling_ae)
        except PARSE_ERRORS as exc:
            return self._refuse(data, "malformed", f"{type(exc).__name__}: {exc}", calling_ae)
        try:
            self._spool_write(data, calling_ae)
        except OSError as exc:
            log.error("cannot spool a received instance: %s", exc.strerror or exc)
            self.metrics.errors.labels(kind="spool").inc()
            return OUT_OF_RESOURCES
        self.metrics.received.labels(via="dicom", result="accepted").inc()
        self._wake.set()
        return SUCCESS

    def _spool_write(self, data: bytes, calling_ae: str) -> Path:
        """Write the instance whole under a ``.part`` name, then rename it to ``.dcm``.

        The drain takes every ``*.dcm`` it finds: written under its final name, a
        file still being written was taken in half-read ("file too short to be
        DICOM", quarantined) after the sender had been told it was stored — 3 in
        20,000 under load (bench/load_node_ingest.py). A rename is atomic.
        """
        sender = _UNSAFE.sub("_", calling_ae)[:16] or "UNKNOWN"
        path = self.spool / f"{time.time_ns():020d}-{secrets.token_hex(4)}-{sender}.dcm"
        part = path.with_suffix(PART)
        try:
            _write_durably(part, data)
            os.rename(part, path)
        except OSError:
            part.unlink(missing_ok=True)
            raise
        fsync_dir(self.spool)
        return path

    def _clear_parts(self) -> None:
        """Remove what a crash left half-written: never acknowledged, so the sender resends."""
        for part in self.spool.glob(f"*{PART}"):
            log.warning("removing %s: written when the node stopped, never acknowledged", part.name)
            part.unlink(missing_ok=True)

    def _refuse(self, data: bytes, code: str, reason: str, calling_ae: str) -> Dataset:
        """Quarantine a received instance now: keep its bytes on the node, tell the sender."""
        quarantine = self.settings.quarantine_dir
        quarantine.mkdir(parents=True, exist_ok=True, mode=0o700)
        kept = quarantine / f"{time.time_ns():020d}-{secrets.token_hex(4)}.dcm"
        outcome = FileOutcome(
            str(kept), "quarantined", code=code, reason=reason, bytes_in=len(data)
        )
        try:
            _write_durably(kept, data)
            self.index.record([outcome], via="dicom", actor=f"dicom:{calling_ae}")
        except Exception:
            log.exception("recording a refused instance failed")
        self.metrics.received.labels(via="dicom", result="refused").inc()
        log.warning("refused an instance from %s: %s", calling_ae, code)
        status = Dataset()
        status.Status = CANNOT_UNDERSTAND
        status.ErrorComment = f"{code}: {reason}"[:64]
        return status

    # -- taking in --------------------------------------------------------------------

    def _drain_loop(self) -> None:
        pool = IntakePool(
            self.config,
            self.settings.store_dir,
            self.settings.ingest_jobs or os.cpu_count() or 1,
            self.settings.originals_dir if self.settings.keep_originals else None,
        )
        try:
            while True:
                batch = sorted(self.spool.glob("*.dcm"))[:DRAIN_BATCH]
                if batch:
                    self._drain(pool, batch)
                    continue
                if self._stopping.is_set():
                    return
                self._wake.wait(1.0)
                self._wake.clear()
        except Exception:
            log.exception("the spool drain stopped; received instances wait in the spool")
            self.metrics.errors.labels(kind="drain").inc()
        finally:
            pool.close()

    def _drain(self, pool: IntakePool, batch: list[Path]) -> None:
        outcomes = pool.process([str(p) for p in batch])
        quarantine = self.settings.quarantine_dir
        for path, outcome in zip(batch, outcomes, strict=True):
            if outcome.status in ("quarantined", "failed"):
                quarantine.mkdir(parents=True, exist_ok=True, mode=0o700)
                kept = quarantine / path.name
                shutil.move(str(path), kept)
                outcome.source = str(kept)
        append_records(self.index.vault, outcomes)
        done = self.index.record(outcomes, via="dicom", actor="intake:dicom")
        for path in batch:
            path.unlink(missing_ok=True)  # committed: the spool copy is no longer needed
        self.metrics.received.labels(via="dicom", result="recorded").inc(done.instances)
        if self.on_recorded is not None and done.instances:
            self.on_recorded()
        self.metrics.received.labels(via="dicom", result="duplicate").inc(done.unchanged)
        if done.quarantined:
            self.metrics.received.labels(via="dicom", result="quarantined").inc(done.quarantined)


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
