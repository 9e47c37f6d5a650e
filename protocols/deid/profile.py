"""Compile Table E.1-1, the keep-list and a site's options into one action per attribute.

The engine on the node and, later, the PHI scanner on both sides ask the same
compiled profile what should have happened to an attribute, so what "removed"
or "kept" means is decided once, here.

Actions after options (``CompiledProfile.code``)
    ``X`` remove, ``Z`` empty, ``D`` dummy, ``K`` keep, ``U`` map UID, ``SHIFT``
    shift a date (times kept), ``C`` clean free text (value removed), the combined
    codes ``X/Z``, ``X/D``, ``X/Z/D``, ``Z/D``, ``X/Z/U*``, ``KU`` keep a class UID,
    ``KG`` keep graphics (binary kept, text removed) and ``PSEUDONYM`` for the
    patient's name and ID.

Final actions (``resolve``) depend on the attribute's VR and on how required it
is where it occurs (Type 1, 2 or 3, from the generated IOD tables): a combined
code becomes the least-preserving of its choices that keeps the object valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from protocols.deid import table
from protocols.deid.dictionary import dictionary_vr, tag_for_keyword
from protocols.deid.keep_list import KEEP_KEYWORDS, OVERLAY_ELEMENTS, REPLACED_KEYWORDS
from protocols.deid.options import TABLE_COLUMNS, DeidOptions
from protocols.deid.safe_private import DEFAULT_SAFE_PRIVATE, SafePrivateKey

#: Patient's Name and Patient ID become the site-prefixed pseudonym.
PATIENT_NAME: Final = 0x00100010
PATIENT_ID: Final = 0x00100020
PSEUDONYM_TAGS: Final = frozenset({PATIENT_NAME, PATIENT_ID})

#: Attributes the engine writes itself; whatever the input held for them is dropped.
GENERATED_TAGS: Final = frozenset(
    {
        0x00120062,  # Patient Identity Removed
        0x00120063,  # De-identification Method
        0x00120064,  # De-identification Method Code Sequence
        0x00280303,  # Longitudinal Temporal Information Modified
    }
)

DATE_VRS: Final = frozenset({"DA", "DT"})
TEXT_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
TEXT_TEMPORAL_KEEP_VRS: Final = frozenset({"TM"})


class Outcome(IntEnum):
    """What finally happens to one element."""

    REMOVE = 0
    KEEP = 1
    EMPTY = 2
    DUMMY = 3
    MAP_UID = 4
    SHIFT = 5
    RECURSE = 6
    KEEP_CLASS_UID = 7
    PSEUDONYM = 8


def _pattern_matcher(pattern: str) -> tuple[int, int]:
    """(mask, value) for a tag pattern with 'x' wildcards."""
    mask = int("".join("0" if c == "x" else "f" for c in pattern), 16)
    value = int(pattern.replace("x", "0"), 16)
    return mask, value


def _option_action(
    options: DeidOptions, basic: str, option_actions: tuple[tuple[str, str], ...], vr: str
) -> str:
    """The action once the site's options are applied to one table row."""
    by_column = dict(option_actions)
    enabled = {TABLE_COLUMNS[name] for name in options.enabled()}
    # Temporal options first: they alone decide dates and times.
    if "rtnLongFullDatesOpt" in by_column and "rtnLongFullDatesOpt" in enabled:
        return "K"
    if "rtnLongModifDatesOpt" in by_column and "rtnLongModifDatesOpt" in enabled:
        if vr in DATE_VRS:
            return "SHIFT"
        if vr in TEXT_TEMPORAL_KEEP_VRS:
            return "K"
        # A temporal attribute that is neither date nor time (binary timestamps,
        # time zone offsets) falls back to the other options and the Basic Profile.
    candidates = [
        action
        for column, action in by_column.items()
        if column in enabled and column not in ("rtnLongFullDatesOpt", "rtnLongModifDatesOpt")
    ]
    # Where two enabled options disagree, the more conservative one (clean) wins.
    if "C" in candidates:
        return "C"
    if "K" in candidates:
        return "K"
    return basic


@dataclass(frozen=True)
class CompiledProfile:
    """The profile for one set of options. Build it with :func:`compile_profile`."""

    options: DeidOptions
    codes: Mapping[int, str]
    curve_code: str
    overlay_data_code: str
    overlay_comment_code: str
    safe_private: frozenset[SafePrivateKey] = field(default=DEFAULT_SAFE_PRIVATE)

    def code(self, tag: int) -> str:
        """Action code for a public attribute (private ones follow ``safe_private``)."""
        found = self.codes.get(tag)
        if found is not None:
            return found
        group = tag >> 16
        if 0x5000 <= group <= 0x501E and group % 2 == 0:
            return self.curve_code
        if 0x6000 <= group <= 0x601E and group % 2 == 0:
            element = tag & 0xFFFF
            if element == 0x3000:
                return self.overlay_data_code
            if element == 0x4000:
                return self.overlay_comment_code
            if self.options.clean_graphics and element in OVERLAY_ELEMENTS:
                return "KG"
        return "X"

    def keeps_private(self, key: SafePrivateKey) -> bool:
        """Whether a private element (creator, group, element byte, VR) is kept."""
        return self.options.retain_safe_private and key in self.safe_private


