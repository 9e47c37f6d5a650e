#!/usr/bin/env python3
"""Registry search on 1,000,000 instances, SQLite and PostgreSQL: a table, not pass/fail.

Builds a registry of 20,000 exams × 50 instances (1,000,000 instance rows) over
10 sites of uneven size, with series, labels, clinical values, a realistic
manifest per exam and 1% of exams withdrawn, bulk-loaded straight into the
migrated tables (``executemany`` on SQLite, ``COPY`` on PostgreSQL). Then it
times a representative set of queries through ``coordinator.registry.search``
as the API runs them (a count and one page of 50; each filter alone and
combined, deep offsets, an exam's detail, statistics) and prints p50/p95/p99
per query per backend against the target: p95 < 100 ms.

PostgreSQL runs in a fresh schema of ``RADFED_TEST_PG_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``), dropped afterwards. The SQLite
registry is written to ``--workdir`` and removed afterwards. SQLite is
measured as the coordinator leaves it (no ``ANALYZE``); PostgreSQL after an
``ANALYZE``, which autovacuum would run after a load like this.

    .venv/bin/python bench/coordinator_registry.py [--exams 20000] [--instances 50]
        [--sites 10] [--repeat 60] [--backends sqlite,postgresql] [--workdir bench/work]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import random
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from coordinator.registry import search
from coordinator.registry.db import Database
from protocols.api.coordinator import ExamFilters, ExamSort, SortOrder
from protocols.deid.options import DeidOptions
from protocols.version import DEID_PROFILE_VERSION, PROTOCOL_VERSION

BENCH = Path(__file__).resolve().parent
PG_DSN = os.environ.get("RADFED_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TARGET_MS = 100.0
ROOT = "1.2.826.0.1.3680043.9.8"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
#: (modalities, weight)
MODALITIES = [
    (["CT"], 35),
    (["CR"], 25),
    (["DX"], 20),
    (["MR"], 10),
    (["CT", "SR"], 5),
    (["CR", "DX"], 3),
    (["US"], 2),
]
BODY_PARTS = [("CHEST", 60), ("HEAD", 15), ("ABDOMEN", 15), (None, 10)]
APPEARANCE = ["typical", "indeterminate", "atypical", "negative"]
DEID = {"profile_version": DEID_PROFILE_VERSION, "options": DeidOptions().model_dump()}
BATCH = 500


def _pick(rng: random.Random, table: list[tuple[Any, int]]) -> Any:
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


# -- the registry ---------------------------------------------------------------------------


class Rows:
    """One batch of rows for each table, as tuples in the tables' column order."""

    def __init__(self) -> None:
        self.exams: list[tuple[Any, ...]] = []
        self.series: list[tuple[Any, ...]] = []
        self.instances: list[tuple[Any, ...]] = []
        self.labels: list[tuple[Any, ...]] = []
        self.clinical: list[tuple[Any, ...]] = []


COLUMNS = {
    "exams": (
        "id, site_id, study_uid, patient_pseudonym, study_date, modality, body_part, "
        "series_count, instance_count, size, manifest_sha256, manifest, deid_profile, "
        "registered_at, withdrawn_at, withdrawn_reason"
    ),
    "series": "id, exam_id, series_uid, modality, body_part, series_number, instance_count",
    "instances": "id, exam_id, series_id, sop_uid, sop_class_uid, size, sha256",
    "labels": "id, exam_id, scheme, name, value",
    "clinical_values": "id, exam_id, variable, value",
}


