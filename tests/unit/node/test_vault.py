"""The encrypted re-identification vault: round trip, tampering, torn records, wrong key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.deid.vault import MAGIC, Vault, VaultError

KEY = os.urandom(32)


def test_entries_round_trip_and_are_not_readable_as_plain_text(tmp_path: Path) -> None:
    vault = Vault(tmp_path / "v.vault", KEY)

    vault.append([{"patient_id": "MRN123", "pseudonym": "SITE-A"}])
    vault.append([{"patient_id": "MRN456", "pseudonym": "SITE-B"}])

    assert [e["patient_id"] for e in vault.entries()] == ["MRN123", "MRN456"]
    raw = (tmp_path / "v.vault").read_bytes()
    assert raw.startswith(MAGIC) and b"MRN123" not in raw
    assert (tmp_path / "v.vault").stat().st_mode & 0o777 == 0o600


def test_wrong_key_cannot_read(tmp_path: Path) -> None:
    Vault(tmp_path / "v.vault", KEY).append([{"x": 1}])

    with pytest.raises(VaultError, match="wrong key or tampered"):
        list(Vault(tmp_path / "v.vault", os.urandom(32)).entries())


def test_a_flipped_byte_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "v.vault"
    Vault(path, KEY).append([{"x": 1}])
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))

    with pytest.raises(VaultError):
        list(Vault(path, KEY).entries())


def test_swapped_records_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "v.vault"
    vault = Vault(path, KEY)
    vault.append([{"n": 1}])
    size_one = path.stat().st_size
    vault.append([{"n": 2}])
    raw = path.read_bytes()
    first, second = raw[len(MAGIC) : size_one], raw[size_one:]
    path.write_bytes(MAGIC + second + first)

    with pytest.raises(VaultError):
        list(Vault(path, KEY).entries())


def test_a_torn_last_record_is_ignored_and_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "v.vault"
    vault = Vault(path, KEY)
    vault.append([{"n": 1}])
    whole = path.read_bytes()
    vault.append([{"n": 99}])
    record = path.read_bytes()[len(whole) :]
    # A crash in the middle of a write leaves a prefix of the record (in its header,
    # its nonce, its tag), or a file longer than what reached the disk (zeros).
    for torn in (record[:3], record[:13], record[:-1], bytes(len(record) + 5)):
        path.write_bytes(whole + torn)

        assert [e["n"] for e in Vault(path, KEY).entries()] == [1]

    Vault(path, KEY).append([{"n": 2}])
    assert [e["n"] for e in Vault(path, KEY).entries()] == [1, 2]


def test_missing_vault_reads_empty(tmp_path: Path) -> None:
    assert list(Vault(tmp_path / "none.vault", KEY).entries()) == []


def test_not_a_vault_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.vault"
    path.write_bytes(b"something else entirely")

    with pytest.raises(VaultError, match="bad magic"):
        list(Vault(path, KEY).entries())
