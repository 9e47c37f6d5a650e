"""A person's decisions on a study: approve, reject, mask — each audited.

Approving needs one reviewer, or two different ones when the site's policy has
the two-person rule; rejecting needs a reason. Masking rewrites the stored
de-identified instance (the unmasked copy is replaced, never kept) and records
the rectangles, who drew them and whether the OCR re-check came back clean.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.errors import NodeError
from node.index import audit
from node.index.lifecycle import transition
from node.index.models import Finding, Review, StatusChange, Study, utcnow
from node.index.store import NodeIndex
from node.vetting.policy import VettingPolicy
from protocols.api.node import StudyStatus as S

REVIEWABLE = frozenset({S.HELD, S.DEIDENTIFIED})


@dataclass(frozen=True)
class ReviewOutcome:
    status: S
    message: str


def _study(session: Session, study_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise NodeError("study_not_found", f"no study {study_uid} in this node's index")
    return study


def approve(
    index: NodeIndex, policy: VettingPolicy, study_uid: str, reviewer: str, reason: str = ""
) -> ReviewOutcome:
    """Approve a study; with the two-person rule the second distinct reviewer completes it."""
    with index.db.write() as session:
        study = _study(session, study_uid)
        if S(study.status) not in REVIEWABLE:
            raise NodeError(
                "invalid_transition", f"study {study_uid} is {study.status}, not awaiting review"
            )
        since = _held_since(session, study)
        approvers = set(
            session.scalars(
                select(Review.reviewer).where(
                    Review.study_id == study.id, Review.decision == "approve", Review.at >= since
                )
            )
        )
        if reviewer in approvers:
            raise NodeError("already_reviewed", f"{reviewer} has already approved this study")
        session.add(
            Review(
                study_id=study.id, reviewer=reviewer, decision="approve", reason=reason, at=utcnow()
            )
        )
        audit.append(session, reviewer, "review.approve", study_uid, reason=reason)
        needed = 2 if policy.review.two_person else 1
        if len(approvers) + 1 < needed:
            if S(study.status) is S.DEIDENTIFIED:
                transition(session, study, S.HELD, reviewer, "first approval recorded")
            return ReviewOutcome(S.HELD, "approved once: a second reviewer must confirm")
        names = ", ".join(sorted(approvers | {reviewer}))
        transition(session, study, S.APPROVED, f"reviewer:{names}", reason or "approved")
        return ReviewOutcome(S.APPROVED, f"approved by {names}")


def reject(index: NodeIndex, study_uid: str, reviewer: str, reason: str) -> ReviewOutcome:
    """Reject a study; the reason is required and recorded."""
    if not reason.strip():
        raise NodeError("reason_required", 'Argument "reason": a rejection needs a reason.')
    with index.db.write() as session:
        study = _study(session, study_uid)
        if S(study.status) not in REVIEWABLE:
            raise NodeError(
                "invalid_transition", f"study {study_uid} is {study.status}, not awaiting review"
            )
        session.add(
            Review(
                study_id=study.id, reviewer=reviewer, decision="reject", reason=reason, at=utcnow()
            )
        )
        audit.append(session, reviewer, "review.reject", study_uid, reason=reason)
        transition(session, study, S.REJECTED, f"reviewer:{reviewer}", reason)
    return ReviewOutcome(S.REJECTED, f"rejected by {reviewer}")


def _held_since(session: Session, study: Study) -> dt.datetime:
    """When the study last entered review: approvals before that no longer count."""
    last = session.scalar(
        select(StatusChange.at)
        .where(StatusChange.study_id == study.id, StatusChange.to_status == S.DEIDENTIFIED.value)
        .order_by(StatusChange.id.desc())
        .limit(1)
    )
    return last or study.received_at


def open_findings(index: NodeIndex, study_uid: str) -> list[dict[str, object]]:
    """Unresolved findings of a study, worst first."""
    with index.db.read() as session:
        study = _study(session, study_uid)
        rows = session.scalars(
            select(Finding)
            .where(Finding.study_id == study.id, Finding.resolved_at.is_(None))
            .order_by(Finding.severity.desc(), Finding.id)
        ).all()
        return [
            {
                "id": f.id,
                "source": f.source,
                "severity": f.severity,
                "kind": f.kind,
                "location": f.location,
                "message": f.message,
                "excerpt": f.excerpt,
                "instance_id": f.instance_id,
            }
            for f in rows
        ]


def findings_json(findings: list[dict[str, object]]) -> str:
    return json.dumps(findings)
