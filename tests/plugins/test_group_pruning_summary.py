"""group_pruning_summary: hand-worked counts and what a physical prune of a copy removes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _sparsity_cases import CASES, damage, param_counts, pick_units, zero_random_weights
from models import MHANet, TinyConvNet, conv_input, sequence_input
from weighttracker_core import WeightTracker


def _summary(tracker, **kwargs):
    return tracker.create_tracker("group_pruning_summary", **kwargs).track()["group_pruning_summary"]


def _group(tracker, name):
    return next(g for g in tracker.groups if g.name == name)


def _check_sums(out):
    for key in ("pruned_units", "pruned_params", "pruned_bias_params", "pruned_physical_params"):
        assert out[key] == sum(row[key] for row in out["groups"].values()), key
    assert out["pruned_physical_params"] == out["pruned_params"] + out["pruned_bias_params"]


def test_hand_worked_mlp():
    # Linear(3, 4) -> ReLU -> Linear(4, 2); hidden feature 1 zero in both layers:
    # row 1 of the first weight (3) + column 1 of the second (2) = 5 weights, 1 bias.
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    tracker = WeightTracker(model, torch.randn(1, 3), prune_model_outputs=True)
    hidden = _group(tracker, "0:prune_out_channels")
    tracker.fake_prune_unit(hidden.id, 1)
    out = _summary(tracker)
    assert out["groups"]["0:prune_out_channels"] == {
        "pruned_units": 1, "pruned_params": 5, "pruned_bias_params": 1, "pruned_physical_params": 6,
    }
    assert out["groups"]["2:prune_out_channels"]["pruned_units"] == 0
    _check_sums(out)


def test_hand_worked_overlap_goes_to_the_lower_group_id():
    # a: Conv2d(3, 4, 3) -> b: Conv2d(4, 4, 3) -> c: Conv2d(4, 2, 3).
    # Group A (a's outputs) loses channels 0, 1: a rows 2 * 3 * 9 = 54, b columns 2 * 4 * 9 = 72.
    # Group B (b's outputs) loses channel 0: b row 4 * 9 = 36, c column 2 * 9 = 18.
    # b's elements [0, 0:2] (2 * 9 = 18) are removed by both; they go to the lower id.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 3))
    tracker = WeightTracker(model, torch.randn(1, 3, 9, 9))
    a = _group(tracker, "0:prune_out_channels")
    b = _group(tracker, "1:prune_out_channels")
    tracker.fake_prune_units({a.id: [0, 1], b.id: [0]})
    out = _summary(tracker)
    rows = out["groups"]
    a_params, b_params = (54 + 72, 36 - 18 + 18) if a.id < b.id else (54 + 72 - 18, 36 + 18)
    assert rows[a.name]["pruned_params"] == a_params and rows[b.name]["pruned_params"] == b_params
    assert rows[a.name]["pruned_bias_params"] == 2 and rows[b.name]["pruned_bias_params"] == 1
    assert out["pruned_params"] == 54 + 72 + 36 + 18 - 18
    before = param_counts(model)
    tracker.prune_zero_units()
    after = param_counts(model)
    assert (before[0] - after[0], before[1] - after[1]) == (out["pruned_params"], out["pruned_bias_params"])


def test_hand_worked_coupled_input_and_output_of_one_layer():
    # TinyConvNet: conv2's input and output channels are one group (residual add).
    # Unit 2 of that group: conv1 row 27 (+1 bias), bn1 1 (+1), conv2 row 72 and column 72
    # sharing 9 elements (135, +1 bias), bn2 1 (+1), conv3 column 16 * 9 = 144.
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(1))
    group = _group(tracker, "conv1:prune_out_channels")
    tracker.fake_prune_unit(group.id, 2)
    row = _summary(tracker)["groups"][group.name]
    assert row["pruned_params"] == 27 + 1 + 135 + 1 + 144
    assert row["pruned_bias_params"] == 1 + 1 + 1 + 1
    # ignore=[BatchNorm2d]: judged without the norms, counted without them
    with torch.no_grad():
        model.bn1.weight[2] = 1.0
    assert _summary(tracker)["groups"][group.name]["pruned_units"] == 0
    row = _summary(tracker, ignore=[nn.BatchNorm2d])["groups"][group.name]
    assert row == {"pruned_units": 1, "pruned_params": 27 + 135 + 144, "pruned_bias_params": 2,
                   "pruned_physical_params": 27 + 135 + 144 + 2}


def test_a_unit_with_a_nonzero_bias_is_not_pruned():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    tracker = WeightTracker(model, torch.randn(1, 3))
    with torch.no_grad():
        model[0].weight[1] = 0
        model[2].weight[:, 1] = 0
    assert _summary(tracker)["pruned_units"] == 0
    with torch.no_grad():
        model[0].bias[1] = 0
    assert _summary(tracker)["pruned_units"] == 1


def test_mha_embedding_channel_hand_worked():
    # MHANet (dim 16, MLP 32): one embedding channel owns embed row 6 (+1 bias), in_proj
    # column 3 * 16 = 48, out_proj row 16 (+1), fc1 column 32, fc2 row 32 (+1), head column 3.
    model = MHANet()
    tracker = WeightTracker(model, sequence_input(1))
    group = next(g for g in tracker.groups if "attn" in g.module_names() and g.kind == "feature")
    tracker.fake_prune_unit(group.id, 5)
    row = _summary(tracker)["groups"][group.name]
    assert row["pruned_params"] == 6 + 48 + 16 + 32 + 32 + 3
    assert row["pruned_bias_params"] == 3


def _rebind(kwargs, source, clone):
    """``kwargs`` with ``num_heads`` keys moved from ``source``'s modules to ``clone``'s."""
    if "num_heads" not in kwargs:
        return kwargs
    names = {id(m): n for n, m in source.named_modules()}
    heads = {clone.get_submodule(names[id(m)]): h for m, h in kwargs["num_heads"].items()}
    return {**kwargs, "num_heads": heads}


def _removed(model, x, kwargs, seed, units):
    """(weights, biases) a physical prune of a copy of ``model`` removes for ``units``."""
    clone = copy.deepcopy(model)
    tracker = WeightTracker(clone, x, **_rebind(kwargs, model, clone))
    zero_random_weights(clone, seed)
    tracker.fake_prune_units(units)
    assert tracker.zero_units() == {g: u for g, u in units.items() if u}
    before = param_counts(clone)
    tracker.prune_zero_units()
    after = param_counts(clone)
    return before[0] - after[0], before[1] - after[1]


@pytest.mark.parametrize("case", list(CASES))
def test_totals_equal_a_physical_prune(case):
    model, x, kwargs = CASES[case]()
    tracker = WeightTracker(model, x, **kwargs)
    units = damage(tracker, model, seed=2, only_prunable=True)
    out = _summary(tracker)
    _check_sums(out)
    assert out["pruned_units"] == sum(len(u) for u in units.values()) > 0
    before = param_counts(model)
    tracker.prune_zero_units()
    after = param_counts(model)
    assert out["pruned_params"] == before[0] - after[0]
    assert out["pruned_bias_params"] == before[1] - after[1]


@pytest.mark.parametrize("case", ["tiny", "catnet", "mhanet"])
def test_each_group_equals_its_share_of_cumulative_physical_prunes(case):
    # Pruning groups 0..g on copies: what group g adds to what groups 0..g-1 removed is
    # exactly the elements attributed to g (the lowest id takes shared elements).
    model, x, kwargs = CASES[case]()
    pristine = copy.deepcopy(model)
    pristine_kwargs = _rebind(kwargs, model, pristine)
    tracker = WeightTracker(model, x, **kwargs)
    seed = 4
    units = pick_units(tracker, seed, only_prunable=True)
    for group in tracker.groups:  # heads and head dims overlap in in_proj_weight: have both
        if group.kind in ("head", "head_dim") and group.id not in units:
            units[group.id] = [group.n_units // 2]
    tracker.fake_prune_units(units)
    zero_random_weights(model, seed)
    out = _summary(tracker)
    previous = (0, 0)
    for group in tracker.groups:
        if group.id in units:
            so_far = {g: u for g, u in units.items() if g <= group.id}
            current = _removed(pristine, x, pristine_kwargs, seed, so_far)
        else:
            current = previous
        row = out["groups"][group.name]
        assert row["pruned_units"] == len(units.get(group.id, ()))
        assert (row["pruned_params"], row["pruned_bias_params"]) == (
            current[0] - previous[0], current[1] - previous[1]
        ), group.name
        previous = current


def test_include_counts_only_selected_layers():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(1))
    group = _group(tracker, "conv1:prune_out_channels")
    tracker.fake_prune_unit(group.id, 2)
    out = _summary(tracker, include=[model.conv3])
    # conv3 holds only column 2 of this group: 16 * 9 weights, no bias
    assert out["groups"][group.name] == {"pruned_units": 1, "pruned_params": 144, "pruned_bias_params": 0,
                                         "pruned_physical_params": 144}
    assert set(out["groups"]) == {group.name, "conv3:prune_out_channels"}


def _brute_owner_counts(specs, masks, numel):
    """Element by element: the lowest rank whose removed position covers it."""
    owner = [len(specs)] * numel
    for rank, ((view, dims), mask) in enumerate(zip(specs, masks)):
        for e in range(numel):
            coords, rest = [], e
            for size in reversed(view):
                coords.append(rest % size)
                rest //= size
            coords.reverse()
            position = 0
            for d in dims:
                position = position * view[d] + coords[d]
            if mask[position] and owner[e] == len(specs):
                owner[e] = rank
    return [owner.count(r) for r in range(len(specs))]


def test_owner_counts_agree_with_an_element_level_brute_force():
    from weighttracker_core.plugin import common_factorisation
    from weighttracker_plugins.trackers._removal import _Slice, owner_counts

    assert common_factorisation([(12, 4), (3, 2, 2, 4)]) == (3, 2, 2, 4)
    assert common_factorisation([(6, 2), (4, 3)]) is None
    gen = torch.Generator().manual_seed(0)
    # a [12, 4] weight, like a fused [3 * heads * dim, E] projection with heads=2, dim=2
    specs = [
        ((12, 4), (1,)),  # columns
        ((3, 2, 2, 4), (1,)),  # heads
        ((3, 2, 2, 4), (2, 0)),  # (head dim, q/k/v) pairs, listed out of order
        ((4, 12), (0,)),  # blocks of 12 elements: no common factorisation with the others
    ]
    for trial in range(10):
        masks = []
        for view, dims in specs:
            length = 1
            for d in dims:
                length *= view[d]
            masks.append(torch.rand(length, generator=gen) < 0.3)
        pieces = [
            _Slice(rank, "weight", dims, view, list(range(len(m))), list(range(len(m))))
            for rank, ((view, dims), m) in enumerate(zip(specs, masks))
        ]
        # the first three cut disjoint factors (closed form); with rows of the [12, 4] view
        # added they overlap (owner grid); all four have no common factorisation (flat)
        assert owner_counts(pieces[:3], masks[:3], 48) == _brute_owner_counts(specs[:3], masks[:3], 48), trial
        rows_spec = ((12, 4), (0,))
        rows_mask = torch.rand(12, generator=gen) < 0.3
        rows = _Slice(1, "weight", (0,), (12, 4), list(range(12)), list(range(12)))
        assert owner_counts([pieces[0], rows, *pieces[1:3]], [masks[0], rows_mask, *masks[1:3]], 48) == (
            _brute_owner_counts([specs[0], rows_spec, *specs[1:3]], [masks[0], rows_mask, *masks[1:3]], 48)
        ), trial
        assert owner_counts(pieces, masks, 48) == _brute_owner_counts(specs, masks, 48), trial


def test_grouped_conv_overlap_matches_a_physical_prune():
    # Conv2d(8, 8, groups=2) weight [8, 4, 3, 3]: its output rows 1, 5 (one group) and its
    # input channels 0, 4 (column 0 of each conv group, another group) cross in 2 * 9
    # elements: 72 + 72 - 18 = 126. With the stem's rows (2 * 27) and the last conv's
    # columns (4 * 2 * 9): 54 + 126 + 72 = 252 weights, 4 biases.
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Conv2d(8, 4, 3))
    tracker = WeightTracker(model, torch.randn(1, 3, 12, 12))
    stem, grouped = _group(tracker, "0:prune_out_channels"), _group(tracker, "2:prune_out_channels")
    tracker.fake_prune_units({stem.id: [0, 4], grouped.id: [1, 5]})
    out = _summary(tracker)
    assert (out["pruned_params"], out["pruned_bias_params"]) == (252, 4)
    low, high = sorted((stem, grouped), key=lambda g: g.id)
    assert out["groups"][low.name]["pruned_params"] == {stem.id: 54 + 72, grouped.id: 72 + 72}[low.id]
    before = param_counts(model)
    tracker.prune_zero_units()
    after = param_counts(model)
    assert (before[0] - after[0], before[1] - after[1]) == (252, 4)
