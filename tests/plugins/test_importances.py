"""Importance plugins (l1, l2, bn_scale, taylor) against brute-force loops over unit slices."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _unit_oracle import stored, unit_elements
from models import CatNet, MHANet, QKVNet, TinyConvNet, conv_input, sequence_input
from torch import nn
from torch.nn.utils import prune

from weighttracker_core import ConfigError, PruningError, WeightTracker
from weighttracker_core.plugin import ConsumerContext, ParamRole


class GroupedNet(nn.Module):
    """A grouped convolution (groups=2) and a GroupNorm between plain convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.norm = nn.GroupNorm(2, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.grouped(torch.relu(self.stem(x)))))).mean(dim=(2, 3))


def make(kind):
    if kind == "tiny":
        model = TinyConvNet()
        return model, WeightTracker(model, conv_input(), prune_model_outputs=True)
    if kind == "cat":
        model = CatNet()
        return model, WeightTracker(model, conv_input())
    if kind == "grouped":
        model = GroupedNet()
        return model, WeightTracker(model, conv_input())
    if kind == "mha":
        model = MHANet()
        return model, WeightTracker(model, sequence_input(), num_heads={model.attn: 4}, prune_num_heads=True)
    model = QKVNet()
    return model, WeightTracker(model, sequence_input(), num_heads={model.attn.qkv: 4}, prune_num_heads=True)


def score(tracker, name, **options):
    spec = tracker.registries.importances.get(name)
    ctx = ConsumerContext(
        name=name, tracker=tracker, structure=tracker.structure, graph=tracker.graph,
        options=spec.options(**options) if spec.options else None,
        selection=tracker.structure.selection(),
    )
    return spec.build(ctx)(tracker.graph.evaluation())


def weights_only(member, piece):
    return piece.role is ParamRole.WEIGHT


def expected(elements, fn):
    return torch.tensor([fn(elements[u]) if elements[u].numel() else math.nan for u in sorted(elements)],
                        dtype=torch.float64)


@pytest.mark.parametrize("kind", ["tiny", "cat", "grouped", "mha", "qkv"])
@pytest.mark.parametrize("include_bias", [False, True])
def test_l1_and_l2_equal_brute_force(kind, include_bias):
    model, tracker = make(kind)
    keep = (lambda m, p: True) if include_bias else weights_only
    elements = unit_elements(model, tracker.groups, keep)
    l1 = expected(elements, lambda e: float(e.double().abs().sum()))
    l2 = expected(elements, lambda e: float(e.double().square().sum().sqrt()))
    got_l1 = score(tracker, "l1", include_bias=include_bias).double()
    got_l2 = score(tracker, "l2", include_bias=include_bias).double()
    torch.testing.assert_close(got_l1, l1, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got_l2, l2, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_l2_power_two_is_the_sum_of_squares():
    model, tracker = make("tiny")
    elements = unit_elements(model, tracker.groups, weights_only)
    want = expected(elements, lambda e: float(e.double().square().sum()))
    torch.testing.assert_close(score(tracker, "l2", power=2).double(), want, rtol=1e-5, atol=1e-6)


def test_magnitude_reads_effective_weights_under_prune_masks():
    model, tracker = make("tiny")
    prune.l1_unstructured(model.conv2, "weight", amount=0.5)
    elements = unit_elements(model, tracker.groups, weights_only)  # orig * mask
    want = expected(elements, lambda e: float(e.double().abs().sum()))
    torch.testing.assert_close(score(tracker, "l1").double(), want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_bn_scale_is_abs_gamma_read_directly():
    model, tracker = make("tiny")
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.weight.normal_()
    scores = score(tracker, "bn_scale")
    groups = {g.root_module: g for g in tracker.groups}
    conv3 = groups["conv3"]  # one batch norm: exactly |gamma|
    assert torch.equal(scores[conv3.unit_ids.start : conv3.unit_ids.stop], model.bn3.weight.detach().abs())
    conv1 = groups["conv1"]  # bn1 and bn2 are coupled through the residual: their mean
    want = (model.bn1.weight.detach().abs() + model.bn2.weight.detach().abs()) / 2
    torch.testing.assert_close(scores[conv1.unit_ids.start : conv1.unit_ids.stop], want)
    fc = groups["fc"]  # no normalization layer: cannot be scored
    assert torch.isnan(scores[fc.unit_ids.start : fc.unit_ids.stop]).all()


def _backward(model, x):
    model.zero_grad()
    model(x).square().sum().backward()


@pytest.mark.parametrize("kind", ["tiny", "cat", "qkv"])
def test_taylor_equals_brute_force_abs_w_times_grad(kind):
    model, tracker = make(kind)
    x = sequence_input() if kind == "qkv" else conv_input()
    _backward(model, x)

    def grad_times_weight(m, module_name, param):
        p = stored(m, module_name, param)
        return p * p.grad

    elements = unit_elements(model, tracker.groups, weights_only, read=grad_times_weight)
    want = expected(elements, lambda e: float(e.double().abs().sum()))
    torch.testing.assert_close(score(tracker, "taylor").double(), want, rtol=1e-5, atol=1e-8, equal_nan=True)
    multi = expected(elements, lambda e: float(e.double().sum().abs()))
    torch.testing.assert_close(score(tracker, "taylor", multivariable=True).double(), multi,
                               rtol=1e-5, atol=1e-8, equal_nan=True)


def test_taylor_under_prune_masks_uses_effective_weights():
    model, tracker = make("tiny")
    plain = copy.deepcopy(model)  # oracle: the same effective weights as plain parameters
    prune.random_unstructured(model.conv2, "weight", amount=0.5)
    with torch.no_grad():
        plain.conv2.weight.copy_(model.conv2.weight_orig * model.conv2.weight_mask)
    x = conv_input()
    _backward(model, x)
    _backward(plain, x)
    elements = unit_elements(plain, tracker.groups, weights_only,
                             read=lambda m, n, p: stored(m, n, p) * stored(m, n, p).grad)
    want = expected(elements, lambda e: float(e.double().abs().sum()))
    torch.testing.assert_close(score(tracker, "taylor").double(), want, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_taylor_without_gradients_says_what_to_do():
    model, tracker = make("tiny")
    with pytest.raises(PruningError, match=r"no \.grad.*loss\.backward\(\)"):
        score(tracker, "taylor")
    pruner = tracker.create_pruner("ranked", importance="taylor", ignored_layers=[model.fc])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PruningError, match=r"has no \.grad"):
        pruner.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_importance_options_are_checked():
    model, tracker = make("tiny")
    with pytest.raises(ConfigError, match="power"):
        tracker.create_pruner("ranked", importance="l2", importance_options={"power": 0})
    with pytest.raises(ConfigError, match="colour"):
        tracker.create_pruner("ranked", importance="l1", importance_options={"colour": 1})
    with pytest.raises(ConfigError, match="takes no options"):
        tracker.create_pruner("ranked", importance="bn_scale", importance_options={"power": 2})
