#!/usr/bin/env python3
"""How long does `radfed demo` take, stage by stage? (Target: under 5 minutes on 2 cores.)

Runs the demo as `make demo` does (default options: two sites, three training
rounds) in a fresh working directory and prints the time of each stage from its
`summary.json` and the total wall time, `--repeat` times. A benchmark: it prints
a table, it does not pass or fail.

    .venv/bin/python bench/demo_time.py [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RADFED = [str(Path(sys.executable).parent / "radfed")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=BENCH / "work" / "demo")
    args = parser.parse_args()

    runs: list[tuple[float, dict[str, float], dict[str, object]]] = []
    for n in range(args.repeat):
        work = args.workdir.resolve() / f"run-{n}"
        shutil.rmtree(work, ignore_errors=True)
        started = time.perf_counter()
        done = subprocess.run(
            [*RADFED, "demo", "--workdir", str(work)], capture_output=True, text=True, check=False
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"the demo failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
        summary = json.loads((work / "summary.json").read_text())
        runs.append((wall, summary["timings_s"], summary["run"]))

    print(f"radfed demo (defaults: 2 sites, 3 rounds), {args.repeat} run(s)\n")
    stages = list(runs[0][1])
    print(f"{'stage':<78} " + " ".join(f"{'run ' + str(i + 1):>8}" for i in range(len(runs))))
    for stage in stages:
        print(f"{stage:<78} " + " ".join(f"{r[1][stage]:>8.1f}" for r in runs))
    print(
        f"{'total wall (start to everything stopped), s':<78} "
        + " ".join(f"{r[0]:>8.1f}" for r in runs)
    )
    for i, (_, _, run) in enumerate(runs):
        rounds = run["rounds"]  # type: ignore[index]
        last = rounds[-1]["central_metrics"] if rounds else {}  # type: ignore[index]
        print(
            f"run {i + 1}: training {run['status']}, held-out accuracy after the last round: "  # type: ignore[index]
            f"{last.get('eval-accuracy', float('nan')):.3f}"
        )


if __name__ == "__main__":
    main()
