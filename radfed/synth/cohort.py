"""A labelled chest-radiograph cohort with a learnable signal, for training tests and demos.

:func:`write_cohort` writes ``n`` CR/DX chest radiographs of synthetic,
PHI-laden patients (names, MRNs and accession numbers from
:mod:`radfed.synth.site`, in folders named after them: the node de-identifies
them) and the RICORD-style ``labels.csv`` a site's research team would hand the
node, keyed by accession number.

Every image is a chest-like scene — body, two dark lung fields, mediastinum,
spine, faint ribs, low-frequency exposure variation and detector noise — with
its geometry, exposure and contrast varied per patient. Positives carry
synthetic airspace opacities, soft bright blobs inside the lung fields, whose
pattern follows the RICORD appearance:

* Typical Appearance: one peripheral lower-zone opacity in each lung;
* Indeterminate Appearance: one lower-zone opacity in one lung;
* Atypical Appearance: one smaller, denser upper-zone opacity;
* Negative for Pneumonia: none.

The files vary the way real exports do: MONOCHROME1 and MONOCHROME2, Rescale
Slope and Intercept other than 1 and 0 on some, Window Center/Width on some.
The same arguments give the same files; the UIDs depend on ``site`` and
``seed``, so cohorts of different sites never collide.

:func:`cohort_manifest` builds the ``TrainingManifest`` a node would hand the
training app for these files (from the original files, not de-identified
copies), for the app's tests and the benchmarks.
"""

from __future__ import annotations

import csv
import datetime as dt
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from protocols.training import TrainingManifest, TrainingSample
from radfed.synth.site import Patient, Uids, make_patient, radiograph, write

#: The label a cohort's appearance is stored under in a training manifest.
APPEARANCE_LABEL: Final = "ricord:appearance"
NEGATIVE: Final = "Negative for Pneumonia"
POSITIVES: Final = ("Typical Appearance", "Indeterminate Appearance", "Atypical Appearance")
LABELS_HEADER: Final = ("Accession Number", "Appearance")

#: A lung field: centre row and column, half-height and half-width (pixels).
Lung = tuple[float, float, float, float]
#: An opacity: centre row and column, Gaussian sigma (pixels), amplitude (display units).
Opacity = tuple[float, float, float, float]


@dataclass(frozen=True)
class CohortImage:
    """One radiograph of the cohort and its truth (original identifiers)."""

    path: Path
    patient_id: str
    accession: str
    study_uid: str
    sop_uid: str
    modality: str
    photometric: str
    appearance: str

    @property
    def positive(self) -> bool:
        return self.appearance != NEGATIVE


@dataclass
class Cohort:
    """The files written and the labels they encode."""

    root: Path
    site: str
    labels_csv: Path
    images: list[CohortImage] = field(default_factory=list)
    patients: list[Patient] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [image.path for image in self.images]

    @property
    def by_accession(self) -> dict[str, str]:
        """Original accession number -> appearance."""
        return {image.accession: image.appearance for image in self.images}

    @property
    def by_sop_uid(self) -> dict[str, str]:
        """Original SOP Instance UID -> appearance."""
        return {image.sop_uid: image.appearance for image in self.images}

    @property
    def by_study_uid(self) -> dict[str, str]:
        """Original Study Instance UID -> appearance."""
        return {image.study_uid: image.appearance for image in self.images}


