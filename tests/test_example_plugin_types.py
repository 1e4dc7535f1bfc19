"""The example plugin is written against ``weighttracker_core.plugin`` alone and type-checks.

``mypy --strict`` checks it against the protocols of ``weighttracker_core.plugin``; a copy
with a tracker that lacks ``track()`` must fail the same check (so the check can fail).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tests" / "example_plugin" / "wt_example"


def test_example_plugin_imports_only_the_plugin_api():
    imported = set()
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    core = {m for m in imported if m.split(".")[0] == "weighttracker_core"}
    assert core == {"weighttracker_core.plugin"}


def _mypy(package: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the `test` extra)")
    env = {**os.environ, "MYPYPATH": str(ROOT)}  # the editable install hides the core from mypy
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--cache-dir", str(cache), "--no-error-summary", package.name],
        cwd=package.parent, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy_cache")


@pytest.mark.slow
def test_example_plugin_passes_mypy_strict(mypy_cache):
    result = _mypy(PACKAGE, mypy_cache)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_strict_catches_a_tracker_without_track(mypy_cache, tmp_path):
    broken = tmp_path / "wt_example"
    shutil.copytree(PACKAGE, broken, ignore=shutil.ignore_patterns("__pycache__"))
    source = (broken / "plugin.py").read_text()
    assert "    def track(self, values: Evaluation)" in source
    (broken / "plugin.py").write_text(source.replace("    def track(self, values: Evaluation)",
                                                     "    def trak(self, values: Evaluation)"))
    result = _mypy(broken, mypy_cache)
    assert result.returncode == 1
    assert 'Argument "build" to "TrackerSpec"' in result.stdout, result.stdout


@pytest.mark.slow
def test_the_plugin_contract_modules_pass_mypy_strict(mypy_cache):
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the `test` extra)")
    modules = ["plugin", "context", "specs", "hookspecs", "registry", "manager", "dag"]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir",
         str(mypy_cache), "--no-error-summary", *(f"weighttracker_core/{m}.py" for m in modules)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
