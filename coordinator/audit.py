"""The coordinator's append-only, hash-chained audit log (format: ``protocols.audit``).

Enrollments, revocations, token changes, uploads, rejections, releases,
withdrawals and logins are appended in the same transaction as what they
record. Every append locks the chain's head row, so concurrent writers on
PostgreSQL never fork the chain; the database refuses updates and deletions of
entries (triggers), and the head row makes a removed tail entry detectable.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.registry.models import AuditEntry, AuditHead
from protocols.audit import Verification, details_json, entry_digest, verify_chain
from protocols.sqltypes import utcnow


def append(session: Session, actor: str, action: str, subject: str, **details: Any) -> AuditEntry:
    """Add one entry at the end of the chain (inside the caller's write transaction)."""
    head = session.execute(
        select(AuditHead).where(AuditHead.id == 1).with_for_update()
    ).scalar_one()
    seq, prev = head.seq + 1, head.hash
    at = utcnow()
    body = details_json(details)
    entry = AuditEntry(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        subject=subject[:200],
        details=body,
        prev_hash=prev,
        hash=entry_digest(seq, at, actor, action, subject[:200], body, prev),
    )
    session.add(entry)
    head.seq, head.hash = seq, entry.hash
    session.flush()
    return entry


def verify(session: Session) -> Verification:
    """Recompute every link and check that the chain ends where its head says."""
    result = verify_chain(
        session.scalars(select(AuditEntry).order_by(AuditEntry.seq)).yield_per(1000)
    )
    if not result.ok:
        return result
    head = session.execute(select(AuditHead.seq, AuditHead.hash)).one()
    last = session.execute(
        select(AuditEntry.seq, AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1)
    ).first()
    if (last[0] if last else 0) != head.seq or (last[1] if last else head.hash) != head.hash:
        missing = (last[0] if last else 0) + 1
        return Verification(result.entries, missing, f"entry {missing} is missing")
    return result
