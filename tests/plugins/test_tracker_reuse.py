"""Trackers reuse their last results only while the weights' zero pattern repeats.

The oracle is a fresh ``WeightTracker`` on a copy of the model, built after every change:
it has no cached results at all. The tracker under test sees the same sequence of changes
(some keep the zero pattern with other values, some change it) and must report exactly
what the fresh one does after each.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from weighttracker_core import WeightTracker

TRACKERS = (
    ("structured_bops", {"log_total_bops": True, "log_layerwise_stats": True}),
    ("unstructured_sparsity", {}),
    ("unstructured_bops", {"log_total_bops": True}),
    ("nvidia_2_4_sparsity", {"log_layerwise_stats": True}),
    ("group_pruning_summary", {}),
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def _metrics(model: nn.Module) -> dict:
    tracker = WeightTracker(model, torch.randn(1, 3, 8, 8))
    for kind, options in TRACKERS:
        tracker.create_tracker(kind, **options)
    return tracker.track()


def test_results_follow_every_change_of_the_weights():
    model = _model()
    tracker = WeightTracker(model, torch.randn(1, 3, 8, 8))
    for kind, options in TRACKERS:
        tracker.create_tracker(kind, **options)
    conv, bn = model[3], model[4]
    gen = torch.Generator().manual_seed(1)
    steps = [
        lambda: None,
        lambda: None,  # the same pattern: reused
        lambda: bn.bias.fill_(0.5),  # every weight non-zero
        lambda: conv.weight.mul_(3.0),  # same pattern, other values
        lambda: conv.weight[2].zero_(),  # a unit becomes zero
        lambda: None,
        lambda: conv.weight.mul_((torch.rand(conv.weight.shape, generator=gen) > 0.5).float()),
        lambda: None,
        lambda: bn.weight[2].fill_(1.0),
        lambda: conv.weight.fill_(1.0),  # back to dense
    ]
    for i, step in enumerate(steps):
        with torch.no_grad():
            step()
        assert tracker.track() == _metrics(copy.deepcopy(model)), i


def test_editing_returned_metrics_does_not_change_the_next_ones():
    model = _model()
    tracker = WeightTracker(model, torch.randn(1, 3, 8, 8))
    for kind, options in TRACKERS:
        tracker.create_tracker(kind, convert_tensors=False, **options)
    first = tracker.track()
    want = copy.deepcopy(first)
    first["structured_bops"].clear()
    first["nvidia_2_4_sparsity"]["layers"].clear()
    first["group_pruning_summary"]["groups"].clear()
    again = tracker.track()
    assert again.keys() == want.keys()
    for name in want:
        assert again[name].keys() == want[name].keys(), name
        assert repr(again[name]) == repr(want[name]), name
