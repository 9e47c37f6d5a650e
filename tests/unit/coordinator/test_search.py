"""Registry search, exam detail and statistics, on SQLite and on PostgreSQL.

The registry's answers are checked against plain Python filtering of the
exams' specs (the oracle).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from coordinator import releases
from coordinator.errors import CoordinatorError
from coordinator.registry import search
from coordinator.registry.db import Database
from protocols.api.coordinator import ExamFilters, ExamSort, SortOrder
from tests.unit.coordinator.registry_data import (
    ExamSpec,
    SeriesSpec,
    ensure_sites,
    generate,
    register,
)

SPECS = generate(60)


def matches(spec: ExamSpec, filters: ExamFilters) -> bool:
    """The oracle: does ``spec`` satisfy every condition of ``filters``?"""
    labels = {f"{scheme}:{name}={value}" for (scheme, name), value in spec.labels.items()}
    clinical = {f"{k}={v}" for k, v in spec.clinical.items()}
    return (
        (filters.site is None or spec.site == filters.site)
        and (filters.modality is None or filters.modality in spec.modalities)
        and (filters.body_part is None or spec.body_part == filters.body_part)
        and set(filters.labels) <= labels
        and set(filters.clinical) <= clinical
        and (
            filters.study_date_from is None
            or (spec.study_date is not None and spec.study_date >= filters.study_date_from)
        )
        and (
            filters.study_date_to is None
            or (spec.study_date is not None and spec.study_date <= filters.study_date_to)
        )
    )


def every_uid(db: Database, filters: ExamFilters, **options: Any) -> list[str]:
    """Every match, page by page."""
    found: list[str] = []
    while True:
        page = search.search(db, filters, limit=11, offset=len(found), **options)
        found += [e.study_instance_uid for e in page.items]
        if not page.items:
            return found


@pytest.fixture
def registered(db: Database) -> Database:
    register(db, SPECS)
    return db


FILTERS = {
    "none": {},
    "site": {"site": "lakeside"},
    "unknown site": {"site": "nowhere"},
    "modality CT (also in CT\\SR)": {"modality": "CT"},
    "modality SR (only with CT)": {"modality": "SR"},
    "modality DX": {"modality": "DX"},
    "body part": {"body_part": "HEAD"},
    "one label": {"labels": ["cxr:appearance=typical"]},
    "two labels": {"labels": ["cxr:appearance=atypical", "ricord:covid=negative"]},
    "label value nobody has": {"labels": ["cxr:appearance=unheard-of"]},
    "clinical": {"clinical": ["sex=M"]},
    "two clinical": {"clinical": ["sex=F", "age_group=40s"]},
    "date from": {"study_date_from": dt.date(2020, 4, 1)},
    "date range": {"study_date_from": dt.date(2020, 2, 1), "study_date_to": dt.date(2020, 3, 31)},
    "combined": {
        "site": "st-marys",
        "modality": "CR",
        "labels": ["ricord:covid=positive"],
        "clinical": ["sex=F"],
        "study_date_to": dt.date(2020, 6, 30),
    },
}


@pytest.mark.parametrize("fields", FILTERS.values(), ids=FILTERS.keys())
def test_each_filter_finds_exactly_what_it_says(registered: Database, fields: Any) -> None:
    # Prepare
    filters = ExamFilters(**fields)
    expected = {s.study_uid for s in SPECS if matches(s, filters)}

    # Execute
    page = search.search(registered, filters, limit=5)
    found = every_uid(registered, filters)

    # Assert
    assert sorted(found) == sorted(expected)  # each match once
    assert page.total == len(expected)
    assert len(page.items) == min(5, len(expected))


@pytest.mark.parametrize("sort", list(ExamSort))
@pytest.mark.parametrize("order", list(SortOrder))
def test_pages_follow_the_sort_with_undated_exams_oldest(
    registered: Database, sort: ExamSort, order: SortOrder
) -> None:
    # Prepare: ties broken by registration order (the row id), in the sort's direction.
    def key(spec: ExamSpec) -> Any:
        if sort == ExamSort.REGISTERED_AT:
            return (1, spec.registered_at, spec.number)
        undated = spec.study_date is None
        return (0, dt.date.min, spec.number) if undated else (1, spec.study_date, spec.number)

    expected = [s.study_uid for s in sorted(SPECS, key=key, reverse=order == SortOrder.DESC)]

    # Execute
    found = every_uid(registered, ExamFilters(), sort=sort, order=order)

    # Assert
    assert found == expected
    assert any(s.study_date is None for s in SPECS)


def test_a_page_past_the_end_is_empty_with_the_total(registered: Database) -> None:
    page = search.search(registered, ExamFilters(), limit=10, offset=500)

    assert page.items == []
    assert (page.total, page.limit, page.offset) == (60, 10, 500)


@pytest.mark.parametrize(("limit", "offset"), [(0, 0), (501, 0), (10, -1)])
def test_a_page_out_of_bounds_is_refused(db: Database, limit: int, offset: int) -> None:
    with pytest.raises(CoordinatorError) as caught:
        search.search(db, ExamFilters(), limit=limit, offset=offset)

    assert caught.value.code == "invalid_argument"
    assert "limit" in caught.value.message or "offset" in caught.value.message


def test_a_page_may_hold_500(db: Database) -> None:
    register(db, generate(501))

    page = search.search(db, ExamFilters(), limit=500)

    assert len(page.items) == 500 and page.total == 501


def test_withdrawn_exams_are_left_out_unless_asked(registered: Database) -> None:
    # Prepare
    gone = SPECS[3]
    site_id = ensure_sites(registered, [gone.site])[gone.site]
    releases.withdraw(registered, site_id, gone.study_uid, "consent withdrawn", "site:x")
    filters = ExamFilters(site=gone.site)

    # Execute
    default = search.search(registered, filters, limit=500)
    everything = search.search(registered, filters, limit=500, include_withdrawn=True)

    # Assert
    assert gone.study_uid not in {e.study_instance_uid for e in default.items}
    assert default.total == everything.total - 1
    listed = {e.study_instance_uid: e for e in everything.items}
    assert listed[gone.study_uid].withdrawn_at is not None
    assert all(e.withdrawn_at is None for e in default.items)


def test_a_summary_says_what_the_exam_is(registered: Database) -> None:
    spec = next(s for s in SPECS if s.modalities == ["CT", "SR"])

    page = search.search(registered, ExamFilters(modality="SR", site=spec.site), limit=500)
    summary = next(e for e in page.items if e.study_instance_uid == spec.study_uid)

    assert summary.site == spec.site and summary.pseudonym == spec.pseudonym
    assert summary.modalities == ["CT", "SR"]
    assert summary.study_date == spec.study_date and summary.body_part == spec.body_part
    assert summary.series_count == 2
    assert summary.instance_count == sum(s.instances for s in spec.series)
    assert summary.registered_at == spec.registered_at


def test_detail_shows_series_instances_labels_clinical_and_deid(registered: Database) -> None:
    # Prepare
    spec = SPECS[9]
    manifest = spec.manifest()

    # Execute
    detail = search.detail(registered, spec.study_uid)

    # Assert
    assert detail.study_instance_uid == spec.study_uid
    assert detail.series == manifest.exam.series
    assert detail.labels == manifest.labels
    assert detail.clinical == spec.clinical
    assert detail.deid == manifest.deid
    assert detail.withdrawn_at is None


def test_detail_of_an_unknown_exam_is_not_found(db: Database) -> None:
    with pytest.raises(CoordinatorError) as caught:
        search.detail(db, "1.2.3.4")

    assert caught.value.code == "exam_not_found"


@pytest.mark.parametrize(
    ("fields", "argument"),
    [
        ({"labels": ["no-colon=x"]}, "labels"),
        ({"labels": ["scheme:name"]}, "labels"),
        ({"clinical": ["novalue"]}, "clinical"),
        ({"study_date_from": "2021-01-02", "study_date_to": "2021-01-01"}, "filters"),
        ({"study_date_from": "yesterday"}, "study_date_from"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_filters_name_the_argument(fields: dict[str, Any], argument: str) -> None:
    with pytest.raises(CoordinatorError) as caught:
        search.make_filters(**fields)

    assert caught.value.code == "invalid_filter"
    assert f'Argument "{argument}' in caught.value.message


def test_key_value_filters_parse_like_the_cli_writes_them() -> None:
    filters = search.parse_filters(
        [
            "site=st-marys",
            "modality=CT",
            "body_part=CHEST",
            "label=cxr:appearance=typical",
            "label=ricord:covid=positive",
            "clinical=sex=F",
            "date_from=2020-01-01",
            "date_to=2020-12-31",
        ]
    )

    assert filters == ExamFilters(
        site="st-marys",
        modality="CT",
        body_part="CHEST",
        labels=["cxr:appearance=typical", "ricord:covid=positive"],
        clinical=["sex=F"],
        study_date_from=dt.date(2020, 1, 1),
        study_date_to=dt.date(2020, 12, 31),
    )


@pytest.mark.parametrize("item", ["colour=blue", "site", "site=a"])
def test_key_value_filters_refuse_unknown_keys_and_repeats(item: str) -> None:
    with pytest.raises(CoordinatorError) as caught:
        search.parse_filters(["site=st-marys", item] if item == "site=a" else [item])

    assert caught.value.code == "invalid_filter"


# -- statistics -------------------------------------------------------------------------


@pytest.fixture
def counted(db: Database) -> Database:
    """Site a: 6 exams, b: 3, c: 1 (+1 withdrawn); CT 6 (one CT\\SR), CR 4; labels."""
    specs = []
    for n, site in enumerate(["a"] * 6 + ["b"] * 3 + ["c"] * 2, start=1):
        modalities = ["CT"] if n <= 5 else (["CT", "SR"] if n == 6 else ["CR"])
        specs.append(
            ExamSpec(
                number=n,
                site=site,
                pseudonym=f"P{n}",
                series=[SeriesSpec(m) for m in modalities],
                labels={("cxr", "appearance"): "typical" if n <= 7 else "atypical"},
            )
        )
    register(db, specs)
    site_c = ensure_sites(db, ["c"])["c"]
    releases.withdraw(db, site_c, specs[-1].study_uid, "consent withdrawn", "site:c")
    return db


def _shown(table: Any) -> dict[str, str]:
    return {row.key: row.display for row in table.rows}


def test_researchers_see_counts_under_k_as_less_than_k(counted: Database) -> None:
    by_site = search.stats(counted, "site", k=5)
    by_modality = search.stats(counted, "modality", k=5)
    by_label = search.stats(counted, "label", k=5)

    assert _shown(by_site) == {"a": "6", "b": "<5", "c": "<5"}
    assert [row.count for row in by_site.rows] == [6, None, None]
    assert _shown(by_modality) == {"CT": "6", "CR": "<5", "SR": "<5"}
    assert _shown(by_label) == {"cxr:appearance=atypical": "<5", "cxr:appearance=typical": "7"}
    assert by_site.k == 5 and by_site.dimension == "site"


def test_operators_see_exact_counts(counted: Database) -> None:
    by_site = search.stats(counted, "site", k=5, exact=True)
    by_modality = search.stats(counted, "modality", k=5, exact=True)

    assert _shown(by_site) == {"a": "6", "b": "3", "c": "1"}  # c's withdrawn exam not counted
    assert [row.count for row in by_site.rows] == [6, 3, 1]
    assert _shown(by_modality) == {"CT": "6", "CR": "4", "SR": "1"}


@pytest.mark.parametrize(("k", "b"), [(1, "3"), (3, "3"), (4, "<4"), (10, "<10")])
def test_k_is_configurable(counted: Database, k: int, b: str) -> None:
    assert _shown(search.stats(counted, "site", k=k))["b"] == b


def test_one_label_is_counted_by_value(counted: Database) -> None:
    table = search.stats(counted, "label", k=2, label="cxr:appearance")

    assert table.dimension == "label:cxr:appearance"
    assert _shown(table) == {"atypical": "3", "typical": "7"}


@pytest.mark.parametrize(
    ("dimension", "label", "code"),
    [
        ("colour", None, "unknown_dimension"),
        ("site", "cxr:appearance", "invalid_filter"),
        ("label", "no-colon", "invalid_filter"),
    ],
)
def test_bad_statistics_requests_are_refused(
    db: Database, dimension: str, label: str | None, code: str
) -> None:
    with pytest.raises(CoordinatorError) as caught:
        search.stats(db, dimension, k=5, label=label)

    assert caught.value.code == code
