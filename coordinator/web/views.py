"""What the UI's pages show, shaped from the services' answers (pure functions, no I/O).

Cumulative contributions per site, metric curves and the participation table of
a training run, and page links for paged lists.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.web.plots import Series
from protocols.api.training import RunRound

#: Where a run's metrics come from, as its charts name them.
METRIC_SOURCES = (
    ("train_metrics", "training (federated)"),
    ("evaluate_metrics", "evaluation (federated)"),
    ("central_metrics", "evaluation (centralised)"),
)
#: Measures charted first, in this order; any other follows by name.
MEASURE_ORDER = ("loss", "accuracy")


def day_label(x: float) -> str:
    """An x value of a contributions chart (a proleptic Gregorian ordinal) as a date."""
    return dt.date.fromordinal(round(x)).isoformat()


def cumulative(rows: Sequence[tuple[dt.date, str, int]]) -> list[Series]:
    """Per site, the exams registered up to each day it registered some (one point a day).

    ``rows`` are (day, site, exams that day); a site of ``""`` is the whole
    federation.
    """
    totals: dict[str, int] = {}
    points: dict[str, list[tuple[float, float]]] = {}
    for day, site, count in sorted(rows):
        totals[site] = totals.get(site, 0) + count
        points.setdefault(site, []).append((float(day.toordinal()), float(totals[site])))
    return [Series(site or "all sites", tuple(line)) for site, line in sorted(points.items())]


def metric_charts(history: Sequence[RunRound]) -> list[tuple[str, list[Series]]]:
    """(measure, series) per chart: a series per source and metric, a point per round.

    The measure is what follows the metric's first ``-`` (``train-loss`` and
    ``eval-loss`` are both ``loss``); example counts are not charted.
    """
    charts: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for record in history:
        for attribute, source in METRIC_SOURCES:
            metrics: dict[str, float] = getattr(record, attribute)
            for key, value in sorted(metrics.items()):
                if key.endswith("num-examples"):
                    continue
                measure = key.split("-", 1)[-1]
                line = charts.setdefault(measure, {}).setdefault(f"{source}: {key}", [])
                line.append((float(record.round), float(value)))

    def order(measure: str) -> tuple[int, str]:
        known = MEASURE_ORDER.index(measure) if measure in MEASURE_ORDER else len(MEASURE_ORDER)
        return known, measure

    return [
        (measure, [Series(name, tuple(line)) for name, line in charts[measure].items()])
        for measure in sorted(charts, key=order)
    ]


@dataclass(frozen=True)
class ParticipationRow:
    """One round: per site what it did (``trained``, ``declined``, ``dropped`` or ``""``)."""

    round: int
    cells: tuple[tuple[str, int | None], ...]
    trained: int
    samples: int


def participation(history: Sequence[RunRound]) -> tuple[list[str], list[ParticipationRow]]:
    """The sites any round asked, and a row per round (a trained site with its samples)."""
    sites = sorted(
        {s for r in history for s in (*r.trained, *r.declined, *r.dropped)},
    )
    rows = []
    for record in history:
        cells: list[tuple[str, int | None]] = []
        for site in sites:
            if site in record.trained:
                cells.append(("trained", record.trained[site]))
            elif site in record.declined:
                cells.append(("declined", None))
            elif site in record.dropped:
                cells.append(("dropped", None))
            else:
                cells.append(("", None))
        rows.append(
            ParticipationRow(
                record.round, tuple(cells), len(record.trained), sum(record.trained.values())
            )
        )
    return sites, rows


@dataclass(frozen=True)
class Pager:
    """Where a paged list is: its offsets for previous and next, and what is shown."""

    total: int
    limit: int
    offset: int

    @property
    def first(self) -> int:
        return min(self.offset + 1, self.total)

    @property
    def last(self) -> int:
        return min(self.offset + self.limit, self.total)

    @property
    def previous(self) -> int | None:
        return max(self.offset - self.limit, 0) if self.offset > 0 else None

    @property
    def next(self) -> int | None:
        return self.offset + self.limit if self.offset + self.limit < self.total else None
