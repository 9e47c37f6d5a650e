"""The samples a run may read on this node: eligible exams, narrowed by the run's cohort.

Eligible means the study's status is one the training policy admits (approved or
shared; never held, rejected, quarantined or withdrawn). A run's cohort narrows
that further: a release (the coordinator lists which of this site's studies it
holds) and/or conditions on modality, body part and labels. Only image instances
go in (they have rows and columns; SEG, SR and other non-images stay out).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from node.errors import NodeError
from node.index.db import Database
from node.index.models import Instance, Label, Series, Study
from protocols.training import TrainingSample

NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "DOC", "RTSTRUCT", "REG"})


@dataclass(frozen=True)
class Cohort:
    """What a run asked for: a release's studies and/or conditions (``key=value``)."""

    release: str | None = None
    conditions: tuple[str, ...] = ()
    #: Filled in from the coordinator when ``release`` is set.
    studies: frozenset[str] | None = None
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_run_config(cls, release: str, conditions: str) -> Cohort:
        parts = tuple(c.strip() for c in conditions.split(";") if c.strip())
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep or not value or key not in ("modality", "body_part", "label"):
                raise NodeError("bad_cohort", f"cohort condition {part!r} is not understood")
            if key == "label" and "=" not in value:
                raise NodeError("bad_cohort", f"label condition {part!r} needs scheme:name=value")
        return cls(release=release or None, conditions=parts)

    def describe(self) -> dict[str, object]:
        return {"release": self.release, "filter": list(self.conditions)}


def samples(
    db: Database, store_dir: Path, statuses: tuple[str, ...], cohort: Cohort
) -> list[TrainingSample]:
    """The image instances of eligible studies in the cohort, with their studies' labels."""
    wanted: dict[str, set[str]] = defaultdict(set)
    labels_wanted: list[tuple[str, str]] = []
    for part in cohort.conditions:
        key, _, value = part.partition("=")
        if key == "label":
            labels_wanted.append((value.split("=", 1)[0], value.split("=", 1)[1]))
        else:
            wanted[key].add(value.upper() if key == "modality" else value)
    with db.read() as session:
        studies = {
            s.id: s.study_uid
            for s in session.scalars(select(Study).where(Study.status.in_(statuses)))
            if cohort.studies is None or s.study_uid in cohort.studies
        }
        labels: dict[int, dict[str, str]] = defaultdict(dict)
        for label in session.scalars(select(Label).where(Label.study_id.in_(studies))):
            labels[label.study_id][f"{label.scheme}:{label.name}"] = label.value
        for key, value in labels_wanted:
            studies = {sid: uid for sid, uid in studies.items() if labels[sid].get(key) == value}
        rows = session.execute(
            select(Instance.path, Instance.study_id, Series.modality, Series.body_part)
            .join(Series, Series.id == Instance.series_id)
            .where(
                Instance.study_id.in_(studies),
                Instance.rows.is_not(None),
                Instance.columns.is_not(None),
            )
            .order_by(Instance.study_id, Instance.id)
        ).all()
    found: list[TrainingSample] = []
    for path, study_id, modality, body_part in rows:
        modality = (modality or "").upper()
        if modality in NON_IMAGE_MODALITIES:
            continue
        if "modality" in wanted and modality not in wanted["modality"]:
            continue
        if "body_part" in wanted and (body_part or "") not in wanted["body_part"]:
            continue
        found.append(
            TrainingSample(
                path=str((store_dir / path).resolve()),
                study=studies[study_id],
                modality=modality,
                labels=labels.get(study_id, {}),
            )
        )
    return found
