"""Audited reads of what the node keeps sealed: the originals vault and quarantine sources.

Nothing that produces output reads these. The few readers — an operator locating
a quarantined file, and later the PHI scanner, the reviewer's header diff and the
label import — go through here, and every read is an audit entry naming who read
what and why, committed before the value is returned.

The index keeps, for each instance, the vault record holding its entry: a read of
some instances' originals decrypts those records, not the whole vault.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select

from node.errors import NodeError
from node.index import audit
from node.index.models import Instance, QuarantineEntry
from node.index.store import VIA_ANNOTATION, NodeIndex

#: SOP Instance UIDs asked of the index per statement (well under SQLite's bound-parameter limit).
_UIDS_PER_QUERY = 500


def quarantine_source(index: NodeIndex, entry_id: int, actor: str, purpose: str) -> str:
    """Where a quarantined file came from (a path or the file kept on the node)."""
    with index.db.write() as session:
        entry = session.scalar(select(QuarantineEntry).where(QuarantineEntry.id == entry_id))
        if entry is None:
            raise NodeError("not_found", f"no quarantine entry {entry_id}")
        audit.append(
            session,
            actor,
            "originals.read",
            f"quarantine:{entry_id}",
            purpose=purpose,
            what="source",
        )
        sealed, kept = entry.source_sealed, entry.kept_as
    return kept or index.vault.unseal(sealed)


def original_identifiers(
    index: NodeIndex, sop_instance_uids: Iterable[str], actor: str, purpose: str
) -> dict[str, dict[str, Any]]:
    """The vault records of de-identified instances, by their (new) SOP Instance UID.

    Where the index knows which vault record holds each instance's entry, only those
    records are decrypted; otherwise (rows indexed before it kept the record, or a
    UID it does not hold) the whole vault is read. Either way an instance found in
    several records gets its newest entry.
    """
    wanted = set(sop_instance_uids)
    with index.db.write() as session:
        audit.append(
            session, actor, "originals.read", "vault", purpose=purpose, instances=len(wanted)
        )
    numbers = _vault_records(index, wanted)
    entries = index.vault.entries() if numbers is None else index.vault.records(numbers)
    found: dict[str, dict[str, Any]] = {}
    for entry in entries:
        new_uid = entry["sop_instance_uid"][1]
        if new_uid in wanted:
            found[new_uid] = entry  # records come oldest first: the newest entry stays
    return found


def _vault_records(index: NodeIndex, wanted: set[str]) -> set[int] | None:
    """The vault records holding the entries of ``wanted``; None when the index cannot say.

    Objects the node made itself (segmentations) have no entry and need no record.
    """
    uids = sorted(wanted)
    numbers: set[int] = set()
    indexed = 0
    with index.db.read() as session:
        for start in range(0, len(uids), _UIDS_PER_QUERY):
            rows = session.execute(
                select(Instance.vault_record, Instance.received_via).where(
                    Instance.sop_uid.in_(uids[start : start + _UIDS_PER_QUERY])
                )
            )
            for number, via in rows:
                indexed += 1
                if number is not None:
                    numbers.add(number)
                elif via != VIA_ANNOTATION:
                    return None  # indexed before the record was kept: only a full read finds it
    if indexed < len(uids):
        # Not indexed here (a file of `radfed node deid`, say): its entry may still be
        # in the vault, and only a full read finds it.
        return None
    return numbers
