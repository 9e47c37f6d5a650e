"""The vetting pass: every de-identified study is scanned, checked for burned-in text and
then approved by policy or held for a person.

For each study waiting (status ``deidentified``):

1. the PHI scanner (``protocols.phi.scanner``, the same one the coordinator runs)
   reads every instance, with the originals from the vault — one audited read per
   pass — so it can also look for the patient's own values;
2. instances at risk of burned-in text get the site's device rules (masked at
   once when a rule matches the device and size) and OCR; text found is a finding;
3. the findings replace the study's previous open machine findings, and the
   policy approves the study or holds it for review, recorded as a transition.

Masking (by rule or by a reviewer) rewrites the stored instance — the unmasked
copy is replaced, so it can never be shared — and updates the index row.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from node.deid.runner import fsync_dir
from node.errors import NodeError
from node.index import audit
from node.index.lifecycle import transition
from node.index.models import Finding, Instance, Mask, Series, Study, utcnow
from node.index.originals import original_identifiers
from node.index.store import NodeIndex
from node.settings import NodeSettings
from node.site import safe_private
from node.vetting import masking, ocr
from node.vetting.policy import InstanceFacts, VettingPolicy, decide
from protocols.api.node import StudyStatus as S
from protocols.deid.options import DeidOptions
from protocols.deid.safe_private import SafePrivateKey
from protocols.phi.findings import PhiFinding, Severity
from protocols.phi.scanner import Originals, scan

log = logging.getLogger("radfed.node.vetting")
MACHINE_SOURCES = ("scanner", "ocr")


@dataclass
class VetSummary:
    studies: int = 0
    approved: int = 0
    held: int = 0
    findings: int = 0
    masked: int = 0
    held_reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Instance:
    id: int
    sop_uid: str
    path: str
    modality: str
    burned_in_risk: bool


def vet_pending(
    index: NodeIndex,
    settings: NodeSettings,
    policy: VettingPolicy,
    options: DeidOptions,
    limit: int = 200,
    stable_seconds: float = 0.0,
) -> VetSummary:
    """Vet up to ``limit`` studies waiting in ``deidentified``.

    ``stable_seconds``: only studies that have received no instance for that long
    (DICOM has no end-of-study signal; a PACS sends a study's series one by one).
    """
    summary = VetSummary()
    quiet_since = utcnow() - dt.timedelta(seconds=stable_seconds)
    with index.db.read() as session:
        studies = list(
            session.execute(
                select(Study.id, Study.study_uid)
                .where(Study.status == S.DEIDENTIFIED.value, Study.updated_at <= quiet_since)
                .order_by(Study.received_at)
                .limit(limit)
            ).all()
        )
        by_study: dict[int, list[_Instance]] = {}
        for row in session.execute(
            select(
                Instance.id,
                Instance.sop_uid,
                Instance.path,
                Series.modality,
                Instance.burned_in_risk,
                Instance.study_id,
            )
            .join(Series, Series.id == Instance.series_id)
            .where(Instance.study_id.in_([s.id for s in studies]))
        ).all():
            by_study.setdefault(row[5], []).append(
                _Instance(row[0], row[1], row[2], row[3] or "", bool(row[4]))
            )
    if not studies:
        return summary
    sops = [i.sop_uid for items in by_study.values() for i in items]
    records = original_identifiers(index, sops, actor="vetting", purpose="PHI scan")
    rules = masking.load_rules(settings.mask_rules)
    for study_id, _ in studies:
        instances = by_study.get(study_id, [])
        found = _vet_study(
            safe_private(settings), index, settings, options, instances, records, rules, summary
        )
        decision = decide(
            policy,
            [InstanceFacts(i.modality, _still_at_risk(index, i.id)) for i in instances],
            [f.severity for _, _, f in found],
        )
        with index.db.write() as session:
            session.execute(
                update(Finding)
                .where(
                    Finding.study_id == study_id,
                    Finding.resolved_at.is_(None),
                    Finding.source.in_(MACHINE_SOURCES),
                )
                .values(resolved_at=utcnow(), resolved_by="superseded")
            )
            for instance_id, source, finding in found:
                session.add(
                    Finding(
                        study_id=study_id,
                        instance_id=instance_id,
                        source=source,
                        severity=int(finding.severity),
                        kind=finding.kind,
                        location=finding.location[:200],
                        message=finding.message,
                        excerpt=redact(finding.excerpt),
                        at=utcnow(),
                    )
                )
            study = session.get(Study, study_id)
            if study is None or study.status != S.DEIDENTIFIED.value:
                continue  # someone decided meanwhile
            target = S.APPROVED if decision.approve else S.HELD
            transition(session, study, target, "policy", decision.reason)
        summary.studies += 1
        summary.findings += len(found)
        if decision.approve:
            summary.approved += 1
        else:
            summary.held += 1
            summary.held_reasons.append(decision.reason)
    return summary


def _vet_study(
    allowed: frozenset[SafePrivateKey],
    index: NodeIndex,
    settings: NodeSettings,
    options: DeidOptions,
    instances: list[_Instance],
    records: dict[str, dict[str, Any]],
    rules: list[masking.MaskRule],
    summary: VetSummary,
) -> list[tuple[int, str, PhiFinding]]:
    found: list[tuple[int, str, PhiFinding]] = []
    for item in instances:
        path = settings.store_dir / item.path
        record = records.get(item.sop_uid)
        originals = Originals.from_records([record]) if record else None
        try:
            findings = scan(
                path,
                options,
                site_prefix=settings.site_id,
                originals=originals,
                safe_private=allowed,
            )
        except OSError as exc:
            findings = [
                PhiFinding(
                    severity=Severity.CRITICAL,
                    kind="unreadable",
                    location=item.path,
                    message=f"cannot read: {exc}",
                )
            ]
        found.extend((item.id, "scanner", f) for f in findings)
        if not item.burned_in_risk:
            continue
        try:
            burned = _burned_in(index, settings, item, path, rules, summary)
        except NodeError as exc:
            # Pixels that cannot be decoded cannot be checked for text: held for a
            # person, and the rest of the pass goes on (one such file must not stop
            # every study behind it).
            burned = [
                PhiFinding(
                    severity=Severity.HIGH,
                    kind="unreadable",
                    location="pixel data",
                    message=f"burned-in text not checked: {exc.code}: {exc.message}"[:500],
                )
            ]
        found.extend((item.id, "ocr", f) for f in burned)
    return found


def _burned_in(
    index: NodeIndex,
    settings: NodeSettings,
    item: _Instance,
    path: Path,
    rules: list[masking.MaskRule],
    summary: VetSummary,
) -> list[PhiFinding]:
    """Device rules, then OCR: text found in the pixels of one instance at risk."""
    rectangles = masking.rules_for(_header(path), rules)
    if rectangles:
        apply_mask(
            index,
            settings,
            item.id,
            [(r.left, r.top, r.width, r.height) for r in rectangles],
            by="policy",
            source="device rule",
        )
        summary.masked += 1
        if not _still_at_risk(index, item.id):
            return []
    return [
        PhiFinding(
            severity=Severity.HIGH,
            kind="burned_in_text",
            location=f"frame {region.frame} at {region.left},{region.top} "
            f"{region.width}×{region.height}",
            message="text in the pixels",
            excerpt=region.text[:40],
        )
        for region in ocr.find_text(path)
    ]


def redact(text: str) -> str:
    """Enough of a value to find it, not enough to read it: the index is not the vault.

    ``ROSSI ANNA MRN123`` becomes ``R···· A··· M·····``: each word keeps its first
    character and its length.
    """
    return " ".join(word[:1] + "·" * (len(word) - 1) for word in text.split())[:200]


def _header(path: Path) -> Any:
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # whatever a malformed header makes pydicom raise
        raise NodeError("bad_dicom", f"the header cannot be read: {exc}") from exc


def _still_at_risk(index: NodeIndex, instance_id: int) -> bool:
    with index.db.read() as session:
        return bool(
            session.scalar(select(Instance.burned_in_risk).where(Instance.id == instance_id))
        )


def apply_mask(
    index: NodeIndex,
    settings: NodeSettings,
    instance_id: int,
    rectangles: list[tuple[int, int, int, int]],
    by: str,
    source: str,
) -> masking.MaskResult:
    """Mask a stored instance in place (atomically); the index and audit log follow."""
    with index.db.read() as session:
        row = session.execute(
            select(Instance.path, Study.status, Study.study_uid, Instance.sop_uid)
            .join(Study, Study.id == Instance.study_id)
            .where(Instance.id == instance_id)
        ).first()
    if row is None:
        raise NodeError("not_found", f"no instance {instance_id}")
    relpath, status, study_uid, sop_uid = row
    if S(status) not in (S.DEIDENTIFIED, S.HELD):
        raise NodeError(
            "invalid_transition",
            f"study {study_uid} is {status}: only studies in review can be masked",
        )
    path = settings.store_dir / relpath
    staged = path.with_name(f".{path.name}.masking")
    result = masking.mask_instance(path, staged, [masking.Rect(*r) for r in rectangles])
    data = staged.read_bytes()
    os.replace(staged, path)  # the unmasked copy is gone: it can never be shared
    fsync_dir(path.parent)
    with index.db.write() as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(
                sha256=hashlib.sha256(data).hexdigest(),
                size=len(data),
                transfer_syntax=result.transfer_syntax_out,
                burned_in_risk=not result.clean,
            )
        )
        session.add(
            Mask(
                instance_id=instance_id,
                rectangles=json.dumps(rectangles),
                source=source,
                by=by,
                at=utcnow(),
                recheck_clean=result.clean,
            )
        )
        if result.clean:
            session.execute(
                update(Finding)
                .where(
                    Finding.instance_id == instance_id,
                    Finding.kind == "burned_in_text",
                    Finding.resolved_at.is_(None),
                )
                .values(resolved_at=utcnow(), resolved_by=by)
            )
        audit.append(
            session,
            by,
            "mask.apply",
            sop_uid,
            study=study_uid,
            source=source,
            rectangles=rectangles,
            clean=result.clean,
        )
    return result
