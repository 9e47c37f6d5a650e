"""Vetting inside ``radfed node serve``: a background vetter and the UI's mask and image hooks."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
from sqlalchemy import select

from node.errors import NodeError
from node.index.models import Instance, Study
from node.index.store import NodeIndex
from node.settings import NodeSettings
from node.vetting import ocr
from node.vetting.policy import VettingPolicy
from node.vetting.vet import apply_mask, vet_pending

log = logging.getLogger("radfed.node.vetting")


class Vetter:
    """Vets studies as they arrive (woken by intake, and every few seconds anyway)."""

    def __init__(
        self, index: NodeIndex, settings: NodeSettings, policy: Callable[[], VettingPolicy]
    ) -> None:
        self.index = index
        self.settings = settings
        self.policy = policy
        #: The last vetting failure, reported in heartbeats; cleared by a pass that works.
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vetter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                summary = vet_pending(
                    self.index,
                    self.settings,
                    self.policy(),
                    self.settings.deid,
                    stable_seconds=self.settings.study_stable_seconds,
                )
                self.last_error = None
                if summary.studies:
                    log.info(
                        "vetted %d studies: %d approved, %d held",
                        summary.studies,
                        summary.approved,
                        summary.held,
                    )
                    continue
            except Exception as exc:
                log.exception("vetting pass failed")
                self.last_error = f"vetting: {type(exc).__name__}: {exc}"[:500]
            # Look again soon enough that a study is vetted about when it becomes stable.
            self._wake.wait(min(5.0, max(0.5, self.settings.study_stable_seconds / 4)))
            self._wake.clear()


def reviewer_mask(
    index: NodeIndex, settings: NodeSettings
) -> Callable[[str, str, list[tuple[int, int, int, int]], str], str]:
    """The web UI's mask action: mask one instance of a study for a reviewer."""

    def mask(study_uid: str, sop_uid: str, rects: list[tuple[int, int, int, int]], who: str) -> str:
        with index.db.read() as session:
            instance_id = session.scalar(
                select(Instance.id)
                .join(Study, Study.id == Instance.study_id)
                .where(Instance.sop_uid == sop_uid, Study.study_uid == study_uid)
            )
        if instance_id is None:
            raise NodeError("not_found", f"no instance {sop_uid} in study {study_uid}")
        result = apply_mask(index, settings, instance_id, rects, by=who, source="reviewer")
        if result.clean:
            return "Masked. The OCR re-check found no text: BurnedInAnnotation is now NO."
        return (
            f"Masked, but the OCR re-check still finds text ({len(result.remaining)} "
            "region(s)): mask those too."
        )

    return mask


def render_png(path: Path, frame: int, size: int) -> bytes:
    """A windowed PNG of one frame of a stored instance (``size`` 0: full size)."""
    ds = pydicom.dcmread(path)
    if size:
        return ocr.thumbnail_png(ds, frame=frame, size=size)
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(ocr.render(ds, frame=frame)).save(buffer, format="PNG")
    return buffer.getvalue()
