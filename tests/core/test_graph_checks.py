"""Couplings Torch-Pruning gets wrong are repaired or refused (SPEC §3.1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plugin_managers import core_plugin_manager
from weighttracker_core import CouplingError, PruneAxis, WeightTracker


def _track(model, x, **kwargs):
    return WeightTracker(model, x, plugin_manager=core_plugin_manager(), **kwargs)


class UnequalSplit(nn.Module):
    """``c1`` makes 6 channels; the first 2 go to ``a``, the last 4 to ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 1)
        self.a = nn.Conv2d(2, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.sizes = [2, 4]

    def forward(self, x):
        p, q = torch.split(self.c1(x), self.sizes, dim=1)
        return self.a(p) + self.b(q)


def _resize_split(tracker):
    """A post-prune hook: the split sizes follow the consumers' new widths."""
    model = tracker.model
    model.sizes = [model.a.in_channels, model.b.in_channels]


def test_split_chunks_go_to_the_consumers_that_read_them():
    model = UnequalSplit().eval()
    x = torch.randn(1, 3, 4, 4)
    tracker = _track(model, x, post_prune_hooks=[_resize_split])
    (group,) = [g for g in tracker.groups if g.root_module == "c1"]
    inputs = {m.module_name: dict(zip(m.tp_indices, m.tp_units)) for m in group.members
              if m.axis is PruneAxis.IN_CHANNEL}
    # channel c of c1 is input c of a for c < 2 and input c - 2 of b otherwise
    assert inputs == {"a": {0: 0, 1: 1}, "b": {0: 2, 1: 3, 2: 4, 3: 5}}
    # and pruning agrees: removing channel 1 (a's input 1) and 4 (b's input 2) keeps outputs
    tracker.fake_prune_unit(group.id, 1)
    tracker.fake_prune_unit(group.id, 4)
    fake = model(x)
    tracker.prune_zero_units()
    assert (model.a.in_channels, model.b.in_channels, model.sizes) == (1, 3, [1, 3])
    torch.testing.assert_close(model(x), fake, rtol=1e-5, atol=1e-6)


def test_pruned_model_that_no_longer_runs_is_restored():
    model = UnequalSplit().eval()  # no hook: the hard-coded split sizes break after pruning
    x = torch.randn(1, 3, 4, 4)
    tracker = _track(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = tracker.groups
    (group,) = [g for g in tracker.groups if g.root_module == "c1"]
    tracker.fake_prune_unit(group.id, 1)
    zeroed = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match="split"):
        tracker.prune_zero_units()
    assert model.c1.out_channels == 6 and model.a.in_channels == 2
    assert all(torch.equal(zeroed[k], v) for k, v in model.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert tracker.groups == groups


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 1)
        self.c2 = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        y = self.c1(x)
        b, c, h, w = y.shape
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.c2(y)


def test_channel_shuffle_is_refused_naming_the_layer_and_operation():
    with pytest.raises(CouplingError, match=r"channel shuffle.*Transpose.*feeds c2"):
        _track(Shuffle(), torch.randn(1, 3, 4, 4))


class Flatten(nn.Module):
    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(16, 2)
        self.channels_last = channels_last

    def forward(self, x):
        y = self.conv(x)
        if self.channels_last:
            y = y.permute(0, 2, 3, 1)
        return self.fc(y.flatten(1))


def test_channel_major_flatten_couples_blocks_of_features():
    model = Flatten(channels_last=False).eval()
    x = torch.randn(2, 3, 2, 2)
    tracker = _track(model, x)
    (group,) = [g for g in tracker.groups if g.root_module == "conv"]
    (fc,) = [m for m in group.members if m.module_name == "fc"]
    # channel c is flattened into features 4c .. 4c+3
    assert dict(zip(fc.tp_indices, fc.tp_units)) == {i: i // 4 for i in range(16)}
    tracker.fake_prune_unit(group.id, 2)
    fake = model(x)
    tracker.prune_zero_units()
    assert model.fc.in_features == 12
    torch.testing.assert_close(model(x), fake, rtol=1e-5, atol=1e-6)


def test_channels_last_flatten_couples_every_fourth_feature():
    # (B, H, W, C) flattened: channel c is feature 4 * position + c; Torch-Pruning alone
    # would map it as channel-major (features 4c .. 4c+3)
    model = Flatten(channels_last=True).eval()
    x = torch.randn(2, 3, 2, 2)
    tracker = _track(model, x)
    (group,) = [g for g in tracker.groups if g.root_module == "conv"]
    (fc,) = [m for m in group.members if m.module_name == "fc"]
    assert dict(zip(fc.tp_indices, fc.tp_units)) == {i: i % 4 for i in range(16)}
    tracker.fake_prune_unit(group.id, 2)
    fake = model(x)
    tracker.prune_zero_units()
    assert model.fc.in_features == 12
    torch.testing.assert_close(model(x), fake, rtol=1e-5, atol=1e-6)


def test_fused_qkv_without_heads_is_refused_with_the_fix():
    from models import QKVNet, sequence_input

    with pytest.raises(CouplingError, match=r"attn\.qkv.*num_heads"):
        _track(QKVNet(), sequence_input())


def test_fused_qkv_with_heads_builds_head_groups():
    from models import QKVNet, sequence_input

    model = QKVNet(dim=16, heads=4)
    tracker = _track(model, sequence_input(), num_heads={model.attn.qkv: 4}, prune_num_heads=True)
    heads = {g.name: g for g in tracker.groups}["attn.qkv:prune_num_heads"]
    assert heads.kind == "head" and heads.n_units == 4
    qkv, proj = heads.members
    # head h owns q, k and v rows h*4 .. h*4+3 of each 16-row block, and proj columns h*4 ..
    assert dict(zip(qkv.tp_indices, qkv.tp_units)) == {r: (r % 16) // 4 for r in range(48)}
    assert dict(zip(proj.tp_indices, proj.tp_units)) == {c: c // 4 for c in range(16)}


def test_example_inputs_that_do_not_fit_are_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"tensor of shape \(1, 5\).*do not fit"):
        _track(model, torch.zeros(1, 5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


class TwoPathConcat(nn.Module):
    """One tensor reaches a cat twice; Torch-Pruning's index mapping would loop forever."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4 * 2 * 2 + 1, 3)

    def forward(self, x):
        y = self.conv(x).flatten(1)
        return self.fc(torch.cat([y, y[:, :1]], 1))


def test_concat_of_one_tensor_along_two_paths_is_refused_not_hung():
    # Torch-Pruning sizes this cat's inputs wrongly and maps nothing through it, so fc's
    # 17th input (the copy of feature 0) belongs to no unit
    with pytest.raises(CouplingError, match=r"Only 16 of the 17 input channels of fc belong to a unit .*CatBackward0"):
        _track(TwoPathConcat(), torch.randn(1, 3, 2, 2))
