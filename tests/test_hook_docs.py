"""Every hook and every first-party name is documented (docs/ or README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from weighttracker_core import create_plugin_manager
from weighttracker_core.hookspecs import HOOK_NAMES

ROOT = Path(__file__).resolve().parents[1]
DOCS = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


@pytest.mark.parametrize("hook", HOOK_NAMES)
def test_every_hook_is_documented(hook):
    assert f"`{hook}()`" in DOCS


def _first_party():
    from weighttracker_core.registry import build_registries

    registries = build_registries(create_plugin_manager(builtins_only=True, use_env=False))
    for kind in ("trackers", "regularizers", "pruners", "importances", "integrations"):
        for name in getattr(registries, kind).names():
            yield kind, name


@pytest.mark.parametrize("kind,name", list(_first_party()))
def test_every_first_party_name_is_documented(kind, name):
    assert f"`{name}`" in DOCS or f'"{name}"' in DOCS, f"{kind} {name!r} is not in README/docs"
