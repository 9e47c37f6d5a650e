"""Read a spreadsheet export: UTF-8 (with or without BOM), comma, semicolon or tab separated.

Rows are numbered as a spreadsheet shows them: the header is row 1, the first
data row is row 2. Rows with every cell blank are dropped (spreadsheets leave
them at the end). A file that cannot be read as a table is a ``NodeError``
naming the argument; its content is never quoted in the message.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from node.annotations.schema import header_key
from node.errors import NodeError

MAX_BYTES = 64 * 1024 * 1024
DELIMITERS = (",", ";", "\t")


@dataclass(frozen=True)
class Table:
    """A CSV file's header and data rows."""

    headers: list[str]
    #: Each header as :func:`header_key` compares it.
    keys: list[str]
    #: (row number, cells) of every row that is not blank.
    rows: list[tuple[int, list[str]]]
    sha256: str

    def column(self, key: str) -> int | None:
        """The position of the column whose header key is ``key``."""
        return self.keys.index(key) if key in self.keys else None


def read_table(path: Path, argument: str) -> Table:
    """The table in ``path``; ``argument`` names the caller's argument in errors."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise NodeError(
            "csv_unreadable", f'Argument "{argument}": cannot read the file ({exc.strerror}).'
        ) from None
    if len(data) > MAX_BYTES:
        raise NodeError(
            "csv_too_large", f'Argument "{argument}": larger than {MAX_BYTES // 2**20} MiB.'
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise NodeError(
            "csv_encoding",
            f'Argument "{argument}": not UTF-8 text; save the sheet as "CSV UTF-8".',
        ) from None
    first = text.split("\n", 1)[0]
    delimiter = max(DELIMITERS, key=first.count) if any(d in first for d in DELIMITERS) else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[tuple[int, list[str]]] = []
    headers: list[str] | None = None
    number = 0
    try:
        for cells in reader:
            number += 1
            if headers is None:
                if any(c.strip() for c in cells):
                    headers = [c.strip() for c in cells]
                else:
                    number -= 1  # blank lines before the header are not rows
                continue
            if any(c.strip() for c in cells):
                rows.append((number, cells))
    except csv.Error:
        raise NodeError(
            "csv_malformed", f'Argument "{argument}": not a readable CSV table (row {number + 1}).'
        ) from None
    if headers is None:
        raise NodeError("csv_empty", f'Argument "{argument}": the file has no header row.')
    keys = [header_key(h) for h in headers]
    seen: set[str] = set()
    for key in keys:
        if key and key in seen:
            raise NodeError(
                "csv_header", f'Argument "{argument}": the header names column "{key}" twice.'
            )
        seen.add(key)
    return Table(headers, keys, rows, hashlib.sha256(data).hexdigest())
