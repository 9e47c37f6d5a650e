"""The coordinator's registry under test: one suite, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import pki
from coordinator.registry.db import Database
from coordinator.settings import CoordinatorSettings, load_settings
from tests.helpers import PgSchema


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.sqlite'}"
        return
    with PgSchema() as schema:
        yield schema.url


@pytest.fixture
def db(registry_url: str) -> Iterator[Database]:
    database = Database.open(registry_url)
    yield database
    database.close()


@pytest.fixture
def settings(tmp_path: Path, registry_url: str) -> CoordinatorSettings:
    """A coordinator home with its federation CA (the registry is the ``db`` fixture's)."""
    settings = load_settings(tmp_path / "coordinator", database_url=registry_url)
    pki.create(pki.Paths(settings.pki_dir), "Test federation", ["localhost", "127.0.0.1"])
    return settings
