"""The ``magnitude`` pruner end to end: prepare/step/finalize/report, training, torch.nn.utils.prune interop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from models import TinyConvNet, conv_input
from weighttracker_core import WeightTracker
from weighttracker_plugins.pruners.magnitude import MagnitudeMask

WEIGHTED = ("conv1", "conv2", "conv3", "fc")


def _effective(module: nn.Module) -> torch.Tensor:
    return (module.weight_orig * module.weight_mask).detach()


def _count_zeros_by_loop(t: torch.Tensor) -> int:
    return sum(1 for v in t.flatten().tolist() if v == 0.0)


def _smallest_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Brute force: zero the floor(n * s) smallest |w| (earlier index first on ties)."""
    values = w.flatten().tolist()
    keep = [1.0] * len(values)
    for i in sorted(range(len(values)), key=lambda i: (abs(values[i]), i))[: math.floor(len(values) * sparsity + 1e-9)]:
        keep[i] = 0.0
    return torch.tensor(keep).reshape(w.shape)


@pytest.fixture
def net_and_tracker():
    model = TinyConvNet()
    return model, WeightTracker(model, conv_input())


def test_prepare_step_finalize_report(net_and_tracker):
    model, tracker = net_and_tracker
    params_before = {name: getattr(model, name).weight for name in WEIGHTED}
    pruner = tracker.create_pruner("magnitude", config={
        "global_config": {"target_sparsity": 0.5, "scheduler": {"update_steps": [1, 2]}, "initial_sparsity": 0.25},
        "module_name_configs": {"conv3": {"granularity": "per_channel", "target_sparsity": 0.5}},
    })
    assert pruner.prepare() is model
    for name in WEIGHTED:
        module = getattr(model, name)
        # re-parametrised by torch.nn.utils.prune, same Parameter object under weight_orig
        assert module._parameters["weight_orig"] is params_before[name]
        assert "weight" not in module._parameters and isinstance(module.weight_mask, torch.Tensor)
    # step 0: initial sparsity 0.25 (update steps start at 1); conv3's own schedule is constant 0.5
    assert _count_zeros_by_loop(_effective(model.conv1)) == math.floor(216 * 0.25)
    assert _count_zeros_by_loop(_effective(model.conv3)) == 8 * 72  # 8 of 16 output channels
    pruner.step()  # update 0 of 2: still the initial sparsity
    assert _count_zeros_by_loop(_effective(model.conv2)) == math.floor(576 * 0.25)
    pruner.step()  # update 1 of 2: the target
    report = pruner.report()
    for name in WEIGHTED:
        weight = _effective(getattr(model, name))
        stats = report[name]
        assert stats["num_params"] == weight.numel()
        assert stats["num_zeros"] == _count_zeros_by_loop(weight)
        assert stats["unstructured_sparsity"] == pytest.approx(stats["num_zeros"] / weight.numel())
        assert stats["scheduled_sparsity"] == pytest.approx(0.5)
    assert report["conv3"]["structured_sparsity"] == 0.5
    assert report["conv3"]["mode"] == "per_channel"
    total = sum(getattr(model, n).weight_orig.numel() for n in WEIGHTED)
    zeros = sum(_count_zeros_by_loop(_effective(getattr(model, n))) for n in WEIGHTED)
    assert report["global"] == {"num_modules": 4, "num_params": total, "num_zeros": zeros,
                                "unstructured_sparsity": pytest.approx(zeros / total), "step_count": 2}

    effective = {name: _effective(getattr(model, name)) for name in WEIGHTED}
    assert pruner.finalize() is model
    for name in WEIGHTED:
        module = getattr(model, name)
        assert module._parameters["weight"] is params_before[name]  # plain parameter again
        assert not hasattr(module, "weight_orig") and not hasattr(module, "weight_mask")
        assert not module._forward_pre_hooks
        assert torch.equal(module.weight.detach(), effective[name])
    assert pruner.report()["conv1"]["num_zeros"] == _count_zeros_by_loop(effective["conv1"])
    model(conv_input())  # still runs


def test_masks_survive_sgd_with_momentum_and_weight_decay(net_and_tracker):
    model, tracker = net_and_tracker
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)  # before prepare
    pruner = tracker.create_pruner("magnitude", config={"global_config": {"target_sparsity": 0.6}})
    pruner.prepare()
    masks = {name: getattr(model, name).weight_mask.clone() for name in WEIGHTED}
    orig_before = model.conv2.weight_orig.detach().clone()
    seen = {}

    def grab(module, args):
        seen[module] = module.weight.detach().clone()  # the weight this forward really uses

    hooks = [getattr(model, n).register_forward_pre_hook(grab) for n in WEIGHTED]
    for _ in range(20):
        x = conv_input()
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
        for name in WEIGHTED:
            module = getattr(model, name)
            pruned = masks[name] == 0
            assert torch.equal(module.weight_mask, masks[name])
            assert bool((_effective(module)[pruned] == 0).all())
            assert bool((seen[module][pruned] == 0).all())
    for h in hooks:
        h.remove()
    # training did move the weights (so the zeros are not an accident of a frozen model)
    assert not torch.equal(model.conv2.weight_orig.detach(), orig_before)
    pruner.finalize()
    for name in WEIGHTED:
        assert bool((getattr(model, name).weight.detach()[masks[name] == 0] == 0).all())


