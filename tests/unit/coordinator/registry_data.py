"""Registered exams for the registry's tests, written straight into the registry tables.

Intake registers exams from signed uploads; the search and release tests need
many exams with known attributes, so this builds the same rows (an ``Exam``
with its manifest, series, instances, labels and clinical values) and, when a
store is given, puts each instance's synthetic DICOM-like bytes into it under
their sha256. ``generate`` makes a varied, deterministic set; the tests check
the registry against plain Python filtering of the same specs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

from sqlalchemy import select

from coordinator.objects import ObjectStore
from coordinator.registry.db import Database
from coordinator.registry.models import (
    Exam,
    ExamClinical,
    ExamInstance,
    ExamLabel,
    ExamSeries,
    Site,
)
from protocols.api.coordinator import (
    DeidRecord,
    ExamEntry,
    ExamManifest,
    InstanceEntry,
    LabelEntry,
    SeriesEntry,
)
from protocols.deid.options import DeidOptions
from protocols.signing import manifest_digest
from protocols.version import DEID_PROFILE_VERSION, PROTOCOL_VERSION

ROOT = "1.2.826.0.1.3680043.9.7"
SITES = ("st-marys", "north-general", "lakeside")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
REGISTERED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@dataclass
class SeriesSpec:
    modality: str
    instances: int = 2
    body_part: str | None = None


@dataclass
class ExamSpec:
    """One exam as the tests want it; ``number`` makes its UIDs."""

    number: int
    site: str
    pseudonym: str
    series: list[SeriesSpec]
    study_date: dt.date | None = None
    body_part: str | None = None
    labels: dict[tuple[str, str], str] = field(default_factory=dict)
    clinical: dict[str, str] = field(default_factory=dict)
    registered_at: dt.datetime = REGISTERED

    @property
    def study_uid(self) -> str:
        return f"{ROOT}.1.{self.number}"

    def series_uid(self, s: int) -> str:
        return f"{ROOT}.2.{self.number}.{s + 1}"

    def sop_uid(self, s: int, i: int) -> str:
        return f"{ROOT}.3.{self.number}.{s + 1}.{i + 1}"

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.series})

    def files(self) -> list[tuple[str, str, str, bytes]]:
        """(series UID, SOP UID, path in a release, bytes) of every instance."""
        return [
            (
                self.series_uid(s),
                self.sop_uid(s, i),
                f"{self.pseudonym}/{self.study_uid}/{self.series_uid(s)}/{self.sop_uid(s, i)}.dcm",
                file_bytes(self.sop_uid(s, i)),
            )
            for s, series in enumerate(self.series)
            for i in range(series.instances)
        ]

    def manifest(self) -> ExamManifest:
        files = self.files()
        return ExamManifest(
            protocol_version=PROTOCOL_VERSION,
            site=self.site,
            exam=ExamEntry(
                pseudonym=self.pseudonym,
                study_instance_uid=self.study_uid,
                study_date=self.study_date,
                modalities=self.modalities,
                body_part=self.body_part,
                series=[
                    SeriesEntry(
                        series_instance_uid=self.series_uid(s),
                        modality=series.modality,
                        body_part=series.body_part,
                        series_number=s + 1,
                        instances=[
                            InstanceEntry(
                                sop_instance_uid=sop,
                                sop_class_uid=CT_IMAGE,
                                size=len(data),
                                sha256=hashlib.sha256(data).hexdigest(),
                            )
                            for series_uid, sop, _, data in files
                            if series_uid == self.series_uid(s)
                        ],
                    )
                    for s, series in enumerate(self.series)
                ],
            ),
            deid=DeidRecord.of(DeidOptions(), DEID_PROFILE_VERSION),
            labels=[
                LabelEntry(scheme=scheme, name=name, value=value)
                for (scheme, name), value in sorted(self.labels.items())
            ],
            clinical=self.clinical,
            created_at=self.registered_at,
        )


def file_bytes(sop_uid: str) -> bytes:
    """Synthetic DICOM-like bytes: a preamble, ``DICM`` and content unique to the instance."""
    body = (f"synthetic instance {sop_uid};" * 8).encode("ascii")
    return b"\0" * 128 + b"DICM" + body


MODALITY_CYCLE = (["CT"], ["CR"], ["DX"], ["CT", "SR"], ["MR"], ["CR", "DX"])
BODY_PARTS = ("CHEST", "CHEST", "HEAD", None, "ABDOMEN")
APPEARANCE = ("typical", "indeterminate", "atypical", "negative")


def generate(count: int, sites: tuple[str, ...] = SITES, start: int = 1) -> list[ExamSpec]:
    """``count`` varied exams across ``sites``, the same every time for the same arguments."""
    specs = []
    for n in range(start, start + count):
        site = sites[n % len(sites)]
        labels = {("ricord", "covid"): "positive" if n % 2 else "negative"}
        if n % 5:
            labels[("cxr", "appearance")] = APPEARANCE[n % len(APPEARANCE)]
        specs.append(
            ExamSpec(
                number=n,
                site=site,
                pseudonym=f"{site.upper()}-P{n // 2:05d}",
                series=[SeriesSpec(m, instances=1 + n % 3) for m in MODALITY_CYCLE[n % 6]],
                study_date=None if n % 7 == 0 else dt.date(2020, 1, 1) + dt.timedelta(days=3 * n),
                body_part=BODY_PARTS[n % len(BODY_PARTS)],
                labels=labels,
                clinical={"sex": "F" if n % 3 else "M", "age_group": f"{20 + 10 * (n % 5)}s"},
                # Registration order differs from study-date order.
                registered_at=REGISTERED + dt.timedelta(minutes=(n * 37) % 1000),
            )
        )
    return specs


def ensure_sites(db: Database, names: list[str] | tuple[str, ...]) -> dict[str, int]:
    """The sites' ids, adding the sites that are not there yet."""
    with db.write() as session:
        found = session.execute(select(Site.name, Site.id).where(Site.name.in_(names)))
        ids = {name: site_id for name, site_id in found}
        for name in names:
            if name not in ids:
                site = Site(name=name, enrolled_at=REGISTERED)
                session.add(site)
                session.flush()
                ids[name] = site.id
    return ids


