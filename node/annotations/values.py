"""Parse one spreadsheet cell against the schema: the canonical value, nothing, or why not.

Reasons never repeat the cell: a misplaced cell may hold a name or an MRN, and
reasons end up in reports and logs.
"""

from __future__ import annotations

import datetime as dt
import re

from node.annotations.schema import MISSING, Kind, Variable, normalise

Parsed = str | dt.date

_DATE = re.compile(r"(\d{4})([-/.]?)(\d{2})\2(\d{2})(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?")
_AGE = re.compile(
    r"(\d{1,3})(?:\.0+)?\s*(y|yr|yrs|year|years|m|mo|month|months|w|week|weeks|d|day|days)?"
)
_AGE_DAYS = {"d": 1, "w": 7, "m": 30.4375, "y": 365.25}
_INTEGER = re.compile(r"[-+]?\d+(?:\.0+)?")


def is_missing(cell: str) -> bool:
    """True when a cell says nothing (blank, ``NA``, ``unknown``, ...)."""
    return normalise(cell) in MISSING


def parse(variable: Variable, cell: str) -> Parsed | None:
    """The canonical value of ``cell`` for ``variable``; None when it says nothing.

    Raises
    ------
    ValueError
        The cell holds something that is not a value of ``variable``; the message
        is the reason, without the cell's text.
    """
    if is_missing(cell):
        return None
    text = cell.strip()
    if variable.kind is Kind.CHOICE:
        value = variable.canonical(text)
        if value is None:
            raise ValueError(f"not one of: {', '.join(variable.values)}")
        return value
    if variable.kind is Kind.DATE:
        return parse_date(text)
    number = parse_age(text) if variable.kind is Kind.AGE else parse_integer(text)
    if variable.minimum is not None and number < variable.minimum:
        raise ValueError(f"below {variable.minimum}")
    if variable.maximum is not None and number > variable.maximum:
        raise ValueError(f"above {variable.maximum}")
    return str(number)


def parse_date(text: str) -> dt.date:
    """A calendar date written YYYY-MM-DD, YYYYMMDD or YYYY/MM/DD (a time part is dropped)."""
    match = _DATE.fullmatch(text.strip())
    if match is None:
        raise ValueError("not a date written YYYY-MM-DD (day/month orders are ambiguous)")
    year, month, day = int(match.group(1)), int(match.group(3)), int(match.group(4))
    if not 1900 <= year <= 2100:
        raise ValueError("year outside 1900-2100")
    try:
        return dt.date(year, month, day)
    except ValueError:
        raise ValueError("no such calendar date") from None


def parse_integer(text: str) -> int:
    """A whole number (``12``, or ``12.0`` as spreadsheets write it)."""
    if _INTEGER.fullmatch(text.strip()) is None:
        raise ValueError("not a whole number")
    return int(text.strip().split(".")[0])


def parse_age(text: str) -> int:
    """Whole years from ``47``, ``47Y``, ``047Y`` (DICOM AS), ``47 years`` or ``6 months``."""
    match = _AGE.fullmatch(text.strip().casefold())
    if match is None:
        raise ValueError("not an age (years, or a DICOM age string such as 047Y)")
    number = int(match.group(1))
    unit = (match.group(2) or "y")[0]
    return int(number * _AGE_DAYS[unit] // _AGE_DAYS["y"])