def test_optimizer_created_after_prepare_trains_weight_orig(net_and_tracker):
    model, tracker = net_and_tracker
    pruner = tracker.create_pruner("magnitude")
    pruner.prepare()
    names = {n for n, _ in model.named_parameters()}
    assert "conv1.weight_orig" in names and "conv1.weight" not in names
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        model(conv_input()).sum().backward()
        optimizer.step()
    assert bool((_effective(model.fc)[model.fc.weight_mask == 0] == 0).all())


def test_torch_l1_unstructured_first_then_ours():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(10, 8))
    layer = model[0]
    prune.l1_unstructured(layer, "weight", amount=0.3)  # 24 of 80
    torch_mask = layer.weight_mask.clone()
    effective = _effective(layer)
    tracker = WeightTracker(model, torch.randn(2, 10))
    pruner = tracker.create_pruner("magnitude", config={"global_config": {"target_sparsity": 0.5}})
    pruner.prepare()
    # our mask is computed on the effective weight: the 24 zeros come first, then 16 more
    ours = _smallest_mask(effective, 0.5)
    assert torch.equal(layer.weight_mask, torch_mask * ours)
    assert _count_zeros_by_loop(_effective(layer)) == 40
    methods = next(iter(layer._forward_pre_hooks.values()))._pruning_methods
    assert [type(m) for m in methods] == [prune.L1Unstructured, MagnitudeMask]
    pruner.finalize()
    assert bool((layer.weight.detach()[torch_mask == 0] == 0).all())
    assert _count_zeros_by_loop(layer.weight.detach()) == 40


def test_ours_then_torch_random_unstructured_then_our_next_update():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 10))
    layer = model[0]
    pruner = WeightTracker(model, torch.randn(2, 10)).create_pruner("magnitude", config={
        "global_config": {"target_sparsity": 0.6, "scheduler": {"update_steps": [0, 1]}, "initial_sparsity": 0.2},
    })
    pruner.prepare()  # 20 of 100 zeros
    ours_first = layer.weight_mask.clone()
    prune.random_unstructured(layer, "weight", amount=0.25)  # 25 % of the 80 remaining: 20 more
    after_torch = layer.weight_mask.clone()
    assert bool((after_torch <= ours_first).all()) and _count_zeros_by_loop(after_torch) == 40
    effective = _effective(layer)
    pruner.step()  # our update to 0.6 multiplies into the combined mask in place
    expected = after_torch * _smallest_mask(effective, 0.6)
    assert torch.equal(layer.weight_mask, expected)
    assert _count_zeros_by_loop(_effective(layer)) == 60
    pruner.finalize()
    assert torch.equal((layer.weight.detach() != 0).float(), expected)


def test_finalize_after_user_prune_remove_reapplies_on_next_update():
    model = nn.Sequential(nn.Linear(8, 8))
    layer = model[0]
    pruner = WeightTracker(model, torch.randn(2, 8)).create_pruner("magnitude", config={
        "global_config": {"target_sparsity": 0.5, "scheduler": {"update_steps": [0, 1]}, "initial_sparsity": 0.25},
    })
    pruner.prepare()
    prune.remove(layer, "weight")  # the user bakes our 25 % in behind the pruner's back
    pruner.step()  # 50 %: the pruner attaches its mask again
    assert _count_zeros_by_loop(_effective(layer)) == 32
    pruner.finalize()
    assert _count_zeros_by_loop(layer.weight.detach()) == 32


def test_trackers_see_the_masked_weights(net_and_tracker):
    model, tracker = net_and_tracker
    sparsity = tracker.create_tracker("unstructured_sparsity")
    pruner = tracker.create_pruner("magnitude", config={"global_config": {"target_sparsity": 0.5}})
    pruner.prepare()
    metrics = sparsity.track()["unstructured_sparsity"]
    zeros = sum(_count_zeros_by_loop(_effective(getattr(model, n))) for n in WEIGHTED)
    total = sum(getattr(model, n).weight_orig.numel() for n in WEIGHTED)
    assert metrics["num_zero_weights"] == zeros
    assert metrics["num_weights"] == total


