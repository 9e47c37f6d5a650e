"""Audited reads of what the node keeps sealed: the originals vault and quarantine sources.

Nothing that produces output reads these. The few readers — an operator locating
a quarantined file, and later the PHI scanner, the reviewer's header diff and the
label import — go through here, and every read is an audit entry naming who read
what and why, committed before the value is returned.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select

from node.errors import NodeError
from node.index import audit
from node.index.models import QuarantineEntry
from node.index.store import NodeIndex


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
    """The vault records of de-identified instances, by their (new) SOP Instance UID."""
    wanted = set(sop_instance_uids)
    with index.db.write() as session:
        audit.append(
            session, actor, "originals.read", "vault", purpose=purpose, instances=len(wanted)
        )
    found: dict[str, dict[str, Any]] = {}
    for entry in index.vault.entries():
        new_uid = entry["sop_instance_uid"][1]
        if new_uid in wanted:
            found[new_uid] = entry
    return found
