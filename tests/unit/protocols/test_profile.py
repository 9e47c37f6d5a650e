"""Compiling the profile: options over the Basic Profile, and resolving combined actions."""

from __future__ import annotations

import pydicom.datadict as dd
import pytest

from protocols.deid.options import DeidOptions
from protocols.deid.profile import (
    Outcome,
    compile_profile,
    iod_index,
    required_type,
    resolve,
)

CT = iod_index("1.2.840.10008.5.1.4.1.1.2")


def tag(keyword: str) -> int:
    found = dd.tag_for_keyword(keyword)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("keyword", "defaults", "basic"),
    [
        ("PatientAge", "K", "X"),  # Retain Patient Characteristics
        ("StudyDate", "SHIFT", "Z"),  # Retain Longitudinal ... Modified Dates
        ("StudyTime", "K", "Z"),  # times kept with modified dates
        ("PatientName", "PSEUDONYM", "PSEUDONYM"),
        ("StudyInstanceUID", "U", "U"),
        ("SOPClassUID", "KU", "KU"),  # keep-list UI: class UIDs
        ("Rows", "K", "K"),  # keep-list
        ("AcquisitionDuration", "X", "X"),  # neither table nor keep-list: deny
        ("TextValue", "D", "D"),  # required free text outside the table
        ("PatientIdentityRemoved", "X", "X"),  # written by the engine, never copied
    ],
)
def test_codes_after_options(keyword: str, defaults: str, basic: str) -> None:
    assert compile_profile(DeidOptions()).code(tag(keyword)) == defaults
    assert compile_profile(DeidOptions.basic()).code(tag(keyword)) == basic


def test_options_override_the_basic_profile() -> None:
    device = compile_profile(DeidOptions().with_settings(["retain-device-identity"]))
    uids = compile_profile(DeidOptions().with_settings(["retain-uids"]))
    full = compile_profile(DeidOptions().with_settings(["retain-longitudinal-full-dates"]))

    assert device.code(tag("DeviceSerialNumber")) == "K"
    assert device.code(tag("StationAETitle")) == "C"  # clean, not keep, for AE titles
    assert uids.code(tag("StudyInstanceUID")) == "K"
    assert uids.code(tag("SOPClassUID")) == "K"
    assert full.code(tag("StudyDate")) == "K"


def test_a_conflict_between_options_takes_the_conservative_action() -> None:
    profile = compile_profile(
        DeidOptions().with_settings(["clean-descriptors", "retain-patient-characteristics"])
    )
    assert profile.code(tag("Allergies")) == "C"


def test_repeating_groups() -> None:
    basic = compile_profile(DeidOptions())
    graphics = compile_profile(DeidOptions().with_settings(["clean-graphics"]))

    assert basic.code(0x60003000) == "X" and basic.code(0x60020010) == "X"
    assert graphics.code(0x60003000) == "KG" and graphics.code(0x60020010) == "KG"
    assert graphics.code(0x60004000) == "C" and graphics.code(0x60000022) == "X"
    assert basic.code(0x50002500) == "X"


@pytest.mark.parametrize(
    ("code", "vr", "rtype", "outcome"),
    [
        ("X/Z", "LO", 3, Outcome.REMOVE),
        ("X/Z", "LO", 2, Outcome.EMPTY),
        ("X/D", "LO", 3, Outcome.REMOVE),
        ("X/D", "LO", 1, Outcome.DUMMY),
        ("X/Z/D", "PN", 3, Outcome.REMOVE),
        ("X/Z/D", "PN", 2, Outcome.EMPTY),
        ("X/Z/D", "PN", 1, Outcome.DUMMY),
        ("Z/D", "LO", 2, Outcome.EMPTY),
        ("Z/D", "LO", 1, Outcome.DUMMY),
        ("X/Z/U*", "UI", 3, Outcome.MAP_UID),
        ("X/Z/U*", "SQ", 3, Outcome.RECURSE),
        ("D", "UI", 3, Outcome.MAP_UID),
        ("X", "LO", 1, Outcome.DUMMY),  # removal would break a Type 1 requirement
        ("X", "SQ", 3, Outcome.REMOVE),
        ("X", "SQ", 2, Outcome.EMPTY),
        ("Z", "SQ", 1, Outcome.EMPTY),
        ("D", "SQ", 3, Outcome.RECURSE),
        ("K", "SQ", 3, Outcome.RECURSE),
        ("C", "LT", 3, Outcome.REMOVE),
        ("SHIFT", "DA", 3, Outcome.SHIFT),
        ("SHIFT", "TM", 3, Outcome.KEEP),
    ],
)
def test_resolve(code: str, vr: str, rtype: int, outcome: Outcome) -> None:
    assert resolve(code, vr, rtype) is outcome


def test_required_types_come_from_the_iod() -> None:
    # Institution Name: Type 3 in a CT, Type 1 somewhere nested in the standard.
    assert required_type(tag("InstitutionName"), CT, nested=False) == 3
    assert required_type(tag("InstitutionName"), CT, nested=True) == 1
    assert required_type(tag("PatientID"), CT, nested=False) == 2
    assert required_type(tag("Rows"), CT, nested=False) == 3  # not a table row: no lookup
    assert required_type(tag("PatientID"), -1, nested=False) <= 2  # unknown IOD: strongest


def test_the_dictionary_knows_every_vr() -> None:
    from protocols.deid.dictionary import KNOWN_VRS

    assert len(KNOWN_VRS) == 34 and {"SV", "UV", "OV", "UC", "UR"} <= KNOWN_VRS
