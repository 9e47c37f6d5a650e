"""The node's DICOM listener: the PACS pushes (C-STORE) and checks (C-ECHO) here.

A received instance takes exactly the path of a folder import: it is spooled to a
file (fsynced), de-identified into the store by the same engine and writer
(fsynced), its re-identification record appended to the vault and its row
committed to the index — and only then is C-STORE success returned. An instance
that cannot be taken in is quarantined with its reason (the spooled file kept in
the node's quarantine folder) and refused with 0xC000, so the sender knows.

Storage SOP classes are accepted with the common transfer syntaxes (implicit and
explicit little endian, big endian, deflate, JPEG baseline/extended/lossless,
JPEG-LS, JPEG 2000, RLE, HTJ2K) without decoding. Associations from calling AE
titles outside the site's allowlist, when it has one, are refused.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.deid.runner import EngineConfig, FileOutcome, Writer, process_file
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


class DicomListener:
    """A threaded storage SCP feeding the node's intake."""

    def __init__(
        self,
        settings: NodeSettings,
        index: NodeIndex,
        config: EngineConfig,
        metrics: NodeMetrics,
    ) -> None:
        self.settings = settings
        self.index = index
        self.metrics = metrics
        self.engine = config.build()
        self.writer = Writer(
            settings.store_dir,
            settings.originals_dir if settings.keep_originals else None,
            durable=True,
        )
        self.spool = settings.spool_dir
        self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()  # one instance recorded at a time: one index writer
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
        """Start listening; returns the address actually bound (port 0 picks one)."""
        self.recover_spool()
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
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

    def recover_spool(self) -> None:
        """Take in what a crash left in the spool (idempotent: it was never acknowledged)."""
        for path in sorted(self.spool.glob("*.dcm")):
            self.take_in(path, calling_ae="(recovered)")

    # -- handlers ----------------------------------------------------------------------

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_rejected(self, event: Any) -> None:
        log.warning("association refused (calling AE title not allowed)")
        self.metrics.errors.labels(kind="association_refused").inc()

    def _on_store(self, event: Any) -> int | Dataset:
        started = time.perf_counter()
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            path = self._spool(event.encoded_dataset(include_meta=True))
        except OSError as exc:
            log.error("cannot spool a received instance: %s", exc.strerror or exc)
            self.metrics.errors.labels(kind="spool").inc()
            return OUT_OF_RESOURCES
        status = self.take_in(path, calling)
        self.metrics.store_seconds.observe(time.perf_counter() - started)
        return status

    def _spool(self, data: bytes) -> Path:
        path = self.spool / f"{time.time_ns()}-{secrets.token_hex(6)}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def take_in(self, path: Path, calling_ae: str) -> int | Dataset:
        """The folder-import path for one spooled file; the C-STORE status to return."""
        with self._lock:
            outcome = process_file(self.engine, self.writer, str(path), hash_output=True)
            if outcome.status in ("quarantined", "failed"):
                return self._refuse(path, outcome, calling_ae)
            try:
                if outcome.record is not None:
                    self.index.vault.append([outcome.record])
                done = self.index.record([outcome], via="dicom", actor=f"dicom:{calling_ae}")
            except Exception:
                log.exception("recording a received instance failed")
                self.metrics.errors.labels(kind="record").inc()
                return OUT_OF_RESOURCES
            path.unlink(missing_ok=True)
            result = "recorded" if done.instances else "duplicate"
            self.metrics.received.labels(via="dicom", result=result).inc()
            return SUCCESS

    def _refuse(self, path: Path, outcome: FileOutcome, calling_ae: str) -> Dataset:
        """Quarantine a received instance: keep the file on the node, tell the sender why."""
        quarantine = self.settings.quarantine_dir
        quarantine.mkdir(parents=True, exist_ok=True, mode=0o700)
        kept = quarantine / path.name
        shutil.move(str(path), kept)
        outcome.source = str(kept)
        try:
            self.index.record([outcome], via="dicom", actor=f"dicom:{calling_ae}")
        except Exception:
            log.exception("recording a quarantined instance failed")
        self.metrics.received.labels(via="dicom", result=outcome.status).inc()
        log.warning("refused an instance from %s: %s", calling_ae, outcome.code)
        status = Dataset()
        status.Status = CANNOT_UNDERSTAND
        status.ErrorComment = f"{outcome.code}: {outcome.reason}"[:64]
        return status
