"""Fixtures for the Flower apps: the app on the import path, Flower's task identity, cohorts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from radfed.synth.cohort import Cohort, cohort_manifest, write_cohort

ROOT = Path(__file__).resolve().parents[3]
APP_DIR = ROOT / "apps" / "cxr"

# Flower puts an app's directory on the import path when it loads the app; so do we.
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What Flower's ServerApp runtime sets before a ServerApp creates messages."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    yield


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models train as fast on one thread, and far steadier on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Site:
    """A generated site: its cohort and the manifest file a node would write for a run."""

    name: str
    cohort: Cohort
    manifest: Path


def make_site(root: Path, name: str, n: int, seed: int, run: str = "run-1") -> Site:
    cohort = write_cohort(root / name, n, seed=seed, site=name)
    manifest = root / f"{name}-manifest.json"
    manifest.write_text(cohort_manifest(cohort, run=run, site=name).model_dump_json())
    return Site(name=name, cohort=cohort, manifest=manifest)


@pytest.fixture(scope="session")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Site]:
    """Two training sites and a held-out cohort (its manifest serves centralised evaluation)."""
    root = tmp_path_factory.mktemp("cohorts")
    return {
        "A": make_site(root, "A", 48, seed=1),
        "B": make_site(root, "B", 48, seed=2),
        "held-out": make_site(root, "held-out", 40, seed=9),
    }
