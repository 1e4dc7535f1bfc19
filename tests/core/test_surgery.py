"""Physical pruning (SPEC §7): parity with fake pruning, and atomicity on failure.

Oracles: the fake-pruned model's own outputs (physical pruning must reproduce them), and the
model's complete state captured before a failing prune (values, shapes, parameter objects,
module classes and attributes).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch_pruning as tp
import torchvision
from models import CatNet, MHANet, TinyConvNet, conv_input, sequence_input
from torch import nn

from weighttracker_core import PruningError, WeightTracker
from weighttracker_core.plugin import ParamSlice, UnitRule, hookimpl
from weighttracker_core.surgery import ModelSnapshot

# ------------------------------------------------------------------------------ parity


def warm_up_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Non-trivial BatchNorm running statistics, so eval-mode parity means something."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x * 2 + 0.5)
    model.eval()


def random_request(tracker: WeightTracker, rng: random.Random, share: float = 0.6) -> dict:
    """Random units of random groups, never every unit of a group."""
    request = {}
    for g in tracker.groups:
        if g.n_units > 1 and rng.random() < share:
            request[g.id] = rng.sample(range(g.n_units), rng.randint(1, g.n_units - 1))
    return request


def check_parity(model, x, seed, **options):
    tracker = WeightTracker(model, x, **options)
    request = random_request(tracker, random.Random(seed))
    assert request
    tracker.fake_prune_units(request)
    with torch.no_grad():
        expected = model(x)
    params = sum(p.numel() for p in model.parameters())
    report = tracker.prune_zero_units()
    assert report.num_units >= sum(len(u) for u in request.values())
    assert sum(p.numel() for p in model.parameters()) == params - report.removed_params < params
    with torch.no_grad():
        got = model(x)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale + 1e-7
    return tracker


@pytest.mark.parametrize("seed", [0, 1])
def test_parity_resnet18(seed):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    warm_up_bn(model, x)
    check_parity(model, x, seed, ignored_layers=[model.fc])


def test_parity_mobilenet_v2():
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    warm_up_bn(model, x)
    check_parity(model, x, 3, ignored_layers=[model.classifier])


@pytest.mark.parametrize("seed", range(4))
def test_parity_catnet(seed):
    model = CatNet()
    x = conv_input()
    warm_up_bn(model, x)
    check_parity(model, x, seed, ignored_layers=[model.fc])


@pytest.mark.parametrize("seed", range(3))
def test_parity_mhanet(seed):
    model = MHANet().eval()
    check_parity(model, sequence_input(), seed, ignored_layers=[model.head],
                 num_heads={model.attn: 4}, prune_num_heads=True)


def test_catnet_both_branches_of_the_cat_in_one_prune():
    """Two groups feeding one torch.cat: the second is mapped after the first shrank it."""
    model = CatNet()
    x = conv_input()
    warm_up_bn(model, x)
    tracker = WeightTracker(model, x, ignored_layers=[model.fc])
    left = next(g for g in tracker.groups if g.root_module == "left")
    right = next(g for g in tracker.groups if g.root_module == "right")
    tracker.fake_prune_units({left.id: [0, 3], right.id: [1, 4]})
    with torch.no_grad():
        expected = model(x)
    tracker.prune_zero_units()
    assert model.merge.in_channels == 5 and model.merge.weight.shape[1] == 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------- atomicity


def capture(model: nn.Module) -> dict:
    """Everything a failed prune must leave untouched."""
    attrs = ("in_channels", "out_channels", "in_features", "out_features", "num_features",
             "num_channels", "embed_dim", "num_heads", "head_dim", "kdim", "vdim", "groups")
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": dict(model.named_parameters()),
        "classes": {n: type(m) for n, m in model.named_modules()},
        "attrs": {(n, a): getattr(m, a) for n, m in model.named_modules() for a in attrs
                  if hasattr(m, a)},
        "dicts": {n: sorted(m.__dict__) for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    now = capture(model)
    assert now["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert now["state"][k].shape == v.shape, k
        assert torch.equal(now["state"][k], v), k
    assert now["params"].keys() == before["params"].keys()
    for k, p in before["params"].items():
        assert now["params"][k] is p, f"{k} is a different object"
    assert now["classes"] == before["classes"]
    assert now["attrs"] == before["attrs"]
    assert now["dicts"] == before["dicts"]
    assert now["grad"] == before["grad"]


def boom(tracker):
    raise RuntimeError("hook failed")


def _zero_some(tracker: WeightTracker) -> None:
    tracker.fake_prune_units({g.id: [0] for g in tracker.groups if g.n_units > 1})


@pytest.mark.parametrize("kind", ["conv", "mha"])
def test_failing_post_prune_hook_restores_everything(kind):
    if kind == "conv":
        model, x = TinyConvNet(), conv_input()
        options = {"ignored_layers": [model.fc]}
    else:
        model, x = MHANet(), sequence_input()
        options = {"num_heads": {model.attn: 4}, "prune_num_heads": True,
                   "ignored_layers": [model.head]}
    calls = []
    tracker = WeightTracker(model, x, post_prune_hooks=[calls.append, boom], **options)
    _zero_some(tracker)
    model.train()
    model(x).sum().backward()  # gradients must come back too
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = capture(model)
    names = [g.name for g in tracker.groups]
    version = tracker.structure.version
    with pytest.raises(RuntimeError, match="hook failed"):
        tracker.prune_zero_units()
    assert calls == [tracker]
    assert_unchanged(model, before)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    # the tracker still describes the model and still prunes it
    assert [g.name for g in tracker.groups] == names
    assert tracker.structure.version == version
    tracker.post_prune_hooks = ()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    tracker.prune_zero_units()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_failure_inside_torch_pruning_mid_group_restores_everything(monkeypatch):
    """Torch-Pruning cuts conv1 (and more), then fails on a BatchNorm of the same group."""
    original = tp.pruner.function.BatchnormPruner.prune_out_channels

    def prune_then_fail(self, layer, idxs):
        original(self, layer, idxs)
        raise RuntimeError("Torch-Pruning failed half way")

    monkeypatch.setattr(tp.pruner.function.BatchnormPruner, "prune_out_channels", prune_then_fail)
    monkeypatch.setattr(tp.pruner.function.BatchnormPruner, "prune_in_channels", prune_then_fail)
    model = TinyConvNet()
    x = conv_input()
    tracker = WeightTracker(model, x)
    group = next(g for g in tracker.groups if g.root_module == "conv1")
    before = capture(model)
    with pytest.raises(RuntimeError, match="half way"):
        tracker.prune_unit(group.id, 2)
    assert_unchanged(model, before)
    model(x)


class Scaled(nn.Module):
    """``x * scale`` per channel; its pruner breaks after changing the layer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(channels))
        self.channels = channels

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class BrokenPruner:
    def prune_out_channels(self, layer, idxs):
        layer.scale.data = layer.scale.data[: layer.channels - len(idxs)]  # re-points .data
        layer.channels -= len(idxs)
        layer.extra = "half-done"
        raise ValueError("custom pruner failed")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return layer.channels

    def get_in_channels(self, layer):
        return layer.channels


