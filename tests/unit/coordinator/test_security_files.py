"""The Flower SuperLink's state and supervised logs stay private whatever the umask.

The SuperLink's state (runs, messages, SuperNode keys) is a SQLite file Flower
creates itself, with the mode the umask leaves; ``coordinator.flower`` makes it
(and the ``flwr`` CLI's connection file) 0600 in a 0700 folder before the
SuperLink starts. The integration suite walks whole homes; the SuperLink costs
too long to start there.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from coordinator.flower import superlink
from coordinator.settings import load_settings
from protocols.process import Supervised


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o000])
def test_the_superlinks_state_and_connection_are_private(tmp_path: Path, mask: int) -> None:
    # Prepare
    settings = load_settings(tmp_path / "coordinator")

    # Execute: what serve does before the SuperLink starts
    with umask(mask):
        link = superlink(settings)

    # Assert
    home = settings.flower_dir
    assert (mode(home), mode(home / "state.db"), mode(home / "config.toml")) == (
        0o700,
        0o600,
        0o600,
    )
    assert str(home / "state.db") in link.argv


def test_a_supervised_process_log_is_its_owners(tmp_path: Path) -> None:
    # Prepare
    log = tmp_path / "logs" / "child.log"
    child = Supervised("child", [sys.executable, "-c", "print('hello')"], dict(os.environ), log)

    # Execute
    with umask(0o000):
        child.start()
        child.stop()

    # Assert
    assert mode(log) == 0o600
