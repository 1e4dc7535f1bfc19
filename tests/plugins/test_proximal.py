"""group_lasso.proximal_step_: block soft-thresholding against brute-force loops, training."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize, prune

from _lasso_oracle import brute_norms_and_counts, index_of, tensor_of
from models import CatNet, MHANet, QKVNet, TinyConvNet, conv_input, sequence_input
from weighttracker_core import ConfigError, StaleConsumerError, WeightTracker


def brute_prox(model, groups, num_units, lr, strength, weighting="sqrt_numel",
               selected=lambda name: True):
    """Expected parameters after one step, by looping over every unit position.

    Factors come from the norms before the step; an element owned by several units is
    multiplied by each of their factors.
    """
    norms, counts = brute_norms_and_counts(model, groups, num_units, selected)
    coefficient = counts.sqrt() if weighting == "sqrt_numel" else (counts > 0).double()
    factors = torch.zeros(num_units, dtype=torch.float64)
    for unit in range(num_units):
        threshold = lr * strength * coefficient[unit]
        if norms[unit] > threshold:
            factors[unit] = 1 - threshold / norms[unit]
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for group in groups:
        for member in group.members:
            if not selected(member.module_name):
                continue
            prefix = f"{member.module_name}." if member.module_name else ""
            for piece in member.slices:
                target = expected[prefix + piece.param]
                shape = piece.viewed_shape(tuple(target.shape))
                viewed = target.view(shape)
                for position, unit in zip(piece.positions, piece.units):
                    viewed[index_of(shape, piece.dims, position)] *= factors[group.offset + unit]
    return expected, factors


def _check_against_brute_force(model, x, lr, strength, weighting="sqrt_numel", **kwargs):
    tracker = WeightTracker(model, x, **kwargs)
    expected, factors = brute_prox(model, tracker.groups, tracker.num_units, lr, strength, weighting)
    lasso = tracker.create_regularizer("group_lasso", weighting=weighting)
    got = lasso.proximal_step_(lr=lr, strength=strength)
    torch.testing.assert_close(got.double(), factors, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    return tracker, factors


def test_hand_worked_linear():
    # Linear(2, 2, bias=False) -> Linear(2, 1, bias=False): unit j owns W1[j, :] and W2[0, j].
    #   unit 0: W1 row [3, 4], W2 0   -> norm 5;   lr * strength = 1, weighting none:
    #           factor 1 - 1/5 = 0.8  -> row [2.4, 3.2]
    #   unit 1: W1 row [0.3, 0.4], W2 0 -> norm 0.5 -> factor max(0, 1 - 2) = 0 -> zeros
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
        model[1].weight.zero_()
    tracker = WeightTracker(model, torch.randn(1, 2), ignored_layers=[model[1]])
    lasso = tracker.create_regularizer("group_lasso", weighting="none")
    factors = lasso.proximal_step_(lr=0.5, strength=2.0)
    torch.testing.assert_close(factors, torch.tensor([0.8, 0.0]))
    torch.testing.assert_close(model[0].weight.detach(), torch.tensor([[2.4, 3.2], [0.0, 0.0]]))
    assert tracker.zero_units() == {0: [1]}


MODELS = {
    "resnet18": lambda: (lambda m: (m, torch.randn(1, 3, 32, 32), {"ignored_layers": [m.fc]}))(
        torchvision.models.resnet18(num_classes=10)),
    "catnet": lambda: (CatNet(), conv_input(), {}),
    "mhanet": lambda: (MHANet(), sequence_input(), {}),
    "qkvnet_heads": lambda: (lambda m: (m, sequence_input(), {"num_heads": {m.attn.qkv: 4},
                                                              "prune_num_heads": True}))(QKVNet()),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_step_matches_brute_force(name):
    model, x, kwargs = MODELS[name]()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                module.bias.normal_()
    # a strength that zeroes some units and shrinks the others
    tracker = WeightTracker(model, x, **kwargs)
    norms, counts = brute_norms_and_counts(model, tracker.groups, tracker.num_units)
    ratio = (norms / counts.sqrt()).median().item()
    _, factors = _check_against_brute_force(model, x, lr=1.0, strength=ratio, **kwargs)
    assert (factors == 0).any() and (factors > 0).any()


def test_weighting_none_matches_brute_force():
    model = CatNet()
    _check_against_brute_force(model, conv_input(), lr=0.1, strength=2.0, weighting="none")


def test_zero_strength_changes_nothing():
    model = CatNet()
    before = copy.deepcopy(model.state_dict())
    tracker = WeightTracker(model, conv_input())
    tracker.create_regularizer("group_lasso").proximal_step_(lr=0.1, strength=0.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_zeroed_units_are_exactly_the_zero_units_of_the_tracker():
    # biases and norm shifts are part of a unit: after the step, factor 0 <=> zero unit
    model = TinyConvNet()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.bias.normal_()
    tracker = WeightTracker(model, conv_input(), ignored_layers=[model.fc])
    lasso = tracker.create_regularizer("group_lasso")
    norms = lasso.unit_norms()
    coefficients = lasso.coefficients()
    strength = (norms / coefficients).median().item()
    factors = lasso.proximal_step_(lr=1.0, strength=strength)
    zero = tracker.zero_units()
    flat = sorted(tracker.groups[g].offset + u for g, units in zero.items() for u in units)
    assert flat == (factors == 0).nonzero().flatten().tolist()
    assert flat
    assert lasso().item() > 0  # the surviving units


def test_include_ignore_leave_unselected_layers_untouched():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(), ignored_layers=[model.fc])
    untouched = {n: p.detach().clone() for n, p in model.named_parameters()
                 if n.startswith(("conv2", "bn2"))}
    lasso = tracker.create_regularizer("group_lasso", ignore=[model.conv2, model.bn2])

    def selected(name):
        return name not in ("conv2", "bn2")

    expected, _ = brute_prox(model, tracker.groups, tracker.num_units, 1.0, 0.3, selected=selected)
    lasso.proximal_step_(lr=1.0, strength=0.3)
    for name, value in untouched.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[name], rtol=1e-5, atol=1e-6)


def test_writes_weight_orig_under_torch_prune():
    model = TinyConvNet()
    prune.random_unstructured(model.conv2, "weight", amount=0.3)
    mask = model.conv2.weight_mask.clone()
    tracker = WeightTracker(model, conv_input(), ignored_layers=[model.fc])
    expected, _ = brute_prox_effective(model, tracker, lr=1.0, strength=0.2)
    tracker.create_regularizer("group_lasso").proximal_step_(lr=1.0, strength=0.2)
    assert torch.equal(model.conv2.weight_mask, mask)
    torch.testing.assert_close(tensor_of(model, "conv2", "weight").detach().double(),
                               expected, rtol=1e-5, atol=1e-6)
    # the mask still applies after the next forward
    model(conv_input())
    assert (model.conv2.weight[mask == 0] == 0).all()


def brute_prox_effective(model, tracker, lr, strength):
    """Expected effective conv2.weight: the prox of orig * mask, from the effective weights."""
    norms, counts = brute_norms_and_counts(model, tracker.groups, tracker.num_units)
    coefficient = counts.sqrt()
    factors = torch.where(norms > lr * strength * coefficient,
                          1 - lr * strength * coefficient / norms.clamp_min(1e-30), 0.0)
    weight = tensor_of(model, "conv2", "weight").detach().double().clone()
    for group in tracker.groups:
        for member in group.members:
            if member.module_name != "conv2":
                continue
            for piece in member.slices:
                if piece.param != "weight":
                    continue
                for position, unit in zip(piece.positions, piece.units):
                    weight[index_of(weight.shape, piece.dims, position)] *= factors[group.offset + unit]
    return weight, factors


class _Double(nn.Module):
    def forward(self, x):
        return 2 * x


def test_writes_parametrization_original():
    model = TinyConvNet()
    parametrize.register_parametrization(model.conv2, "weight", _Double())
    tracker = WeightTracker(model, conv_input(), ignored_layers=[model.fc])
    expected, _ = brute_prox_effective(model, tracker, lr=1.0, strength=0.2)
    tracker.create_regularizer("group_lasso").proximal_step_(lr=1.0, strength=0.2)
    # a linear parametrization commutes with scaling: 2 * (s * original) == s * (2 * original)
    torch.testing.assert_close(model.conv2.weight.detach().double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_rates_are_errors_and_change_nothing(bad):
    model = TinyConvNet()
    before = copy.deepcopy(model.state_dict())
    tracker = WeightTracker(model, conv_input())
    lasso = tracker.create_regularizer("group_lasso")
    with pytest.raises(ConfigError, match="lr"):
        lasso.proximal_step_(lr=bad, strength=0.1)
    with pytest.raises(ConfigError, match="strength"):
        lasso.proximal_step_(lr=0.1, strength=bad)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_stale_after_physical_prune():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(), ignored_layers=[model.fc])
    lasso = tracker.create_regularizer("group_lasso")
    group = next(g for g in tracker.groups if g.root_module == "conv3")
    tracker.prune_unit(group.id, 0)
    with pytest.raises(StaleConsumerError):
        lasso.proximal_step_(lr=0.1, strength=0.1)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_training_with_proximal_steps_yields_prunable_zero_units():
    torch.manual_seed(0)
    # synthetic task: is the image brighter in its left or right half?
    x = torch.randn(128, 1, 8, 8)
    y = (x[..., :4].mean(dim=(1, 2, 3)) > x[..., 4:].mean(dim=(1, 2, 3))).long()
    model = SmallCNN()
    tracker = WeightTracker(model, x[:1], ignored_layers=[model.fc])
    lasso = tracker.create_regularizer("group_lasso")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        lasso.proximal_step_(lr=0.05, strength=0.01)
    zero = tracker.zero_units()
    num_zero = sum(len(units) for units in zero.values())
    assert num_zero > 0
    model.eval()
    fake_pruned = model(x)
    params_before = sum(p.numel() for p in model.parameters())
    report = tracker.prune_zero_units()
    assert report.num_units == num_zero
    assert sum(p.numel() for p in model.parameters()) == report.params_after < params_before
    assert tracker.zero_units() == {}
    # the pruned model runs and computes what the zeroed model computed
    torch.testing.assert_close(model(x), fake_pruned, rtol=1e-4, atol=1e-5)
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.8