def register(
    db: Database, specs: list[ExamSpec], store: ObjectStore | None = None
) -> dict[str, int]:
    """Register ``specs`` as intake would (and store their files); study UID -> exam id."""
    site_ids = ensure_sites(db, sorted({s.site for s in specs}))
    ids = {}
    with db.write() as session:
        for spec in specs:
            manifest = spec.manifest()
            exam = Exam(
                site_id=site_ids[spec.site],
                study_uid=spec.study_uid,
                patient_pseudonym=spec.pseudonym,
                study_date=spec.study_date,
                modality="\\".join(spec.modalities),
                body_part=spec.body_part,
                series_count=len(spec.series),
                instance_count=manifest.instance_count,
                size=manifest.total_size,
                manifest_sha256=manifest_digest(manifest),
                manifest=manifest.model_dump_json(),
                deid_profile=DEID_PROFILE_VERSION,
                registered_at=spec.registered_at,
            )
            session.add(exam)
            session.flush()
            ids[spec.study_uid] = exam.id
            for entry in manifest.exam.series:
                series = ExamSeries(
                    exam_id=exam.id,
                    series_uid=entry.series_instance_uid,
                    modality=entry.modality,
                    body_part=entry.body_part,
                    series_number=entry.series_number,
                    instance_count=len(entry.instances),
                )
                session.add(series)
                session.flush()
                session.add_all(
                    ExamInstance(
                        exam_id=exam.id,
                        series_id=series.id,
                        sop_uid=i.sop_instance_uid,
                        sop_class_uid=i.sop_class_uid,
                        size=i.size,
                        sha256=i.sha256,
                    )
                    for i in entry.instances
                )
            session.add_all(
                ExamLabel(exam_id=exam.id, scheme=scheme, name=name, value=value)
                for (scheme, name), value in spec.labels.items()
            )
            session.add_all(
                ExamClinical(exam_id=exam.id, variable=variable, value=value)
                for variable, value in spec.clinical.items()
            )
    if store is not None:
        for spec in specs:
            for _, _, _, data in spec.files():
                store.put_stream([data], hashlib.sha256(data).hexdigest())
    return ids
