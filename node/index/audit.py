"""The append-only, hash-chained audit log of the node.

Each entry's hash covers its content and the previous entry's hash, so editing,
removing or reordering any entry breaks every link after it; the database
refuses updates and deletions outright (triggers). Entries are written in the
same transaction as what they record: a status change and its audit entry are
committed together or not at all.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.index.models import AuditEntry, utcnow
from protocols.audit import GENESIS, Verification, details_json, entry_digest, verify_chain

__all__ = ["GENESIS", "Verification", "append", "verify"]


def append(session: Session, actor: str, action: str, subject: str, **details: Any) -> AuditEntry:
    """Add one entry at the end of the chain (inside the caller's write transaction)."""
    last = session.execute(
        select(AuditEntry.seq, AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1)
    ).first()
    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    at = utcnow()
    body = details_json(details)
    entry = AuditEntry(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        subject=subject,
        details=body,
        prev_hash=prev,
        hash=entry_digest(seq, at, actor, action, subject, body, prev),
    )
    session.add(entry)
    session.flush()
    return entry


def verify(session: Session) -> Verification:
    """Recompute every link; name the first entry that does not hold."""
    return verify_chain(
        session.scalars(select(AuditEntry).order_by(AuditEntry.seq)).yield_per(1000)
    )
