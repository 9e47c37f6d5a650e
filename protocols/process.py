"""Child processes a RadFed service supervises (the Flower SuperLink, a SuperNode).

A ``Supervised`` process starts in its own session, so a terminal's Ctrl-C reaches
only the parent, which stops it in order; on Linux it also gets SIGTERM when the
parent dies without stopping it (``PR_SET_PDEATHSIG``), and Flower's own children
watch their parent's pid, so a killed service leaves no orphans. A process that
exits on its own is restarted after a growing pause (1 s doubling to 30 s, reset
after a minute of uptime); ``restarts`` counts how often that happened, so callers
can tell that work in flight there was lost. Output goes to a log file.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def tool(name: str) -> str:
    """The absolute path of a console script installed beside this interpreter."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def tool_path() -> str:
    """``PATH`` with this interpreter's scripts first (Flower starts its helpers by name)."""
    here = str(Path(sys.executable).parent)
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != here]
    return os.pathsep.join([here, *rest])


class Supervised:
    """One supervised child process."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
        on_restart: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.on_restart = on_restart
        self.restarts = 0
        self.last_exit: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._log = logging.getLogger(f"radfed.process.{name}")

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # 0600: a supervised service's log (Flower's) is its operator's to read
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - argv built by our code
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self._log.info("%s started (pid %d)", self.name, self._proc.pid)

    def start(self) -> None:
        """Start the process and the thread that restarts it when it exits."""
        with self._lock:
            self._stop.clear()
            self._spawn()
        self._thread = threading.Thread(target=self._watch, name=f"supervise-{self.name}")
        self._thread.daemon = True
        self._thread.start()

    def _watch(self) -> None:
        pause = 1.0
        while not self._stop.is_set():
            proc = self._proc
            if proc is None:  # pragma: no cover - start() spawns first
                return
            started = time.monotonic()
            code = proc.wait()
            if self._stop.is_set():
                return
            self.last_exit = code
            if time.monotonic() - started > 60:
                pause = 1.0
            self._log.warning(
                "%s exited with %s; restarting in %.0f s (log: %s)",
                self.name,
                code,
                pause,
                self.log_path,
            )
            if self._stop.wait(pause):
                return
            pause = min(pause * 2, 30.0)
            with self._lock:
                if self._stop.is_set():
                    return
                self._spawn()
                self.restarts += 1
            if self.on_restart is not None:
                self.on_restart(self.restarts)

    def kill(self) -> None:
        """SIGKILL the process group now (a crash, for tests); the watcher restarts it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process and everything it started; wait for it to exit."""
        with self._lock:
            self._stop.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
            except ProcessLookupError:
                pass
        if proc is not None:
            # Stragglers of the group (Flower's executors) go too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._thread is not None:
            self._thread.join(timeout)
        self._log.info("%s stopped", self.name)
