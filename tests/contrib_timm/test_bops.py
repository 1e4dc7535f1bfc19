"""``structured_bops`` of a fake-pruned timm model equals fvcore's MAC count of the
physically pruned copy, times the bit-widths, for every counted layer (SPEC §5.1, §9)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("timm")
fvcore_nn = pytest.importorskip("fvcore.nn")

from _timm_models import make  # noqa: E402

from weighttracker_core import WeightTracker  # noqa: E402


def weight_bits(name, module):
    return 8 if name.endswith("qkv") else 4 if name.endswith("proj") else 32


def activation_bits(name, module):
    return 16 if ".mlp." in name else 8


CASES = {
    # model, its options, {attention qkv: (heads to remove, head dims to remove)}
    "vit_tiny_patch16_224": ({"depth": 3}, {"blocks.1.attn.qkv": ([0, 2], [])}),
    "deit_tiny_patch16_224": ({"depth": 2}, {"blocks.0.attn.qkv": ([1], [3, 9, 40])}),
    "swin_tiny_patch4_window7_224": (
        {"depths": (1, 1, 2, 1)},
        {"layers.2.blocks.0.attn.qkv": ([0, 5], []), "layers.1.blocks.0.attn.qkv": ([], [1, 2, 31])},
    ),
}


def _fake_prune(tracker, plan):
    units = {}
    for qkv, (heads, dims) in plan.items():
        for group in tracker.groups:
            if group.root_module == qkv:
                units[group.id] = heads if group.kind == "head" else dims
    tracker.fake_prune_units({g: u for g, u in units.items() if u})


@pytest.mark.parametrize("name", list(CASES))
def test_structured_bops_equal_fvcore_macs_of_the_pruned_copy(name):
    options, plan = CASES[name]
    model, x = make(name, batch=1, **options)
    kwargs = dict(prune_num_heads=True, prune_head_dims=True,
                  weight_bitwidth_fn=weight_bits, activation_bitwidth_fn=activation_bits)
    tracker = WeightTracker(model, x, **kwargs)
    _fake_prune(tracker, plan)
    layers = tracker.create_tracker("structured_bops", log_layerwise_stats=True).track()[
        "structured_bops"]["modules"]

    pruned = copy.deepcopy(model)
    WeightTracker(pruned, x, **kwargs).prune_zero_units()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        analysis = fvcore_nn.FlopCountAnalysis(pruned, x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        macs = analysis.by_module()
    weighted = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(layers) == weighted  # every counted layer, norms excluded
    for layer, stats in layers.items():
        module = pruned.get_submodule(layer)
        expected = macs[layer] * weight_bits(layer, module) * activation_bits(layer, module)
        assert stats["bops"] == pytest.approx(expected, rel=1e-6), layer
