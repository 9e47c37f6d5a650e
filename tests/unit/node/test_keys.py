"""Site secrets: created once with 0600, shared by concurrent first runs, checked when given."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from node.deid.keys import KeyFileError, load_or_create, site_secret, vault_key


def test_created_on_first_use_with_private_permissions(tmp_path: Path) -> None:
    keys = tmp_path / "home" / "keys"

    secret = site_secret(keys)

    assert len(secret) == 32
    assert (keys / "site.secret").stat().st_mode & 0o777 == 0o600
    assert keys.stat().st_mode & 0o777 == 0o700
    assert site_secret(keys) == secret
    assert vault_key(keys) != secret


def _create(path: str, queue: multiprocessing.Queue[bytes]) -> None:
    queue.put(load_or_create(Path(path)))


def test_concurrent_first_runs_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "site.secret"
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[bytes] = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(str(path), queue)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)

    secrets = {queue.get(timeout=5) for _ in procs}

    assert len(secrets) == 1


def test_given_secret_file_is_used(tmp_path: Path) -> None:
    given = tmp_path / "mine.secret"
    given.write_text("00" * 40 + "\n")
    given.chmod(0o600)

    assert site_secret(tmp_path / "keys", given) == bytes(40)
    assert not (tmp_path / "keys" / "site.secret").exists()


def test_a_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    given = tmp_path / "open.secret"
    given.write_text("11" * 32)
    given.chmod(0o644)

    with pytest.raises(KeyFileError, match="chmod 600"):
        site_secret(tmp_path / "keys", given)


def test_a_short_secret_is_refused(tmp_path: Path) -> None:
    given = tmp_path / "short.secret"
    given.write_text("abcd")
    given.chmod(0o600)

    with pytest.raises(KeyFileError, match="at least 32 are needed"):
        site_secret(tmp_path / "keys", given)
