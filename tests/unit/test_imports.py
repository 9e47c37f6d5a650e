"""The dependency direction of DESIGN.md, checked by parsing every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"protocols", "node", "coordinator", "radfed", "apps"}
# package -> the packages of ours it may import
ALLOWED = {
    "protocols": set(),
    "node": {"protocols"},
    "coordinator": {"protocols"},
    "apps": {"protocols"},
    "radfed": {"protocols", "node", "coordinator", "radfed"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


def violations(root: Path) -> list[str]:
    problems = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")) if (root / package).exists() else []:
            for imported in imported_packages(path) - allowed - {package}:
                problems.append(f"{path.relative_to(root)} imports {imported}")
    return problems


def test_packages_import_only_what_the_design_allows() -> None:
    assert violations(ROOT) == []


def test_the_checker_catches_a_violation(tmp_path: Path) -> None:
    # Prepare: a tree where protocols imports node and node imports coordinator.
    (tmp_path / "protocols").mkdir()
    (tmp_path / "protocols" / "bad.py").write_text("from node.deid import engine\n")
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "bad.py").write_text("import coordinator.cli\n")
    (tmp_path / "radfed").mkdir()
    (tmp_path / "radfed" / "ok.py").write_text("import node, coordinator, protocols\n")

    problems = violations(tmp_path)

    assert sorted(problems) == ["node/bad.py imports coordinator", "protocols/bad.py imports node"]


#: What a Flower app may import besides itself and the standard library (DESIGN: apps
#: import only protocols, torch and flwr; numpy and safetensors come with them).
APP_IMPORTS = {"protocols", "torch", "flwr", "numpy", "safetensors"}


def app_violations(root: Path) -> list[str]:
    import sys

    problems = []
    for app in sorted(p for p in (root / "apps").iterdir() if p.is_dir()):
        own = {p.name for p in app.iterdir() if p.is_dir()}
        for path in sorted(app.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            found = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
            for name in sorted(found - APP_IMPORTS - own - set(sys.stdlib_module_names)):
                problems.append(f"{path.relative_to(root)} imports {name}")
    return problems


def test_apps_import_only_protocols_torch_and_flwr() -> None:
    assert (ROOT / "apps" / "cxr").is_dir()
    assert app_violations(ROOT) == []


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_module_has_a_docstring(package: str) -> None:
    for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).exists() else []:
        if path.name.startswith("_table"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if path.name == "__init__.py" and not tree.body:
            continue
        assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no module docstring"


def test_the_app_checker_catches_a_violation(tmp_path: Path) -> None:
    app = tmp_path / "apps" / "demoapp" / "demoapp"
    app.mkdir(parents=True)
    (app / "ok.py").write_text("import json, torch\nfrom demoapp import ok\nimport protocols\n")
    (app / "bad.py").write_text("import node.index\nimport pandas\n")

    assert app_violations(tmp_path) == [
        "apps/demoapp/demoapp/bad.py imports node",
        "apps/demoapp/demoapp/bad.py imports pandas",
    ]
