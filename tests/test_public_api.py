"""The root package exports the user API; plugin-author names live in ``weighttracker_core.plugin``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import weighttracker_core
import weighttracker_core.plugin as plugin_api

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for pattern in ("plugins/**/*.py", "contrib_*/**/*.py", "tests/**/*.py", "bench/*.py",
                             "docs/*.md", "README.md", "CONTRIBUTING.md")
           for p in ROOT.glob(pattern) if "egg-info" not in str(p) and p.name != "api.md"]
ROOT_IMPORT = re.compile(r"from weighttracker_core import (\([^)]*\)|[^\n]+)")


def test_root_exports_the_user_api_only():
    exported = set(weighttracker_core.__all__)
    assert {"WeightTracker", "PruneReport", "apply_pruning_record", "train_mode_forward",
            "AttentionLayout", "WeightTrackerError", "create_plugin_manager"} <= exported
    assert not exported & weighttracker_core._MOVED
    for name in exported:
        assert getattr(weighttracker_core, name) is not None


@pytest.mark.parametrize("name", sorted(weighttracker_core._MOVED))
def test_a_moved_name_warns_and_its_advice_works(name):
    with pytest.warns(DeprecationWarning, match=rf"from weighttracker_core.plugin import {name}`") as caught:
        old = getattr(weighttracker_core, name)
    advice = re.search(r"`(from weighttracker_core\.plugin import \w+)`", str(caught[0].message))
    namespace: dict[str, object] = {}
    exec(advice.group(1), namespace)
    if name != "Evaluation":  # the protocol took the name; the old object was the class
        assert namespace[name] is old


def test_no_file_of_the_repository_imports_a_moved_name_from_the_root():
    offenders = []
    for path in SOURCES:
        for match in ROOT_IMPORT.finditer(path.read_text()):
            names = {n.strip().split(" as ")[0] for n in re.split(r"[,\s()]+", match.group(1)) if n.strip()}
            if names & weighttracker_core._MOVED:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(names & weighttracker_core._MOVED)}")
    assert not offenders, offenders


def test_plugin_api_names_resolve():
    for name in plugin_api.__all__:
        assert hasattr(plugin_api, name), name
