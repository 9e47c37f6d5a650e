"""The hash-chained audit log format both services keep (node and coordinator).

Each entry's hash covers its sequence number, time, actor, action, subject,
details and the previous entry's hash, so editing, removing or reordering any
entry breaks every link after it. Each service stores its entries in its own
table; the format and the verification are shared, so one auditor's tool reads
either log.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

GENESIS = "0" * 64


def details_json(details: dict[str, Any]) -> str:
    """The canonical text of an entry's details."""
    return json.dumps(details, sort_keys=True, separators=(",", ":"), default=str)


def entry_digest(
    seq: int, at: dt.datetime, actor: str, action: str, subject: str, details: str, prev_hash: str
) -> str:
    """The hash of one entry, linking it to the one before."""
    canonical = json.dumps(
        [seq, at.astimezone(dt.UTC).isoformat(), actor, action, subject, details, prev_hash],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


class ChainEntry(Protocol):
    """What verification reads of a stored entry."""

    @property
    def seq(self) -> int: ...
    @property
    def at(self) -> dt.datetime: ...
    @property
    def actor(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def subject(self) -> str: ...
    @property
    def details(self) -> str: ...
    @property
    def prev_hash(self) -> str: ...
    @property
    def hash(self) -> str: ...


@dataclass(frozen=True)
class Verification:
    """The result of recomputing a chain."""

    entries: int
    broken_at: int | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def verify_chain(entries: Iterable[ChainEntry]) -> Verification:
    """Recompute every link, in sequence order; name the first entry that does not hold."""
    expected_seq, prev = 1, GENESIS
    count = 0
    for entry in entries:
        count += 1
        if entry.seq != expected_seq:
            return Verification(count, expected_seq, f"entry {expected_seq} is missing")
        if entry.prev_hash != prev:
            return Verification(count, entry.seq, "does not link to the entry before it")
        recomputed = entry_digest(
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
