"""The keep-list is what its docstring promises: technical, reviewed, outside the table."""

from __future__ import annotations

import pydicom.datadict as dd
import pytest

from protocols.deid import table
from protocols.deid.keep_list import (
    KEEP_KEYWORDS,
    OVERLAY_ELEMENTS,
    REPLACED_KEYWORDS,
    REVIEWED_STRINGS,
)

TABLE_KEYWORDS = {kw for _, kw, *_ in table.ROWS if kw}
IDENTITY_VRS = {"PN", "DA", "DT", "TM", "LT", "ST", "UT", "UR", "UC", "AE"}


@pytest.mark.parametrize("keyword", sorted(KEEP_KEYWORDS))
def test_kept_keyword_is_safe(keyword: str) -> None:
    tag = dd.tag_for_keyword(keyword)
    assert tag is not None, f"{keyword} is not an attribute"
    vr = dd.dictionary_VR(tag)
    assert keyword not in TABLE_KEYWORDS, f"{keyword} is in Table E.1-1: the table decides"
    assert vr not in IDENTITY_VRS, f"{keyword} ({vr}) could carry a name, a date or free text"
    if vr in ("SH", "LO"):
        assert keyword in REVIEWED_STRINGS, f"{keyword} ({vr}) needs a reviewed reason"


def test_reviewed_strings_are_kept_short_strings() -> None:
    for keyword, reason in REVIEWED_STRINGS.items():
        assert keyword in KEEP_KEYWORDS
        assert dd.dictionary_VR(dd.tag_for_keyword(keyword)) in ("SH", "LO")
        assert reason


def test_replaced_keywords_are_outside_the_table_and_replaced_not_kept() -> None:
    for keyword, action in REPLACED_KEYWORDS.items():
        assert keyword not in TABLE_KEYWORDS and keyword not in KEEP_KEYWORDS
        assert action in ("D", "Z")


def test_overlay_structure_excludes_text() -> None:
    # Overlay Description (0022), Label (1500) and Comments (4000) are text.
    assert not OVERLAY_ELEMENTS & {0x0022, 0x1500, 0x4000, 0x3000}
