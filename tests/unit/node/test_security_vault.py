"""The re-identification map without its key: unreadable, untouchable, and apart from its key.

``test_vault.py`` covers the journal's crash behaviour; here the vault is the
attacker's: every byte flipped in turn, another key, the key file's place and
mode under a permissive umask, and the layout written before the header check.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from node.deid.vault import MAGIC_V1, Vault, VaultError
from node.settings import load_settings
from node.site import open_vault

KEY = os.urandom(32)
PLANTED = {
    "patient_name": "KOWALSKI^GRETA",
    "patient_id": "MRN0042517",
    "accession_number": "ACC7654321",
    "study_date": "20240229",
    "sop_instance_uid": ["1.2.826.0.1.3680043.10.1043.7.42517.3", "2.25.1234"],
}


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_every_flipped_byte_is_an_error_never_a_shorter_vault(tmp_path: Path) -> None:
    # Prepare: three records.
    path = tmp_path / "originals.vault"
    vault = Vault(path, KEY)
    for n in range(3):
        vault.append([{**PLANTED, "n": n}])
    raw = path.read_bytes()
    silent = []

    # Execute
    for at in range(len(raw)):
        for bit in (0x01, 0x80):
            damaged = bytearray(raw)
            damaged[at] ^= bit
            path.write_bytes(bytes(damaged))
            try:
                read = [e["n"] for e in Vault(path, KEY).entries()]
            except VaultError:
                continue
            silent.append((at, bit, read))

    # Assert: a record's length among them (before: the vault read as empty or cut short)
    assert silent == []


def test_every_flipped_byte_is_an_error_to_a_reader_that_knew_the_file(tmp_path: Path) -> None:
    # Prepare: three records, and the bytes of the file
    path = tmp_path / "originals.vault"
    for n in range(3):
        Vault(path, KEY).append([{**PLANTED, "n": n}])
    raw = path.read_bytes()
    silent = []

    # Execute: a reader that found the records' offsets before the byte changed
    for at in range(len(raw)):
        for bit in (0x01, 0x80):
            path.write_bytes(raw)
            reader = Vault(path, KEY)
            assert [e["n"] for e in reader.records([2])] == [2]
            damaged = bytearray(raw)
            damaged[at] ^= bit
            path.write_bytes(bytes(damaged))
            try:
                read = [e["n"] for e in reader.records(range(3))]
            except VaultError:
                continue
            silent.append((at, bit, read))

    # Assert: the offsets it kept never stand in for the headers' checks
    assert silent == []


def test_another_key_reads_nothing_and_the_bytes_hold_no_identifier(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "originals.vault"
    Vault(path, KEY).append([PLANTED])
    raw = path.read_bytes()

    # Execute
    with pytest.raises(VaultError, match="wrong key or tampered") as caught:
        list(Vault(path, os.urandom(32)).entries())

    # Assert
    assert "record 0" in str(caught.value)
    for value in (
        "KOWALSKI",
        "GRETA",
        "MRN0042517",
        "ACC7654321",
        "20240229",
        "3680043.10.1043.7.42517",
    ):
        assert value.encode() not in raw, value
        assert value.encode("utf-16-le") not in raw, value
    assert list(Vault(path, KEY).entries()) == [PLANTED]


def test_sealed_values_do_not_open_with_another_key_or_when_changed() -> None:
    vault, other = Vault(Path("unused"), KEY), Vault(Path("unused"), os.urandom(32))
    sealed = vault.seal("/mnt/pacs/KOWALSKI_GRETA/MRN0042517.dcm")
    changed = sealed[:-6] + ("A" if sealed[-6] != "A" else "B") + sealed[-5:]

    assert "KOWALSKI" not in sealed and vault.unseal(sealed).endswith("MRN0042517.dcm")
    for attempt in (lambda: other.unseal(sealed), lambda: vault.unseal(changed)):
        with pytest.raises(VaultError, match="wrong key or tampered"):
            attempt()


@pytest.mark.parametrize("mask", [0o022, 0o000])
def test_the_key_is_apart_from_the_vault_and_only_its_owner_reads_either(
    tmp_path: Path, mask: int
) -> None:
    # Prepare
    settings = load_settings(tmp_path / "home")

    # Execute
    with umask(mask):
        vault = open_vault(settings)
        vault.append([PLANTED])

    # Assert
    key_file = settings.keys_dir / "vault.key"
    assert key_file.parent != vault.path.parent
    for path, mode in (
        (settings.home, 0o700),
        (settings.keys_dir, 0o700),
        (key_file, 0o600),
        (vault.path.parent, 0o700),
        (vault.path, 0o600),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    assert bytes.fromhex(key_file.read_text().strip()) not in vault.path.read_bytes()


def test_a_vault_written_before_the_header_check_is_still_read_and_extended(
    tmp_path: Path,
) -> None:
    # Prepare: the first layout, written by hand (it is no longer written for new vaults).
    path = tmp_path / "old.vault"
    aead = AESGCM(KEY)
    nonce = os.urandom(12)
    plain = zlib.compress(json.dumps([{"n": 1}]).encode())
    sealed = nonce + aead.encrypt(nonce, plain, MAGIC_V1 + struct.pack("<Q", 0))
    path.write_bytes(MAGIC_V1 + struct.pack("<L", len(sealed)) + sealed)

    # Execute
    Vault(path, KEY).append([{"n": 2}])

    # Assert
    assert [e["n"] for e in Vault(path, KEY).entries()] == [1, 2]
    assert path.read_bytes().startswith(MAGIC_V1)
