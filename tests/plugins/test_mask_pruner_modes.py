"""Mask modes of the ``magnitude`` pruner: the seed's worked examples by hand, brute force otherwise."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from weighttracker_core import WeightTracker
from weighttracker_plugins.pruners.magnitude.modes import magnitude_mask, n_m_mask
from weighttracker_plugins.pruners.magnitude import MagnitudePruner


def _prune_once(module: nn.Module, input_shape: tuple[int, ...], **module_config) -> torch.Tensor:
    """Prune a one-layer model through the tracker and return the effective weight."""
    model = nn.Sequential(module)
    tracker = WeightTracker(model, torch.zeros(input_shape))
    pruner = tracker.create_pruner("magnitude", config={"global_config": module_config})
    pruner.prepare()
    return (module.weight_orig * module.weight_mask).detach()


def _linear_with(weight: list) -> nn.Linear:
    w = torch.tensor(weight, dtype=torch.float32)
    layer = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def test_unstructured_seed_example():
    # n = floor(4 * 0.75) = 3 smallest |w|: |-0.01| < |0.05| < |-0.2|  ->  only 0.3 survives.
    layer = _linear_with([[0.3, -0.2, -0.01, 0.05]])
    pruned = _prune_once(layer, (1, 4), target_sparsity=0.75)
    assert pruned.tolist() == [[pytest.approx(0.3), 0.0, 0.0, 0.0]]


def test_block_seed_example():
    # block_size 2 along dim 0, per column: rows (0, 1) -> sqrt(1 + 36) = 6.08, sqrt(9 + 49) = 7.62;
    # rows (2, 3) -> sqrt(0 + 81) = 9.00, sqrt(9 + 4) = 3.61. Sparsity 0.5 = 4 of 8 weights = the
    # two lowest blocks (3.61 and 6.08).
    layer = _linear_with([[1, 3], [-6, -7], [0, 3], [-9, 2]])
    pruned = _prune_once(layer, (1, 2), target_sparsity=0.5, block_size=2)
    assert pruned.tolist() == [[0, 3], [0, -7], [0, 0], [-9, 0]]


def test_n_m_seed_example():
    # 1:2 along dim 1: in each pair of a row the smaller |w| goes.
    # [3, 4 | 7, 6] -> [0, 4, 7, 0]; [1, 8 | -3, -8] -> [0, 8, 0, -8];
    # [-2, -3 | -4, 0] -> [0, -3, -4, 0]; [5, 4 | -3, -2] -> [5, 0, -3, 0].
    layer = _linear_with([[3, 4, 7, 6], [1, 8, -3, -8], [-2, -3, -4, 0], [5, 4, -3, -2]])
    pruned = _prune_once(layer, (1, 4), n_m_ratio=(1, 2))
    assert pruned.tolist() == [[0, 4, 7, 0], [0, 8, 0, -8], [0, -3, -4, 0], [5, 0, -3, 0]]


def _seed_conv() -> nn.Conv2d:
    conv = nn.Conv2d(2, 2, kernel_size=(1, 2))
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[2.0, -1.0]], [[-3.0, 2.0]]], [[[5.0, -2.0]], [[-1.0, -3.0]]]]))
    return conv


def test_per_channel_seed_example():
    # rows of the 2 x 4 fold: [2, -1, -3, 2] -> sqrt(18) = 4.2426, [5, -2, -1, -3] -> sqrt(39) = 6.2450;
    # floor(2 channels * 0.5) = 1 channel: the first.
    pruned = _prune_once(_seed_conv(), (1, 2, 1, 4), target_sparsity=0.5, granularity="per_channel")
    assert pruned.tolist() == [[[[0, 0]], [[0, 0]]], [[[5, -2]], [[-1, -3]]]]


def test_per_kernel_seed_example():
    # kernel norms [[sqrt(5), sqrt(13)], [sqrt(29), sqrt(10)]] = [[2.24, 3.61], [5.39, 3.16]];
    # floor(4 kernels * 0.5) = 2 kernels: (0, 0) and (1, 1).
    pruned = _prune_once(_seed_conv(), (1, 2, 1, 4), target_sparsity=0.5, granularity="per_kernel")
    assert pruned.tolist() == [[[[0, 0]], [[-3, 2]]], [[[5, -2]], [[0, 0]]]]


# ----------------------------------------------------------------------------- brute force


def _brute_unstructured(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    values = w.flatten().tolist()
    n = math.floor(len(values) * sparsity + 1e-9)
    order = sorted(range(len(values)), key=lambda i: (abs(values[i]), i))
    keep = [1.0] * len(values)
    for i in order[:n]:
        keep[i] = 0.0
    return torch.tensor(keep).reshape(w.shape)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.29, 0.5, 0.77, 1.0])
def test_unstructured_matches_brute_force(sparsity):
    w = torch.randn(6, 5, 3)
    assert torch.equal(magnitude_mask(w, sparsity), _brute_unstructured(w, sparsity))


def test_unstructured_count_is_exact_at_awkward_ratios():
    # 100 * 0.29 is 28.999999999999996 in floating point; the count must still be 29.
    w = torch.randn(100)
    assert int((magnitude_mask(w, 0.29) == 0).sum()) == 29


def _brute_n_m(w: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Loop over every (other channel, kernel position) and every block of m channels."""
    keep = torch.ones_like(w)
    other_dim = 1 - dim
    kernel = list(itertools.product(*[range(s) for s in w.shape[2:]]))
    for o in range(w.shape[other_dim]):
        for pos in kernel:
            for start in range(0, w.shape[dim], m):
                index = []
                for c in range(start, start + m):
                    full = [0, 0, *pos]
                    full[dim], full[other_dim] = c, o
                    index.append(tuple(full))
                # padded positions count as |w| = 0 and sort after real zeros
                scores = [(abs(w[i].item()) if i[dim] < w.shape[dim] else 0.0, k) for k, i in enumerate(index)]
                for _, k in sorted(scores)[:n]:
                    if index[k][dim] < w.shape[dim]:
                        keep[index[k]] = 0.0
    return keep


