#!/usr/bin/env python3
"""Generate the de-identification profile's data files from the standard's tables.

Inputs
------
* PS3.15 Table E.1-1 as data (``../shared/standard/ps3.15-table-E.1-1.json``):
  every attribute of the Application Level Confidentiality Profile with its
  Basic Profile action and the action of each option.
* The IOD and module tables of the standard as shipped by highdicom
  (``highdicom/_standard/*.json``), used only to know how required an
  attribute is (Type 1, 2 or 3) in each IOD. The combined actions of the
  profile (X/Z, X/D, X/Z/D, Z/D, X/Z/U*) and "clean" resolve by that type.

* The data dictionary (PS3.6) as shipped by pydicom: VR and keyword of every
  attribute and the registered standard UIDs, so the node's engine does not
  need pydicom at run time.

Outputs: ``protocols/deid/table_e1_1.json`` and ``protocols/deid/dictionary.json``
(JSON: they load in milliseconds). Run ``python tools/gen_deid_profile.py`` (or
``make profile``) after a new edition of an input;
``tests/unit/protocols/test_profile_table.py`` fails when a committed file
differs from what this script makes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

import pydicom.datadict as dd

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TABLE = ROOT.parent / "shared" / "standard" / "ps3.15-table-E.1-1.json"

OPTION_KEYS = (
    "rtnSafePrivOpt",
    "rtnUIDsOpt",
    "rtnDevIdOpt",
    "rtnInstIdOpt",
    "rtnPatCharsOpt",
    "rtnLongFullDatesOpt",
    "rtnLongModifDatesOpt",
    "cleanDescOpt",
    "cleanStructContOpt",
    "cleanGraphOpt",
)
# Type 1 and 1C need a value, 2 and 2C need the element, 3 may go.
TYPE_RANK = {"1": 1, "1C": 1, "2": 2, "2C": 2, "3": 3}


def _pattern(row: dict[str, Any]) -> str:
    ident = str(row["id"]).lower()
    if ident.startswith("gggg"):
        return "private"
    if len(ident) != 8:
        raise ValueError(f"unexpected tag id {row['id']!r} for {row['name']!r}")
    return ident


def _keyword(pattern: str) -> str:
    if "x" in pattern or pattern == "private":
        return ""
    return str(dd.keyword_for_tag(int(pattern, 16)) or "")


def _needs_type(row: dict[str, Any]) -> bool:
    """Rows whose outcome depends on the type: combined codes, clean, and remove
    (a removal that would break a Type 1 or 2 requirement becomes dummy or empty)."""
    actions = {row["basicProfile"]} | {row[k] for k in OPTION_KEYS if k in row}
    return bool(actions - {"K", "U"})


def _standard_dir() -> Path:
    import highdicom

    return Path(highdicom.__file__).parent / "_standard"


def build(table_path: Path) -> dict[str, str]:
    """The generated files, by path relative to the repository root, as text."""
    rows = json.loads(table_path.read_text(encoding="utf-8"))
    std = _standard_dir()
    modules = json.loads((std / "module_attribute_map.json").read_text(encoding="utf-8"))
    iods = json.loads((std / "iod_module_map.json").read_text(encoding="utf-8"))
    sop_iod = json.loads((std / "sop_class_iod_map.json").read_text(encoding="utf-8"))

    top: dict[str, dict[str, int]] = {}
    nested: dict[str, int] = {}
    for module, attrs in modules.items():
        for attr in attrs:
            rank = TYPE_RANK.get(attr["type"], 3)
            kw = attr["keyword"]
            if attr["path"]:
                nested[kw] = min(nested.get(kw, 3), rank)
            else:
                top.setdefault(module, {})
                top[module][kw] = min(top[module].get(kw, 3), rank)

    iod_names = sorted(iods)
    iod_index = {name: i for i, name in enumerate(iod_names)}

    out_rows = []
    types: dict[str, list[Any]] = {}
    for row in sorted(rows, key=_pattern):
        pattern = _pattern(row)
        keyword = _keyword(pattern)
        options = [[k, row[k]] for k in OPTION_KEYS if k in row]
        out_rows.append([pattern, keyword, row["name"], row["basicProfile"], options])
        if keyword and _needs_type(row):
            per_iod: dict[str, int] = {}
            for iod in iod_names:
                rank = min([top.get(m["key"], {}).get(keyword, 3) for m in iods[iod]] + [3])
                if rank < 3:
                    per_iod[str(iod_index[iod])] = rank
            types[pattern] = [nested.get(keyword, 3), per_iod]

    hd_version = importlib.metadata.version("highdicom")
    pd_version = importlib.metadata.version("pydicom")
    profile = {
        "generated_by": "tools/gen_deid_profile.py — do not edit, regenerate",
        "generated_from": (
            f"{table_path.name} (PS3.15 Table E.1-1, {len(rows)} rows); IOD and module "
            f"tables of highdicom {hd_version}; keywords from pydicom {pd_version}"
        ),
        "rows_columns": ["tag pattern", "keyword", "name", "Basic Profile", "options"],
        "rows": out_rows,
        "iods": iod_names,
        "sop_class_iod": {uid: iod_index[iod] for uid, iod in sorted(sop_iod.items())},
        "required_types_note": (
            "tag pattern: [strongest type nested in any sequence, {IOD index: type at top "
            "level}]; 1 needs a value, 2 needs the element, 3 may be removed; absent means 3"
        ),
        "required_types": types,
    }
    from pydicom._dicom_dict import DicomDictionary, RepeatersDictionary
    from pydicom._uid_dict import UID_dictionary

    dictionary = {
        "generated_by": "tools/gen_deid_profile.py — do not edit, regenerate",
        "generated_from": f"the data dictionary of pydicom {pd_version} (PS3.6)",
        "columns": ["VR", "keyword"],
        "tags": {
            f"{tag:08x}": [entry[0], entry[4]] for tag, entry in sorted(DicomDictionary.items())
        },
        "repeaters": {
            mask.lower(): [entry[0], entry[4]]
            for mask, entry in sorted(RepeatersDictionary.items())
        },
        "standard_uids": sorted(UID_dictionary),
    }
    return {
        "protocols/deid/table_e1_1.json": _dump(profile),
        "protocols/deid/dictionary.json": _dump(dictionary),
    }


def _dump(data: dict[str, Any]) -> str:
    """JSON with one row or entry per line, so a new edition reads as a small diff."""

    def one(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    fields = []
    for key, value in data.items():
        if isinstance(value, list) and len(value) > 8:
            body = ",\n".join(one(item) for item in value)
            fields.append(f"{one(key)}: [\n{body}\n]")
        elif isinstance(value, dict) and len(value) > 8:
            body = ",\n".join(f"{one(k)}: {one(v)}" for k, v in value.items())
            fields.append(f"{one(key)}: {{\n{body}\n}}")
        else:
            fields.append(f"{one(key)}: {one(value)}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--root", type=Path, default=ROOT, help="where the outputs go")
    parser.add_argument("--check", action="store_true", help="exit 1 if an output would change")
    args = parser.parse_args(argv)
    stale = []
    for relpath, text in build(args.table).items():
        path = args.root / relpath
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale.append(relpath)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}: run tools/gen_deid_profile.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
