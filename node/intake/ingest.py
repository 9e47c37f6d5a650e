"""``radfed node ingest PATH…``: de-identify and index folders of DICOM, all cores.

Idempotent and safe to kill: an output file is published before its index row is
committed, and a rerun finds its own earlier outputs identical and records what
the interrupted run had not, so it ends with the index one clean run gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from node.deid.runner import EngineConfig, FileOutcome, RunSummary, run
from node.index.store import NodeIndex, Recorded
from node.settings import NodeSettings


@dataclass
class IngestSummary:
    run: RunSummary
    recorded: Recorded = field(default_factory=Recorded)


def ingest(
    sources: list[Path],
    settings: NodeSettings,
    index: NodeIndex,
    config: EngineConfig,
    jobs: int,
    report_path: Path,
    on_progress: Callable[[FileOutcome], None] | None = None,
) -> IngestSummary:
    """Take every file under ``sources`` into the node."""
    recorded = Recorded()

    def on_batch(outcomes: list[FileOutcome]) -> None:
        done = index.record(outcomes, via="folder", actor="intake:folder")
        recorded.instances += done.instances
        recorded.unchanged += done.unchanged
        recorded.quarantined += done.quarantined
        recorded.studies_created.extend(done.studies_created)

    summary = run(
        sources,
        settings.store_dir,
        config,
        jobs,
        index.vault,
        report_path,
        on_progress=on_progress,
        on_batch=on_batch,
        hash_output=True,
        originals=settings.originals_dir if settings.keep_originals else None,
    )
    return IngestSummary(summary, recorded)
