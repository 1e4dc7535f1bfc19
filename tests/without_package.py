"""Run Python in a subprocess where some packages cannot be imported (as if not installed).

A ``sitecustomize`` on ``PYTHONPATH`` installs a meta-path finder that refuses the top-level
names given, and ``WEIGHTTRACKER_DISABLE_PLUGINS`` blocks the plugins those packages bring.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_BLOCKER = '''
import sys


class _Blocked:
    """Pretend these packages are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {packages!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
'''


def run_without(packages: Sequence[str], plugins: Sequence[str], args: Sequence[str],
                tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``python *args`` from the repository root with ``packages`` unimportable and
    ``plugins`` blocked (on top of any already blocked)."""
    (tmp_path / "sitecustomize.py").write_text(_BLOCKER.format(packages=tuple(packages)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["WEIGHTTRACKER_DISABLE_PLUGINS"] = ",".join(
        p for p in (env.get("WEIGHTTRACKER_DISABLE_PLUGINS", ""), *plugins) if p)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def suite_report(packages: Sequence[str], plugins: Sequence[str], check: str, tests: Sequence[str],
                 tmp_path: Path) -> str:
    """Run ``check`` (a ``python -c`` script that prints ``ok...``) and then pytest on
    ``tests`` with ``packages`` unimportable; assert both pass with nothing failed, and
    return pytest's report for the caller's own checks (which tests were skipped, and why).
    """
    first = run_without(packages, plugins, ["-c", check], tmp_path)
    assert first.returncode == 0 and first.stdout.startswith("ok"), first.stdout + first.stderr
    run = run_without(packages, plugins, ["-m", "pytest", "-q", "-rs", *tests], tmp_path)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert " passed" in report and "failed" not in report, report
    return report
