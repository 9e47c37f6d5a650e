"""The C heap of a long-running service: glibc malloc's arenas, trimming, figures.

Measured on the coordinator under 50 uploading nodes (``docs/reliability.md``): the
memory its request threads allocate and free in C (TLS records, SQLite, hashing,
Python objects over 512 bytes) levels off, but glibc keeps what was freed in the
arena of the thread that freed it — up to eight arenas per core, one per thread
until then — so the process's resident memory rose a few MiB a minute with live
allocations flat. Two glibc knobs bound that: a limit on arenas (``M_ARENA_MAX``),
set before the service starts its threads, and ``malloc_trim(0)`` now and then,
which gives the whole free pages inside every arena back to the system.

On a C library other than glibc (musl in Alpine, macOS) each call here does nothing
and says so (``False`` / ``None``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import sys
import threading
import time
from dataclasses import dataclass
from functools import cache

#: ``mallopt`` parameter number of the arena limit (glibc's ``malloc.h``).
_M_ARENA_MAX = -8

log = logging.getLogger("radfed.heap")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes taken from the system with brk/sbrk and arena heaps
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # bytes in chunks mapped on their own (large allocations)
            "usmblks",
            "fsmblks",
            "uordblks",  # bytes allocated and in use
            "fordblks",  # bytes free inside the arenas
            "keepcost",
        )
    ]


@cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc, else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.open_memstream.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    libc.open_memstream.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.malloc_info.restype = ctypes.c_int
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    if hasattr(libc, "mallinfo2"):  # glibc 2.33+
        libc.mallinfo2.restype = _MallInfo2
    return libc


def limit_arenas(arenas: int) -> bool:
    """Let malloc use at most ``arenas`` arenas (0: leave the C library's default).

    Call it before the threads that should share them allocate; arenas already made
    stay. Returns whether the limit is in force.
    """
    if arenas < 0:
        raise ValueError(f'Argument "arenas" must be 0 or more, not {arenas}.')
    libc = _glibc()
    if libc is None or arenas == 0:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


def trim() -> bool:
    """Give the free pages inside every malloc arena back to the system.

    Returns whether any memory was released (``False`` as well off glibc).
    """
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


@dataclass(frozen=True)
class HeapFigures:
    """The C heap now: bytes in use, bytes free but kept, and how many arenas."""

    in_use: int
    free: int
    mapped: int  # large allocations mapped on their own (in use)
    arenas: int


def _arena_count(libc: ctypes.CDLL) -> int:
    """Arenas glibc has made, from ``malloc_info``'s report (one ``<heap>`` each)."""
    buffer, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
    if not stream:
        return 0
    try:
        libc.malloc_info(0, stream)
    finally:
        libc.fclose(stream)
    try:
        report = ctypes.string_at(buffer.value, size.value) if buffer.value else b""
    finally:
        libc.free(buffer)
    return report.count(b"<heap nr=")


def figures() -> HeapFigures | None:
    """The C heap's figures, or ``None`` where glibc (2.33 or newer) is not the C library."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    info = libc.mallinfo2()
    return HeapFigures(
        in_use=info.uordblks,
        free=info.fordblks,
        mapped=info.hblkhd,
        arenas=_arena_count(libc),
    )


class Trimmer:
    """A daemon thread that trims the heap every ``interval_s`` until stopped."""

    def __init__(self, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f'Argument "interval_s" must be positive, not {interval_s}.')
        self.interval_s = interval_s
        self.trims = 0
        self.seconds = 0.0  # spent trimming, all together
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heap-trimmer", daemon=True)

    def start(self) -> Trimmer:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            began = time.perf_counter()
            try:
                trim()
            except Exception:  # never take the service down over a trim
                log.exception("heap trim failed")
                continue
            self.seconds += time.perf_counter() - began
            self.trims += 1

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(RuntimeError):  # never started
            self._thread.join(5)
