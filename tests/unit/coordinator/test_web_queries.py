"""The registry reads the coordinator's web UI added, on SQLite and PostgreSQL: contributions
per day and site, one instance's object, a page of the audit log, runs counted, exports found."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections import Counter

import pytest
from sqlalchemy import select

from coordinator import audit, releases, training
from coordinator.errors import CoordinatorError
from coordinator.registry import search
from coordinator.registry.db import Database
from coordinator.registry.models import Exam
from coordinator.settings import CoordinatorSettings
from protocols.api.coordinator import ExamFilters
from tests.unit.coordinator.registry_data import REGISTERED, generate, register


def test_contributions_count_exams_per_day_and_site_without_the_withdrawn(db: Database) -> None:
    # Prepare: 12 exams over three days; one withdrawn.
    specs = [
        dataclasses.replace(s, registered_at=REGISTERED + dt.timedelta(days=s.number % 3, hours=5))
        for s in generate(12)
    ]
    register(db, specs)
    gone = specs[0]
    with db.write() as session:
        exam = session.scalar(select(Exam).where(Exam.study_uid == gone.study_uid))
        assert exam is not None
        exam.withdrawn_at = REGISTERED
    expected = Counter(
        (s.registered_at.date(), s.site) for s in specs if s.study_uid != gone.study_uid
    )

    # Execute
    by_site = search.contributions(db)
    total = search.contributions(db, by_site=False)

    # Assert
    assert {(day, site): n for day, site, n in by_site} == dict(expected)
    assert by_site == sorted(by_site)
    days = Counter[dt.date]()
    for (day, _), n in expected.items():
        days[day] += n
    assert total == [(day, "", days[day]) for day in sorted(days)]


def test_an_instance_object_is_found_only_in_its_own_exam(db: Database) -> None:
    first, second = generate(2)
    register(db, [first, second])
    _, sop, _, data = first.files()[0]

    found = search.instance_object(db, first.study_uid, sop)

    assert found == hashlib.sha256(data).hexdigest()
    with pytest.raises(CoordinatorError) as elsewhere:
        search.instance_object(db, second.study_uid, sop)
    assert elsewhere.value.code == "instance_not_found"


def test_a_page_of_the_audit_log_is_newest_first_and_filters_by_action(db: Database) -> None:
    # Prepare
    with db.write() as session:
        for n in range(5):
            audit.append(session, "olga", "site.add" if n % 2 else "login", f"s{n}")
        audit.append(session, "olga", "site%odd", "x")  # a LIKE wildcard is a plain character

    # Execute
    with db.read() as session:
        total, page = audit.entries(session, limit=2, offset=1)
        sites_total, sites = audit.entries(session, action="site.")
        wild_total, _ = audit.entries(session, action="site%")

    # Assert
    assert total == 6 and [e.seq for e in page] == [5, 4]
    assert sites_total == 2 and {e.action for e in sites} == {"site.add"}
    assert wild_total == 1
    assert page[0].details == {} and len(page[0].hash) == 64
    with db.read() as session, pytest.raises(CoordinatorError, match='"limit"'):
        audit.entries(session, limit=0)


def test_runs_are_counted_and_an_export_is_found_where_it_was_written(
    db: Database, settings: CoordinatorSettings
) -> None:
    register(db, generate(3), settings.store())

    releases.create(db, settings.store(), settings, "v1", ExamFilters(), "olga", export=False)
    before = releases.exported(settings, "v1")
    releases.export(db, settings.store(), settings, "v1")

    assert training.count_runs(db) == 0
    assert before is None
    assert releases.exported(settings, "v1") == settings.releases_dir / "v1"