@pytest.mark.parametrize(
    "shape,n,m,dim",
    [((3, 8), 2, 4, 1), ((8, 3), 2, 4, 0), ((4, 8, 3, 3), 2, 4, 1), ((8, 4, 2), 1, 4, 0), ((5, 6), 2, 4, 1)],
)
def test_n_m_matches_brute_force(shape, n, m, dim):
    w = torch.randn(shape)
    assert torch.equal(n_m_mask(w, n, m, dim), _brute_n_m(w, n, m, dim))


def test_n_m_on_conv_blocks_run_along_input_channels():
    # conv [K, C, kh, kw]: a block is 4 input channels at one (output channel, kernel position),
    # the layout of NVIDIA's 2:4 sparse kernels -- not 4 neighbours in the flattened C*kh*kw row.
    w = torch.randn(3, 8, 3, 3)
    zeros = (w * n_m_mask(w, 2, 4, 1)) == 0
    per_block = zeros.reshape(3, 2, 4, 3, 3).sum(dim=2)
    assert bool((per_block == 2).all())


def _brute_block(w: torch.Tensor, sparsity: float, block: int) -> torch.Tensor:
    """Blocks of `block` rows per column of the folded weight; zero lowest-norm blocks within budget."""
    folded = w.reshape(w.shape[0], -1)
    rows, cols = folded.shape
    blocks = []
    for b in range(0, rows, block):
        for c in range(cols):
            members = [(r, c) for r in range(b, min(b + block, rows))]
            norm = math.sqrt(sum(folded[r, c].item() ** 2 for r, c in members))
            blocks.append((norm, b // block * cols + c, members))
    budget = math.floor(rows * cols * sparsity + 1e-9)
    keep = torch.ones_like(folded)
    used = 0
    for _, _, members in sorted(blocks, key=lambda t: (t[0], t[1])):
        if used + len(members) > budget:
            break
        used += len(members)
        for r, c in members:
            keep[r, c] = 0.0
    return keep.reshape(w.shape)


@pytest.mark.parametrize("rows,block,sparsity", [(8, 2, 0.5), (7, 2, 0.4), (9, 4, 0.6), (6, 3, 0.3)])
def test_block_matches_brute_force_including_padding(rows, block, sparsity):
    w = torch.randn(rows, 3, 2)
    assert torch.equal(magnitude_mask(w, sparsity, block_size=block), _brute_block(w, sparsity, block))


def test_block_padding_keeps_the_tail_rows_as_one_short_block():
    # 5 rows, block 2: blocks (0, 1), (2, 3) and the padded (4,). Column norms: rows 0-1 large,
    # rows 2-3 tiny, row 4 small. Budget floor(5 * 0.6) = 3 weights: the tiny block (2) fits,
    # then the short tail block (1) -- 3 weights zeroed, rows 0-1 kept.
    w = torch.tensor([[5.0], [5.0], [0.1], [0.1], [1.0]])
    assert magnitude_mask(w, 0.6, block_size=2).flatten().tolist() == [1, 1, 0, 0, 0]


@pytest.mark.parametrize("granularity", ["per_channel", "per_kernel"])
def test_structured_granularities_match_brute_force(granularity):
    w = torch.randn(6, 4, 3, 3)
    if granularity == "per_channel":
        units = [((o,), w[o].norm().item()) for o in range(6)]
    else:
        units = [((o, i), w[o, i].norm().item()) for o in range(6) for i in range(4)]
    n = math.floor(len(units) * 0.5)
    keep = torch.ones_like(w)
    for index, _ in sorted(units, key=lambda u: u[1])[:n]:
        keep[index] = 0.0
    assert torch.equal(magnitude_mask(w, 0.5, granularity=granularity), keep)


def test_per_channel_on_a_linear_falls_back_to_unstructured():
    # granularity only applies to weights of rank >= 3 (as in the seed): rank 2 is per scalar
    w = torch.randn(4, 6)
    assert torch.equal(magnitude_mask(w, 0.5, granularity="per_channel"), _brute_unstructured(w, 0.5))
    model = nn.Sequential(nn.Linear(6, 4))
    pruner = MagnitudePruner(model, {"global_config": {"granularity": "per_channel"}})
    pruner.prepare()
    assert pruner.report()["0"]["mode"] == "unstructured"


def test_mode_names_in_report():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1))
    pruner = MagnitudePruner(model, {"module_name_configs": {
        "0": {"block_size": 2}, "1": {"n_m_ratio": [2, 4]}, "2": {"granularity": "per_channel"},
        "3": {"granularity": "per_kernel"},
    }})
    pruner.prepare()
    modes = {name: stats["mode"] for name, stats in pruner.report().items() if name != "global"}
    assert modes == {"0": "block", "1": "n:m", "2": "per_channel", "3": "per_kernel"}
