"""bops_group_lasso (SPEC §6): sum_u lambda_u * ||w_u||_2 with lambda_u the unit's BOPs share,
checked against explicit loops over groups, members, slices and channels."""

from __future__ import annotations

import pytest
import torch
from _cost_oracle import fvcore_macs
from _lasso_oracle import unit_elements
from models import TinyConvNet, conv_input
from torch import nn

from weighttracker_core import ConfigError, PruneAxis, RegularizerType, WeightTracker


def weight_bits(name, module):
    return 4 if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) else 8


def activation_bits(name, module):
    return 2 + len(name) % 5


class DepthwiseNet(nn.Module):
    """pointwise -> depthwise -> pointwise -> head (the depthwise conv has one feature axis)."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.project = nn.Conv2d(8, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        y = self.project(torch.relu(self.depthwise(torch.relu(self.expand(x)))))
        return self.fc(y.mean(dim=(2, 3)))


def _channels(module, axis):
    if isinstance(module, nn.Linear):
        return module.in_features if axis is PruneAxis.IN_CHANNEL else module.out_features
    return module.in_channels if axis is PruneAxis.IN_CHANNEL else module.out_channels


def brute_penalty(tracker, counted, selected, normalize=True):
    """The documented formula, one layer, member and channel at a time (float64)."""
    model = tracker.model
    macs = fvcore_macs(model, tracker.structure.example_inputs)
    model.train()
    costs: dict[int, float] = {}
    for group in tracker.groups:
        for member in group.members:
            if member.module_name not in counted:
                continue
            module = model.get_submodule(member.module_name)
            bops = macs[member.module_name] * weight_bits(member.module_name, module) * activation_bits(
                member.module_name, module
            )
            size = _channels(module, member.axis)
            for _, unit in zip(member.tp_indices, member.tp_units):
                costs[group.offset + unit] = costs.get(group.offset + unit, 0.0) + bops / size
    parts = unit_elements(model, tracker.groups, selected)
    owned = sorted(parts)
    mean = sum(costs.get(u, 0.0) for u in owned) / len(owned)
    total = torch.zeros((), dtype=torch.float64)
    weights = {}
    for unit in owned:
        weight = costs.get(unit, 0.0) / (mean if normalize else 1.0)
        weights[unit] = weight
        flat = torch.cat(parts[unit]).double()
        total = total + weight * torch.sqrt((flat * flat).sum())
    return total, weights


def _tracker(model, inputs):
    return WeightTracker(model, inputs, weight_bitwidth_fn=weight_bits, activation_bitwidth_fn=activation_bits)


@pytest.mark.parametrize("make", [TinyConvNet, DepthwiseNet])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_brute_force(make, normalize):
    model = make()
    tracker = _tracker(model, conv_input())
    group = tracker.groups[1]
    tracker.fake_prune_units({group.id: [0]})
    penalty = tracker.create_regularizer("bops_group_lasso", normalize=normalize)
    counted = {i.name for i in tracker.structure.modules if i.category == "weighted"}
    expected, weights = brute_penalty(tracker, counted, lambda name: True, normalize)
    assert penalty().item() == pytest.approx(expected.item(), rel=1e-5)
    got = penalty.unit_weights()
    for unit, weight in weights.items():
        assert got[unit].item() == pytest.approx(weight, rel=1e-9)


def test_ignore_and_include_change_costs_and_norms():
    model = TinyConvNet()
    tracker = _tracker(model, conv_input())
    penalty = tracker.create_regularizer(RegularizerType.BOPS_GROUP_LASSO, ignore=[model.fc])
    counted = {"conv1", "conv2", "conv3"}
    expected, _ = brute_penalty(tracker, counted, lambda name: name != "fc")
    assert penalty().item() == pytest.approx(expected.item(), rel=1e-5)
    only = tracker.create_regularizer("bops_group_lasso", include=[model.conv3, model.fc])
    expected, _ = brute_penalty(tracker, {"conv3", "fc"}, lambda name: name in {"conv3", "fc"})
    assert only().item() == pytest.approx(expected.item(), rel=1e-5)


def test_hand_worked_example():
    # fc1 = Linear(2, 4) (8 MACs) -> fc2 = Linear(4, 1) (4 MACs), 32-bit: hidden units cost
    # 1024 * (8/4 + 4/4) = 3072, the output unit 1024 * 4 = 4096; mean 3276.8 ->
    # lambda = 0.9375 (hidden) and 1.25 (output)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    tracker = WeightTracker(model, torch.randn(1, 2), prune_model_outputs=True)
    penalty = tracker.create_regularizer("bops_group_lasso")
    hidden = next(g for g in tracker.groups if g.root_module == "0")
    out = next(g for g in tracker.groups if g.root_module == "2")
    assert penalty.unit_costs()[out.offset].item() == 4096
    assert penalty.unit_costs()[hidden.offset].item() == 3072
    assert penalty.unit_weights()[hidden.offset].item() == pytest.approx(0.9375)
    assert penalty.unit_weights()[out.offset].item() == pytest.approx(1.25)


def test_differentiable_finite_at_zero_units_and_repeatable():
    model = TinyConvNet()
    tracker = _tracker(model, conv_input())
    group = next(g for g in tracker.groups if g.root_module == "conv3")
    tracker.fake_prune_units({group.id: [0, 1]})
    penalty = tracker.create_regularizer("bops_group_lasso")
    first, second = penalty(), penalty()
    assert first.item() == second.item()
    assert first.requires_grad and first.dim() == 0
    first.backward()
    owned = {f"{m.module_name}.{p.param}" for g in tracker.groups for m, p in g.iter_slices()}
    assert "fc.bias" not in owned  # the classifier's outputs are no units: no pressure on them
    for name, param in model.named_parameters():
        if name in owned:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert (model.conv3.weight.grad[:2] == 0).all()
    assert (model.conv3.weight.grad[2:] != 0).any()


def test_bitwidths_are_read_on_every_call():
    bits = {"conv1": 32}
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(), weight_bitwidth_fn=lambda n, m: bits.get(n, 32))
    penalty = tracker.create_regularizer("bops_group_lasso", normalize=False)
    conv1 = next(g for g in tracker.groups if g.root_module == "conv1")
    before = penalty.unit_costs()[conv1.offset].item()
    bits["conv1"] = 8
    after = penalty.unit_costs()[conv1.offset].item()
    assert after < before


def test_proximal_step_uses_bops_weighted_thresholds():
    model = TinyConvNet()
    tracker = _tracker(model, conv_input())
    penalty = tracker.create_regularizer("bops_group_lasso")
    weights = penalty.unit_weights()
    norms = penalty.unit_norms()
    strength = float((norms.double() / weights).median())  # about half the units fall below
    factors = penalty.proximal_step_(lr=1.0, strength=strength)
    expected = torch.clamp(1 - strength * weights / norms.double(), min=0)
    assert torch.allclose(factors.double(), expected, atol=1e-5)
    zero = tracker.zero_units()
    assert sum(len(units) for units in zero.values()) == int((factors == 0).sum()) > 0
    with pytest.raises(ConfigError):
        penalty.proximal_step_(lr=-1.0, strength=1.0)


def test_selection_without_macs_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    tracker = WeightTracker(model, torch.tensor([[1, 2, 3]]))
    with pytest.raises(ConfigError, match="MACs"):
        tracker.create_regularizer("bops_group_lasso", include=[model[0]])
    with pytest.raises(ConfigError):
        tracker.create_regularizer("bops_group_lasso", include=[nn.Conv2d])
