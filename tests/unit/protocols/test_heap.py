"""The C heap knobs (``protocols.heap``): arena limit, trimming, figures.

Each case runs in a fresh interpreter: the arena limit is process-wide and must be
set before the threads that allocate exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from protocols import heap

pytestmark = pytest.mark.skipif(heap.figures() is None, reason="glibc 2.33+ only")

#: Eight threads that hold 8 MB of C-heap blocks each at the same time, then the figures.
_THREADS = """
import json, sys, threading
from protocols import heap
limited = heap.limit_arenas(int(sys.argv[1]))
barrier = threading.Barrier(8)
def work():
    blocks = [bytes(4000) for _ in range(2000)]
    barrier.wait()
    del blocks
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
now = heap.figures()
print(json.dumps({"limited": limited, "arenas": now.arenas, "in_use": now.in_use}))
"""

#: 80 MB of blocks freed but for one in 64 (so no free run reaches the top of the
#: heap, which free() would give back itself), then the resident memory before and
#: after ``trim`` or a ``Trimmer``.
_FRAGMENTED = """
import json, sys, time
from protocols import heap
def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS:"))
blocks = [bytes(4000) for _ in range(20000)]
kept = blocks[::64]
del blocks
freed = rss()
free = heap.figures().free
if sys.argv[1] == "trim":
    released = heap.trim()
    trims = 1
elif sys.argv[1] == "trimmer":
    trimmer = heap.Trimmer(0.05).start()
    deadline = time.monotonic() + 10
    while trimmer.trims < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    trimmer.stop()
    released, trims = None, trimmer.trims
else:
    released, trims = None, 0
print(json.dumps({"freed": freed, "free": free, "after": rss(), "released": released,
                  "trims": trims}))
"""


def _run(script: str, *args: str) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, int] = json.loads(done.stdout)
    return result


def test_threads_share_the_arenas_they_are_limited_to() -> None:
    # Execute: the same eight concurrent threads without a limit, and limited to 1 and 2.
    free_run = _run(_THREADS, "0")
    one = _run(_THREADS, "1")
    two = _run(_THREADS, "2")

    # Assert: unlimited, glibc gives the threads arenas of their own; limited, never more.
    assert free_run["limited"] is False and free_run["arenas"] > 2
    assert one["limited"] is True and one["arenas"] == 1
    assert two["limited"] is True and two["arenas"] == 2
    assert min(free_run["in_use"], one["in_use"], two["in_use"]) > 0


def test_trim_gives_free_pages_inside_the_heap_back() -> None:
    # Execute
    kept = _run(_FRAGMENTED, "none")
    trimmed = _run(_FRAGMENTED, "trim")

    # Assert: ~77 MB free inside the heap stays resident until trimmed.
    assert kept["free"] > 60 << 20 and trimmed["free"] > 60 << 20
    assert kept["after"] > kept["freed"] - (10 << 20)
    assert trimmed["released"] is True
    assert trimmed["after"] < trimmed["freed"] - (50 << 20)


def test_the_trimmer_trims_on_its_interval_until_stopped() -> None:
    # Execute
    result = _run(_FRAGMENTED, "trimmer")

    # Assert
    assert result["trims"] >= 2
    assert result["after"] < result["freed"] - (50 << 20)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match='"arenas"'):
        heap.limit_arenas(-1)
    with pytest.raises(ValueError, match='"interval_s"'):
        heap.Trimmer(0)
