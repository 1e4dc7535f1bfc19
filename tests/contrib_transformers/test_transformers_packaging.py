"""weighttracker-transformers is its own distribution: entry points match the modules on disk,
load, and register what the docs say."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from weighttracker_core import create_plugin_manager  # noqa: E402
from weighttracker_core.registry import build_registries  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "contrib_transformers" / "weighttracker_transformers"


def _declared():
    dist = importlib.metadata.distribution("weighttracker-transformers")
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == "weighttracker"}


def test_distribution_depends_on_weighttracker_and_transformers():
    requires = importlib.metadata.requires("weighttracker-transformers")
    names = {re.split(r"[ ;<>=\[]", r)[0] for r in requires if "extra ==" not in r}
    assert names == {"weighttracker", "transformers"}
    assert any(r.startswith("accelerate") and 'extra == "trainer"' in r for r in requires)


def test_every_hook_module_is_declared_and_loads():
    with_hooks = {
        "weighttracker_transformers." + p.stem for p in PACKAGE.glob("*.py") if "@hookimpl" in p.read_text()
    }
    assert set(_declared().values()) == with_hooks
    modules = [importlib.import_module(v) for v in _declared().values()]
    registries = build_registries(create_plugin_manager(*modules, entry_points=False, use_env=False))
    assert set(registries.integrations.names()) == {"transformers", "transformers_any_shape"}
    assert list(registries.model_sources.names()) == ["hf"]
    assert "transformers_rms_norm" in registries.unit_rules.names()


def test_the_trainer_module_is_not_imported_by_the_package():
    import weighttracker_transformers

    assert "trainer" not in weighttracker_transformers.__all__
    assert weighttracker_transformers.__doc__ and "Trainer" in weighttracker_transformers.__doc__
