"""unstructured_bops (SPEC §5.3): BaselineMACs * (1 - sparsity) * bits, per layer, with the
zero counts taken by explicit loops over the effective weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as torch_prune
import torchvision
from _cost_oracle import fake_prune_randomly, fvcore_macs, weight_zero_counts
from models import MHANet, TinyConvNet, conv_input, sequence_input
from torch import nn

from weighttracker_core import ConfigError, TrackerType, WeightTracker

WEIGHTS = {
    nn.Conv2d: ("weight",),
    nn.Linear: ("weight",),
    nn.MultiheadAttention: ("in_proj_weight", "out_proj.weight"),
}


def weight_bits(name, module):
    return 4 if isinstance(module, nn.Conv2d) else 8


def activation_bits(name, module):
    return 3 + len(name) % 5


def _expected(model, inputs, names):
    macs = fvcore_macs(model, inputs)
    out = {}
    for name in names:
        module = model.get_submodule(name)
        zeros, numel = weight_zero_counts(module, WEIGHTS[type(module)])
        bits = weight_bits(name, module) * activation_bits(name, module)
        out[name] = macs.get(name, 0) * (1 - zeros / numel) * bits
    return out, macs


@pytest.mark.parametrize("case", ["resnet18", "mha"])
def test_matches_direct_zero_counts(case):
    if case == "resnet18":
        model, inputs, options = torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32), {}
    else:
        model, inputs = MHANet(), sequence_input()
        options = {"num_heads": {model.attn: 4}, "prune_num_heads": True}
    tracker = WeightTracker(model, inputs, weight_bitwidth_fn=weight_bits,
                            activation_bitwidth_fn=activation_bits, **options)
    handle = tracker.create_tracker(TrackerType.UNSTRUCTURED_BOPS, log_total_bops=True, log_layerwise_stats=True)
    fake_prune_randomly(tracker, seed=3)
    with torch.no_grad():  # plus scattered zeros that structured metrics would not see
        for param in model.parameters():
            if param.dim() > 1:
                param.view(-1)[::7] = 0.0
    metrics = handle.track()["unstructured_bops"]
    expected, macs = _expected(model, inputs, metrics["modules"])
    for name, stats in metrics["modules"].items():
        assert stats["bops"] == pytest.approx(expected[name], rel=1e-9), name
        assert stats["baseline"] == pytest.approx(macs.get(name, 0) * 1024)
    assert metrics["bops"] == pytest.approx(sum(expected.values()), rel=1e-9)
    baseline = sum(macs.get(name, 0) for name in metrics["modules"]) * 1024
    assert metrics["compression"] == pytest.approx(1 - sum(expected.values()) / baseline, rel=1e-9)


def test_hand_worked_example():
    # conv (3 -> 2, 1x1) on a 2x2 image: 3 * 2 * 4 = 24 MACs; 3 of its 6 weights zero -> 12
    # active MACs; 4-bit weights x 8-bit activations: 12 * 32 = 384 BOPs vs 24 * 1024.
    model = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0, 3.0]).reshape(2, 3, 1, 1))
    tracker = WeightTracker(model, torch.randn(1, 3, 2, 2), weight_bitwidth_fn=lambda n, m: 4,
                            activation_bitwidth_fn=lambda n, m: 8)
    metrics = tracker.create_tracker("unstructured_bops", log_total_bops=True).track()["unstructured_bops"]
    assert metrics["bops"] == 384.0
    assert metrics["baseline"] == 24 * 1024
    assert metrics["compression"] == pytest.approx(1 - 384 / 24576)


def test_reads_torch_prune_masks():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    handle = tracker.create_tracker("unstructured_bops", log_layerwise_stats=True)
    torch_prune.l1_unstructured(model.conv2, "weight", amount=0.5)
    stats = handle.track()["unstructured_bops"]["modules"]["conv2"]
    # half of conv2's 576 weights are masked: BOPs are half the dense 32-bit BOPs
    assert stats["compression_rate"] == pytest.approx(0.5)


def test_dense_model_has_no_compression_and_keys():
    tracker = WeightTracker(TinyConvNet(), conv_input())
    metrics = tracker.create_tracker("unstructured_bops").track()
    assert metrics == {"unstructured_bops": {"compression": 0.0}}
    both = tracker.create_tracker(["structured_bops", "unstructured_bops"], log_total_bops=True).track()
    assert both["structured_bops"]["baseline"] == both["unstructured_bops"]["baseline"]


def test_include_that_selects_nothing_is_an_error():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    with pytest.raises(ConfigError):
        tracker.create_tracker("unstructured_bops", include=[nn.GELU])