def write_cohort(
    root: Path,
    n: int,
    seed: int,
    size: int = 128,
    positive_fraction: float = 0.5,
    site: str = "A",
) -> Cohort:
    """Write ``n`` labelled chest radiographs and ``labels.csv`` under ``root``.

    Exactly ``round(n * positive_fraction)`` images are positive, the three
    positive appearances taking turns.
    """
    if n < 1:
        raise ValueError(f'Argument "n" must be at least 1, not {n}.')
    if size < 32:
        raise ValueError(f'Argument "size" must be at least 32, not {size}.')
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(
            f'Argument "positive_fraction" must be between 0 and 1, not {positive_fraction}.'
        )
    mixed = zlib.crc32(f"{site}\x00{seed}".encode())
    rng = random.Random(mixed)
    nprng = np.random.default_rng(mixed)
    uids = Uids(mixed)
    positives = round(n * positive_fraction)
    appearances = [POSITIVES[i % len(POSITIVES)] for i in range(positives)]
    appearances += [NEGATIVE] * (n - positives)
    rng.shuffle(appearances)
    cohort = Cohort(root=root, site=site, labels_csv=root / "labels.csv")
    accessions: set[str] = set()
    for index, appearance in enumerate(appearances):
        patient = make_patient(rng, index)
        cohort.patients.append(patient)
        when = dt.datetime(2020, 4, 1, 9, 0) + dt.timedelta(
            days=rng.randrange(0, 300), minutes=rng.randrange(0, 600)
        )
        study_uid = uids.new(patient.patient_id[3:])
        patient.studies.append(study_uid)
        accession = f"ACC{rng.randrange(10**6, 10**7)}"
        while accession in accessions:
            accession = f"ACC{rng.randrange(10**6, 10**7)}"
        accessions.add(accession)
        dx = index % 2 == 1
        ds = radiograph(patient, uids, study_uid, when, accession, size, nprng, dx=dx)
        display = chest_scene(size, appearance, nprng)
        photometric = _encode(ds, display, index, nprng)
        folder = root / f"{patient.name.split('^')[0]}_{patient.patient_id}"
        path = write(ds, folder / "XR" / f"{accession}.dcm")
        cohort.images.append(
            CohortImage(
                path=path,
                patient_id=patient.patient_id,
                accession=accession,
                study_uid=study_uid,
                sop_uid=str(ds.SOPInstanceUID),
                modality=str(ds.Modality),
                photometric=photometric,
                appearance=appearance,
            )
        )
    _write_labels(cohort)
    return cohort


def cohort_manifest(
    cohort: Cohort, run: str = "test", site: str = "A", app_hash: str = "0" * 64
) -> TrainingManifest:
    """The training manifest a node would hand the app for ``cohort`` (original files)."""
    samples = [
        TrainingSample(
            path=str(image.path.resolve()),
            study=image.study_uid,
            modality=image.modality,
            labels={APPEARANCE_LABEL: image.appearance},
        )
        for image in cohort.images
    ]
    return TrainingManifest(run=run, site=site, app_hash=app_hash, samples=samples)


def _ellipse(
    size: int, cy: float, cx: float, ry: float, rx: float, soft: float
) -> npt.NDArray[np.float64]:
    """A filled ellipse with a soft edge (1 inside, 0 outside)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    r = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    mask: npt.NDArray[np.float64] = np.clip((1.0 - r) / soft + 0.5, 0.0, 1.0)
    return mask


def _blob(size: int, cy: float, cx: float, sigma: float) -> npt.NDArray[np.float64]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    blob: npt.NDArray[np.float64] = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
    return blob


def _smooth_noise(size: int, cells: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Low-frequency noise: a coarse random grid upsampled bilinearly."""
    coarse = rng.normal(0.0, 1.0, (cells + 1, cells + 1))
    grid = np.linspace(0, cells, size)
    i0 = np.floor(grid).astype(int).clip(0, cells - 1)
    f = grid - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    out: npt.NDArray[np.float64] = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    return out


