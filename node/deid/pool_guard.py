"""Tie the de-identification pool's processes to the process that started them.

Imported first by the pool's fork server (and called by every worker): when the
parent dies — even by SIGKILL, which leaves it no chance to clean up — the
kernel kills the child too (``PR_SET_PDEATHSIG``), so a killed ``ingest`` leaves
no orphaned workers behind. Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


die_with_parent()
