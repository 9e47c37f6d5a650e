"""Profile options: defaults, CLI settings, contradictions, CID 7050 codes."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import codes

from protocols.deid.options import OPTION_CODES, DeidOptions, DeidOptionsError


def test_defaults_follow_the_design() -> None:
    options = DeidOptions()

    assert options.enabled() == [
        "retain_patient_characteristics",
        "retain_longitudinal_modified_dates",
    ]


def test_basic_turns_every_option_off() -> None:
    assert DeidOptions.basic().enabled() == []


def test_settings_turn_options_on_and_off() -> None:
    options = DeidOptions().with_settings(
        ["retain-device-identity", "clean-graphics=on", "retain-patient-characteristics=off"]
    )

    assert options.retain_device_identity and options.clean_graphics
    assert not options.retain_patient_characteristics


def test_full_dates_replace_modified_dates() -> None:
    options = DeidOptions().with_settings(["retain-longitudinal-full-dates"])

    assert options.retain_longitudinal_full_dates
    assert not options.retain_longitudinal_modified_dates


def test_both_date_options_are_refused() -> None:
    with pytest.raises(DeidOptionsError, match="mutually exclusive"):
        DeidOptions().with_settings(
            ["retain-longitudinal-full-dates", "retain-longitudinal-modified-dates=on"]
        )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("retain-everything", 'Unknown option "retain-everything"'),
        ("clean-graphics=maybe", 'takes on or off, not "maybe"'),
    ],
)
def test_bad_settings_name_the_option(setting: str, message: str) -> None:
    with pytest.raises(DeidOptionsError, match=message):
        DeidOptions().with_settings([setting])


@pytest.mark.parametrize("name", sorted(OPTION_CODES))
def test_method_codes_are_the_standards(name: str) -> None:
    value, meaning = OPTION_CODES[name]
    keyword = meaning.replace(" ", "").replace("UIDs", "Uids")  # pydicom's keyword spelling

    code = getattr(codes.DCM, keyword)

    assert (code.value, code.meaning) == (value, meaning)


def test_method_codes_list_only_applied_options() -> None:
    listed = [value for value, _ in DeidOptions().method_codes()]

    assert listed == ["113100", "113107", "113108"]