class BrokenPlugin:
    @hookimpl
    def wt_register_unit_rules(self):
        return (UnitRule(name="test_scaled", module_types=(Scaled,),
                         out_slices=(ParamSlice(param="scale", dim=0),),
                         layer_pruner=BrokenPruner()),)


def test_failure_inside_a_plugin_layer_pruner_restores_everything():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), Scaled(6), nn.Conv2d(6, 2, 1))
    x = conv_input()
    tracker = WeightTracker(model, x, plugins=[BrokenPlugin()], ignored_layers=[model[2]])
    group = next(g for g in tracker.groups if "1" in g.module_names())
    before = capture(model)
    with pytest.raises(ValueError, match="custom pruner failed"):
        tracker.prune_unit(group.id, 1)
    assert_unchanged(model, before)
    assert not hasattr(model[1], "extra")


def test_failure_in_the_rebuild_restores_everything_with_a_clear_error():
    class HardCoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.fc(y.reshape(x.shape[0], 8, -1).mean(-1))  # 8 is hard-coded

    model = HardCoded()
    tracker = WeightTracker(model, conv_input())
    group = next(g for g in tracker.groups if g.root_module == "conv")
    groups = tracker.groups
    before = capture(model)
    with pytest.raises(PruningError, match="restored unchanged"):
        tracker.prune_unit(group.id, 0)
    assert_unchanged(model, before)
    assert tracker.groups == groups


# ---------------------------------------------------------------------- the snapshot itself


def test_snapshot_restores_classes_data_pointers_grads_and_attributes():
    model = nn.Sequential(nn.Linear(3, 4), nn.MultiheadAttention(4, 2))
    model[0].weight.grad = torch.ones(4, 3)
    before = capture(model)
    bias = model[0].bias
    snap = ModelSnapshot(model)
    with torch.no_grad():
        model[0].weight.mul_(0)  # in place
        model[0].weight.grad.add_(1)
        bias.data = torch.zeros(7)  # re-pointed and resized
    model[0].weight.requires_grad_(False)
    model[0].register_buffer("new", torch.zeros(1))
    model[0].register_forward_hook(lambda *a: None)
    model[1].__class__ = type("Other", (nn.MultiheadAttention,), {})
    model[1].num_heads = 1
    model[1].out_proj = nn.Linear(4, 4)
    snap.restore()
    assert_unchanged(model, before)
    assert model[0].bias is bias and bias.shape == (4,)
    assert torch.equal(model[0].weight.grad, torch.ones(4, 3))
    assert not model[0]._forward_hooks and "new" not in model[0]._buffers


def test_refused_prune_of_a_reparametrised_layer_changes_nothing():
    model = TinyConvNet()
    torch.nn.utils.prune.l1_unstructured(model.conv3, "weight", amount=0.5)
    tracker = WeightTracker(model, conv_input())
    group = next(g for g in tracker.groups if g.root_module == "conv3")
    before = capture(model)
    with pytest.raises(PruningError, match=r"prune.remove"):
        tracker.prune_unit(group.id, 0)
    assert_unchanged(model, before)
