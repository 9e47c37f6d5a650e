#!/usr/bin/env python3
"""Benchmarks of the node: ingest, C-STORE receive, index search. Tables, not pass/fail.

1. Ingest (read + de-identify + index) of a generated corpus (default 5,000 CT
   512×512), next to ``radfed node deid`` (de-identification only) of the same
   files in the same run: target ≥ 80% of the de-identification rate, memory flat.
2. C-STORE over loopback: one pynetdicom association sending N instances to
   ``radfed node serve``, next to a plain pynetdicom storage SCP that only writes
   the files it receives (the floor): target ≥ 70% of the floor's rate.
3. Index search on 1,000,000 instance rows generated straight into a node
   index: filtered, paginated queries; target p95 < 50 ms.

    .venv/bin/python bench/node_intake.py [--instances 5000] [--cstore 500] [--rows 1000000]
                                   [--only ingest,cstore,search] [--workdir bench/work]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
from _tree import timed_tree
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from radfed.synth.site import Uids, ct_series, make_patient, write

BENCH = Path(__file__).resolve().parent
RADFED = str(Path(sysconfig.get_path("scripts")) / "radfed")
SLICES = 250


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- corpus -------------------------------------------------------------------------------


def corpus(workdir: Path, count: int, size: int = 512) -> Path:
    folder = workdir / f"node-corpus-{count}-{size}"
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng, nprng, uids = random.Random(count), np.random.default_rng(count), Uids(count)
    written, patient = 0, 0
    while written < count:
        p = make_patient(rng, patient)
        n = min(SLICES, count - written)
        series = ct_series(
            p,
            uids,
            uids.new(),
            dt.datetime(2020, 4, 1) + dt.timedelta(days=patient),
            f"ACC{patient:05d}",
            n,
            size,
            nprng,
        )
        for i, ds in enumerate(series):
            write(ds, folder / f"p{patient:03d}" / f"{i:04d}.dcm")
        written += n
        patient += 1
    (folder / ".complete").write_text("ok\n")
    return folder


def warm(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*.dcm"):
        total += len(path.read_bytes())
    return total


# -- 1. ingest ----------------------------------------------------------------------------


def bench_ingest(workdir: Path, count: int) -> list[str]:
    src = corpus(workdir, count)
    size = warm(src)
    rows = []
    results: dict[str, list[tuple[float, float]]] = {"deid": [], "ingest": []}
    for _ in range(2):
        for kind in ("deid", "ingest"):
            scratch = workdir / "node-run"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            os.sync()
            argv = (
                [
                    RADFED,
                    "node",
                    "deid",
                    str(src),
                    str(scratch / "out"),
                    "-q",
                    "--home",
                    str(scratch / "home"),
                ]
                if kind == "deid"
                else [
                    RADFED,
                    "node",
                    "ingest",
                    str(src),
                    "-q",
                    "--no-vet",
                    "--home",
                    str(scratch / "home"),
                ]
            )
            results[kind].append(timed_tree(argv))
            shutil.rmtree(scratch, ignore_errors=True)
    rate = {}
    for kind in ("deid", "ingest"):
        seconds = statistics.median(s for s, _ in results[kind])
        rss = max(r for _, r in results[kind])
        rate[kind] = count / seconds
        rows.append(
            f"| {kind} | {count} | {seconds:.1f} | {count / seconds:.0f} | "
            f"{size / 1e6 / seconds:.0f} | {rss:.0f} |"
        )
    ratio = rate["ingest"] / rate["deid"]
    return [
        f"Corpus: {count} CT 512×512 (16-bit, {size / 1e6:.0f} MB), all cores; median of 2.",
        "",
        "| run | files | seconds | files/s | MB/s | peak RSS MiB (largest process) |",
        "|-----|------:|--------:|--------:|-----:|-------------------------------:|",
        *rows,
        "",
        f"Ingest / de-identification only: **{ratio:.0%}** (target ≥ 80%: "
        f"{'met' if ratio >= 0.8 else 'NOT met'})",
    ]


# -- 2. C-STORE -----------------------------------------------------------------------------

PLAIN_SCP = textwrap.dedent(
    """
    import os, sys
    from pynetdicom import AE, evt, AllStoragePresentationContexts
    out = sys.argv[2]
    def store(event):
        path = os.path.join(out, event.request.AffectedSOPInstanceUID + ".dcm")
        with open(path, "wb") as fh:
            fh.write(event.encoded_dataset())
        return 0x0000
    ae = AE(ae_title="PLAIN")
    ae.maximum_pdu_size = 0
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax)
    print("ready", flush=True)
    ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True,
                    evt_handlers=[(evt.EVT_C_STORE, store)])
    """
)


def send(port: int, called: str, datasets: list[pydicom.Dataset]) -> float:
    ae = AE(ae_title="BENCH")
    ae.maximum_pdu_size = 0
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"association with {called} failed")
    started = time.perf_counter()
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    seconds = time.perf_counter() - started
    assoc.release()
    if set(statuses) != {0}:
        raise RuntimeError(f"{called}: statuses {set(statuses)}")
    return seconds


def wait_for(check: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start")


def bench_cstore(workdir: Path, count: int) -> list[str]:
    src = corpus(workdir, max(count, 500))
    files = sorted(src.rglob("*.dcm"))[:count]
    datasets = [pydicom.dcmread(p) for p in files]
    size = sum(p.stat().st_size for p in files)
    results: dict[str, list[float]] = {"plain SCP (writes files)": [], "radfed node serve": []}
    drained: list[float] = []
    for _ in range(2):
        scratch = workdir / "cstore-run"
        shutil.rmtree(scratch, ignore_errors=True)
        (scratch / "plain").mkdir(parents=True)
        port = free_port()
        plain = subprocess.Popen(
            [sys.executable, "-c", PLAIN_SCP, str(port), str(scratch / "plain")],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert plain.stdout is not None
            plain.stdout.readline()
            time.sleep(0.5)
            os.sync()
            results["plain SCP (writes files)"].append(send(port, "PLAIN", datasets))
        finally:
            plain.terminate()
            plain.wait(30)
        api, dicom = free_port(), free_port()
        node = subprocess.Popen(
            [
                RADFED,
                "node",
                "serve",
                "--home",
                str(scratch / "home"),
                "--api-port",
                str(api),
                "--dicom-port",
                str(dicom),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        health = f"http://127.0.0.1:{api}/healthz"
        try:
            wait_for(lambda url=health: httpx.get(url, timeout=1).is_success, "radfed node serve")
            os.sync()
            started = time.perf_counter()
            results["radfed node serve"].append(send(dicom, "RADFED", datasets))
            while httpx.get(health, timeout=10).json()["pending_instances"]:
                time.sleep(0.05)
            drained.append(time.perf_counter() - started)
        finally:
            node.terminate()
            node.wait(60)
        shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    rate = {}
    for name, runs in results.items():
        seconds = statistics.median(runs)
        rate[name] = count / seconds
        rows.append(
            f"| {name} | {count} | {seconds:.2f} | {count / seconds:.0f} | "
            f"{size / 1e6 / seconds:.0f} |"
        )
    ratio = rate["radfed node serve"] / rate["plain SCP (writes files)"]
    taken_in = statistics.median(drained)
    return [
        f"{count} CT 512×512 over one association on 127.0.0.1 (max PDU unlimited); "
        "median of 2. The node checks each instance with its de-identification engine, "
        "spools it and fsyncs it before acknowledging; the plain SCP writes without syncing.",
        "",
        "| receiver | instances | seconds | instances/s | MB/s |",
        "|----------|----------:|--------:|------------:|-----:|",
        *rows,
        "",
        f"Node / plain SCP: **{ratio:.0%}** (target ≥ 70%: {'met' if ratio >= 0.7 else 'NOT met'})",
        "",
        f"Every instance is acknowledged once checked, spooled and fsynced; all {count} were "
        f"also de-identified, stored and indexed {taken_in:.2f} s after the first was sent "
        f"({count / taken_in:.0f} instances/s end to end).",
    ]


# -- 3. search ------------------------------------------------------------------------------


def fill_index(home: Path, rows: int) -> None:
    """``rows`` instances in ~rows/100 studies, straight into a migrated node index."""
    from node.settings import load_settings
    from node.site import open_index

    marker = home / f".filled-{rows}-v2"
    if marker.exists():
        return
    shutil.rmtree(home, ignore_errors=True)
    index = open_index(load_settings(home))
    index.db.close()
    rng = random.Random(rows)
    modalities = [
        ("CT", "CHEST", 512, 0.7, 1.25),
        ("CT", "ABDOMEN", 512, 0.8, 2.5),
        ("CR", "CHEST", 2048, 0.15, None),
        ("DX", "CHEST", 3000, 0.14, None),
        ("MR", "HEAD", 256, 0.9, 5.0),
        ("US", "ABDOMEN", 600, None, None),
    ]
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(" ")
    db = sqlite3.connect(home / "index.sqlite")
    db.execute("PRAGMA synchronous=OFF")
    study_id = series_id = instance_id = 0
    patients = max(rows // 400, 1)
    db.executemany(
        "INSERT INTO patients (id, pseudonym, created_at) VALUES (?, ?, ?)",
        [(i + 1, f"SITE-P{i:08d}", now) for i in range(patients)],
    )
    while instance_id < rows:
        study_id += 1
        date = (dt.date(2010, 1, 1) + dt.timedelta(days=rng.randrange(0, 4000))).isoformat()
        status = rng.choice(["deidentified", "held", "approved", "shared", "rejected"])
        series_in_study = rng.choice([1, 2, 3])
        study_instances = 0
        study_modalities = set()
        series_rows, instance_rows = [], []
        for _ in range(series_in_study):
            series_id += 1
            modality, body, matrix, spacing, thickness = rng.choice(modalities)
            study_modalities.add(modality)
            n = rng.randrange(1, 200) if modality in ("CT", "MR") else rng.randrange(1, 3)
            n = min(n, rows - instance_id)
            # 2% of series are mixed (one odd instance): searches must look inside those.
            mixed = n > 1 and rng.random() < 0.02
            series_rows.append(
                (
                    series_id,
                    f"2.25.{series_id}",
                    study_id,
                    modality,
                    body,
                    "GE MEDICAL SYSTEMS",
                    "Revolution",
                    1,
                    n,
                    matrix,
                    matrix,
                    spacing,
                    thickness,
                    None,
                    "1.2.840.10008.1.2.1",
                    "MONOCHROME2",
                    modality == "US",
                    not mixed,
                )
            )
            for k in range(n):
                instance_id += 1
                odd = mixed and k == n - 1
                instance_rows.append(
                    (
                        instance_id,
                        f"2.25.9{instance_id}",
                        series_id,
                        study_id,
                        "1.2.840.10008.5.1.4.1.1.2",
                        k + 1,
                        matrix // 2 if odd else matrix,
                        matrix,
                        spacing,
                        thickness,
                        None,
                        "1.2.840.10008.1.2.1",
                        "MONOCHROME2",
                        524288,
                        "0" * 64,
                        modality == "US",
                        "[]",
                        f"p/{study_id}/{series_id}/{instance_id}.dcm",
                        "folder",
                        now,
                    )
                )
            study_instances += n
            if instance_id >= rows:
                break
        db.execute(
            "INSERT INTO studies (id, study_uid, patient_id, study_date, status, status_at, "
            "modalities, series_count, instance_count, size, burned_in_risk, received_at, "
            "updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                study_id,
                f"2.25.1{study_id}",
                rng.randrange(1, patients + 1),
                date,
                status,
                now,
                "\\".join(sorted(study_modalities)),
                len(series_rows),
                study_instances,
                study_instances * 524288,
                False,
                now,
                now,
            ),
        )
        db.executemany(
            "INSERT INTO series (id, series_uid, study_id, modality, body_part, "
            "manufacturer, model, series_number, instance_count, rows, columns, "
            "pixel_spacing, slice_thickness, number_of_frames, transfer_syntax, photometric, "
            "burned_in_risk, uniform) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            series_rows,
        )
        db.executemany(
            "INSERT INTO instances (id, sop_uid, series_id, study_id, sop_class_uid, "
            "instance_number, rows, columns, pixel_spacing, slice_thickness, number_of_frames, "
            "transfer_syntax, photometric, size, sha256, burned_in_risk, risk_reasons, path, "
            "received_via, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            instance_rows,
        )
    db.commit()
    db.execute("ANALYZE")
    db.close()
    marker.write_text("ok\n")


def bench_search(workdir: Path, rows: int, repeat: int = 200) -> list[str]:
    from node.index.store import StudyQuery
    from node.settings import load_settings
    from node.site import open_index
    from protocols.api.node import StudyStatus

    home = workdir / "search-index"
    started = time.perf_counter()
    fill_index(home, rows)
    print(f"index of {rows} instances ready ({time.perf_counter() - started:.0f} s)", flush=True)
    index = open_index(load_settings(home))
    queries = {
        "status=approved, page 1": StudyQuery(status=(StudyStatus.APPROVED,)),
        "modality=CT, body part CHEST, date range, page 3": StudyQuery(
            modality="CT",
            body_part="CHEST",
            study_date_from=dt.date(2012, 1, 1),
            study_date_to=dt.date(2016, 12, 31),
            offset=100,
        ),
        "CT, slice thickness 1-2 mm, 512 rows, by received": StudyQuery(
            modality="CT",
            slice_thickness_min=1.0,
            slice_thickness_max=2.0,
            rows=512,
            sort="received_at",
        ),
        "DX/CHEST approved, 3000 columns": StudyQuery(
            status=(StudyStatus.APPROVED,), modality="DX", body_part="CHEST", columns=3000
        ),
        "burned-in risk (US), oldest first": StudyQuery(burned_in_risk=True, order="asc"),
        "rare: MR HEAD, thickness ≥ 4 mm, 2019": StudyQuery(
            modality="MR", slice_thickness_min=4.0, study_date_from=dt.date(2019, 1, 1)
        ),
    }
    lines = [
        "| query | total matches | p50 ms | p95 ms | p99 ms |",
        "|-------|--------------:|-------:|-------:|-------:|",
    ]
    worst = 0.0
    for name, query in queries.items():
        index.search(query)  # warm
        times = []
        total = 0
        for _ in range(repeat):
            t = time.perf_counter()
            total = index.search(query).total
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        p95 = times[int(len(times) * 0.95) - 1]
        worst = max(worst, p95)
        lines.append(
            f"| {name} | {total} | {times[len(times) // 2]:.1f} | {p95:.1f} | "
            f"{times[int(len(times) * 0.99) - 1]:.1f} |"
        )
    return [
        f"{rows} instance rows; each query {repeat} times through NodeIndex.search (count + "
        "one page of 50, as the API runs it).",
        "",
        *lines,
        "",
        f"Worst p95: **{worst:.1f} ms** (target < 50 ms: {'met' if worst < 50 else 'NOT met'})",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--cstore", type=int, default=500)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--only", default="ingest,cstore,search")
    parser.add_argument("--workdir", type=Path, default=BENCH / "work")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sections = {
        "ingest": (
            "Ingest vs de-identification only",
            lambda: bench_ingest(args.workdir, args.instances),
        ),
        "cstore": ("C-STORE receive rate", lambda: bench_cstore(args.workdir, args.cstore)),
        "search": ("Index search", lambda: bench_search(args.workdir, args.rows)),
    }
    report = [
        f"Machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
    ]
    for key in args.only.split(","):
        title, run = sections[key]
        print(f"== {title}", flush=True)
        lines = run()
        print("\n".join(lines), flush=True)
        report += [f"### {title}", "", *lines, ""]
    out = args.workdir / "node-results.md"
    out.write_text("\n".join(report))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
