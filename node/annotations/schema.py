"""The RICORD-style vocabularies as data: labels, clinical variables and segment codes.

Each column an import understands is a :class:`Variable`: its stored name, the
column headers accepted for it, its kind and, for choices, the canonical values
with the spellings accepted for each. Spellings are compared after
:func:`normalise` (case, punctuation and spacing folded), so ``"Typical"``,
``"typical appearance"`` and ``"TYPICAL_APPEARANCE"`` are one value. The stored
value is always the canonical one.

Segment labels map to coded concepts (scheme designator, code value, meaning)
for the Segmented Property Category and Type of a DICOM SEG. Ground glass
opacity has no SNOMED CT concept in the DICOM standard's context groups; the
standard codes it ``(112120, DCM)`` (CID 6102/6104), which is used here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final


def normalise(text: str) -> str:
    """Fold case, punctuation and spacing (``"Ground-Glass"`` -> ``"ground glass"``)."""
    return " ".join(re.sub(r"[^0-9a-z+]+", " ", text.casefold()).split())


def header_key(text: str) -> str:
    """A column header as importers compare it: ``"Accession Number"`` -> ``"accession_number"``."""
    return normalise(text).replace(" ", "_").replace("+", "_")


class Kind(StrEnum):
    """How a cell is parsed."""

    CHOICE = "choice"
    INTEGER = "integer"
    AGE = "age"
    DATE = "date"


@dataclass(frozen=True)
class Term:
    """One canonical value of a choice and the other spellings that mean it."""

    value: str
    spellings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Variable:
    """A column an import understands."""

    name: str
    kind: Kind
    description: str
    #: Other accepted column headers (compared with :func:`header_key`).
    headers: tuple[str, ...] = ()
    terms: tuple[Term, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    #: Labels: the scheme the value is stored under (``Label.scheme``).
    scheme: str = ""
    #: Removed with the patient characteristics when the site does not retain them.
    patient_characteristic: bool = False
    _spellings: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for term in self.terms:
            for spelling in (term.value, *term.spellings):
                self._spellings[normalise(spelling)] = term.value

    @property
    def values(self) -> tuple[str, ...]:
        """The canonical values of a choice."""
        return tuple(t.value for t in self.terms)

    def canonical(self, text: str) -> str | None:
        """The canonical value a spelling means, None when it means none."""
        return self._spellings.get(normalise(text))


YES_NO: Final = (
    Term("yes", ("y", "true", "1")),
    Term("no", ("n", "false", "0")),
)

#: Chest radiograph labels (RICORD 1c): the appearance and the airspace disease grading.
LABELS: Final[tuple[Variable, ...]] = (
    Variable(
        "appearance",
        Kind.CHOICE,
        "COVID-19 appearance of the chest radiograph (RSNA/RICORD classification)",
        headers=("ricord_appearance", "cxr_appearance", "classification"),
        terms=(
            Term("Typical Appearance", ("typical",)),
            Term("Indeterminate Appearance", ("indeterminate",)),
            Term("Atypical Appearance", ("atypical",)),
            Term("Negative for Pneumonia", ("negative", "negative pneumonia", "no pneumonia")),
        ),
        scheme="ricord",
    ),
    Variable(
        "airspace_disease",
        Kind.CHOICE,
        "Airspace disease grading of the chest radiograph",
        headers=("airspace_disease_grading", "airspace_grade", "airspace", "grading"),
        terms=(
            Term("none", ("no", "absent", "0", "no airspace disease")),
            Term("mild", ("1", "mild airspace disease")),
            Term("moderate", ("2", "mod", "moderate airspace disease")),
            Term("severe", ("3", "severe airspace disease")),
        ),
        scheme="ricord",
    ),
)

#: Clinical variables (RICORD clinical data), stored per study.
CLINICAL: Final[tuple[Variable, ...]] = (
    Variable(
        "age",
        Kind.AGE,
        "Age in whole years at the time of the study",
        headers=("age_years", "patient_age", "age_at_study"),
        minimum=0,
        maximum=130,
        patient_characteristic=True,
    ),
    Variable(
        "sex",
        Kind.CHOICE,
        "Sex, as DICOM codes it (M, F, O)",
        headers=("gender", "patient_sex"),
        terms=(Term("M", ("male", "man")), Term("F", ("female", "woman")), Term("O", ("other",))),
        patient_characteristic=True,
    ),
    Variable(
        "covid_test_result",
        Kind.CHOICE,
        "Result of the COVID-19 (SARS-CoV-2) test",
        headers=(
            "covid_test",
            "covid_result",
            "covid19_test_result",
            "covid_19_test_result",
            "sars_cov_2_test_result",
        ),
        terms=(
            Term("positive", ("pos", "detected", "+")),
            Term("negative", ("neg", "not detected", "undetected")),
        ),
    ),
    Variable(
        "covid_test_date",
        Kind.DATE,
        "Date of the COVID-19 test, shifted like the patient's study dates",
        headers=("covid_date", "covid19_test_date", "covid_19_test_date", "test_date"),
    ),
    Variable(
        "admitted",
        Kind.CHOICE,
        "Admitted to hospital",
        headers=("admission", "hospital_admission", "hospitalized", "hospitalised"),
        terms=YES_NO,
    ),
    Variable(
        "icu",
        Kind.CHOICE,
        "Admitted to intensive care",
        headers=("icu_admission", "intensive_care"),
        terms=YES_NO,
    ),
    Variable("intubated", Kind.CHOICE, "Intubated", headers=("intubation",), terms=YES_NO),
    Variable(
        "death",
        Kind.CHOICE,
        "Died",
        headers=("died", "deceased", "expired", "mortality"),
        terms=YES_NO,
    ),
    Variable(
        "days_to_outcome",
        Kind.INTEGER,
        "Days from the study to the outcome (discharge or death); a duration, not shifted",
        headers=("time_to_outcome_days", "outcome_days"),
        minimum=0,
        maximum=3650,
    ),
)

#: Cells that mean "not given": the value is left as it is, never an error.
MISSING: Final = frozenset(
    {"", "na", "n a", "nan", "null", "unknown", "unk", "not available", "not known", "missing"}
)

#: Key columns: the original identifier a row is matched on (never stored).
ACCESSION: Final = "accession_number"
MRN: Final = "mrn"
KEY_HEADERS: Final[dict[str, str]] = {
    "accession_number": ACCESSION,
    "accession": ACCESSION,
    "accession_no": ACCESSION,
    "mrn": MRN,
    "medical_record_number": MRN,
}

#: Headers of columns dropped as identifiers (reported, never read past the header).
IDENTIFIER_HEADERS: Final = frozenset(
    {
        "name",
        "patient_name",
        "first_name",
        "last_name",
        "given_name",
        "family_name",
        "surname",
        "patient_id",
        "other_patient_ids",
        "birth_date",
        "date_of_birth",
        "dob",
        "patient_birth_date",
        "ssn",
        "social_security_number",
        "national_id",
        "insurance_number",
        "address",
        "patient_address",
        "city",
        "zip",
        "zip_code",
        "postcode",
        "phone",
        "telephone",
        "email",
        "study_instance_uid",
        "series_instance_uid",
        "sop_instance_uid",
        "study_id",
        "encounter_id",
        "visit_id",
        "admission_date",
        "discharge_date",
        "death_date",
        "date_of_death",
        "physician",
        "referring_physician",
        "radiologist",
        "reader",
        "annotator",
    }
)

#: Headers of free-text columns (dropped: free text may name people).
FREE_TEXT_HEADERS: Final = frozenset(
    {
        "comment",
        "comments",
        "note",
        "notes",
        "remark",
        "remarks",
        "report",
        "findings",
        "impression",
        "description",
        "free_text",
        "history",
        "indication",
    }
)


def column_index(variables: tuple[Variable, ...]) -> dict[str, Variable]:
    """Every accepted header (as :func:`header_key` gives it) -> its variable."""
    found: dict[str, Variable] = {}
    for variable in variables:
        for header in (variable.name, *variable.headers):
            found[header_key(header)] = variable
    return found


@dataclass(frozen=True)
class Coded:
    """A coded concept: (code value, coding scheme designator, code meaning)."""

    value: str
    scheme: str
    meaning: str


ANATOMICAL_STRUCTURE: Final = Coded("91723000", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL: Final = Coded("49755003", "SCT", "Morphologically Abnormal Structure")


@dataclass(frozen=True)
class SegmentLabel:
    """A segment a mask may carry, with its DICOM SEG property codes."""

    label: str
    category: Coded
    property_type: Coded
    spellings: tuple[str, ...] = ()


#: The segment labels a manifest may use, in the order a SEG numbers them.
SEGMENT_LABELS: Final[tuple[SegmentLabel, ...]] = (
    SegmentLabel(
        "Lung",
        ANATOMICAL_STRUCTURE,
        Coded("39607008", "SCT", "Lung"),
        ("lungs", "lung field", "lung fields"),
    ),
    SegmentLabel(
        "Ground-glass opacity",
        MORPHOLOGICALLY_ABNORMAL,
        Coded("112120", "DCM", "Ground glass opacity"),
        ("ground glass", "ggo", "ground glass opacities"),
    ),
    SegmentLabel(
        "Consolidation",
        MORPHOLOGICALLY_ABNORMAL,
        Coded("95436008", "SCT", "Lung consolidation"),
        ("lung consolidation", "consolidations"),
    ),
)


def segment_label(text: str) -> SegmentLabel | None:
    """The segment label a manifest cell means, None when it means none."""
    wanted = normalise(text)
    for item in SEGMENT_LABELS:
        if wanted in {normalise(s) for s in (item.label, *item.spellings)}:
            return item
    return None
