"""l2_norm_distribution: per-group summaries against torch.quantile of brute-force unit norms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _sparsity_cases import CASES, damage
from models import TinyConvNet, conv_input
from weighttracker_core import ConfigError, WeightTracker


def _dist(tracker, **kwargs):
    return tracker.create_tracker("l2_norm_distribution", **kwargs).track()["l2_norm_distribution"]


def _brute_unit_norms(model, group, keep=lambda name: True):
    """Per-unit (sum of squares, element count) by explicit indexing of every slice."""
    sums = [0.0] * group.n_units
    counts = [0] * group.n_units
    for member in group.members:
        if not keep(member.module_name):
            continue
        module = model.get_submodule(member.module_name) if member.module_name else model
        for piece in member.slices:
            tensor = module.get_parameter(piece.param).detach().double()
            viewed = tensor.reshape(piece.view) if piece.view else tensor
            dims = list(piece.dims)
            others = [d for d in range(viewed.dim()) if d not in dims]
            rows = viewed.permute(*dims, *others).reshape(math.prod(viewed.shape[d] for d in dims), -1)
            for position, unit in zip(piece.positions, piece.units):
                sums[unit] += float((rows[position] ** 2).sum())
                counts[unit] += rows.shape[1]
    return sums, counts


def test_hand_worked_group():
    # Linear(2, 4) -> Linear(4, 1) without biases; hidden units own row u of the first and
    # column u of the second. Norms [0, 3, 4, 5] -> p25 2.25, p50 3.5, p75 4.25, mean 3.
    model = nn.Sequential(nn.Linear(2, 4, bias=False), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [3.0, 4.0]]))
        model[1].weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0]]))
    tracker = WeightTracker(model, torch.randn(1, 2))
    out = _dist(tracker)["groups"]["0:prune_out_channels"]
    assert out == {"num_units": 4, "min": 0.0, "p25": 2.25, "p50": 3.5, "p75": 4.25, "max": 5.0,
                   "mean": 3.0, "num_below_threshold": 1}
    # RMS per unit: each unit owns 3 weights -> norms / sqrt(3)
    norm = _dist(tracker, normalized=True, quantiles=[0.5], threshold=2.0)["groups"]["0:prune_out_channels"]
    assert norm["p50"] == pytest.approx(3.5 / math.sqrt(3))
    assert norm["num_below_threshold"] == 2  # 0 and 3 / sqrt(3) = 1.73


@pytest.mark.parametrize("case", ["tiny", "catnet", "mhanet", "resnet18"])
def test_matches_torch_quantile_of_brute_force_norms(case):
    model, x, kwargs = CASES[case]()
    tracker = WeightTracker(model, x, **kwargs)
    damage(tracker, model, seed=7)
    quantiles = (0.0, 0.1, 0.5, 0.9, 1.0)
    out = _dist(tracker, quantiles=quantiles, threshold=1e-6)["groups"]
    assert set(out) == {g.name for g in tracker.groups}
    for group in tracker.groups:
        sums, _ = _brute_unit_norms(model, group)
        norms = torch.tensor(sums, dtype=torch.float64).sqrt()
        row = out[group.name]
        assert row["num_units"] == group.n_units
        assert row["min"] == pytest.approx(float(norms.min()), rel=1e-5, abs=1e-7)
        assert row["max"] == pytest.approx(float(norms.max()), rel=1e-5)
        assert row["mean"] == pytest.approx(float(norms.mean()), rel=1e-5)
        for q in quantiles:
            key = f"p{q * 100:g}"
            assert row[key] == pytest.approx(float(torch.quantile(norms, q)), rel=1e-5, abs=1e-7), key
        assert row["num_below_threshold"] == int((norms < 1e-6).sum())
    assert sum(row["num_below_threshold"] for row in out.values()) > 0


def test_include_and_ignore_restrict_the_norms():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(1))
    out = _dist(tracker, ignore=[nn.BatchNorm2d], quantiles=[0.5])["groups"]
    for group in tracker.groups:
        sums, _ = _brute_unit_norms(model, group, keep=lambda n: not n.startswith("bn"))
        expected = float(torch.quantile(torch.tensor(sums, dtype=torch.float64).sqrt(), 0.5))
        assert out[group.name]["p50"] == pytest.approx(expected, rel=1e-5)
    only_fc = _dist(tracker, include=[model.fc])["groups"]
    # fc is an input-side member of conv3's group (its own outputs are the model's: no units)
    assert set(only_fc) == {"conv3:prune_out_channels"}


@pytest.mark.parametrize("bad", [{"quantiles": [0.5, 1.5]}, {"quantiles": [-0.1]}, {"threshold": -1.0},
                                 {"normalized": "yes"}])
def test_bad_options_raise_config_errors(bad):
    tracker = WeightTracker(TinyConvNet(), conv_input(1))
    with pytest.raises(ConfigError, match="l2_norm_distribution"):
        tracker.create_tracker("l2_norm_distribution", **bad)


def test_segment_summary_handles_empty_and_single_segments():
    from weighttracker_plugins.trackers.l2_norm_distribution import segment_summary

    values = torch.tensor([2.0, 7.0, 1.0])
    segment = torch.tensor([2, 2, 0])
    out = segment_summary(values, segment, 3, (0.5,), 1.5)
    assert out["num_units"].tolist() == [1, 0, 2]
    assert out["p50"].tolist() == [1.0, 0.0, 4.5]
    assert out["min"].tolist() == [1.0, 0.0, 2.0] and out["max"].tolist() == [1.0, 0.0, 7.0]
    assert out["num_below_threshold"].tolist() == [1, 0, 0]


@pytest.mark.parametrize("kind", ["l2_norm_distribution", "group_pruning_summary", "nvidia_2_4_sparsity"])
def test_filters_that_select_no_layer_raise(kind):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    tracker = WeightTracker(model, torch.randn(1, 3))
    with pytest.raises(ConfigError, match="select"):
        tracker.create_tracker(kind, include=[model[1]])  # the ReLU owns no weights
    with pytest.raises(ConfigError):
        tracker.create_tracker(kind, include=[model[0]], ignore=[nn.Linear])
