#!/usr/bin/env python3
"""Does de-identification memory stay flat however many files there are?

Generates small CT corpora of growing size (1,000 / 4,000 / 16,000 files by
default, 64×64 slices so the count, not the pixels, grows), runs
``radfed node deid`` on each with one worker and with all cores, and prints
the peak resident memory of the whole process tree next to the file count.
Flat means the peak does not grow with the count. A benchmark: it prints a
table, it does not pass or fail.

    .venv/bin/python bench/deid_memory.py [--counts 1000,4000,16000] [--workdir bench/work]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import resource
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np
from _tree import timed_tree

from radfed.synth.site import Uids, ct_series, make_patient, write

BENCH = Path(__file__).resolve().parent
RADFED = Path(sysconfig.get_path("scripts")) / "radfed"
SLICES = 500  # per patient


def corpus(root: Path, count: int) -> Path:
    """``count`` CT files (64×64), reused when already there."""
    folder = root / f"memory-{count}"
    marker = folder / ".complete"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng, nprng, uids = random.Random(count), np.random.default_rng(count), Uids(count)
    written = 0
    patient = 0
    while written < count:
        p = make_patient(rng, patient)
        when = dt.datetime(2020, 5, 1) + dt.timedelta(days=patient)
        slices = min(SLICES, count - written)
        series = ct_series(p, uids, uids.new(), when, f"ACC{patient:06d}", slices, 64, nprng)
        for i, ds in enumerate(series):
            write(ds, folder / f"p{patient:04d}" / f"{i:04d}.dcm")
        written += slices
        patient += 1
    marker.write_text("ok\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,4000,16000")
    parser.add_argument("--workdir", type=Path, default=BENCH / "work")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    for count in counts:
        started = time.perf_counter()
        src = corpus(args.workdir, count)
        print(f"corpus of {count} files ready ({time.perf_counter() - started:.0f} s)", flush=True)
        for jobs in (1, 0):
            scratch = args.workdir / "memory-run"
            shutil.rmtree(scratch, ignore_errors=True)
            os.sync()
            seconds, rss = timed_tree(
                [
                    str(RADFED),
                    "node",
                    "deid",
                    str(src),
                    str(scratch / "out"),
                    "--quiet",
                    "--home",
                    str(scratch / "home"),
                    "--jobs",
                    str(jobs),
                ]
            )
            rows.append((count, "1" if jobs == 1 else f"all ({os.cpu_count()})", seconds, rss))
            shutil.rmtree(scratch, ignore_errors=True)
    print()
    print("| files | workers | seconds | files/s | peak RSS MiB (process tree) |")
    print("|------:|---------|--------:|--------:|----------------------------:|")
    for count, workers, seconds, rss in rows:
        print(f"| {count} | {workers} | {seconds:.1f} | {count / seconds:.0f} | {rss:.0f} |")
    print(
        f"\nself peak RSS (bench driver): "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
