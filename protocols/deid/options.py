"""The options of the confidentiality profile (PS3.15 E.3) a site chooses.

Defaults follow DESIGN.md: Retain Longitudinal Temporal Information with
Modified Dates and Retain Patient Characteristics on, every other option off.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from pydantic import BaseModel, ConfigDict, model_validator

#: CID 7050 "De-identification Method" codes (scheme DCM), by option field.
BASIC_PROFILE_CODE: Final = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES: Final[dict[str, tuple[str, str]]] = {
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_longitudinal_full_dates": (
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    "retain_longitudinal_modified_dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}
CLEAN_PIXEL_DATA_CODE: Final = ("113101", "Clean Pixel Data Option")

#: Column of Table E.1-1 that each option reads.
TABLE_COLUMNS: Final[dict[str, str]] = {
    "retain_safe_private": "rtnSafePrivOpt",
    "retain_uids": "rtnUIDsOpt",
    "retain_device_identity": "rtnDevIdOpt",
    "retain_institution_identity": "rtnInstIdOpt",
    "retain_patient_characteristics": "rtnPatCharsOpt",
    "retain_longitudinal_full_dates": "rtnLongFullDatesOpt",
    "retain_longitudinal_modified_dates": "rtnLongModifDatesOpt",
    "clean_descriptors": "cleanDescOpt",
    "clean_structured_content": "cleanStructContOpt",
    "clean_graphics": "cleanGraphOpt",
}


class DeidOptionsError(ValueError):
    """A bad option name or combination; the message names the option."""


class DeidOptions(BaseModel):
    """Which profile options are applied. Frozen: one value per run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retain_longitudinal_modified_dates: bool = True
    retain_longitudinal_full_dates: bool = False
    retain_patient_characteristics: bool = True
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_uids: bool = False
    retain_safe_private: bool = False
    clean_descriptors: bool = False
    clean_structured_content: bool = False
    clean_graphics: bool = False

    @model_validator(mode="after")
    def _dates_exclusive(self) -> DeidOptions:
        if self.retain_longitudinal_full_dates and self.retain_longitudinal_modified_dates:
            raise ValueError(
                'Options "retain-longitudinal-full-dates" and '
                '"retain-longitudinal-modified-dates" are mutually exclusive.'
            )
        return self

    @classmethod
    def basic(cls) -> DeidOptions:
        """The Basic Profile alone: every option off."""
        return cls(**dict.fromkeys(TABLE_COLUMNS, False))

    @classmethod
    def names(cls) -> list[str]:
        """Option names as the CLI and config files spell them."""
        return [name.replace("_", "-") for name in TABLE_COLUMNS]

    def with_settings(self, settings: Iterable[str]) -> DeidOptions:
        """Apply ``name``, ``name=on`` or ``name=off`` settings (CLI ``--option``).

        Turning full dates on turns modified dates off unless the same settings
        also turn modified dates on (which is then refused as a contradiction).
        """
        values = self.model_dump()
        named: set[str] = set()
        for setting in settings:
            name, _, raw = setting.partition("=")
            field = name.strip().lower().replace("-", "_")
            if field not in TABLE_COLUMNS:
                raise DeidOptionsError(
                    f'Unknown option "{name}". Known options: {", ".join(self.names())}.'
                )
            state = raw.strip().lower() or "on"
            if state in ("on", "true", "yes", "1"):
                values[field] = True
            elif state in ("off", "false", "no", "0"):
                values[field] = False
            else:
                raise DeidOptionsError(f'Option "{name}" takes on or off, not "{raw}".')
            named.add(field)
        if (
            "retain_longitudinal_full_dates" in named
            and values["retain_longitudinal_full_dates"]
            and "retain_longitudinal_modified_dates" not in named
        ):
            values["retain_longitudinal_modified_dates"] = False
        try:
            return DeidOptions(**values)
        except ValueError as exc:
            raise DeidOptionsError(str(exc)) from exc

    def enabled(self) -> list[str]:
        """Names of the options that are on, in table order."""
        return [name for name in TABLE_COLUMNS if getattr(self, name)]

    def method_codes(self) -> list[tuple[str, str]]:
        """CID 7050 codes of the profile and options applied (code value, meaning)."""
        enabled = sorted(self.enabled(), key=lambda n: OPTION_CODES[n][0])
        return [BASIC_PROFILE_CODE, *(OPTION_CODES[name] for name in enabled)]