def compile_profile(
    options: DeidOptions, safe_private: frozenset[SafePrivateKey] = DEFAULT_SAFE_PRIVATE
) -> CompiledProfile:
    """Table E.1-1 + keep-list + options -> one action code per public attribute."""
    codes: dict[int, str] = {}
    curve = overlay_data = overlay_comment = "X"
    # Clean Graphics "cleans" graphics by keeping their binary structure and data (the
    # image is flagged for review) and dropping every text element of the group.
    for pattern, _keyword, _name, basic, option_actions in table.ROWS:
        if pattern == "private":
            continue
        if "x" in pattern:
            action = _option_action(options, basic, option_actions, "")
            if pattern.startswith("50"):
                curve = "KG" if action == "C" else action
            elif pattern.endswith("3000"):
                overlay_data = "KG" if action == "C" else action
            else:
                overlay_comment = action
            continue
        tag = int(pattern, 16)
        codes[tag] = _option_action(options, basic, option_actions, dictionary_vr(tag))
    for keyword in KEEP_KEYWORDS:
        kept = tag_for_keyword(keyword)
        if kept is None:
            raise ValueError(f'Keep-list keyword "{keyword}" is not in the data dictionary.')
        if kept in codes:
            raise ValueError(f'Keep-list keyword "{keyword}" is also in Table E.1-1.')
        codes[kept] = "KU" if dictionary_vr(kept) == "UI" else "K"
    for keyword, action in REPLACED_KEYWORDS.items():
        replaced = tag_for_keyword(keyword)
        if replaced is None or replaced in codes:
            raise ValueError(f'Replaced keyword "{keyword}" is unknown or already has an action.')
        codes[replaced] = action
    if options.retain_uids:
        for tag, code in codes.items():
            if code == "KU":
                codes[tag] = "K"
    for tag in PSEUDONYM_TAGS:
        codes[tag] = "PSEUDONYM"
    for tag in GENERATED_TAGS:
        codes[tag] = "X"
    return CompiledProfile(
        options=options,
        codes=codes,
        curve_code=curve,
        overlay_data_code=overlay_data,
        overlay_comment_code=overlay_comment,
        safe_private=safe_private,
    )


_MATCHERS: Final = tuple(
    (_pattern_matcher(p), p) for p, *_ in table.ROWS if "x" in p and p != "private"
)
_TYPES: Final = {int(p, 16): v for p, v in table.REQUIRED_TYPES.items() if "x" not in p}


def iod_index(sop_class_uid: str) -> int:
    """Index of the IOD of a SOP class in the generated tables, -1 when unknown."""
    return table.SOP_CLASS_IOD.get(sop_class_uid, -1)


def required_type(tag: int, iod: int, nested: bool) -> int:
    """How required an attribute is where it occurs: 1 value, 2 element, 3 optional.

    Nested attributes take the strongest type they have in any sequence of the
    standard; an unknown IOD takes the strongest top-level type of any IOD.
    """
    entry = _TYPES.get(tag)
    if entry is None:
        return 3
    nested_type, per_iod = entry
    if nested:
        return nested_type
    if iod < 0:
        return min(per_iod.values(), default=3)
    return per_iod.get(iod, 3)


def resolve(code: str, vr: str, rtype: int) -> Outcome:
    """The final action for an action code, the element's VR and its required type."""
    if vr == "SQ":
        return _resolve_sequence(code, rtype)
    if code == "K":
        return Outcome.KEEP
    if code == "X":
        # Removal must not break the object: where the attribute is required it
        # becomes a dummy (Type 1) or empty (Type 2) — no value survives either way.
        if rtype >= 3:
            return Outcome.REMOVE
        code = "X/Z/D"
    if code == "Z":
        return Outcome.EMPTY
    if code == "U":
        return Outcome.MAP_UID
    if code == "KU":
        return Outcome.KEEP_CLASS_UID
    if code == "KG":
        return Outcome.REMOVE if vr in TEXT_VRS or not vr else Outcome.KEEP
    if code == "SHIFT":
        return Outcome.SHIFT if vr in DATE_VRS else Outcome.KEEP
    if code == "PSEUDONYM":
        return Outcome.PSEUDONYM
    if code == "D":
        return Outcome.MAP_UID if vr == "UI" else Outcome.DUMMY
    if code == "X/Z/U*" and vr == "UI":
        return Outcome.MAP_UID
    choice = {
        "X/Z": ("X", "Z", "Z"),
        "X/Z/U*": ("X", "Z", "Z"),
        "X/D": ("X", "D", "D"),
        "X/Z/D": ("X", "Z", "D"),
        "C": ("X", "Z", "D"),
        "Z/D": ("Z", "Z", "D"),
    }.get(code)
    if choice is None:
        raise ValueError(f'Unknown action code "{code}".')
    picked = choice[0] if rtype >= 3 else choice[1] if rtype == 2 else choice[2]
    if picked == "D" and vr == "UI":
        return Outcome.MAP_UID
    return {"X": Outcome.REMOVE, "Z": Outcome.EMPTY, "D": Outcome.DUMMY}[picked]


def _resolve_sequence(code: str, rtype: int) -> Outcome:
    """Sequences are never kept whole: what is kept is walked with the profile."""
    if code == "X":
        # As for values: a required sequence stays (empty, or walked with the profile).
        return Outcome.REMOVE if rtype >= 3 else Outcome.EMPTY if rtype == 2 else Outcome.RECURSE
    if code == "Z":
        return Outcome.EMPTY
    if code == "X/Z":
        return Outcome.REMOVE if rtype >= 3 else Outcome.EMPTY
    if code in ("X/D", "X/Z/D", "C"):
        if rtype >= 3:
            return Outcome.REMOVE
        if rtype == 2 and code != "X/D":
            return Outcome.EMPTY
        return Outcome.RECURSE
    # K, D, U, Z/D, X/Z/U* (kept with its UIDs replaced), KU, SHIFT: walk the items.
    return Outcome.RECURSE


def repeating_pattern(tag: int) -> str | None:
    """The Table E.1-1 pattern (curves, overlays) a tag falls under, if any."""
    for (mask, value), pattern in _MATCHERS:
        if tag & mask == value:
            return pattern
    return None
