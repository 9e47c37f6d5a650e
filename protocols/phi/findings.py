"""What the PHI scanner reports: a finding with where it is and how bad it is."""

from __future__ import annotations

from enum import IntEnum

from pydantic import BaseModel, ConfigDict


class Severity(IntEnum):
    """Ordered: a threshold keeps every finding at or above it."""

    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @classmethod
    def parse(cls, name: str) -> Severity:
        try:
            return cls[name.strip().upper()]
        except KeyError:
            names = ", ".join(s.name.lower() for s in cls)
            raise ValueError(f'Severity "{name}" is not one of {names}.') from None


class PhiFinding(BaseModel):
    """One thing that should not be in a de-identified instance.

    ``kind`` is stable (``not_removed``, ``not_emptied``, ``person_name``,
    ``original_uid``, ``original_value``, ``date_not_shifted``, ``identifier_pattern``,
    ``private_not_allowed``, ``file_meta``, ``burned_in_text``, ...); ``location`` is
    a tag path like ``(0040,A730)[0]/(0040,A160)``, ``raw bytes @1234`` or a pixel
    region; ``excerpt`` shows just enough to find it (never the whole value).
    """

    model_config = ConfigDict(frozen=True)

    severity: Severity
    kind: str
    location: str
    message: str
    excerpt: str = ""
