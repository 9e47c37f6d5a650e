"""The demo's long-running services: ``radfed coordinator serve`` and ``radfed node serve``.

Each runs as its own process in its own session (a terminal's Ctrl-C reaches the
demo, which stops them in order), gets SIGTERM if the demo dies without stopping
it, and logs to a file under the demo's working directory. They supervise their
own Flower processes (the SuperLink, the SuperNodes) and stop them when stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

from protocols.process import die_with_parent, tool_path


class ServiceError(RuntimeError):
    """A service did not start, or stopped on its own; the message says where its log is."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """One ``radfed …`` service process, started and stopped by the demo."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        health_url: str,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.env = dict(env)
        self.log_path = log_path
        self.health_url = health_url
        self.verify = verify
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 120.0) -> None:
        """Start the process and wait until its ``/healthz`` answers."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PATH": tool_path(), **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - argv built here
                [sys.executable, "-m", "radfed.cli", *self.args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self.wait_until(self._healthy, timeout, f"{self.name} to answer {self.health_url}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=2, verify=self.verify).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``check`` until it holds; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with status {self.proc.returncode} while waiting for "
                    f"{what}; its log: {self.log_path}\n{self.tail()}"
                )
            if check():
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"timed out after {timeout:.0f} s waiting for {what}; "
                    f"log: {self.log_path}\n{self.tail()}"
                )
            time.sleep(0.5)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the service stops its Flower processes), SIGKILL to the group if stuck."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # Anything left in its session (a Flower child that missed its parent's exit).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode
