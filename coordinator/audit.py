"""The coordinator's append-only, hash-chained audit log (format: ``protocols.audit``).

Enrollments, revocations, token changes, uploads, rejections, releases,
withdrawals and logins are appended in the same transaction as what they
record. Every append locks the chain's head row, so concurrent writers on
PostgreSQL never fork the chain; the database refuses updates and deletions of
entries (triggers), and the head row makes a removed tail entry detectable.
``entries`` reads a page of the log, newest first, for the operators' web UI.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.errors import CoordinatorError
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


@dataclass(frozen=True)
class EntryView:
    """One audit entry as an operator reads it."""

    seq: int
    at: dt.datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any]
    hash: str


def entries(
    session: Session, *, limit: int = 100, offset: int = 0, action: str = ""
) -> tuple[int, list[EntryView]]:
    """How many entries there are (with actions starting ``action``) and a page, newest first."""
    if not 1 <= limit <= 1000:
        raise CoordinatorError(
            "invalid_argument", f'Argument "limit" must be from 1 to 1000, not {limit}.'
        )
    if offset < 0:
        raise CoordinatorError("invalid_argument", 'Argument "offset" must be 0 or more.')
    where = [AuditEntry.action.startswith(action, autoescape=True)] if action else []
    total = session.scalar(select(func.count()).select_from(AuditEntry).where(*where)) or 0
    rows = session.scalars(
        select(AuditEntry).where(*where).order_by(AuditEntry.seq.desc()).limit(limit).offset(offset)
    )
    return total, [
        EntryView(e.seq, e.at, e.actor, e.action, e.subject, json.loads(e.details), e.hash)
        for e in rows
    ]
