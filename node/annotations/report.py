"""What an import did and what it could not use.

A report names rows by number and columns by header, never by their content:
unmatched rows say which key type did not match, not the MRN or accession
number, so the report can be stored in the index, shown and logged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Unmatched:
    """A row whose key matches no study (or instance) of this node, or several."""

    row: int
    key: str
    reason: str


@dataclass(frozen=True)
class Unparseable:
    """A cell that holds no value of its column (or contradicts another row)."""

    row: int
    column: str
    reason: str


@dataclass(frozen=True)
class Ignored:
    """A column the import dropped, with why (identifier, free text, unknown, ...)."""

    column: str
    reason: str


@dataclass(frozen=True)
class StoredObject:
    """A DICOM object an import built (a SEG), all of it de-identified."""

    source_series: str
    series_instance_uid: str
    sop_instance_uid: str
    segments: list[str]
    frames: int
    status: str  # written | unchanged | conflict
    path: str


@dataclass
class ImportReport:
    """The outcome of one import."""

    kind: str  # labels | clinical | segmentations
    key: str  # accession_number | mrn | sop_instance_uid
    rows: int = 0
    matched: int = 0
    #: Whether anything was stored (a rejected file stores nothing).
    applied: bool = False
    import_id: int | None = None
    studies: int = 0
    values: int = 0
    unmatched: list[Unmatched] = field(default_factory=list)
    unparseable: list[Unparseable] = field(default_factory=list)
    ignored_columns: list[Ignored] = field(default_factory=list)
    objects: list[StoredObject] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data (what ``ImportRun.report`` holds)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
