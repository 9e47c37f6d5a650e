"""The append-only, hash-chained audit log of the node.

Each entry's hash covers its content and the previous entry's hash, so editing,
removing or reordering any entry breaks every link after it; the database
refuses updates and deletions outright (triggers). Entries are written in the
same transaction as what they record: a status change and its audit entry are
committed together or not at all.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.index.models import AuditEntry, utcnow

GENESIS = "0" * 64


def _digest(
    seq: int, at: dt.datetime, actor: str, action: str, subject: str, details: str, prev_hash: str
) -> str:
    canonical = json.dumps(
        [seq, at.astimezone(dt.UTC).isoformat(), actor, action, subject, details, prev_hash],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def append(session: Session, actor: str, action: str, subject: str, **details: Any) -> AuditEntry:
    """Add one entry at the end of the chain (inside the caller's write transaction)."""
    last = session.execute(
        select(AuditEntry.seq, AuditEntry.hash).order_by(AuditEntry.seq.desc()).limit(1)
    ).first()
    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    at = utcnow()
    body = json.dumps(details, sort_keys=True, separators=(",", ":"), default=str)
    entry = AuditEntry(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        subject=subject,
        details=body,
        prev_hash=prev,
        hash=_digest(seq, at, actor, action, subject, body, prev),
    )
    session.add(entry)
    session.flush()
    return entry


@dataclass(frozen=True)
class Verification:
    """The result of recomputing the chain."""

    entries: int
    broken_at: int | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def verify(session: Session) -> Verification:
    """Recompute every link; name the first entry that does not hold."""
    expected_seq, prev = 1, GENESIS
    count = 0
    for entry in session.scalars(select(AuditEntry).order_by(AuditEntry.seq)).yield_per(1000):
        count += 1
        if entry.seq != expected_seq:
            return Verification(count, expected_seq, f"entry {expected_seq} is missing")
        if entry.prev_hash != prev:
            return Verification(count, entry.seq, "does not link to the entry before it")
        recomputed = _digest(
            entry.seq,
            entry.at,
            entry.actor,
            entry.action,
            entry.subject,
            entry.details,
            entry.prev_hash,
        )
        if recomputed != entry.hash:
            return Verification(count, entry.seq, "content does not match its hash")
        expected_seq, prev = entry.seq + 1, entry.hash
    return Verification(count, None, "")
