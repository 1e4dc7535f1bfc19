"""The core stays readable: no function over 50 lines, and a thin ``tracker.py`` façade.

A function's length counts from its ``def`` line (decorators excluded) to its last line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import weighttracker_core

CORE = Path(weighttracker_core.__file__).parent
MAX_FUNCTION_LINES = 50
MAX_TRACKER_LINES = 200

def long_functions(root: Path, limit: int) -> dict[str, str]:
    """``{"path:name": "path:line name (n lines)"}`` for functions in ``root`` over ``limit``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > limit:
                    where = path.relative_to(root.parent).as_posix()
                    found[f"{where}:{node.name}"] = f"{where}:{node.lineno} {node.name} ({length} lines)"
    return found


def test_no_core_function_is_longer_than_50_lines():
    found = list(long_functions(CORE, MAX_FUNCTION_LINES).values())
    assert not found, (
        f"Functions over {MAX_FUNCTION_LINES} lines in weighttracker_core (split them into "
        "named steps): " + "; ".join(found)
    )


def test_tracker_facade_stays_thin():
    lines = len((CORE / "tracker.py").read_text(encoding="utf-8").splitlines())
    assert lines < MAX_TRACKER_LINES, (
        f"weighttracker_core/tracker.py has {lines} lines (limit {MAX_TRACKER_LINES}): move the "
        "work into the module that owns it and keep WeightTracker to orchestration."
    )


def test_the_length_check_can_fail(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(50))
    (package / "mod.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(package, MAX_FUNCTION_LINES) == {"pkg/mod.py:long": "pkg/mod.py:5 long (51 lines)"}
