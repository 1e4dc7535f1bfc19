"""Every ```python block of README.md and docs/*.md runs.

Blocks of one file run in order in one shared namespace, so a walk-through can build on its
earlier steps; a failure names the file and the line where its block starts.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# optional dependencies (test extras); a page whose examples need a missing one is skipped
OPTIONAL = {"tensorboard", "lightning", "pytorch_lightning", "sklearn", "timm", "transformers",
            "weighttracker_transformers", "accelerate"}


def _blocks(path: Path) -> list[tuple[str, str]]:
    text = path.read_text()
    out = []
    for match in BLOCK.finditer(text):
        line = text[: match.start()].count("\n") + 2
        out.append((f"{path.relative_to(ROOT)}:{line}", match.group(1)))
    return out


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_markdown_examples_run(path, tmp_path, monkeypatch):
    blocks = _blocks(path)
    if not blocks:
        pytest.skip("no python examples")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__markdown__"}
    for where, code in blocks:
        try:
            exec(compile(code, where, "exec"), namespace)
        except ImportError as err:  # also weighttracker's MissingDependencyError
            missing = err.name or getattr(err.__cause__, "name", None) or ""
            if missing.split(".")[0] not in OPTIONAL:
                raise
            pytest.skip(f"{where} needs {missing}, which is not installed")
