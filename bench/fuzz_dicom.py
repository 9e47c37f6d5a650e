#!/usr/bin/env python3
"""A time-boxed fuzz campaign of the node's intake: malformed DICOM, counted. A table.

Inputs come from ``tests/fuzz_dicom.py`` (every mutation family over every seed
kind in turn; a deflate bomb every 200th input, it takes seconds), numbered from
``--start`` so a campaign is reproducible and an input is named by
``family-kind-number``. Each goes through the intake's own code path in a worker
process — ``node.deid.runner.process_file`` (read, de-identify, publish into a
store) — and then:

- an exception out of it is a **crash**, a worker over ``--hang`` seconds a
  **hang** (the pool is replaced), a worker that dies a **death**;
- a quarantined input, or one pydicom cannot read whole, goes to the PHI scanner,
  which must not call it clean (``scan clean`` counts the times it did), and so
  does the seed's de-identified output broken the same way;
- an accepted input's output must be read whole by pydicom (``bad output``).

Peak RSS is the largest worker's. The store is checked for scraps at the end.

    .venv/bin/python bench/fuzz_dicom.py [--seconds 600] [--jobs 2] [--start 0] [--hang 20]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.deid.runner import EngineConfig, Writer, process_file  # noqa: E402
from protocols.deid.options import DeidOptions  # noqa: E402
from protocols.deid.safe_private import DEFAULT_SAFE_PRIVATE  # noqa: E402
from tests import fuzz_dicom as fz  # noqa: E402

BOMB_EVERY = 200
_state: dict[str, Any] = {}


def _init(store: str, scratch: str) -> None:
    config = EngineConfig(DeidOptions(), b"fuzz" * 8, "FUZZ", 1, 30, DEFAULT_SAFE_PRIVATE)
    _state.update(
        engine=config.build(), writer=Writer(Path(store)), scratch=Path(scratch), store=store
    )


def _readable(data: bytes | Path) -> bool:
    import pydicom
    from pydicom.filebase import DicomBytesIO

    try:
        ds = pydicom.dcmread(data if isinstance(data, Path) else DicomBytesIO(data))
        ds.walk(lambda _ds, elem: elem.value)
    except Exception:
        return False
    return True


def _one(name: tuple[str, str, int]) -> dict[str, Any]:
    """One input through intake, then the scanner where it applies."""
    import warnings

    from protocols.phi.scanner import scan

    warnings.simplefilter("ignore")
    family, kind, number = name
    out: dict[str, Any] = {"family": family}
    started = time.perf_counter()
    try:
        case = fz.make(family, kind, number)
    except Exception:  # the generator's own failure, not the node's
        out.update(generator=traceback.format_exc()[-1500:], ms=0.0, rss=0)
        return out
    try:
        path = _state["scratch"] / f"{family}-{kind}-{number}.dcm"
        path.write_bytes(case.data)
        outcome = process_file(_state["engine"], _state["writer"], str(path), hash_output=True)
        path.unlink()
        out["status"], out["code"] = outcome.status, outcome.code
        if outcome.status in ("written", "unchanged"):
            out["bad_output"] = not _readable(Path(_state["store"]) / outcome.output)
            if outcome.status == "written":
                (Path(_state["store"]) / outcome.output).unlink()
        unreadable = outcome.status in ("quarantined", "failed") or not _readable(case.data)
        if unreadable and family != "deflate_bomb":
            out["scan_clean"] = scan(case.data, DeidOptions()) == []
        if family not in ("deflate_bomb", "valid"):
            result = _state["engine"].deidentify(fz.seed_bytes(kind, number))
            clean = b"".join(bytes(c) for c in result.chunks)
            broken = fz.make_from(clean, family, kind, number)
            if not _readable(broken):
                found = scan(broken, DeidOptions(), site_prefix="FUZZ")
                out["scan_clean"] = out.get("scan_clean", False) or not any(
                    f.kind in ("unreadable", "malformed") for f in found
                )
    except Exception:
        out["crash"] = traceback.format_exc()[-1500:]
    out["ms"] = (time.perf_counter() - started) * 1000
    out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _names(start: int) -> Any:
    families = [f for f in fz.ALL_FAMILIES if f != "deflate_bomb"]
    number = start
    while True:
        for kind in fz.SEED_KINDS:
            for family in families:
                number += 1
                if number % BOMB_EVERY == 0:
                    yield ("deflate_bomb", kind, number)
                yield (family, kind, number)


def _pool(jobs: int, store: Path, scratch: Path) -> Any:
    context = multiprocessing.get_context("forkserver")
    return context.Pool(jobs, initializer=_init, initargs=(str(store), str(scratch)))


def campaign(seconds: float, jobs: int, start: int, hang: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="radfed-fuzz-"))
    store, scratch = work / "store", work / "scratch"
    store.mkdir()
    scratch.mkdir()
    rows: dict[str, Counter[str]] = defaultdict(Counter)
    slowest: dict[str, float] = defaultdict(float)
    crashes: list[tuple[tuple[str, str, int], str]] = []
    peak = 0
    names = _names(start)
    deadline = time.monotonic() + seconds
    began = time.monotonic()
    pool = _pool(jobs, store, scratch)
    try:
        while time.monotonic() < deadline:
            batch = [next(names) for _ in range(jobs * 8)]
            pending = [(name, pool.apply_async(_one, (name,))) for name in batch]
            for name, future in pending:
                family = name[0]
                try:
                    out = future.get(timeout=hang)
                except multiprocessing.TimeoutError:
                    rows[family]["hangs"] += 1
                    rows[family]["inputs"] += 1
                    crashes.append((name, f"no answer in {hang} s"))
                    pool.terminate()
                    pool = _pool(jobs, store, scratch)
                    break
                except Exception as exc:  # the worker died under it
                    rows[family]["deaths"] += 1
                    rows[family]["inputs"] += 1
                    crashes.append((name, repr(exc)))
                    continue
                row = rows[family]
                row["inputs"] += 1
                peak = max(peak, out["rss"])
                slowest[family] = max(slowest[family], out["ms"])
                if "generator" in out:
                    row["inputs"] -= 1
                    rows["(generator errors)"]["inputs"] += 1
                    continue
                if "crash" in out:
                    row["crashes"] += 1
                    crashes.append((name, out["crash"]))
                    continue
                row["accepted" if out["status"] in ("written", "unchanged") else "quarantined"] += 1
                row["bad output"] += bool(out.get("bad_output"))
                row["scan clean"] += bool(out.get("scan_clean"))
                if out["status"] in ("quarantined", "failed"):
                    row[f"code:{out['code']}"] += 1
    finally:
        pool.terminate()
    elapsed = time.monotonic() - began
    scraps = [p for p in store.rglob("*") if p.is_file()]
    _table(rows, slowest, peak, elapsed, jobs, start)
    print(f"\nstore left with {len(scraps)} stray file(s) (outputs are removed as checked)")
    for name, detail in crashes[:20]:
        print(f"\n--- {'-'.join(map(str, name))}\n{detail}")
    shutil.rmtree(work, ignore_errors=True)


def _table(
    rows: dict[str, Counter[str]],
    slowest: dict[str, float],
    peak: int,
    elapsed: float,
    jobs: int,
    start: int,
) -> None:
    columns = ["inputs", "crashes", "hangs", "deaths", "quarantined", "accepted"]
    columns += ["bad output", "scan clean"]
    print(
        f"fuzz campaign: {elapsed:.0f} s on {jobs} worker(s), inputs numbered from {start}, "
        f"{os.cpu_count()} CPU(s)\n"
    )
    header = ["family", *columns, "slowest ms", "quarantine codes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    total: Counter[str] = Counter()
    for family in sorted(rows):
        row = rows[family]
        total.update(row)
        codes = ", ".join(
            f"{k[5:]} {v}" for k, v in sorted(row.items()) if k.startswith("code:") and v
        )
        cells = [family, *(str(row[c]) for c in columns), f"{slowest[family]:.0f}", codes]
        print("| " + " | ".join(cells) + " |")
    cells = ["**all**", *(f"**{total[c]}**" for c in columns), "", ""]
    print("| " + " | ".join(cells) + " |")
    print(f"\npeak RSS of a worker: {peak / (1 << 20):.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--hang", type=float, default=20)
    args = parser.parse_args()
    campaign(args.seconds, args.jobs, args.start, args.hang)


if __name__ == "__main__":
    main()