def generate(exams: int, per_exam: int, sites: int, seed: int = 7) -> Iterator[Rows]:
    """The registry's rows, ``BATCH`` exams at a time (the same for the same arguments)."""
    rng = random.Random(seed)
    # Uneven sites: a few large hospitals, a long tail of small ones.
    site_weights = [1 / (i + 1) for i in range(sites)]
    registered = dt.datetime(2026, 1, 1)
    order = list(range(exams))
    rng.shuffle(order)  # registration order differs from study-date order
    series_id = instance_id = label_id = clinical_id = 0
    rows = Rows()
    for n in range(exams):
        exam_id = n + 1
        site = rng.choices(range(1, sites + 1), weights=site_weights)[0]
        modalities = _pick(rng, MODALITIES)
        body_part = _pick(rng, BODY_PARTS)
        date = (
            None
            if rng.random() < 0.02
            else dt.date(2015, 1, 1) + dt.timedelta(days=rng.randrange(3650))
        )
        pseudonym = f"SITE{site:02d}-P{rng.randrange(exams // 2):08d}"
        study_uid = f"{ROOT}.1.{exam_id}"
        n_series = rng.randint(len(modalities), 4)
        counts = [per_exam // n_series] * n_series
        counts[0] += per_exam - sum(counts)
        series_json = []
        size_total = 0
        for s, count in enumerate(counts):
            series_id += 1
            modality = modalities[s % len(modalities)]
            series_uid = f"{ROOT}.2.{exam_id}.{s + 1}"
            rows.series.append((series_id, exam_id, series_uid, modality, body_part, s + 1, count))
            instances_json = []
            for i in range(count):
                instance_id += 1
                sop = f"{ROOT}.3.{exam_id}.{s + 1}.{i + 1}"
                size = rng.randrange(100_000, 600_000)
                sha = secrets.token_hex(32)
                size_total += size
                rows.instances.append((instance_id, exam_id, series_id, sop, CT_IMAGE, size, sha))
                instances_json.append(
                    {
                        "sop_instance_uid": sop,
                        "sop_class_uid": CT_IMAGE,
                        "size": size,
                        "sha256": sha,
                    }
                )
            series_json.append(
                {
                    "series_instance_uid": series_uid,
                    "modality": modality,
                    "body_part": body_part,
                    "series_number": s + 1,
                    "instances": instances_json,
                }
            )
        labels = {("ricord", "covid"): rng.choice(["positive", "negative"])}
        if rng.random() < 0.8:
            labels[("cxr", "appearance")] = rng.choice(APPEARANCE)
        if "CT" in modalities:
            labels[("ct", "severity")] = rng.choice(["mild", "moderate", "severe"])
        clinical = {
            "sex": rng.choice(["F", "M"]),
            "age_group": f"{rng.randrange(2, 9) * 10}s",
            "icu": rng.choice(["yes", "no", "no", "no"]),
            "outcome": rng.choice(["discharged", "discharged", "deceased", "unknown"]),
        }
        for (scheme, name), value in labels.items():
            label_id += 1
            rows.labels.append((label_id, exam_id, scheme, name, value))
        for variable, value in clinical.items():
            clinical_id += 1
            rows.clinical.append((clinical_id, exam_id, variable, value))
        manifest = json.dumps(
            {
                "protocol_version": PROTOCOL_VERSION,
                "site": f"site-{site:02d}",
                "exam": {
                    "pseudonym": pseudonym,
                    "study_instance_uid": study_uid,
                    "study_date": date.isoformat() if date else None,
                    "modalities": modalities,
                    "body_part": body_part,
                    "series": series_json,
                },
                "deid": DEID,
                "labels": [
                    {"scheme": s, "name": k, "value": v} for (s, k), v in sorted(labels.items())
                ],
                "clinical": clinical,
                "created_at": "2026-01-01T00:00:00Z",
            },
            separators=(",", ":"),
        )
        at = registered + dt.timedelta(seconds=order[n] * 30)
        withdrawn = at + dt.timedelta(days=30) if rng.random() < 0.01 else None
        rows.exams.append(
            (
                exam_id,
                site,
                study_uid,
                pseudonym,
                date,
                "\\".join(modalities),
                body_part,
                n_series,
                per_exam,
                size_total,
                secrets.token_hex(32),
                manifest,
                DEID_PROFILE_VERSION,
                at,
                withdrawn,
                "consent withdrawn" if withdrawn else None,
            )
        )
        if len(rows.exams) == BATCH:
            yield rows
            rows = Rows()
    if rows.exams:
        yield rows


def _sqlite_value(value: Any) -> Any:
    # SQLAlchemy's SQLite DateTime storage format, so the ORM reads these rows back.
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def load(db: Database, exams: int, per_exam: int, sites: int) -> float:
    """Bulk-load the registry; returns the seconds it took."""
    started = time.perf_counter()
    raw = db.writer.raw_connection()
    try:
        cursor = raw.cursor()
        site_rows = [
            (i, f"site-{i:02d}", "2026-01-01 00:00:00.000000", "{}") for i in range(1, sites + 1)
        ]
        if db.dialect == "sqlite":
            cursor.execute("BEGIN")
            cursor.executemany(
                "INSERT INTO sites (id, name, created_at, counts) VALUES (?, ?, ?, ?)", site_rows
            )
        else:
            cursor.executemany(
                "INSERT INTO sites (id, name, created_at, counts) VALUES (%s, %s, %s, %s)",
                site_rows,
            )
        for rows in generate(exams, per_exam, sites):
            for table, batch in (
                ("exams", rows.exams),
                ("series", rows.series),
                ("instances", rows.instances),
                ("labels", rows.labels),
                ("clinical_values", rows.clinical),
            ):
                columns = COLUMNS[table]
                if db.dialect == "sqlite":
                    marks = ", ".join("?" * len(batch[0]))
                    cursor.executemany(
                        f"INSERT INTO {table} ({columns}) VALUES ({marks})",
                        [tuple(_sqlite_value(v) for v in row) for row in batch],
                    )
                else:
                    with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                        for row in batch:
                            copy.write_row(row)
        if db.dialect == "postgresql":
            for table in ("sites", *COLUMNS):
                cursor.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )
        raw.commit()
        cursor.close()
        if db.dialect == "postgresql":
            driver = raw.driver_connection
            driver.autocommit = True
            driver.execute("VACUUM ANALYZE")
    finally:
        raw.close()
    return time.perf_counter() - started