class TwoFourNet(nn.Module):
    """Linear and conv layers whose input axes are multiples of 4, plus a 3-channel stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.pointwise = nn.Conv2d(12, 8, 1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        y = torch.relu(self.pointwise(torch.relu(self.conv(torch.relu(self.stem(x))))))
        return self.fc2(torch.relu(self.fc1(y.mean(dim=(2, 3)))))


def _blocks_along_input(w: torch.Tensor):
    """Every complete block of 4 input channels at each (output channel, kernel position)."""
    for o in range(w.shape[0]):
        for pos in itertools.product(*[range(s) for s in w.shape[2:]]):
            for start in range(0, w.shape[1] - w.shape[1] % 4, 4):
                yield [w[(o, c, *pos)].item() for c in range(start, start + 4)]


def test_two_four_run_on_linear_and_conv_layers():
    model = TwoFourNet()
    tracker = WeightTracker(model, torch.randn(1, 3, 8, 8))
    pruner = tracker.create_pruner("magnitude", config={"global_config": {"n_m_ratio": (2, 4)}})
    pruner.prepare()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 8, 8)).pow(2).mean().backward()
        optimizer.step()
        pruner.step()
    for name in ("conv", "pointwise", "fc1", "fc2"):
        blocks = list(_blocks_along_input(_effective(getattr(model, name))))
        assert blocks and all(sum(v == 0.0 for v in block) >= 2 for block in blocks), name
    # the stem's 3 input channels form one padded block of 4: the padding absorbs one zero
    stem = _effective(model.stem)
    assert bool(((stem == 0).sum(dim=1) >= 1).all())
    assert pruner.report()["fc1"]["n_m_block_fraction"] == 1.0
    pruner.finalize()
    for name in ("conv", "pointwise", "fc1", "fc2"):
        weight = getattr(model, name).weight.detach()
        assert all(sum(v == 0.0 for v in block) >= 2 for block in _blocks_along_input(weight)), name


def test_nvidia_2_4_tracker_agrees_after_a_2_4_run():
    model = TwoFourNet()
    tracker = WeightTracker(model, torch.randn(1, 3, 8, 8))
    nvidia = tracker.create_tracker("nvidia_2_4_sparsity", log_layerwise_stats=True)
    pruner = tracker.create_pruner("magnitude", config={
        "global_config": {"n_m_ratio": (2, 4)}, "module_name_configs": {"stem": None},
    })
    pruner.prepare()
    metrics = nvidia.track()["nvidia_2_4_sparsity"]
    layers = metrics["layers"]
    assert layers["stem"]["eligible"] is False  # untouched, and 3 input channels leave a tail
    for name in ("conv", "pointwise", "fc1", "fc2"):
        assert layers[name]["eligible"] is True and layers[name]["nvidia_eligible_block_fraction"] == 1.0
    assert metrics["num_eligible_layers"] == 4


def test_second_prepare_is_a_no_op_and_a_second_pruner_is_refused():
    model = nn.Sequential(nn.Linear(6, 6))
    tracker = WeightTracker(model, torch.randn(1, 6))
    pruner = tracker.create_pruner("magnitude")
    pruner.prepare()
    mask = model[0].weight_mask.clone()
    pruner.prepare()
    assert torch.equal(model[0].weight_mask, mask)
    with pytest.raises(Exception, match="already masked by another magnitude pruner"):
        tracker.create_pruner("magnitude").prepare()


def test_composes_with_the_ranked_pruners_unit_masks(net_and_tracker):
    model, tracker = net_and_tracker
    ranked = tracker.create_pruner("ranked", importance="l2", pruning_ratio=0.25, apply="mask")
    ranked.step()
    dead = (model.conv1.weight_mask.flatten(1) == 0).all(dim=1)
    assert bool(dead.any())
    pruner = tracker.create_pruner("magnitude", config={"global_config": {"target_sparsity": 0.5}})
    pruner.prepare()
    weight = _effective(model.conv1)
    assert bool((weight[dead] == 0).all())
    assert _count_zeros_by_loop(weight) == 108  # the masked channels count toward the 50 %
    pruner.finalize()
    assert bool((model.conv1.weight.detach()[dead] == 0).all())


@pytest.mark.gpu
def test_masks_on_cuda():
    model = TwoFourNet().cuda()
    pruner = WeightTracker(model, torch.randn(1, 3, 8, 8, device="cuda")).create_pruner(
        "magnitude", config={"global_config": {"n_m_ratio": (2, 4)},
                             "module_name_configs": {"stem": {"block_size": 2, "target_sparsity": 0.5}}})
    pruner.prepare()
    pruner.step()
    assert model.fc1.weight_mask.device.type == "cuda"
    for name in ("conv", "fc1"):
        blocks = list(_blocks_along_input(_effective(getattr(model, name)).cpu()))
        assert all(sum(v == 0.0 for v in block) >= 2 for block in blocks)
    assert pruner.report()["stem"]["unstructured_sparsity"] == 0.5
