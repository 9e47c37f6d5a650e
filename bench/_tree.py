"""Timing a command and the peak memory of its whole process tree (shared by the benches)."""

from __future__ import annotations

import subprocess
import sys

_LAUNCHER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(time.perf_counter() - t, "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rc)\n"
)


def timed_tree(argv: list[str]) -> tuple[float, float]:
    """Run a command from a fresh interpreter: (seconds, peak RSS MiB of its largest process).

    RUSAGE_CHILDREN reports the largest descendant that has been waited for; a
    process pool's workers are reaped by its fork server, itself reaped by the
    command, so they count.
    """
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *argv], capture_output=True, text=True, check=True
    ).stdout.split()
    if out[2] != "0":
        raise RuntimeError(f"{' '.join(argv)} exited {out[2]}")
    return float(out[0]), float(out[1])
