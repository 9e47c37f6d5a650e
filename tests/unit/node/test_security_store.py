"""The node's store as a target: links planted in it, a umask that would open it to everyone.

The de-identification run writes ``<pseudonym>/<study>/<series>/<sop>.dcm`` under
its output folder. A folder in it replaced by a symbolic link must not carry a
write (nor a new folder) out of it, and what the run creates must never be
writable by others whatever the umask.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest

from node.deid.runner import run
from node.settings import load_settings
from node.site import engine_config, open_vault
from radfed.synth.site import write_site_corpus


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def ct_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """Two CT instances of one patient's study."""
    corpus = write_site_corpus(
        tmp_path_factory.mktemp("corpus"),
        patients=1,
        ct_slices=2,
        ct_size=32,
        cr_size=32,
        with_us=False,
        with_sr=False,
    )
    first, second = sorted(p for p in corpus.files if "CT" in p.parts)
    return first.read_bytes(), second.read_bytes()


def deidentify(home: Path, data: bytes, name: str) -> list[dict[str, str]]:
    import json

    settings = load_settings(home)
    inbox = home.parent / f"in-{name}"
    inbox.mkdir()
    (inbox / "x.dcm").write_bytes(data)
    report = home / "runs" / f"{name}.jsonl"
    run([inbox], settings.store_dir, engine_config(settings), 1, open_vault(settings), report)
    return [json.loads(line) for line in report.read_text().splitlines()]


def test_a_link_planted_in_the_store_carries_no_write_out_of_it(
    tmp_path: Path, ct_pair: tuple[bytes, bytes]
) -> None:
    # Prepare: the patient's folder replaced by a link to a folder outside the store.
    home, outside = tmp_path / "home", tmp_path / "outside"
    outside.mkdir()
    (done,) = deidentify(home, ct_pair[0], "first")
    patient = home / "store" / Path(done["output"]).parts[0]
    patient.rename(tmp_path / "moved")
    patient.symlink_to(outside, target_is_directory=True)

    # Execute: the same patient's next instance
    (refused,) = deidentify(home, ct_pair[1], "second")

    # Assert: refused with the reason; nothing written outside, not even a folder
    assert (refused["status"], refused["code"]) == ("failed", "unsafe_path")
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o000])
def test_what_a_run_creates_is_never_writable_by_others(
    tmp_path: Path, ct_pair: tuple[bytes, bytes], mask: int
) -> None:
    # Execute
    with umask(mask):
        (done,) = deidentify(tmp_path / "home", ct_pair[0], "run")

    # Assert
    home = tmp_path / "home"
    assert done["status"] == "written"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for path in home.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o022 == 0, path
    output = home / "store" / done["output"]
    assert pydicom.dcmread(output).PatientID == Path(done["output"]).parts[0]
