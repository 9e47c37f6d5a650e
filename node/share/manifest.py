"""The ``ExamManifest`` of an approved study, built from the node index and signed.

Everything in it comes from the index, which holds de-identified values only:
the pseudonym, the de-identified UIDs, the shifted study date, each file's
size and SHA-256, the profile options this site applies, and the labels and
clinical variables imported for the study (already de-identified). Before a
manifest is made every file is hashed again, so a stored file that changed
since it was indexed is caught on the node, not at the coordinator.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from node.errors import NodeError
from node.index.models import ClinicalValue, Instance, Label, Patient, Series, Study
from node.index.store import NodeIndex
from node.settings import NodeSettings
from protocols.api.coordinator import (
    DeidRecord,
    ExamEntry,
    ExamManifest,
    InstanceEntry,
    LabelEntry,
    SeriesEntry,
    SignedManifest,
)
from protocols.signing import sign_manifest
from protocols.sqltypes import utcnow
from protocols.version import DEID_PROFILE_VERSION, PROTOCOL_VERSION


@dataclass(frozen=True)
class ExamPackage:
    """A signed manifest and where each of its files is on this node."""

    signed: SignedManifest
    files: dict[str, Path]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(
    index: NodeIndex, settings: NodeSettings, study_uid: str, site: str
) -> tuple[ExamManifest, dict[str, Path]]:
    """The manifest of one study and its files by SHA-256."""
    with index.db.read() as session:
        row = session.execute(
            select(Study, Patient.pseudonym)
            .join(Patient, Patient.id == Study.patient_id)
            .where(Study.study_uid == study_uid)
        ).first()
        if row is None:
            raise NodeError("study_not_found", f"no study {study_uid} in this node's index")
        study, pseudonym = row
        series_rows = session.scalars(
            select(Series)
            .where(Series.study_id == study.id)
            .order_by(Series.series_number, Series.id)
        ).all()
        instances = session.scalars(
            select(Instance)
            .where(Instance.study_id == study.id)
            .order_by(Instance.series_id, Instance.instance_number, Instance.id)
        ).all()
        labels = session.scalars(
            select(Label).where(Label.study_id == study.id).order_by(Label.scheme, Label.name)
        ).all()
        clinical = session.scalars(
            select(ClinicalValue)
            .where(ClinicalValue.study_id == study.id)
            .order_by(ClinicalValue.variable)
        ).all()
        session.expunge_all()  # keep what was read: the read transaction ends here
    by_series: dict[int, list[Instance]] = {}
    for inst in instances:
        by_series.setdefault(inst.series_id, []).append(inst)
    files: dict[str, Path] = {}
    series_entries = []
    for s in series_rows:
        entries = []
        for inst in by_series.get(s.id, []):
            path = settings.store_dir / inst.path
            try:
                actual = _sha256(path)
            except OSError as exc:
                raise NodeError(
                    "store_unreadable", f"cannot read {inst.sop_uid} from the store: {exc}"
                ) from exc
            if actual != inst.sha256:
                raise NodeError(
                    "store_changed",
                    f"instance {inst.sop_uid} changed on disk since it was indexed; re-ingest it",
                )
            files[inst.sha256] = path
            entries.append(
                InstanceEntry(
                    sop_instance_uid=inst.sop_uid,
                    sop_class_uid=inst.sop_class_uid,
                    size=inst.size,
                    sha256=inst.sha256,
                )
            )
        if entries:
            series_entries.append(
                SeriesEntry(
                    series_instance_uid=s.series_uid,
                    modality=s.modality or "OT",
                    body_part=s.body_part,
                    series_number=s.series_number,
                    instances=entries,
                )
            )
    if not series_entries:
        raise NodeError("empty_study", f"study {study_uid} has no instances to share")
    body_parts = sorted({s.body_part for s in series_rows if s.body_part})
    manifest = ExamManifest(
        protocol_version=PROTOCOL_VERSION,
        site=site,
        exam=ExamEntry(
            pseudonym=pseudonym,
            study_instance_uid=study.study_uid,
            study_date=study.study_date,
            modalities=sorted({s.modality for s in series_entries}),
            body_part=body_parts[0] if len(body_parts) == 1 else None,
            series=series_entries,
        ),
        deid=DeidRecord.of(settings.deid, DEID_PROFILE_VERSION),
        labels=[LabelEntry(scheme=lab.scheme, name=lab.name, value=lab.value) for lab in labels],
        clinical={c.variable: c.value for c in clinical},
        created_at=utcnow(),
    )
    return manifest, files


def package(
    index: NodeIndex,
    settings: NodeSettings,
    study_uid: str,
    site: str,
    key_path: Path,
    cert_path: Path,
) -> ExamPackage:
    """The signed manifest of a study, ready to upload."""
    manifest, files = build_manifest(index, settings, study_uid, site)
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise NodeError("bad_key", f"{key_path} is not an EC key")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return ExamPackage(sign_manifest(manifest, key, cert), files)