# -- the queries ----------------------------------------------------------------------------


def queries(db: Database, exams: int) -> dict[str, Callable[[], int]]:
    """Name -> a call returning how many exams it matched (or rows it returned)."""
    rng = random.Random(11)

    def find(filters: ExamFilters, **options: Any) -> Callable[[], int]:
        return lambda: search.search(db, filters, **options).total

    def detail() -> int:
        uid = f"{ROOT}.1.{rng.randrange(1, exams + 1)}"
        return search.detail(db, uid).instance_count

    def stats(dimension: str, **options: Any) -> Callable[[], int]:
        return lambda: len(search.stats(db, dimension, k=5, **options).rows)

    deep = max(exams - 1000, 0)
    return {
        "everything, newest study first, page 1": find(ExamFilters()),
        "site (a large one)": find(ExamFilters(site="site-01")),
        "site (a small one)": find(ExamFilters(site="site-10")),
        "modality CT (incl. CT\\SR)": find(ExamFilters(modality="CT")),
        "modality SR (rare)": find(ExamFilters(modality="SR")),
        "body part HEAD": find(ExamFilters(body_part="HEAD")),
        "label cxr:appearance=typical": find(ExamFilters(labels=["cxr:appearance=typical"])),
        "two labels": find(ExamFilters(labels=["ricord:covid=positive", "ct:severity=severe"])),
        "clinical icu=yes": find(ExamFilters(clinical=["icu=yes"])),
        "study dates, one year": find(
            ExamFilters(study_date_from=dt.date(2019, 1, 1), study_date_to=dt.date(2019, 12, 31))
        ),
        "combined: site, CT, CHEST, label, clinical, dates": find(
            ExamFilters(
                site="site-02",
                modality="CT",
                body_part="CHEST",
                labels=["ricord:covid=positive"],
                clinical=["sex=F"],
                study_date_from=dt.date(2016, 1, 1),
                study_date_to=dt.date(2022, 12, 31),
            )
        ),
        f"deep offset {deep}, by study date": find(ExamFilters(), offset=deep),
        "deep offset 5000, CR, by study date": find(ExamFilters(modality="CR"), offset=5000),
        "deep offset 5000, CR, by registration asc": find(
            ExamFilters(modality="CR"),
            sort=ExamSort.REGISTERED_AT,
            order=SortOrder.ASC,
            offset=5000,
        ),
        "page of 500, withdrawn included": find(ExamFilters(), include_withdrawn=True, limit=500),
        "exam detail (50 instances)": detail,
        "stats by site": stats("site"),
        "stats by modality": stats("modality"),
        "stats by label (all)": stats("label"),
        "stats by label cxr:appearance": stats("label", label="cxr:appearance"),
    }


