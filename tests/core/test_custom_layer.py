"""A user-defined layer is supported by a unit-rule plugin alone (SPEC §3.3)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from plugin_managers import core_plugin_manager
from weighttracker_core import PruneAxis, WeightTracker
from weighttracker_core.plugin import hookimpl
from wt_example.gated_linear import GATED_LINEAR_RULE, GatedLinear


class GatedRules:
    @hookimpl
    def wt_register_unit_rules(self):
        return (GATED_LINEAR_RULE,)


def _model():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), GatedLinear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_without_a_rule_the_layer_is_reported_and_left_out():
    model = _model()
    with pytest.warns(UserWarning, match=r"no unit rule covers these layers: 2 \(GatedLinear\)"):
        tracker = WeightTracker(model, torch.zeros(1, 4), plugin_manager=core_plugin_manager())
    assert all("2" not in g.module_names() for g in tracker.groups)


def test_with_the_rule_the_layer_is_coupled_measured_and_pruned():
    model = _model().eval()
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # covered now: no warning
        tracker = WeightTracker(model, x, plugin_manager=core_plugin_manager(GatedRules()))
    by_root = {g.root_module: g for g in tracker.groups}
    gated_out = by_root["2"]
    assert gated_out.n_units == 8
    members = {(m.module_name, m.axis): m for m in gated_out.members}
    assert set(members) == {("2", PruneAxis.OUT_CHANNEL), ("4", PruneAxis.IN_CHANNEL)}
    assert [s.param for s in members[("2", PruneAxis.OUT_CHANNEL)].slices] == ["weight", "bias", "gate"]
    into_gated = by_root["0"]
    assert ("2", PruneAxis.IN_CHANNEL) in {(m.module_name, m.axis) for m in into_gated.members}

    # unit 3 owns weight row 3, bias 3, gate 3 and column 3 of the last layer
    sq = tracker.structure.plan().unit_reduce("sum_sq")[gated_out.offset + 3]
    expected = (model[2].weight[3] ** 2).sum() + model[2].bias[3] ** 2 + model[2].gate[3] ** 2
    expected = expected + (model[4].weight[:, 3] ** 2).sum()
    torch.testing.assert_close(sq, expected.detach())

    tracker.fake_prune_unit(gated_out.id, 3)
    tracker.fake_prune_unit(into_gated.id, 1)
    fake = model(x)
    reference = copy.deepcopy(model)
    tracker.prune_zero_units()
    assert (model[2].out_features, model[2].in_features) == (7, 5)
    assert model[2].gate.shape == (7,) and model[4].weight.shape == (3, 7)
    torch.testing.assert_close(model(x), fake, rtol=1e-5, atol=1e-6)
    assert reference[2].gate.shape == (8,)
