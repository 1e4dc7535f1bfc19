"""Import layering: the core imports nothing from plugins, contrib, timm, torchvision or
fvcore, and every core module has its place in the layers contract."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"weighttracker_plugins", "weighttracker_timm", "timm", "torchvision", "fvcore", "plugins"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_core_source_imports_nothing_forbidden():
    for path in sorted((ROOT / "weighttracker_core").rglob("*.py")):
        bad = _imports(path) & FORBIDDEN
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_the_graph_package_imports_torch_pruning():
    core = ROOT / "weighttracker_core"
    users = {p.relative_to(core).parts[0] for p in core.rglob("*.py") if "torch_pruning" in _imports(p)}
    assert users == {"graph"}


def test_every_core_module_has_a_layer():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    layers = next(c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    listed = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    core = ROOT / "weighttracker_core"
    modules = {p.stem for p in core.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in core.glob("*/__init__.py")}
    assert modules - listed == set(), (
        f"Core modules missing from the layers contract in pyproject.toml: {sorted(modules - listed)}; "
        "add each to the layer it belongs to."
    )
    assert listed - modules == set(), f"The layers contract names modules that do not exist: {sorted(listed - modules)}"


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.skip(f"lint-imports is not installed next to {sys.executable} (pip install import-linter)")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