def measure(call: Callable[[], int], repeat: int) -> tuple[int, list[float]]:
    for _ in range(3):  # warm the caches and the connection pool
        result = call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - started) * 1000)
    return result, sorted(times)


def percentile(times: list[float], p: float) -> float:
    return times[min(len(times) - 1, max(0, round(p * len(times)) - 1))]


# -- backends -------------------------------------------------------------------------------


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql)


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, tuple[int, list[float]]]:
    schema = f"bench_registry_{secrets.token_hex(4)}"
    folder = args.workdir / f"registry-{secrets.token_hex(4)}"
    if backend == "sqlite":
        folder.mkdir(parents=True)
        url = f"sqlite:///{folder / 'registry.sqlite'}"
    else:
        pg_admin(f"CREATE SCHEMA {schema}")
        url = f"{PG_DSN}?options=-csearch_path%3D{schema}"
    try:
        db = Database.open(url)
        try:
            seconds = load(db, args.exams, args.instances, args.sites)
            print(
                f"{backend}: {args.exams} exams, {args.exams * args.instances} instances "
                f"loaded in {seconds:.0f} s",
                flush=True,
            )
            results = {}
            for name, call in queries(db, args.exams).items():
                results[name] = measure(call, args.repeat)
                times = results[name][1]
                print(
                    f"  {name}: p50 {statistics.median(times):.1f} ms, "
                    f"p95 {percentile(times, 0.95):.1f} ms",
                    flush=True,
                )
            return results
        finally:
            db.close()
    finally:
        if backend == "sqlite":
            shutil.rmtree(folder, ignore_errors=True)
        else:
            pg_admin(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def table(results: dict[str, dict[str, tuple[int, list[float]]]]) -> list[str]:
    backends = list(results)
    names = list(next(iter(results.values())))
    head = "| query | matches |" + "".join(
        f" {b} p50 ms | {b} p95 ms | {b} p99 ms |" for b in backends
    )
    lines = [head, "|" + "---|" * (2 + 3 * len(backends))]
    for name in names:
        cells = [name.replace("|", "\\|"), str(results[backends[0]][name][0])]
        for b in backends:
            times = results[b][name][1]
            cells += [
                f"{statistics.median(times):.1f}",
                f"{percentile(times, 0.95):.1f}",
                f"{percentile(times, 0.99):.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for b in backends:
        worst_name, (_, worst_times) = max(
            results[b].items(), key=lambda item: percentile(item[1][1], 0.95)
        )
        worst = percentile(worst_times, 0.95)
        verdict = "met" if worst < TARGET_MS else "NOT met"
        lines.append(
            f"{b}: worst p95 **{worst:.1f} ms** ({worst_name}); "
            f"target < {TARGET_MS:.0f} ms: {verdict}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--exams", type=int, default=20_000)
    parser.add_argument("--instances", type=int, default=50, help="per exam")
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=60)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--workdir", type=Path, default=BENCH / "work")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {backend: run_backend(backend, args) for backend in args.backends.split(",")}
    out = io.StringIO()
    print(
        f"Machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {args.exams} exams × {args.instances} "
        f"instances over {args.sites} sites; each query {args.repeat} times "
        "(count + one page of 50 unless said)",
        file=out,
    )
    print("", file=out)
    print("\n".join(table(results)), file=out)
    print(out.getvalue(), flush=True)


if __name__ == "__main__":
    main()
