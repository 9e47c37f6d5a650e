"""The encrypted re-identification vault: round trip, tampering, torn records, records by number."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from node.deid.vault import MAGIC, MAGIC_V1, Vault, VaultError

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


# -- record numbers: append says where, records reads just those -----------------------------


def write_v1(path: Path, batches: list[list[dict[str, object]]]) -> None:
    """A vault in the first layout (no header check), written by hand: it is no longer written."""
    aead = AESGCM(KEY)
    raw = bytearray(MAGIC_V1)
    for number, batch in enumerate(batches):
        nonce = os.urandom(12)
        plain = zlib.compress(json.dumps(batch).encode())
        sealed = nonce + aead.encrypt(nonce, plain, MAGIC_V1 + struct.pack("<Q", number))
        raw += struct.pack("<L", len(sealed)) + sealed
    path.write_bytes(bytes(raw))


def test_append_returns_the_number_of_the_record_it_wrote(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "v.vault"
    vault = Vault(path, KEY)

    # Execute
    numbers = [vault.append([{"n": n}]) for n in range(3)]
    nothing = vault.append([])

    # Assert
    assert numbers == [0, 1, 2]
    assert nothing is None
    assert [e["n"] for e in Vault(path, KEY).entries()] == [0, 1, 2]


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_records_returns_the_entries_of_just_those_records(tmp_path: Path, layout: str) -> None:
    # Prepare: five records of two entries each, in either layout.
    path = tmp_path / "v.vault"
    batches: list[list[dict[str, object]]] = [
        [{"n": n, "i": 0}, {"n": n, "i": 1}] for n in range(5)
    ]
    if layout == "v1":
        write_v1(path, batches[:3])
        appended = [Vault(path, KEY).append(b) for b in batches[3:]]
        assert appended == [3, 4]
    else:
        for batch in batches:
            Vault(path, KEY).append(batch)
    vault = Vault(path, KEY)

    # Execute
    picked = list(vault.records([3, 1, 3]))
    first = list(vault.records(iter([0])))
    none = list(vault.records([]))

    # Assert: each record once, oldest first, entries in their order
    assert [(e["n"], e["i"]) for e in picked] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert first == batches[0]
    assert none == []
    assert path.read_bytes().startswith(MAGIC_V1 if layout == "v1" else MAGIC)


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_a_tampered_record_or_a_wrong_key_is_an_error_for_records(
    tmp_path: Path, layout: str
) -> None:
    # Prepare: three records; the middle one's ciphertext changed.
    path = tmp_path / "v.vault"
    batches: list[list[dict[str, object]]] = [[{"n": n}] for n in range(3)]
    if layout == "v1":
        write_v1(path, batches)
    else:
        for batch in batches:
            Vault(path, KEY).append(batch)
    vault = Vault(path, KEY)
    assert [e["n"] for e in vault.records([1])] == [1]  # known to this object before the change
    raw = bytearray(path.read_bytes())
    width = 4 if layout == "v1" else 8
    (first_length,) = struct.unpack("<L", raw[8:12])
    raw[8 + width + first_length + width + 20] ^= 0x01  # inside record 1's ciphertext
    path.write_bytes(bytes(raw))

    # Execute / Assert
    with pytest.raises(VaultError, match="record 1 does not authenticate"):
        list(vault.records([1]))
    with pytest.raises(VaultError, match="record 1 does not authenticate"):
        list(Vault(path, KEY).records([1]))
    assert [e["n"] for e in vault.records([0, 2])] == [0, 2]
    with pytest.raises(VaultError, match="wrong key or tampered"):
        list(Vault(path, os.urandom(32)).records([0]))


def test_a_record_number_the_vault_does_not_hold_is_an_error(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "v.vault"
    vault = Vault(path, KEY)
    for n in range(3):
        vault.append([{"n": n}])

    # Execute / Assert: refused before any entry is returned
    for numbers in ([3], [0, 7], [-1]):
        read = vault.records(numbers)
        with pytest.raises(VaultError, match=r'"numbers": vault record (3|7|-1) does not exist'):
            next(read)
    with pytest.raises(VaultError, match=r"holds 3 record\(s\), 0 to 2"):
        list(vault.records([3]))
    with pytest.raises(VaultError, match="holds no record"):
        list(Vault(tmp_path / "none.vault", KEY).records([0]))
    assert list(Vault(tmp_path / "none.vault", KEY).records([])) == []


def test_records_appended_by_another_vault_object_are_seen(tmp_path: Path) -> None:
    # Prepare: two objects on one file, as the listener and an ingest run in two processes.
    path = tmp_path / "v.vault"
    ours, theirs = Vault(path, KEY), Vault(path, KEY)
    assert ours.append([{"n": 0}]) == 0
    assert list(ours.records([0])) == [{"n": 0}]

    # Execute
    written = [theirs.append([{"n": n}]) for n in (1, 2)]
    read = list(ours.records([2, 1]))
    next_number = ours.append([{"n": 3}])

    # Assert
    assert written == [1, 2]
    assert [e["n"] for e in read] == [1, 2]
    assert next_number == 3
    assert [e["n"] for e in theirs.records([3])] == [3]
    assert [e["n"] for e in Vault(path, KEY).entries()] == [0, 1, 2, 3]


def test_a_torn_record_after_what_an_object_knew_is_ignored_then_cut(tmp_path: Path) -> None:
    # Prepare: an object that knows two records; a crashed writer then left a torn third.
    path = tmp_path / "v.vault"
    vault = Vault(path, KEY)
    vault.append([{"n": 0}])
    vault.append([{"n": 1}])
    assert list(vault.records([1])) == [{"n": 1}]
    whole = path.read_bytes()
    Vault(path, KEY).append([{"n": 99}])
    record = path.read_bytes()[len(whole) :]
    path.write_bytes(whole + record[:-1])

    # Execute
    read = [e["n"] for e in vault.entries()]
    number = vault.append([{"n": 2}])

    # Assert
    assert read == [0, 1]
    assert number == 2
    assert [e["n"] for e in Vault(path, KEY).records([2])] == [2]


@pytest.mark.parametrize("shape", ["shorter", "longer"])
def test_a_replaced_vault_file_is_read_from_its_start_again(tmp_path: Path, shape: str) -> None:
    # Prepare: an object that knows a file of three records; the file is then replaced
    # by another vault (a restore, say), shorter or longer, with other records.
    path, other = tmp_path / "v.vault", tmp_path / "other.vault"
    vault = Vault(path, KEY)
    for n in range(3):
        vault.append([{"n": n, "pad": "x" * 40}])
    assert len(list(vault.records([2]))) == 1
    for n in range(2 if shape == "shorter" else 5):
        Vault(other, KEY).append([{"m": n}])
    os.replace(other, path)

    # Execute
    read = list(vault.records([1]))
    number = vault.append([{"m": "next"}])

    # Assert
    assert read == [{"m": 1}]
    assert number == (2 if shape == "shorter" else 5)
    assert [e["m"] for e in Vault(path, KEY).entries()][-1] == "next"
