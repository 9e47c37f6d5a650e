"""The coordinator load benchmark's own functions at small scale, so its accounting is tested.

``bench/load_coordinator.py`` has 50 nodes upload for 10 minutes and offers 1,000
registry searches a second; here the same functions run with 3 enrolled nodes for a
few seconds against a real ``radfed coordinator serve``, and 50 searches a second for
3 s. Asserted: every exam a node got a receipt for is registered with its instances
and digests, nothing failed, nothing is left running, and the check names a loss
when an exam or an object goes missing; every search is answered. No timing is
asserted.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def load() -> Iterator[ModuleType]:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        yield importlib.import_module("load_coordinator")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_uploads_under_load_lose_nothing_and_a_loss_is_named(
    load: ModuleType, tmp_path: Path
) -> None:
    # Execute: 3 sites, each its own node and client thread, uploading for 12 s.
    report = load.run_uploads(tmp_path, nodes=3, seconds=12, procs=2, keep=True)

    # Assert: every receipt is a registered exam with its instances, nothing else is.
    check = report.check
    try:
        assert check["problems"] == [], check["problems"]
        assert report.crashes == [] and report.errors == {}
        assert check["receipts"] == check["registered"] == len(report.exams) > 0
        assert {e["site"] for e in report.exams} == {"site00", "site01", "site02"}
        assert sum(report.api_counts.values()) == check["registered"]
        assert check["objects_checked"] == 4 * check["registered"]
        assert check["uploads"] == {"registered": check["registered"]}
        assert check["audit_ok"] and report.leftovers == []
        assert report.samples and report.flat["peak"] > 0
        # The server's C heap read from its /metrics with the samples: live bytes, and
        # no more arenas than the coordinator's malloc_arena_max (2).
        assert report.flat["heap_in_use_early"] > 1 and report.flat["heap_in_use_late"] > 1
        assert 1 <= report.flat["heap_arenas"] <= 2
        assert "server C heap (its /metrics)" in "\n".join(load.upload_tables(report, 4.0))

        # Execute: a receipt whose exam is not there, and an object gone from the store.
        coordinator = report.coordinator
        ghost = {**report.exams[0], "study_uid": "2.25.1"}
        some_sha = next(iter(report.exams[1]["instances"].values()))
        coordinator.settings().store().delete(some_sha)
        recheck = load.verify_registry(coordinator, [*report.exams, ghost])

        # Assert: both named.
        assert recheck["lost"] == 1
        assert any(p.startswith("LOST: 2.25.1 ") for p in recheck["problems"])
        assert any("objects: 1 missing" in p for p in recheck["problems"])
    finally:
        shutil.rmtree(report.coordinator.home.parent, ignore_errors=True)


def test_searches_at_a_fixed_rate_are_all_answered(load: ModuleType, tmp_path: Path) -> None:
    # Execute: a small registry, 50 researcher requests a second for 3 s, open loop.
    report = load.run_search(
        tmp_path, [50], 3, exams=300, instances=10, generators=1, connections=4, drain_s=120
    )

    # Assert: each request of the mix sent and answered, and the floor's; the cache's
    # hits and misses read from the server (the mix repeats its questions); nothing
    # left running.
    mix, floor = report.phases
    assert (mix.what, floor.what) == ("registry mix", "GET /healthz (the HTTP floor)")
    for phase in (mix, floor):
        assert len(phase.results) == 150
        assert {status for _, _, _, status in phase.results} == {200}
        assert all(ms >= 0 for _, _, ms, _ in phase.results)
    hits, misses = mix.cache
    assert hits + misses == 150 and hits > 0 and misses > 0
    assert floor.cache == (0, 0)
    assert "| GET /healthz (the HTTP floor) | 50 | 150 | 150 |" in "\n".join(
        load.search_tables(report)
    )
    assert report.leftovers == []
    assert report.samples and report.flat["peak"] > 0
    assert list(tmp_path.glob("load-search-*")) == []
