"""nvidia_2_4_sparsity: hand-worked blocks and brute-force block loops on real models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _sparsity_cases import CASES, block_histogram_by_start, block_zero_counts_loop, damage
from models import TinyConvNet, conv_input
from weighttracker_core import WeightTracker


def _stats(tracker, **kwargs):
    handle = tracker.create_tracker("nvidia_2_4_sparsity", **kwargs)
    return handle.track()["nvidia_2_4_sparsity"]


def test_hand_worked_linear():
    # Linear(8, 2), blocks of 4 columns:
    #   row 0: [0 0 1 1 | 0 0 0 1] -> 2 zeros (strict, eligible), 3 zeros (eligible only)
    #   row 1: [1 1 1 0 | 0 0 1 1] -> 1 zero (neither),            2 zeros (strict, eligible)
    # strict = 2 / 4, eligible = 3 / 4; the layer is neither strict nor eligible.
    model = nn.Sequential(nn.Linear(8, 2))
    with torch.no_grad():
        rows = [[0, 0, 1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0, 1, 1]]
        model[0].weight.copy_(torch.tensor(rows, dtype=torch.float))
    out = _stats(WeightTracker(model, torch.randn(1, 8)), log_layerwise_stats=True)
    assert out["strict_block_fraction"] == 0.5
    assert out["nvidia_eligible_block_fraction"] == 0.75
    assert (out["num_blocks"], out["num_strict_blocks"], out["num_eligible_blocks"]) == (4, 2, 3)
    assert out["tail_elements"] == 0
    assert (out["num_layers"], out["num_strict_layers"], out["num_eligible_layers"]) == (1, 0, 0)
    assert out["layers"]["0"] == {
        "strict_block_fraction": 0.5, "nvidia_eligible_block_fraction": 0.75, "num_blocks": 4,
        "tail_elements": 0, "strict": False, "eligible": False,
    }


def test_hand_worked_tail_stops_a_layer_counting():
    # Linear(6, 1): row [0 1 0 2 | 0 3] -> one block with 2 zeros, a tail of 2 elements.
    model = nn.Sequential(nn.Linear(6, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0, 3.0]]))
    out = _stats(WeightTracker(model, torch.randn(1, 6)))
    assert out["strict_block_fraction"] == 1.0 and out["nvidia_eligible_block_fraction"] == 1.0
    assert out["tail_elements"] == 2 and out["num_layers_with_tail"] == 1
    assert out["num_strict_layers"] == 0 and out["num_eligible_layers"] == 0


def test_hand_worked_conv_blocks_run_along_input_channels():
    # Conv2d(4, 1, kernel (1, 2)): weight[0, c, 0, j]. Blocks are the 4 input channels at
    # each kernel position j: j = 0 -> [0, 0, 1, 1] (2 zeros), j = 1 -> [1, 0, 1, 1] (1 zero).
    # A block along the kernel axis would be [0, 1], [0, 0], ... -- not what is counted.
    model = nn.Sequential(nn.Conv2d(4, 1, (1, 2)))
    w = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]).reshape(1, 4, 1, 2)
    with torch.no_grad():
        model[0].weight.copy_(w)
    out = _stats(WeightTracker(model, torch.randn(1, 4, 3, 3)))
    assert out["num_blocks"] == 2
    assert out["num_strict_blocks"] == 1 and out["num_eligible_blocks"] == 1


def test_exact_two_four_pattern_makes_layers_strict():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(1))
    with torch.no_grad():
        for module in (model.conv2, model.conv3, model.fc):
            pattern = torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(module.weight.shape[1] // 4)
            shape = [1, -1] + [1] * (module.weight.dim() - 2)
            module.weight.mul_(pattern.view(shape))
        model.conv3.weight[0, 0, 0, 0] = 0  # one block of conv3 now has 3 zeros
    out = _stats(tracker, log_layerwise_stats=True)
    assert out["num_layers"] == 4  # conv1 (3 input channels) is all tail
    assert out["layers"]["conv1"]["num_blocks"] == 0 and out["layers"]["conv1"]["tail_elements"] == 8 * 3 * 9
    assert out["num_strict_layers"] == 2  # conv2, fc
    assert out["num_eligible_layers"] == 3  # conv2, conv3, fc
    assert out["layers"]["conv3"]["eligible"] and not out["layers"]["conv3"]["strict"]
    assert out["num_blocks"] - out["num_strict_blocks"] == 1


@pytest.mark.parametrize("case", ["catnet", "tiny", "mhanet"])
def test_small_models_match_block_loops(case):
    model, x, kwargs = CASES[case]()
    tracker = WeightTracker(model, x, **kwargs)
    damage(tracker, model, seed=5)
    with torch.no_grad():  # some exact 2:4 rows too
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.in_features % 4 == 0:
                module.weight[0] *= torch.tensor([0.0, 1.0, 1.0, 0.0]).repeat(module.in_features // 4)
    out = _stats(tracker, log_layerwise_stats=True)
    strict = eligible = blocks = tail = 0
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            weights = [module.in_proj_weight, module.out_proj.weight]
            seen.add(f"{name}.out_proj")
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and name not in seen:
            weights = [module.weight]
        else:
            continue
        layer_strict = layer_eligible = layer_blocks = layer_tail = 0
        for w in weights:
            counts, t = block_zero_counts_loop(w)
            layer_blocks += len(counts)
            layer_strict += sum(1 for c in counts if c == 2)
            layer_eligible += sum(1 for c in counts if c >= 2)
            layer_tail += t
        row = out["layers"][name]
        assert row["num_blocks"] == layer_blocks and row["tail_elements"] == layer_tail, name
        assert row["strict"] == (layer_tail == 0 and layer_blocks > 0 and layer_strict == layer_blocks)
        strict, eligible = strict + layer_strict, eligible + layer_eligible
        blocks, tail = blocks + layer_blocks, tail + layer_tail
    counted = (out["num_blocks"], out["num_strict_blocks"], out["num_eligible_blocks"])
    assert counted == (blocks, strict, eligible)
    assert out["tail_elements"] == tail
    assert out["strict_block_fraction"] == pytest.approx(strict / blocks)
    assert out["nvidia_eligible_block_fraction"] == pytest.approx(eligible / blocks)
    assert strict > 0


@pytest.mark.parametrize("case", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_match_block_counts(case):
    model, x, kwargs = CASES[case]()
    tracker = WeightTracker(model, x, **kwargs)
    damage(tracker, model, seed=11)
    with torch.no_grad():  # make many blocks hold 2 or 3 zeros
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.in_channels // module.groups % 4 == 0:
                keep = torch.rand(module.weight.shape) > 0.6
                module.weight.mul_(keep)
    out = _stats(tracker)
    hist, tail = [0] * 5, 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            h, t = block_histogram_by_start(module.weight)
            hist = [a + b for a, b in zip(hist, h)]
            tail += t
    assert out["num_blocks"] == sum(hist)
    assert out["num_strict_blocks"] == hist[2]
    assert out["num_eligible_blocks"] == hist[2] + hist[3] + hist[4]
    assert out["tail_elements"] == tail
    assert 0 < out["strict_block_fraction"] < out["nvidia_eligible_block_fraction"] < 1


def test_transposed_conv_blocks_run_along_dim_0():
    model = nn.Sequential(nn.ConvTranspose2d(8, 3, 2))  # weight [8, 3, 2, 2]: input axis is dim 0
    with torch.no_grad():
        model[0].weight[0:2] = 0  # input channels 0, 1: every first block has 2 zeros
    out = _stats(WeightTracker(model, torch.randn(1, 8, 3, 3)))
    counts, tail = block_zero_counts_loop(model[0].weight, transposed=True)
    assert out["num_blocks"] == len(counts) == 2 * 3 * 4 and tail == 0
    assert out["num_strict_blocks"] == sum(1 for c in counts if c == 2) == 12


def test_embeddings_are_not_counted_unless_included():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 2)

        def forward(self, idx):
            return self.fc(self.emb(idx).mean(1))

    model = Net()
    tracker = WeightTracker(model, torch.tensor([[1, 2, 3]]))
    out = _stats(tracker, log_layerwise_stats=True)
    assert set(out["layers"]) == {"fc"}
    out = _stats(tracker, include=[nn.Embedding], log_layerwise_stats=True)
    assert set(out["layers"]) == {"emb"} and out["num_blocks"] == 10 * 2
