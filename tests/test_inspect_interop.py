"""``weighttracker inspect`` and the trackers agree with a direct count on a model pruned by
``torch.nn.utils.prune.global_unstructured`` (SPEC §10.3)."""

from __future__ import annotations

import json

import torch
from torch import nn

from models import globally_pruned_convnet
from weighttracker_core import WeightTracker
from weighttracker_core.cli import main


def _direct_sparsity(model: nn.Module) -> float:
    # the weights a layer really uses: weight_orig * weight_mask, refreshed by a forward
    model(torch.zeros(1, 3, 8, 8))
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def test_inspect_and_tracker_report_the_direct_count(capsys):
    expected = _direct_sparsity(globally_pruned_convnet())
    assert 0.39 < expected < 0.41  # 40 % of the conv/linear weights were masked

    model = globally_pruned_convnet()
    tracker = WeightTracker(model, torch.zeros(1, 3, 8, 8))
    measured = tracker.create_tracker("unstructured_sparsity").track()["unstructured_sparsity"]
    assert abs(measured["sparsity"] - expected) < 1e-12

    assert main(["inspect", "models:globally_pruned_convnet", "--input-shape", "1,3,8,8",
                 "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert abs(report["metrics"]["unstructured_sparsity"]["sparsity"] - expected) < 1e-12
