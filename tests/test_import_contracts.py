"""The core imports nothing from plugins, contrib, timm, torchvision or fvcore (SPEC §2)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
