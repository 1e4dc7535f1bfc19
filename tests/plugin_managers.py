"""Plugin managers for tests that must not depend on plugins other than the layer rules."""

from __future__ import annotations

import importlib
from typing import Any

from weighttracker_core import PluginManager, create_plugin_manager

CORE_PLUGIN_MODULES = (
    "weighttracker_plugins.unit_rules.conv",
    "weighttracker_plugins.unit_rules.linear",
    "weighttracker_plugins.unit_rules.norm",
    "weighttracker_plugins.unit_rules.embedding",
    "weighttracker_plugins.unit_rules.activation",
    "weighttracker_plugins.unit_rules.attention",
    "weighttracker_plugins.unit_rules.unwrapped",
    "weighttracker_plugins.calculations.structure",
)


def core_plugin_manager(*extra: Any) -> PluginManager:
    """The first-party unit rules and structure calculations, plus ``extra`` plugins."""
    modules = [importlib.import_module(name) for name in CORE_PLUGIN_MODULES]
    return create_plugin_manager(*modules, *extra, entry_points=False, use_env=False)
