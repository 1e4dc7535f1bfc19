"""Bit-widths (SPEC §5.7): validated on every track(), called for every counted layer."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from models import TinyConvNet, conv_input
from torch import nn

from weighttracker_core import WeightTracker
from weighttracker_core.plugin import check_bitwidth

WEIGHTED = ["conv1", "conv2", "conv3", "fc"]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8", torch.tensor([8, 8]), float("nan"), None])
@pytest.mark.parametrize("kind", ["weight", "activation"])
def test_bad_bitwidths_name_the_layer_and_value(bad, kind):
    def fn(name, module):
        return bad if name == "conv2" else 8

    tracker = WeightTracker(TinyConvNet(), conv_input(), **{f"{kind}_bitwidth_fn": fn})
    handle = tracker.create_tracker("structured_bops")
    with pytest.raises(ValueError, match="conv2") as info:
        handle.track()
    assert repr(bad) in str(info.value)
    assert kind in str(info.value)


@pytest.mark.parametrize("good,bits", [(8, 8), (8.0, 8), (torch.tensor(4), 4), (torch.tensor(2.0), 2), (1, 1)])
def test_whole_numbers_are_accepted(good, bits):
    assert check_bitwidth(good, "layer", "weight") == bits
    model = nn.Sequential(nn.Linear(4, 2))
    tracker = WeightTracker(model, torch.randn(1, 4), weight_bitwidth_fn=lambda n, m: good)
    metrics = tracker.create_tracker("structured_bops", log_total_bops=True).track()["structured_bops"]
    # Linear(4, 2) on one token: 8 MACs, `bits`-bit weights, 32-bit activations
    assert metrics["bops"] == 8 * bits * 32


def test_functions_are_called_for_every_counted_layer_on_every_track():
    calls: Counter[tuple[str, str]] = Counter()

    def weight(name, module):
        calls["weight", name] += 1
        return 8

    def activation(name, module):
        calls["activation", name] += 1
        return 4

    tracker = WeightTracker(TinyConvNet(), conv_input(), weight_bitwidth_fn=weight,
                            activation_bitwidth_fn=activation)
    tracker.create_tracker("structured_bops")
    tracker.create_tracker("unstructured_bops")
    for _ in range(3):
        tracker.track()
    # both trackers share one evaluation per track(): each layer is asked once per track()
    assert calls == Counter({(kind, name): 3 for kind in ("weight", "activation") for name in WEIGHTED})


def test_changing_bitwidths_change_bops_without_recreating_the_tracker():
    bits = {"value": 32}
    tracker = WeightTracker(TinyConvNet(), conv_input(), weight_bitwidth_fn=lambda n, m: bits["value"])
    handle = tracker.create_tracker("structured_bops")
    assert handle.track()["structured_bops"]["compression"] == 0.0
    bits["value"] = 8  # e.g. quantization-aware training lowered the weight precision
    assert handle.track()["structured_bops"]["compression"] == pytest.approx(0.75)


def test_included_normalization_layers_are_asked_too():
    asked = []
    tracker = WeightTracker(TinyConvNet(), conv_input(),
                            weight_bitwidth_fn=lambda name, module: asked.append(name) or 16)
    metrics = tracker.create_tracker("structured_bops", include=[nn.BatchNorm2d],
                                     log_layerwise_stats=True).track()["structured_bops"]
    assert {"bn1", "bn2", "bn3"} <= set(asked)
    for stats in metrics["modules"].values():
        assert stats["compression_rate"] == pytest.approx(0.5)  # 16-bit weights, 32-bit activations


def test_view_bitwidths_lists_widths_and_sources():
    tracker = WeightTracker(TinyConvNet(), conv_input(),
                            weight_bitwidth_fn=lambda n, m: 4 if isinstance(m, nn.Conv2d) else 8)
    view = tracker.view_bitwidths()
    rows = view.to_dict()
    assert list(rows) == WEIGHTED
    assert rows["conv1"] == {"weight_bits": 4, "weight_source": "weight_bitwidth_fn",
                             "activation_bits": 32, "activation_source": "default"}
    assert rows["fc"]["weight_bits"] == 8
    assert "conv2: weight 4 (weight_bitwidth_fn), activation 32 (default)" in str(view)
    with pytest.raises(ValueError, match="conv1"):
        WeightTracker(TinyConvNet(), conv_input(), activation_bitwidth_fn=lambda n, m: 0).view_bitwidths()
