"""The registry answer cache: bounded, one generation at a time, never older than the registry.

The generation is bumped by database triggers (migration 0004) on SQLite and
PostgreSQL alike: every kind of write to what registry reads return counts,
whatever writes it; heartbeats and rolled-back writes do not. Through the API:
a repeated search is answered from the cache, and a registration, a
withdrawal or a write from another connection is seen by the next request.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import delete, inspect, select, text, update

from coordinator import releases, tokens
from coordinator.api.app import create_app
from coordinator.registry.cache import ResponseCache, generation
from coordinator.registry.db import Database
from coordinator.registry.models import (
    Exam,
    ExamClinical,
    ExamInstance,
    ExamLabel,
    ExamSeries,
    Site,
)
from coordinator.settings import CoordinatorSettings
from tests.unit.coordinator.registry_data import generate, register

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

# -- the cache itself ----------------------------------------------------------------------


def test_an_answer_is_served_only_at_the_generation_it_was_kept_under() -> None:
    cache = ResponseCache(1 << 20)

    cache.put(7, "q", b"seven")
    same = cache.get(7, "q")
    newer = cache.get(8, "q")
    back = cache.get(7, "q")

    assert same == b"seven"
    assert newer is None  # another generation empties the cache ...
    assert back is None  # ... so the old answer is gone for good
    assert (cache.hits, cache.misses) == (1, 2)
    assert cache.size == (0, 0)


def test_a_late_answer_from_an_older_generation_replaces_the_newer_ones() -> None:
    # A request that read generation 4 just before a write finishes after one that
    # read 5: holding its answer drops generation 5's (a miss later, never a wrong hit).
    cache = ResponseCache(1 << 20)
    cache.put(5, "a", b"new")

    cache.put(4, "b", b"old")

    assert cache.get(5, "a") is None
    assert cache.get(5, "b") is None


def test_least_recently_used_answers_go_first_and_large_ones_are_not_kept() -> None:
    cache = ResponseCache(1600)  # answers up to 100 bytes are kept
    for n in range(16):
        cache.put(1, n, bytes(100))
    assert cache.get(1, 0) == bytes(100)  # 0 is now the most recently used

    cache.put(1, "x", bytes(100))  # over the bound by one answer: the oldest unused goes
    cache.put(1, "big", bytes(101))

    assert cache.get(1, 1) is None
    assert cache.get(1, 0) is not None and cache.get(1, "x") is not None
    assert cache.get(1, "big") is None
    assert cache.size == (16, 1600)


def test_a_zero_bound_keeps_nothing_and_a_negative_one_is_refused() -> None:
    cache = ResponseCache(0)
    cache.put(1, "q", b"")

    assert not cache.enabled
    assert cache.size == (0, 0)
    with pytest.raises(ValueError, match='"max_bytes"'):
        ResponseCache(-1)


# -- the generation triggers ---------------------------------------------------------------

WATCHED = ("exams", "series", "instances", "labels", "clinical_values", "sites")


def test_every_watched_table_has_its_triggers_at_head(db: Database) -> None:
    with db.writer.connect() as connection:
        if db.dialect == "sqlite":
            rows = connection.execute(
                text(
                    "SELECT tbl_name FROM sqlite_master WHERE type = 'trigger' "
                    "AND name LIKE 'registry_generation%'"
                )
            )
            per_table = {t: 0 for t in WATCHED}
            for (table,) in rows:
                per_table[table] = per_table.get(table, 0) + 1
            assert per_table == {t: 3 for t in WATCHED}  # insert, update, delete
        else:
            rows = connection.execute(
                text(
                    "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                    "WHERE NOT t.tgisinternal AND t.tgname LIKE 'registry_generation%' "
                    "AND c.relnamespace = "
                    "(SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
                )
            )
            assert sorted(r[0] for r in rows) == sorted(WATCHED)
    assert "registry_generation" in inspect(db.writer).get_table_names()


@pytest.fixture
def registered(db: Database) -> Database:
    register(db, generate(3))
    return db


def generation_now(db: Database) -> int:
    with db.reader.connect() as connection:
        return generation(connection)


def _bumps(db: Database, write: str) -> int:
    """How much the generation moved over one write transaction."""
    before = generation_now(db)
    with db.write() as session:
        exam = session.scalars(select(Exam).order_by(Exam.id)).first()
        assert exam is not None
        if write == "exam update":
            session.execute(update(Exam).where(Exam.id == exam.id).values(body_part="KNEE"))
        elif write == "withdrawal":
            exam.withdrawn_at = dt.datetime.now(dt.UTC)
        elif write == "label insert":
            session.add(ExamLabel(exam_id=exam.id, scheme="x", name="y", value="z"))
        elif write == "label delete":
            session.execute(delete(ExamLabel).where(ExamLabel.exam_id == exam.id))
        elif write == "clinical update":
            session.execute(
                update(ExamClinical).where(ExamClinical.exam_id == exam.id).values(value="?")
            )
        elif write == "instance delete":
            session.execute(delete(ExamInstance).where(ExamInstance.exam_id == exam.id))
        elif write == "series update":
            session.execute(
                update(ExamSeries).where(ExamSeries.exam_id == exam.id).values(modality="MR")
            )
        elif write == "site rename":
            session.execute(update(Site).where(Site.id == exam.site_id).values(name="renamed"))
        elif write == "new site":
            session.add(Site(name="brand-new"))
        elif write == "heartbeat":
            session.execute(
                update(Site)
                .where(Site.id == exam.site_id)
                .values(last_seen=dt.datetime.now(dt.UTC), counts='{"shared": 1}')
            )
        else:
            raise AssertionError(write)
    return generation_now(db) - before


@pytest.mark.parametrize(
    "write",
    [
        "exam update",
        "withdrawal",
        "label insert",
        "label delete",
        "clinical update",
        "instance delete",
        "series update",
        "site rename",
        "new site",
    ],
)
def test_every_write_to_what_the_registry_answers_moves_the_generation(
    registered: Database, write: str
) -> None:
    assert _bumps(registered, write) > 0


def test_a_heartbeat_leaves_the_generation_alone(registered: Database) -> None:
    assert _bumps(registered, "heartbeat") == 0


def test_a_rolled_back_write_leaves_the_generation_alone(registered: Database) -> None:
    before = generation_now(registered)

    with pytest.raises(RuntimeError), registered.write() as session:
        session.execute(update(Exam).values(body_part="FOOT"))
        raise RuntimeError("refused half-way")

    assert generation_now(registered) == before


# -- through the API -----------------------------------------------------------------------


@dataclass
class Api:
    client: TestClient
    db: Database
    researcher: dict[str, str]
    operator: dict[str, str]


@pytest.fixture
def api(db: Database, settings: CoordinatorSettings) -> Iterator[Api]:
    register(db, generate(12))
    researcher = tokens.create(db, "rita", "researcher", actor="test")
    operator = tokens.create(db, "olga", "operator", actor="test")
    with TestClient(create_app(settings.model_copy(update={"small_count_k": 5}), db)) as client:
        yield Api(
            client,
            db,
            {"Authorization": f"Bearer {researcher}"},
            {"Authorization": f"Bearer {operator}"},
        )


def _uids(api: Api, **params: str) -> list[str]:
    answer = api.client.get("/api/v1/exams", params=params, headers=api.researcher)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    return [e["study_instance_uid"] for e in answer.json()["items"]]


def _hits(api: Api) -> float:
    text_ = api.client.get("/metrics", headers=api.operator).text
    line = next(
        x
        for x in text_.splitlines()
        if x.startswith("radfed_coordinator_registry_cache_hits_total")
    )
    return float(line.split()[-1])


def test_a_repeated_search_is_answered_from_the_cache_with_the_same_body(api: Api) -> None:
    first = api.client.get("/api/v1/exams", params={"limit": 5}, headers=api.researcher)
    hits = _hits(api)

    again = api.client.get("/api/v1/exams", params={"limit": 5}, headers=api.researcher)

    assert again.status_code == 200 and again.content == first.content
    assert _hits(api) == hits + 1
    assert len(again.json()["items"]) == 5


def test_a_withdrawal_is_seen_by_the_next_search_detail_and_statistics(api: Api) -> None:
    # Prepare: every answer asked twice, so it is held
    uids = _uids(api, limit="500")
    gone = uids[0]
    for _ in range(2):
        _uids(api, limit="500")
        api.client.get(f"/api/v1/exams/{gone}", headers=api.researcher)
        api.client.get("/api/v1/stats/site", headers=api.operator)
    with api.db.read() as session:
        site_id = session.scalar(select(Exam.site_id).where(Exam.study_uid == gone))
    assert site_id is not None

    # Execute
    releases.withdraw(api.db, site_id, gone, "patient asked", actor="site")

    # Assert
    assert gone not in _uids(api, limit="500")
    assert gone in _uids(api, limit="500", include_withdrawn="true")
    detail = api.client.get(f"/api/v1/exams/{gone}", headers=api.researcher).json()
    assert detail["withdrawn_at"] is not None
    stats = api.client.get("/api/v1/stats/site", headers=api.operator).json()
    assert sum(r["count"] for r in stats["rows"]) == len(uids) - 1


def test_a_registration_from_another_connection_is_seen_by_the_next_search(
    api: Api, registry_url: str
) -> None:
    before = _uids(api, limit="500")
    _uids(api, limit="500")  # held now

    other = Database.open(registry_url)  # as another process would write
    try:
        register(other, generate(1, start=100))
    finally:
        other.close()

    after = _uids(api, limit="500")
    assert len(after) == len(before) + 1


def test_statistics_are_kept_apart_for_operators_and_researchers(api: Api) -> None:
    operator = api.client.get("/api/v1/stats/site", headers=api.operator).json()

    researcher = api.client.get("/api/v1/stats/site", headers=api.researcher).json()

    assert all(r["count"] is not None for r in operator["rows"])
    # 12 exams over three sites: 4 each, under k = 5 — hidden from researchers
    assert {r["display"] for r in researcher["rows"]} == {"<5"}
    assert all(r["count"] is None for r in researcher["rows"])


def test_errors_are_not_kept(api: Api) -> None:
    first = api.client.get("/api/v1/exams/1.2.3.4", headers=api.researcher)
    register(api.db, generate(1, start=200))
    uid = generate(1, start=200)[0].study_uid

    missing = api.client.get("/api/v1/exams/1.2.3.4", headers=api.researcher)
    found = api.client.get(f"/api/v1/exams/{uid}", headers=api.researcher)

    assert first.status_code == missing.status_code == 404
    assert found.status_code == 200
