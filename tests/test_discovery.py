"""The out-of-tree example plugin (tests/example_plugin) is found through its entry point."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from torch import nn

from weighttracker_core import WeightTracker, create_plugin_manager, describe_plugins

pytestmark = pytest.mark.requires_distribution("wt-example")


@pytest.fixture
def manager():
    # only this distribution's entry points plus the first-party ones: nothing registered by hand
    return create_plugin_manager(use_env=False)


def test_example_distribution_is_installed():
    dist = importlib.metadata.distribution("wt-example")
    names = [ep.name for ep in dist.entry_points if ep.group == "weighttracker"]
    assert "wt_example" in names


def test_entry_point_registers_the_tracker_and_rule(manager):
    rows = {row["name"]: row for row in describe_plugins(manager)}
    row = rows["wt_example"]
    assert row["distribution"] == "wt-example"
    assert row["version"] == importlib.metadata.version("wt-example")
    assert row["registers"]["tracker"] == ["closed_gate_fraction"]
    assert row["registers"]["unit rule"] == ["wt_example_gated_linear"]


def test_discovered_plugin_works_without_core_changes(manager):
    from wt_example.gated_linear import GatedLinear

    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), GatedLinear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    tracker = WeightTracker(model, torch.zeros(1, 4), plugin_manager=manager)
    with torch.no_grad():
        model[2].gate[:2] = 0.0
    assert tracker.create_tracker("closed_gate_fraction").track() == {
        "closed_gate_fraction": {"closed_gate_fraction": 0.25, "gates": 8}  # 2 of 8 gates
    }
    (group,) = [g for g in tracker.groups if g.root_module == "2"]
    assert {(m.module_name, str(m.axis)) for m in group.members} == {("2", "out_channel"), ("4", "in_channel")}


def test_third_party_importance_arrives_through_its_entry_point(manager):
    rows = {row["name"]: row for row in describe_plugins(manager)}
    assert rows["wt_example_importance"]["distribution"] == "wt-example"
    assert rows["wt_example_importance"]["registers"] == {"importance": ["wt_peak"]}
