"""Every real hook of the plugin manager is documented with an example and used by a test;
every first-party name is documented (docs/ or README)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from weighttracker_core import create_plugin_manager
from weighttracker_core.plugin import HOOK_NAMES, HOOKS

ROOT = Path(__file__).resolve().parents[1]
DOCS = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
HOOK_PAGE = (ROOT / "docs" / "hooks.md").read_text()
TESTS = {p: p.read_text() for p in (ROOT / "tests").rglob("*.py")
         if p.name != Path(__file__).name and "egg-info" not in str(p)}


def _real_hooks() -> list[str]:
    """The hooks pluggy knows for a manager with no plugin at all (from the hookspecs)."""
    pm = create_plugin_manager(entry_points=False, use_env=False)
    return sorted(name for name in vars(pm.hook) if not name.startswith("_"))


REAL_HOOKS = _real_hooks()


def test_the_hook_list_is_the_managers_hooks():
    assert sorted(HOOK_NAMES) == REAL_HOOKS
    assert [hook.name for hook in HOOKS] == list(HOOK_NAMES)


def _section(hook: str) -> str:
    heading = f"## `{hook}()`"
    assert heading in HOOK_PAGE, f"docs/hooks.md has no section {heading!r}"
    body = HOOK_PAGE.split(heading, 1)[1]
    return body.split("\n## ", 1)[0]


@pytest.mark.parametrize("hook", REAL_HOOKS)
def test_every_hook_is_documented_with_an_example(hook):
    examples = re.findall(r"^```python\n(.*?)^```", _section(hook), re.S | re.M)
    assert any(f"def {hook}(" in code for code in examples), (
        f"the {hook}() section of docs/hooks.md has no python example implementing it")
    assert f"`{hook}()`" in (ROOT / "docs" / "writing-plugins.md").read_text()


@pytest.mark.parametrize("hook", REAL_HOOKS)
def test_every_hook_is_implemented_by_a_test_plugin(hook):
    users = [p for p, text in TESTS.items() if re.search(rf"\b{hook}\s*(\(|=)", text)]
    assert users, f"no test under tests/ implements {hook}()"


def _first_party():
    from weighttracker_core.registry import build_registries

    registries = build_registries(create_plugin_manager(builtins_only=True, use_env=False))
    for kind in ("trackers", "regularizers", "pruners", "importances", "integrations"):
        for name in getattr(registries, kind).names():
            yield kind, name


@pytest.mark.parametrize("kind,name", list(_first_party()))
def test_every_first_party_name_is_documented(kind, name):
    assert f"`{name}`" in DOCS or f'"{name}"' in DOCS, f"{kind} {name!r} is not in README/docs"
