#!/usr/bin/env python3
"""Write the JSON Schemas of the wire models to ``protocols/schemas/protocol-<version>.json``.

A published protocol version is immutable: when the models change, this refuses
to overwrite the file of the current ``PROTOCOL_VERSION`` and asks for a bump,
and ``tests/unit/protocols/test_schemas.py`` fails until the committed schemas
match the models.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import protocols.api.coordinator
import protocols.api.errors
import protocols.api.node
import protocols.api.training
import protocols.deid.options
import protocols.training
from protocols.version import PROTOCOL_VERSION

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "protocols" / "schemas"
MODULES = (
    protocols.api.coordinator,
    protocols.api.errors,
    protocols.api.node,
    protocols.api.training,
    protocols.deid.options,
    protocols.training,
)


def models() -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    for module in MODULES:
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseModel)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found[f"{module.__name__}.{name}"] = obj
    return dict(sorted(found.items()))


def build() -> str:
    document: dict[str, Any] = {
        "protocol_version": PROTOCOL_VERSION,
        "generated_by": "tools/gen_schemas.py — do not edit",
        "schemas": {name: model.model_json_schema() for name, model in models().items()},
    }
    return json.dumps(document, indent=1, sort_keys=True) + "\n"


def target(folder: Path = SCHEMAS) -> Path:
    return folder / f"protocol-{PROTOCOL_VERSION}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the schemas drifted")
    parser.add_argument("--dir", type=Path, default=SCHEMAS, help="where the schemas live")
    args = parser.parse_args(argv)
    text, path = build(), target(args.dir)
    current = path.read_text(encoding="utf-8") if path.exists() else None
    if current == text:
        return 0
    if args.check or current is not None:
        print(
            f"the wire models differ from protocol {PROTOCOL_VERSION} ({path.name}): "
            "bump PROTOCOL_VERSION in protocols/version.py, then run tools/gen_schemas.py",
            file=sys.stderr,
        )
        return 1
    args.dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
