"""Plugin managers: entry-point loading, duplicates, failures, blocking (SPEC §8)."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest
import torch

from plugin_managers import core_plugin_manager
from weighttracker_core import (
    DuplicateNameError,
    PluginError,
    UnknownNameError,
    WeightTracker,
    create_plugin_manager,
    default_plugin_manager,
    describe_plugins,
)
from weighttracker_core.plugin import TrackerSpec, hookimpl
from weighttracker_core import manager as manager_module


class _Dist:
    def __init__(self, name: str, version: str) -> None:
        self.metadata = {"Name": name}
        self.version = version


def _ep(name: str, value: str, dist: str, version: str = "1.0"):
    return importlib.metadata.EntryPoint(name, value, "weighttracker")._for(_Dist(dist, version))


def _module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    sys.modules[name] = module
    return module


def _tracker_plugin(module_name: str, tracker_name: str) -> types.ModuleType:
    class T:
        def __init__(self, ctx):
            pass

        def track(self, values):
            return {"ok": 1}

    return _module(module_name, wt_register_trackers=lambda: (TrackerSpec(name=tracker_name, build=T),))


@pytest.fixture
def fake_entry_points(monkeypatch):
    """Replace the installed entry points of group ``weighttracker`` with a given list."""

    def install(*eps):
        def entry_points(group=None):
            return [ep for ep in eps if ep.group == group]

        monkeypatch.setattr(manager_module.importlib.metadata, "entry_points", entry_points)

    yield install
    for name in [n for n in sys.modules if n.startswith("wt_test_")]:
        del sys.modules[name]


def test_duplicate_entry_point_name_names_both_distributions(fake_entry_points):
    _tracker_plugin("wt_test_a", "a")
    _tracker_plugin("wt_test_b", "b")
    fake_entry_points(_ep("shared", "wt_test_a", "dist-one", "1.2"), _ep("shared", "wt_test_b", "dist-two", "3.4"))
    with pytest.raises(DuplicateNameError) as info:
        create_plugin_manager(use_env=False)
    message = str(info.value)
    assert "'shared'" in message and "dist-one 1.2" in message and "dist-two 3.4" in message


def test_same_distribution_seen_twice_is_not_a_conflict(fake_entry_points):
    _tracker_plugin("wt_test_a", "a")
    fake_entry_points(_ep("one", "wt_test_a", "dist-one"), _ep("one", "wt_test_a", "dist-one"))
    pm = create_plugin_manager(use_env=False)
    assert pm.registered_names() == ["one"]


def test_failing_import_names_entry_point_and_distribution(fake_entry_points):
    fake_entry_points(_ep("broken", "wt_test_does_not_exist", "dist-broken", "0.9"))
    with pytest.raises(PluginError) as info:
        create_plugin_manager(use_env=False)
    message = str(info.value)
    assert "'broken'" in message and "dist-broken 0.9" in message and "WEIGHTTRACKER_DISABLE_PLUGINS" in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_duplicate_tracker_name_names_both_plugins_and_distributions(fake_entry_points):
    _tracker_plugin("wt_test_a", "same_name")
    _tracker_plugin("wt_test_b", "same_name")
    fake_entry_points(_ep("first", "wt_test_a", "dist-one", "1.0"), _ep("second", "wt_test_b", "dist-two", "2.0"))
    pm = create_plugin_manager(use_env=False)
    with pytest.raises(DuplicateNameError) as info:
        WeightTracker(torch.nn.Linear(2, 2), torch.zeros(1, 2), plugin_manager=pm)
    message = str(info.value)
    for part in ("same_name", "'first'", "dist-one 1.0", "'second'", "dist-two 2.0"):
        assert part in message


def test_environment_variable_blocks_plugins(fake_entry_points, monkeypatch):
    _tracker_plugin("wt_test_a", "a")
    fake_entry_points(_ep("wanted", "wt_test_a", "dist-one"), _ep("unwanted", "wt_test_does_not_exist", "dist-x"))
    monkeypatch.setenv("WEIGHTTRACKER_DISABLE_PLUGINS", " unwanted , other")
    pm = create_plugin_manager()
    assert pm.registered_names() == ["wanted"]
    assert pm.is_blocked("unwanted")


def test_misspelled_hook_is_an_error():
    plugin = _module("wt_test_typo", wt_register_trackerz=lambda: ())
    with pytest.raises(PluginError, match="wt_register_trackerz"):
        create_plugin_manager(plugin, entry_points=False)
    del sys.modules["wt_test_typo"]


def test_plugins_argument_is_private_to_one_tracker():
    plugin = _tracker_plugin("wt_test_private", "private_tracker")
    base = core_plugin_manager()
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    with_plugin = WeightTracker(model, torch.zeros(1, 2), plugin_manager=base, plugins=[plugin])
    assert with_plugin.create_tracker("private_tracker").track() == {"private_tracker": {"ok": 1}}
    assert not base.is_registered(plugin)
    without = WeightTracker(model, torch.zeros(1, 2), plugin_manager=base)
    with pytest.raises(UnknownNameError, match="private_tracker"):
        without.create_tracker("private_tracker")
    del sys.modules["wt_test_private"]


def test_unknown_tracker_lists_installed_names_and_a_hint():
    plugin = _tracker_plugin("wt_test_hint", "closed_gates")
    tracker = WeightTracker(torch.nn.Linear(2, 2), torch.zeros(1, 2), plugin_manager=core_plugin_manager(plugin))
    with pytest.raises(UnknownNameError) as info:
        tracker.create_tracker("closed_gate")
    assert "Did you mean 'closed_gates'?" in str(info.value)
    assert "Installed trackers: closed_gates." in str(info.value)
    del sys.modules["wt_test_hint"]


def test_default_manager_is_built_lazily_once():
    default_plugin_manager.cache_clear()
    first = default_plugin_manager()
    assert default_plugin_manager() is first
    rows = {row["name"]: row for row in describe_plugins(first)}
    assert rows["conv_rules"]["distribution"] == "weighttracker"
    assert rows["conv_rules"]["registers"] == {"unit rule": ["conv"]}
    default_plugin_manager.cache_clear()


def test_importing_the_core_loads_no_plugin():
    code = (
        "import sys, weighttracker_core;"
        "bad = [m for m in sys.modules if m.startswith(('weighttracker_plugins', 'weighttracker_timm', 'wt_example'))];"
        "assert not bad, bad"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)
