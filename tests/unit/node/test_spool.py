"""The DICOM listener's spool: a received instance is never visible to the drain half-written.

The drain takes every ``*.dcm`` in the spool. An instance written under that
name was taken in half-read under load — quarantined as "file too short to be
DICOM" after the sender had been told it was stored (3 in 20,000 C-STOREs,
``bench/load_node_ingest.py``). Now it is written as ``.part`` and renamed when
whole; a ``.part`` a crash left was never acknowledged and goes at start-up.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.intake.listener import PART, DicomListener
from node.metrics import NodeMetrics
from node.settings import load_settings
from node.site import engine_config, open_index
from radfed.synth.site import Uids, ct_series, make_patient


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[DicomListener]:
    settings = load_settings(tmp_path / "node", dicom_port=0)
    index = open_index(settings)
    listener = DicomListener(
        settings, index, engine_config(settings), NodeMetrics(index, settings.spool_dir)
    )
    yield listener
    listener.stop()


def _instance() -> bytes:
    patient = make_patient(random.Random(5), 0)
    uids = Uids(5)
    (ds,) = ct_series(
        patient, uids, uids.new(), dt.datetime(2021, 3, 4, 8, 0), "ACC1", 1, 32,
        np.random.default_rng(5),
    )  # fmt: skip
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_received_instance_has_no_dcm_name_until_it_is_whole_and_synced(
    listener: DicomListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: look at the spool at the moment the file's bytes are fsynced (the
    # last step before it may be called complete) — what a drain listing then sees.
    data = _instance()
    seen_at_fsync: list[list[str]] = []
    fsync = os.fsync

    def watching(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the file's bytes, not the folder entry
            seen_at_fsync.append(sorted(p.name for p in listener.spool.glob("*.dcm")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", watching)

    # Execute
    status = listener.receive(data, "PACS")

    # Assert: acknowledged; no *.dcm visible while the bytes were being written and
    # synced; afterwards exactly one, whole, and no .part left.
    assert status == 0x0000
    assert seen_at_fsync and all(names == [] for names in seen_at_fsync)
    (spooled,) = listener.spool.glob("*.dcm")
    assert spooled.read_bytes() == data
    assert pydicom.dcmread(spooled).SOPInstanceUID
    assert list(listener.spool.glob(f"*{PART}")) == []


def test_a_failed_spool_write_leaves_nothing_and_answers_out_of_resources(
    listener: DicomListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)

    status = listener.receive(_instance(), "PACS")

    assert status == 0xA700  # Out of resources: the PACS keeps it and retries
    assert list(listener.spool.iterdir()) == []


def test_what_a_crash_left_half_written_is_removed_at_start_up(
    listener: DicomListener,
) -> None:
    # Prepare: a .part as a crash mid-write leaves it (never acknowledged)
    left = listener.spool / f"0001-abcd-PACS{PART}"
    left.write_bytes(_instance()[:100])

    # Execute
    listener.start()

    # Assert: gone, and nothing taken in from it
    assert not left.exists()
    assert listener.pending() == 0
