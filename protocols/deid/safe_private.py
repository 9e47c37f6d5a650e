"""Private attributes kept under the Retain Safe Private option.

An entry is keyed by private creator, group, element (the low byte within the
creator's block) and VR, as PS3.15 Table E.3.10-1 lists them. The defaults are
diffusion parameters from that table that MR research needs; a site extends
the list with a JSON file (``[{"creator": ..., "group": "0019", "element": "0C",
"vr": "IS"}, ...]``), loaded by :func:`load_allowlist`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from protocols.deid.dictionary import KNOWN_VRS

SafePrivateKey = tuple[str, int, int, str]

DEFAULT_SAFE_PRIVATE: Final[frozenset[SafePrivateKey]] = frozenset(
    {
        ("SIEMENS MR HEADER", 0x0019, 0x0C, "IS"),  # B_value
        ("SIEMENS MR HEADER", 0x0019, 0x0D, "CS"),  # DiffusionDirectionality
        ("SIEMENS MR HEADER", 0x0019, 0x0E, "FD"),  # DiffusionGradientDirection
        ("SIEMENS MR HEADER", 0x0019, 0x27, "FD"),  # B_matrix
        ("GEMS_PARM_01", 0x0043, 0x39, "IS"),  # slop_int_6..9 (b-value)
        ("Philips Imaging DD 001", 0x2001, 0x03, "FL"),  # Diffusion B-Factor
        ("Philips Imaging DD 001", 0x2001, 0x04, "CS"),  # Diffusion Direction
    }
)


class SafePrivateError(ValueError):
    """The allowlist file is malformed; the message names the entry."""


def load_allowlist(path: Path) -> frozenset[SafePrivateKey]:
    """Read a site allowlist file and return it together with the defaults."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SafePrivateError(f"Cannot read safe-private allowlist {path}: {exc}") from exc
    if not isinstance(entries, list):
        raise SafePrivateError(f"Safe-private allowlist {path} must be a JSON list of entries.")
    keys: set[SafePrivateKey] = set(DEFAULT_SAFE_PRIVATE)
    for index, entry in enumerate(entries):
        try:
            creator = str(entry["creator"]).strip()
            group = int(str(entry["group"]), 16)
            element = int(str(entry["element"]), 16)
            vr = str(entry["vr"]).upper()
        except (KeyError, TypeError, ValueError) as exc:
            raise SafePrivateError(
                f"Safe-private allowlist {path}, entry {index}: needs creator, group (hex), "
                f"element (hex) and vr ({exc})."
            ) from exc
        if group % 2 == 0 or not creator:
            raise SafePrivateError(
                f"Safe-private allowlist {path}, entry {index}: group {group:04X} is not private."
            )
        if not 0 <= element <= 0xFF:
            raise SafePrivateError(
                f"Safe-private allowlist {path}, entry {index}: element must be 00..FF "
                "(the low byte inside the creator's block)."
            )
        if vr not in KNOWN_VRS or vr == "SQ":
            raise SafePrivateError(
                f'Safe-private allowlist {path}, entry {index}: VR "{vr}" is not allowed.'
            )
        keys.add((creator, group, element, vr))
    return frozenset(keys)
