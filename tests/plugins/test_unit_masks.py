"""Persistent canonical-unit masks through torch.nn.utils.prune (SPEC §10.3)."""

from __future__ import annotations

import copy

import pytest
import torch
from _unit_oracle import unit_elements
from models import MHANet, TinyConvNet, conv_input, sequence_input
from torch import nn
from torch.nn.utils import parametrize, prune

from weighttracker_core import MemberSlice, PruningError, WeightTracker
from weighttracker_core.plugin import ParamRole
from weighttracker_plugins.pruners.ranked.unit_masks import UnitMasks, has_prune_masks, slice_keep_mask


def piece(dims, view=None):
    return MemberSlice(param="weight", dims=dims, view=view, role=ParamRole.WEIGHT, positions=(), units=())


def test_keep_mask_rows_of_a_linear():
    # Linear(2, 3): output channel 1 is row 1
    keep = slice_keep_mask((3, 2), piece((0,)), [1])
    assert keep.tolist() == [[True, True], [False, False], [True, True]]


def test_keep_mask_input_channel_of_a_grouped_conv():
    # Conv2d(4, 4, 1, groups=2): weight [4, 2, 1, 1] viewed (groups, rows, cols, -1) = (2, 2, 2, 1);
    # input channel 3 = group 1, column 1 -> weight[2, 1] and weight[3, 1]
    keep = slice_keep_mask((4, 2, 1, 1), piece((0, 2), view=(2, 2, 2, -1)), [3])
    zeros = {tuple(i) for i in (~keep).nonzero().tolist()}
    assert zeros == {(2, 1, 0, 0), (3, 1, 0, 0)}


def test_keep_mask_one_head_of_a_fused_qkv():
    # 2 heads of dim 2, input width 1: qkv weight [12, 1] viewed (3, heads, dim, -1);
    # head 0 is rows 0-1 of each of the q, k and v blocks of 4 rows
    keep = slice_keep_mask((12, 1), piece((1,), view=(3, 2, 2, -1)), [0])
    assert (~keep).nonzero()[:, 0].tolist() == [0, 1, 4, 5, 8, 9]


def test_keep_mask_with_unsorted_dims():
    # dims (2, 0) on [2, 3, 4]: position p = i2 * 2 + i0; p = 5 is i2 = 2, i0 = 1
    keep = slice_keep_mask((2, 3, 4), piece((2, 0)), [5])
    zeros = {tuple(i) for i in (~keep).nonzero().tolist()}
    assert zeros == {(1, j, 2) for j in range(3)}


def _tiny():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    group = next(g for g in tracker.groups if g.root_module == "conv1")
    return model, tracker, group


def test_masked_units_are_zero_and_others_untouched():
    model, tracker, group = _tiny()
    zeroed = copy.deepcopy(model)  # second opinion: the core's in-place fake pruning
    WeightTracker(zeroed, conv_input()).fake_prune_units({group.id: [1, 3]})
    before = unit_elements(model, tracker.groups)
    UnitMasks(model).apply_(tracker.structure, {group.id: [1, 3]})
    after = unit_elements(model, tracker.groups)
    masked = {group.offset + 1, group.offset + 3}
    for unit, values in after.items():
        if unit in masked:
            assert values.numel() and torch.count_nonzero(values) == 0
        else:  # units share elements (conv2's rows cross the group's own input channels)
            assert bool(((values == before[unit]) | (values == 0)).all())
    reference = unit_elements(zeroed, tracker.groups)
    assert all(torch.equal(after[u], reference[u]) for u in after)
    # the trackers read effective weights
    assert tracker.zero_units() == {group.id: [1, 3]}
    norms = tracker.graph.evaluation()["unit_l2_norm"]
    assert norms[group.offset + 1] == 0 and norms[group.offset + 0] > 0


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
])
def test_masked_units_stay_exactly_zero_through_training(make_optimizer):
    model, tracker, group = _tiny()
    x = conv_input()
    optimizer = make_optimizer(model.parameters())
    for _ in range(3):  # optimizer state (momentum) exists before masking
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    masks = UnitMasks(model)
    masks.apply_(tracker.structure, {group.id: [0, 5]})
    start = unit_elements(model, tracker.groups)
    for _ in range(20):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    end = unit_elements(model, tracker.groups)
    for unit in (group.offset, group.offset + 5):
        assert torch.count_nonzero(end[unit]) == 0
    assert not torch.equal(end[group.offset + 1], start[group.offset + 1])  # the rest trains
    model(x)  # the forward pre-hook recomputes the attribute the layer uses
    assert torch.count_nonzero(model.conv1.weight[[0, 5]]) == 0
    assert tracker.zero_units() == {group.id: [0, 5]}


def test_finalize_bakes_zeros_into_plain_parameters():
    model, tracker, group = _tiny()
    originals = {n: p for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    masks = UnitMasks(model)
    masks.apply_(tracker.structure, {group.id: [2]})
    assert has_prune_masks(model)
    x = conv_input()
    for _ in range(5):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    effective = unit_elements(model, tracker.groups)
    assert masks.finalize() > 0
    assert not has_prune_masks(model) and not prune.is_pruned(model)
    assert not [n for n, _ in model.named_buffers() if n.endswith("_mask")]
    current = dict(model.named_parameters())
    assert set(current) == set(originals)
    assert all(current[n] is originals[n] for n in current)  # the optimizer's tensors
    baked = unit_elements(model, tracker.groups)
    assert all(torch.equal(baked[u], effective[u]) for u in baked)
    assert torch.count_nonzero(baked[group.offset + 2]) == 0
    # the optimizer still trains the same tensors, and they are not held at zero any more
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
    assert model.conv1.weight.grad is not None


def test_masks_compose_with_other_prune_methods():
    model, tracker, group = _tiny()
    prune.l1_unstructured(model.conv2, "weight", amount=0.3)
    earlier = model.conv2.weight_mask.clone()
    UnitMasks(model).apply_(tracker.structure, {group.id: [4]})
    hooks = [h for h in model.conv2._forward_pre_hooks.values()
             if isinstance(h, prune.BasePruningMethod) and h._tensor_name == "weight"]
    assert len(hooks) == 1 and isinstance(hooks[0], prune.PruningContainer)
    combined = model.conv2.weight_mask
    # conv2's output channel 4 and input channel 4 both belong to the group (residual)
    expected = earlier.clone()
    expected[4] = 0
    expected[:, 4] = 0
    assert torch.equal(combined, expected)


def test_attention_out_projection_stays_masked_after_training():
    model = MHANet()
    x = sequence_input()
    tracker = WeightTracker(model, x, num_heads={model.attn: 4}, prune_num_heads=True)
    heads = next(g for g in tracker.groups if g.kind == "head")
    UnitMasks(model).apply_(tracker.structure, {heads.id: [1]})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    # oracle: a copy whose parameters are the effective weights, with no prune hooks at all
    plain = MHANet()
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("_mask"):
            continue
        if name.endswith("_orig"):
            base = name[: -len("_orig")]
            value = value * model.state_dict()[base + "_mask"]
            name = base
        state[name] = value
    plain.load_state_dict(state)
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(x), plain(x))
    assert torch.count_nonzero(plain.attn.out_proj.weight[:, 4:8]) == 0


def test_parametrized_parameters_are_refused_and_nothing_changes():
    model, tracker, group = _tiny()

    class Same(nn.Module):
        def forward(self, w):
            return w

    parametrize.register_parametrization(model.conv2, "weight", Same())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PruningError, match="conv2.weight.*parametriz"):
        UnitMasks(model).apply_(tracker.structure, {group.id: [0]})
    assert not has_prune_masks(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
