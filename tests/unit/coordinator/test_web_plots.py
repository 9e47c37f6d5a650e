"""The coordinator UI's SVG charts and the view shaping behind its pages (pure functions)."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET

import pytest

from coordinator.web.plots import Series, line_chart, nice_ticks
from coordinator.web.views import Pager, cumulative, day_label, metric_charts, participation
from protocols.api.training import RunRound

SVG = "{http://www.w3.org/2000/svg}"
NOW = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)


def _points(svg: str) -> dict[str, list[tuple[float, float, str]]]:
    """Series name -> (cx, cy, title) of each point, parsed as XML."""
    root = ET.fromstring(svg)
    found = {}
    for group in root.iter(f"{SVG}g"):
        if group.get("class") == "series":
            found[group.get("data-series", "")] = [
                (
                    float(c.get("cx", "nan")),
                    float(c.get("cy", "nan")),
                    c.findtext(f"{SVG}title", ""),
                )
                for c in group.iter(f"{SVG}circle")
            ]
    return found


@pytest.mark.parametrize(
    ("low", "high", "integer", "expected"),
    [
        (0, 1, False, [0, 0.25, 0.5, 0.75, 1]),
        (0.3, 0.9, False, [0.2, 0.4, 0.6, 0.8, 1.0]),
        (0, 1234, False, [0, 500, 1000, 1500]),
        (1, 3, True, [1, 2, 3]),
        (5, 5, True, [4, 5, 6]),
        (-2, 2, False, [-2, -1, 0, 1, 2]),
    ],
)
def test_ticks_are_round_numbers_that_cover_the_range(
    low: float, high: float, integer: bool, expected: list[float]
) -> None:
    ticks = nice_ticks(low, high, 5, integer=integer)

    assert ticks == pytest.approx(expected)
    assert ticks[0] <= low and ticks[-1] >= high


def test_a_chart_has_a_point_per_value_in_order_and_higher_values_higher() -> None:
    # Prepare
    loss = Series("loss", ((1, 0.9), (2, 0.5), (3, 0.2)))
    accuracy = Series("accuracy", ((1, 0.4), (2, 0.6), (3, 0.8)))

    # Execute
    svg = line_chart([loss, accuracy], title="per round", x_integer=True)

    # Assert
    points = _points(svg)
    assert list(points) == ["loss", "accuracy"]
    assert [len(p) for p in points.values()] == [3, 3]
    xs = [x for x, _, _ in points["loss"]]
    assert xs == sorted(xs) and xs == [x for x, _, _ in points["accuracy"]]
    ys = [y for _, y, _ in points["loss"]]
    assert ys == sorted(ys)  # SVG y grows downwards: falling values sit lower
    assert points["accuracy"][2][2] == "accuracy: 3, 0.8"
    assert svg.count("<polyline") == 2


def test_every_text_of_a_chart_is_escaped_and_no_inline_style_is_used() -> None:
    svg = line_chart([Series('<script>"x"</script>', ((1, 1),))], title="a & b <i>", x_label="<x>")

    root = ET.fromstring(svg)  # well-formed despite the markup in the names

    assert "<script>" not in svg and "<i>" not in svg
    assert root.findtext(f"{SVG}title") == "a & b <i>"
    assert "style=" not in svg


def test_a_chart_without_points_says_so() -> None:
    svg = line_chart([], title="nothing")

    assert _points(svg) == {}
    assert "no data yet" in svg


def test_contributions_accumulate_per_site_one_point_a_day() -> None:
    # Prepare
    d1, d2, d3 = dt.date(2026, 1, 1), dt.date(2026, 1, 2), dt.date(2026, 1, 5)
    rows = [(d2, "north", 2), (d1, "north", 3), (d3, "north", 1), (d2, "south", 4)]

    # Execute
    lines = cumulative(rows)
    federation = cumulative([(d1, "", 3), (d2, "", 6)])

    # Assert
    assert [line.name for line in lines] == ["north", "south"]
    assert [(day_label(x), y) for x, y in lines[0].points] == [
        ("2026-01-01", 3),
        ("2026-01-02", 5),
        ("2026-01-05", 6),
    ]
    assert lines[1].points == ((float(d2.toordinal()), 4.0),)
    assert federation[0].name == "all sites" and federation[0].points[-1][1] == 9


def _round(number: int, trained: dict[str, int], **fields: object) -> RunRound:
    return RunRound.model_validate(
        {"round": number, "trained": trained, "finished_at": NOW, **fields}
    )


def test_metric_charts_group_by_measure_and_leave_out_example_counts() -> None:
    history = [
        _round(
            r,
            {"north": 10},
            train_metrics={"train-loss": 1 / r, "train-accuracy": 0.5},
            evaluate_metrics={"eval-loss": 2 / r, "num-examples": 30},
            central_metrics={"eval-auc": 0.7},
        )
        for r in (1, 2)
    ]

    charts = metric_charts(history)

    assert [measure for measure, _ in charts] == ["loss", "accuracy", "auc"]
    loss = dict((s.name, s.points) for s in charts[0][1])
    assert loss == {
        "training (federated): train-loss": ((1.0, 1.0), (2.0, 0.5)),
        "evaluation (federated): eval-loss": ((1.0, 2.0), (2.0, 1.0)),
    }
    assert charts[2][1][0].name == "evaluation (centralised): eval-auc"


def test_participation_has_a_row_per_round_and_a_column_per_site() -> None:
    history = [
        _round(1, {"north": 10, "south": 5}),
        _round(2, {"north": 10}, declined=["east"], dropped=["south"]),
    ]

    sites, rows = participation(history)

    assert sites == ["east", "north", "south"]
    assert rows[0].cells == (("", None), ("trained", 10), ("trained", 5))
    assert rows[1].cells == (("declined", None), ("trained", 10), ("dropped", None))
    assert (rows[1].trained, rows[1].samples) == (1, 10)


def test_a_pager_knows_its_neighbours() -> None:
    first, middle, last, empty = (
        Pager(250, 100, 0),
        Pager(250, 100, 100),
        Pager(250, 100, 200),
        Pager(0, 100, 0),
    )

    assert (first.previous, first.next, first.first, first.last) == (None, 100, 1, 100)
    assert (middle.previous, middle.next) == (0, 200)
    assert (last.previous, last.next, last.last) == (100, None, 250)
    assert (empty.first, empty.last, empty.next) == (0, 0, None)
