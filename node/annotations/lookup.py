"""Audited reads of the originals vault that join original keys to de-identified objects.

An import reads the vault once: the read is an audit entry (who, why, which key
type, how many keys — never the keys) committed before the vault is opened, as
``node.index.originals`` does. Only the keys the import asked for are kept in
memory, and only long enough to find their de-identified studies or instances.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from node.annotations.schema import ACCESSION, MRN
from node.deid.vault import VaultError
from node.errors import NodeError
from node.index import audit
from node.index.store import NodeIndex

#: The vault field that holds each key type's original value.
VAULT_FIELDS = {ACCESSION: "accession_number", MRN: "patient_id"}


@dataclass
class StudyMatch:
    """What the vault says about the studies of the keys asked for."""

    #: Original key -> de-identified Study Instance UIDs.
    studies: dict[str, set[str]] = field(default_factory=dict)
    #: De-identified Study Instance UID -> the date shifts its instances were given.
    shifts: dict[str, set[int]] = field(default_factory=dict)


def _audited_entries(
    index: NodeIndex, actor: str, purpose: str, **details: Any
) -> Iterator[dict[str, Any]]:
    with index.db.write() as session:
        audit.append(session, actor, "originals.read", "vault", purpose=purpose, **details)
    try:
        yield from index.vault.entries()
    except VaultError as exc:
        raise NodeError("vault_unreadable", str(exc)) from exc


def match_studies(
    index: NodeIndex, key: str, wanted: Iterable[str], actor: str, purpose: str
) -> StudyMatch:
    """The de-identified studies of original accession numbers or MRNs (``key``)."""
    if key not in VAULT_FIELDS:
        raise NodeError("bad_key", f'Argument "key" must be one of {", ".join(VAULT_FIELDS)}.')
    keys = {w.strip() for w in wanted if w.strip()}
    found = StudyMatch()
    if not keys:
        return found
    vault_field = VAULT_FIELDS[key]
    for entry in _audited_entries(index, actor, purpose, key=key, keys=len(keys)):
        original = str(entry.get(vault_field) or "").strip()
        if original not in keys:
            continue
        study_uid = str(entry["study_instance_uid"][1])
        found.studies.setdefault(original, set()).add(study_uid)
        found.shifts.setdefault(study_uid, set()).add(int(entry["date_shift_days"]))
    return found


def match_instances(
    index: NodeIndex, wanted: Iterable[str], actor: str, purpose: str
) -> dict[str, str]:
    """Original SOP Instance UID -> de-identified SOP Instance UID, for those in the vault."""
    uids = {w.strip() for w in wanted if w.strip()}
    found: dict[str, str] = {}
    if not uids:
        return found
    for entry in _audited_entries(index, actor, purpose, key="sop_instance_uid", keys=len(uids)):
        original, new = entry["sop_instance_uid"]
        if original in uids:
            found[str(original)] = str(new)
    return found
