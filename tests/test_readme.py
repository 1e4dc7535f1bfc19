"""Every ```python block of README.md and docs/*.md runs (each in a fresh namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(path: Path) -> list[tuple[str, str]]:
    text = path.read_text()
    out = []
    for match in BLOCK.finditer(text):
        line = text[: match.start()].count("\n") + 1
        out.append((f"{path.relative_to(ROOT)}:{line}", match.group(1)))
    return out


CASES = [case for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] for case in _blocks(path)]


@pytest.mark.parametrize("where,code", CASES, ids=[c[0] for c in CASES])
def test_markdown_example_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__readme__"})
