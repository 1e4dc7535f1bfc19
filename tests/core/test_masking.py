"""Fake pruning (SPEC §7): which weights a unit owns, shapes, re-parametrised layers, bad ids.

Oracle: the slices each unit owns, written out by hand from the model definitions (never
read from the groups): after ``fake_prune_unit`` exactly those elements are zero and every
other element is unchanged.
"""

from __future__ import annotations

import pytest
import torch
from models import MHANet, TinyConvNet, conv_input, sequence_input
from torch import nn
from torch.nn.utils import parametrize, prune

from weighttracker_core import PruningError, UnitIndexError, WeightTracker


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def group_of(tracker: WeightTracker, module: str, axis: str = "out_channel"):
    """The group in which ``module`` is coupled on ``axis`` (looked up, not assumed)."""
    return next(g for g in tracker.groups
                for m in g.members if m.module_name == module and str(m.axis) == axis)


def assert_zeroed_exactly(model, before, expected: dict[str, list]) -> None:
    """``expected[name]`` lists index expressions that must be zero; all else unchanged."""
    after = model.state_dict()
    for name, old in before.items():
        mask = torch.zeros_like(old, dtype=torch.bool)
        for index in expected.get(name, []):
            mask[index] = True
        new = after[name]
        assert new.shape == old.shape, name
        assert (new[mask] == 0).all(), f"{name}: owned elements not zero"
        assert torch.equal(new[~mask], old[~mask]), f"{name}: elements outside the unit changed"


@pytest.mark.parametrize("unit", [0, 5])
def test_conv_residual_unit_owns_every_coupled_slice(unit):
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    group = group_of(tracker, "conv1")
    before = snapshot(model)
    tracker.fake_prune_unit(group.id, unit)
    c = unit
    # conv1 -> bn1 -> (+) <- bn2 <- conv2: the residual add ties conv1, conv2 outputs;
    # conv2 and conv3 read the channel.
    expected = {
        "conv1.weight": [c], "conv1.bias": [c], "bn1.weight": [c], "bn1.bias": [c],
        "conv2.weight": [c, (slice(None), c)], "conv2.bias": [c],
        "bn2.weight": [c], "bn2.bias": [c], "conv3.weight": [(slice(None), c)],
    }
    assert_zeroed_exactly(model, before, expected)


def test_linear_head_unit():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(), prune_model_outputs=True)
    before = snapshot(model)
    tracker.fake_prune_unit(group_of(tracker, "fc").id, 2)
    assert_zeroed_exactly(model, before, {"fc.weight": [2], "fc.bias": [2]})


def test_grouped_and_depthwise_convs():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.grouped = nn.Conv2d(8, 6, 3, padding=1, groups=2)  # weight [6, 4, 3, 3]
            self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)  # weight [6, 1, 3, 3]
            self.out = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.out(self.dw(self.grouped(self.stem(x))))

    model = Grouped()
    tracker = WeightTracker(model, conv_input(), ignored_layers=[model.out])
    before = snapshot(model)
    tracker.fake_prune_unit(group_of(tracker, "stem").id, 5)
    # stem channel 5 = input channel 5 of the grouped conv: group 5 // 4 = 1 (output rows
    # 3..5), column 5 % 4 = 1
    assert_zeroed_exactly(model, before, {
        "stem.weight": [5], "stem.bias": [5], "grouped.weight": [(slice(3, 6), 1)],
    })
    before = snapshot(model)
    tracker.fake_prune_unit(group_of(tracker, "grouped").id, 4)
    # grouped output 4 = depthwise channel 4 = out conv input 4
    assert_zeroed_exactly(model, before, {
        "grouped.weight": [4], "grouped.bias": [4], "dw.weight": [4], "dw.bias": [4],
        "out.weight": [(slice(None), 4)],
    })


def test_mha_embedding_head_and_head_dim_units():
    torch.manual_seed(1)
    model = MHANet()
    model.attn = nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=True)
    tracker = WeightTracker(model, sequence_input(), num_heads={model.attn: 4},
                            prune_num_heads=True)
    heads = next(g for g in tracker.groups if g.kind == "head")
    dims = next(g for g in tracker.groups if g.kind == "head_dim")
    embed = group_of(tracker, "embed")
    before = snapshot(model)
    tracker.fake_prune_unit(heads.id, 2)
    # head 2 of 4 (width 4): rows 8..11 of each of q, k, v (offsets 0, 16, 32)
    rows = [slice(8, 12), slice(24, 28), slice(40, 44)]
    assert_zeroed_exactly(model, before, {
        "attn.in_proj_weight": rows, "attn.in_proj_bias": rows,
        "attn.bias_k": [(0, 0, slice(8, 12))], "attn.bias_v": [(0, 0, slice(8, 12))],
        "attn.out_proj.weight": [(slice(None), slice(8, 12))],
    })
    before = snapshot(model)
    tracker.fake_prune_unit(dims.id, 1)
    rows = [j * 16 + h * 4 + 1 for j in range(3) for h in range(4)]
    cols = [h * 4 + 1 for h in range(4)]
    assert_zeroed_exactly(model, before, {
        "attn.in_proj_weight": [rows], "attn.in_proj_bias": [rows],
        "attn.bias_k": [(0, 0, cols)], "attn.bias_v": [(0, 0, cols)],
        "attn.out_proj.weight": [(slice(None), cols)],
    })
    before = snapshot(model)
    tracker.fake_prune_unit(embed.id, 7)
    # embedding channel 7: embed row, in_proj column, out_proj row, the residual stream's
    # readers (fc1, head columns) and writers (fc2 rows)
    assert_zeroed_exactly(model, before, {
        "embed.weight": [7], "embed.bias": [7], "attn.in_proj_weight": [(slice(None), 7)],
        "attn.out_proj.weight": [7], "attn.out_proj.bias": [7],
        "fc1.weight": [(slice(None), 7)], "fc2.weight": [7], "fc2.bias": [7],
        "head.weight": [(slice(None), 7)],
    })