def chest_scene(size: int, appearance: str, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """A display image in [0, 1] (1 = white, dense): a chest and, for positives, opacities."""
    s = float(size)
    body = _ellipse(size, s * 0.55, s * 0.5, s * 0.52, s * 0.46, 0.08)
    image = 0.08 + 0.42 * body
    lungs: list[Lung] = []
    for side in (-1.0, 1.0):
        cy = s * rng.uniform(0.47, 0.53)
        cx = s * (0.5 + side * rng.uniform(0.19, 0.23))
        ry, rx = s * rng.uniform(0.27, 0.32), s * rng.uniform(0.13, 0.16)
        lungs.append((cy, cx, ry, rx))
        image -= 0.26 * _ellipse(size, cy, cx, ry, rx, 0.25)
    # mediastinum and spine: dense midline structures
    image += 0.12 * _ellipse(size, s * 0.55, s * 0.5, s * 0.3, s * 0.07, 0.3)
    image += 0.1 * _ellipse(size, s * 0.6, s * 0.5, s * 0.45, s * 0.035, 0.4)
    # ribs: faint periodic bands across the lung fields
    y = np.arange(size, dtype=np.float64)[:, None]
    period = s * rng.uniform(0.075, 0.09)
    phase = rng.uniform(0, 2 * np.pi)
    image += 0.035 * (np.sin(2 * np.pi * y / period + phase) > 0.6) * body
    for cy, cx, sigma, amplitude in _opacities(appearance, lungs, rng):
        image += amplitude * _blob(size, cy, cx, sigma)
    image += 0.04 * _smooth_noise(size, 4, rng)
    image = image * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05)
    image += rng.normal(0.0, 0.025, (size, size))
    clipped: npt.NDArray[np.float64] = np.clip(image, 0.0, 1.0)
    return clipped


def _opacities(appearance: str, lungs: list[Lung], rng: np.random.Generator) -> list[Opacity]:
    """Each opacity the appearance calls for, inside the lung fields."""

    def lower(lung: Lung, sigma: float) -> Opacity:
        cy, cx, ry, rx = lung
        outward = 1.0 if cx > lungs[0][1] + 1 else -1.0
        return (
            cy + ry * rng.uniform(0.1, 0.45),
            cx + outward * rx * rng.uniform(0.0, 0.4),
            sigma,
            rng.uniform(0.3, 0.4),
        )

    half_width = lungs[0][3]
    if appearance == "Typical Appearance":
        return [lower(lung, half_width * rng.uniform(0.45, 0.6)) for lung in lungs]
    if appearance == "Indeterminate Appearance":
        return [lower(lungs[int(rng.integers(0, 2))], half_width * rng.uniform(0.5, 0.65))]
    if appearance == "Atypical Appearance":
        cy, cx, ry, _ = lungs[int(rng.integers(0, 2))]
        sigma = half_width * rng.uniform(0.35, 0.45)
        return [(cy - ry * rng.uniform(0.3, 0.55), cx, sigma, rng.uniform(0.35, 0.45))]
    return []


def _encode(
    ds: Dataset, display: npt.NDArray[np.float64], index: int, rng: np.random.Generator
) -> str:
    """Store ``display`` in ``ds`` as 12-bit pixels, varying how the file encodes them.

    Every fourth image uses a non-trivial Rescale Slope/Intercept; images alternate
    MONOCHROME1 and MONOCHROME2 in a pattern independent of the DX/CR alternation;
    half carry a Window Center/Width that spans (most of) the image's range.
    """
    monochrome1 = index % 3 == 0
    stored_max = 4095
    stored = np.round((1.0 - display if monochrome1 else display) * stored_max)
    stored = stored.astype(np.uint16)
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    slope, intercept = (2.0, -1024.0) if index % 4 == 2 else (1.0, 0.0)
    if index % 4 == 2 or ds.Modality == "DX":
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "US"
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    if index % 2 == 0:
        low = float(np.percentile(stored, 0.5)) * slope + intercept
        high = float(np.percentile(stored, 99.5)) * slope + intercept
        margin = (high - low) * float(rng.uniform(0.0, 0.1))
        ds.WindowCenter = round((low + high) / 2, 1)
        ds.WindowWidth = round(max(high - low + margin, 2.0), 1)
    ds.PixelData = stored.tobytes()
    return str(ds.PhotometricInterpretation)


def _write_labels(cohort: Cohort) -> None:
    cohort.labels_csv.parent.mkdir(parents=True, exist_ok=True)
    with cohort.labels_csv.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABELS_HEADER)
        for image in cohort.images:
            writer.writerow([image.accession, image.appearance])
