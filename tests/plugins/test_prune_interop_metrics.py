"""Trackers measure effective weights (SPEC §10.3): torch.nn.utils.prune masks and parametrizations.

The oracle is always a direct count on ``module.weight`` *after a forward pass*, which is
when ``torch.nn.utils.prune`` refreshes the attribute (``weight_orig * weight_mask``) and
when a parametrization is evaluated by the layer itself.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize, prune

from _sparsity_cases import block_histogram_by_start, gemm_weights, param_counts
from models import CatNet, MHANet, TinyConvNet, conv_input, sequence_input
from weighttracker_core import WeightTracker

TRACKERS = ["unstructured_sparsity", "nvidia_2_4_sparsity", "group_pruning_summary", "l2_norm_distribution"]


def _direct_zeros(model, x):
    model.eval()
    with torch.no_grad():
        model(x)  # refresh module.weight from weight_orig * weight_mask
    weights = [t for ts in gemm_weights(model).values() for t in ts]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def _gemm_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("build_first", [True, False])
def test_global_unstructured_on_mobilenet_v2(build_first):
    model = torchvision.models.mobilenet_v2(num_classes=10)
    x = conv_input(1, 32)
    tracker = WeightTracker(model, x) if build_first else None
    prune.global_unstructured([(m, "weight") for m in _gemm_layers(model)],
                              pruning_method=prune.L1Unstructured, amount=0.4)
    if tracker is None:
        tracker = WeightTracker(model, x)
    handle = tracker.create_tracker(TRACKERS, log_layerwise_stats=True)
    out = handle.track()
    zeros, total = _direct_zeros(model, x)
    assert out["unstructured_sparsity"]["num_zero_weights"] == zeros
    assert out["unstructured_sparsity"]["sparsity"] == pytest.approx(zeros / total, rel=1e-12)
    assert zeros == pytest.approx(0.4 * total, abs=1)
    # a training step changes weight_orig; the mask keeps pruned entries at zero
    with torch.no_grad():
        for module in _gemm_layers(model):
            module.weight_orig.add_(0.01)
            module.weight_orig[0].zero_()
    out = handle.track()
    zeros, total = _direct_zeros(model, x)
    assert out["unstructured_sparsity"]["num_zero_weights"] == zeros
    layers = out["nvidia_2_4_sparsity"]["layers"]
    for name in ("features.2.conv.0.0", "features.7.conv.2", "features.18.0", "classifier.1"):
        hist, _ = block_histogram_by_start(model.get_submodule(name).weight)
        assert layers[name]["strict_block_fraction"] == pytest.approx(hist[2] / sum(hist)), name
        assert layers[name]["nvidia_eligible_block_fraction"] == pytest.approx(sum(hist[2:]) / sum(hist)), name


def test_l1_and_random_unstructured_per_layer_on_catnet():
    model = CatNet()
    x = conv_input(1)
    tracker = WeightTracker(model, x)
    prune.l1_unstructured(model.stem, "weight", amount=0.3)
    prune.random_unstructured(model.merge, "weight", amount=0.5)
    prune.l1_unstructured(model.merge, "weight", amount=0.2)  # a PruningContainer on top
    prune.l1_unstructured(model.fc, "weight", amount=5)
    out = tracker.create_tracker("unstructured_sparsity").track()["unstructured_sparsity"]
    zeros, total = _direct_zeros(model, x)
    assert (out["num_zero_weights"], out["num_weights"]) == (zeros, total)
    for name in ("stem", "merge", "fc"):
        weight = model.get_submodule(name).weight
        assert out["layers"][name] == pytest.approx(float((weight == 0).double().mean()))


class RoundToGrid(nn.Module):
    """A fake quantizer: rounds to multiples of ``step``; small weights become exact zeros."""

    def __init__(self, step: float) -> None:
        super().__init__()
        self.step = step

    def forward(self, weight):
        return torch.round(weight / self.step) * self.step


def test_parametrized_fake_quantizer_counts_rounded_zeros():
    model = TinyConvNet()
    x = conv_input(1)
    for module in (model.conv2, model.conv3, model.fc):
        parametrize.register_parametrization(module, "weight", RoundToGrid(0.15))
    tracker = WeightTracker(model, x)
    handle = tracker.create_tracker(["unstructured_sparsity", "nvidia_2_4_sparsity"], log_layerwise_stats=True)
    out = handle.track()
    zeros, total = _direct_zeros(model, x)
    assert out["unstructured_sparsity"]["num_zero_weights"] == zeros
    assert out["unstructured_sparsity"]["sparsity"] == pytest.approx(zeros / total)
    quantized = (model.conv2, model.conv3, model.fc)
    raw = sum(int((m.parametrizations.weight.original == 0).sum()) for m in quantized)
    assert zeros > raw + 100  # the quantizer's zeros are what is counted
    h, _ = block_histogram_by_start(model.conv3.weight)
    row = out["nvidia_2_4_sparsity"]["layers"]["conv3"]
    assert row["strict_block_fraction"] == pytest.approx(h[2] / sum(h))


def test_parametrized_attention_projection():
    model = MHANet()
    x = sequence_input(1)
    parametrize.register_parametrization(model.attn, "in_proj_weight", RoundToGrid(0.2))
    parametrize.register_parametrization(model.fc1, "weight", RoundToGrid(0.2))
    tracker = WeightTracker(model, x)
    out = tracker.create_tracker("unstructured_sparsity").track()["unstructured_sparsity"]
    zeros, total = _direct_zeros(model, x)
    assert (out["num_zero_weights"], out["num_weights"]) == (zeros, total)
    assert out["layers"]["attn"] == pytest.approx(
        (int((model.attn.in_proj_weight == 0).sum()) + int((model.attn.out_proj.weight == 0).sum()))
        / (model.attn.in_proj_weight.numel() + model.attn.out_proj.weight.numel())
    )


def test_two_four_masks_make_layers_strict():
    model = TinyConvNet()
    x = conv_input(1)
    tracker = WeightTracker(model, x)
    for module in (model.conv2, model.conv3, model.fc):
        pattern = torch.tensor([0.0, 1.0, 1.0, 0.0]).repeat(module.weight.shape[1] // 4)
        shape = [1, -1] + [1] * (module.weight.dim() - 2)
        prune.custom_from_mask(module, "weight", pattern.view(shape).expand_as(module.weight).clone())
    out = tracker.create_tracker("nvidia_2_4_sparsity").track()["nvidia_2_4_sparsity"]
    assert out["num_strict_layers"] == 3 and out["strict_block_fraction"] == 1.0


def test_structured_masks_count_as_pruned_units():
    # Unit 2 of conv1's group zeroed only through pruning masks (weights, biases, norms).
    model = TinyConvNet()
    x = conv_input(1)
    tracker = WeightTracker(model, x)
    group = next(g for g in tracker.groups if g.name == "conv1:prune_out_channels")
    for member in group.members:
        module = model.get_submodule(member.module_name)
        for piece in member.slices:
            tensor = getattr(module, piece.param)
            mask = torch.ones_like(tensor)
            mask.select(piece.dims[0], 2).zero_()
            prune.custom_from_mask(module, piece.param, mask)
    out = tracker.create_tracker(["group_pruning_summary", "l2_norm_distribution"]).track()
    summary = out["group_pruning_summary"]
    assert summary["groups"][group.name]["pruned_units"] == 1
    assert out["l2_norm_distribution"]["groups"][group.name]["min"] == 0.0
    # make the masks permanent and remove the unit physically
    for module in model.modules():
        masked = [n for n, _ in module.named_parameters(recurse=False) if n.endswith("_orig")]
        for name in [n[: -len("_orig")] for n in masked]:
            prune.remove(module, name)
    fresh = WeightTracker(model, x)
    before = param_counts(model)
    fresh.prune_zero_units()
    after = param_counts(model)
    removed = (before[0] - after[0], before[1] - after[1])
    assert (summary["pruned_params"], summary["pruned_bias_params"]) == removed