def test_fake_prune_units_many_at_once_equals_one_by_one():
    a, b = TinyConvNet(), TinyConvNet()
    b.load_state_dict(a.state_dict())
    ta, tb = WeightTracker(a, conv_input()), WeightTracker(b, conv_input())
    request = {g.id: [0, g.n_units - 1] for g in ta.groups}
    ta.fake_prune_units(request)
    for gid, units in request.items():
        for u in units:
            tb.fake_prune_unit(gid, u)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert ta.zero_units() == {gid: sorted(units) for gid, units in request.items()}


# ------------------------------------------------------------------------ re-parametrised


def test_torch_prune_writes_to_weight_orig():
    model = TinyConvNet()
    prune.l1_unstructured(model.conv1, "weight", amount=0.3)
    mask = model.conv1.weight_mask.clone()
    tracker = WeightTracker(model, conv_input())
    tracker.fake_prune_unit(group_of(tracker, "conv1").id, 3)
    assert (model.conv1.weight_orig[3] == 0).all()
    assert (model.conv1.weight[3] == 0).all()  # refreshed without waiting for a forward
    assert torch.equal(model.conv1.weight_mask, mask)
    assert (model.conv1.weight_orig[2] != 0).any()
    model(conv_input())
    assert (model.conv1.weight[3] == 0).all()


class Double(nn.Module):
    def forward(self, w):
        return 2 * w

    def right_inverse(self, w):
        return w / 2


class PlusOne(nn.Module):  # maps zeros to ones and has no right_inverse
    def forward(self, w):
        return w + 1


def test_parametrizations_single_original_and_weight_norm():
    model = TinyConvNet()
    parametrize.register_parametrization(model.conv2, "weight", Double())
    nn.utils.parametrizations.weight_norm(model.conv3)  # original0 = g, original1 = v
    tracker = WeightTracker(model, conv_input())
    tracker.fake_prune_unit(group_of(tracker, "conv1").id, 4)  # conv2 rows + columns, conv3 columns
    tracker.fake_prune_unit(group_of(tracker, "conv3").id, 6)  # conv3 rows
    assert (model.conv2.parametrizations.weight.original[4] == 0).all()
    assert (model.conv2.weight[:, 4] == 0).all() and (model.conv2.weight[4] == 0).all()
    weight = model.conv3.weight
    assert torch.isfinite(weight).all()
    assert (weight[:, 4] == 0).all() and (weight[6] == 0).all()
    assert (weight[5] != 0).any()
    assert set(tracker.zero_units()) >= {group_of(tracker, "conv1").id, group_of(tracker, "conv3").id}


def test_parametrization_that_cannot_keep_zeros_is_refused_and_nothing_changes():
    model = TinyConvNet()
    parametrize.register_parametrization(model.conv3, "weight", PlusOne())
    tracker = WeightTracker(model, conv_input())
    before = snapshot(model)
    with pytest.raises(PruningError, match="conv3.weight"):
        # conv1's unit reaches conv1, bn1, conv2, bn2 before conv3 fails
        tracker.fake_prune_units({group_of(tracker, "conv1").id: [1]})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def tiny():
    model = TinyConvNet()
    return model, WeightTracker(model, conv_input())


def test_group_id_out_of_range_names_the_valid_range(tiny):
    model, tracker = tiny
    n = len(tracker.groups)
    with pytest.raises(UnitIndexError, match=rf"group_id {n} is out of range.*0\.\.{n - 1}"):
        tracker.fake_prune_unit(n, 0)
    with pytest.raises(UnitIndexError, match="-1"):
        tracker.fake_prune_unit(-1, 0)


def test_unit_id_out_of_range_names_the_valid_range(tiny):
    model, tracker = tiny
    group = tracker.groups[0]
    with pytest.raises(UnitIndexError, match=rf"ids 0\.\.{group.n_units - 1}"):
        tracker.fake_prune_unit(group.id, group.n_units)


@pytest.mark.parametrize("bad", [1.0, "1", True, None])
def test_non_int_ids_are_refused(tiny, bad):
    model, tracker = tiny
    with pytest.raises(UnitIndexError, match="must be an int"):
        tracker.fake_prune_unit(bad, 0)
    with pytest.raises(UnitIndexError, match="must be an int"):
        tracker.fake_prune_unit(0, bad)


def test_a_bad_id_anywhere_changes_nothing(tiny):
    model, tracker = tiny
    before = snapshot(model)
    with pytest.raises(UnitIndexError):
        tracker.fake_prune_units({0: [0, 1], 1: [10_000]})
    with pytest.raises(TypeError, match="list of unit ids"):
        tracker.fake_prune_units({0: 1})
    with pytest.raises(TypeError, match="mapping"):
        tracker.fake_prune_units([(0, [1])])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_integer_like_ids_are_accepted(tiny):
    np = pytest.importorskip("numpy")
    model, tracker = tiny
    group = tracker.groups[0]
    tracker.fake_prune_units({np.int64(group.id): [np.int64(1), torch.tensor(2)]})
    assert tracker.zero_units() == {group.id: [1, 2]}
