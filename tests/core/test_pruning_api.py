"""The pruning façade (SPEC §7, §12): zero-unit views, prune_unit, prune_zero_units with
ignore / ignore_prune / dry_run, hooks, rebuilt structure, stale consumers, refusals.

Oracles: Torch-Pruning pruning a copy of the model itself with the reported indices, slices
of the original weights written out by hand, and the model state captured before a
refused call.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from models import MHANet, TinyConvNet, conv_input, sequence_input
from torch import nn

from weighttracker_core import PruningError, StaleConsumerError, UnitIndexError, WeightTracker
from weighttracker_core.plugin import RegularizerSpec, TrackerSpec, hookimpl


class CountingTracker:
    def __init__(self, ctx):
        self.structure = ctx.structure

    def track(self, values):
        return {"units": self.structure.num_units}


class NormRegularizer:
    def __init__(self, ctx):
        self.plan = ctx.structure.plan()

    def __call__(self, evaluation):
        return self.plan.unit_reduce("l2", grad=True).sum()


class ConsumersPlugin:
    @hookimpl
    def wt_register_trackers(self):
        return (TrackerSpec(name="test_units", build=CountingTracker),)

    @hookimpl
    def wt_register_regularizers(self):
        return (RegularizerSpec(name="test_norm", build=NormRegularizer),)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k, v in before.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k


def group(tracker, root):
    return next(g for g in tracker.groups if g.root_module == root)


@pytest.fixture
def tiny():
    model = TinyConvNet().eval()
    # the classifier's outputs are units too: these tests prune the fc group
    return model, WeightTracker(model, conv_input(), plugins=[ConsumersPlugin()], prune_model_outputs=True)


# ---------------------------------------------------------------------- view_zero_units


def test_view_zero_units_reports_units_and_torch_pruning_indices(tiny):
    model, tracker = tiny
    conv1, conv3 = group(tracker, "conv1"), group(tracker, "conv3")
    assert tracker.view_zero_units().num_zero_units == 0
    tracker.fake_prune_units({conv1.id: [4, 1], conv3.id: [0]})
    view = tracker.view_zero_units()
    info = view.to_dict()
    # a conv's output channel c is Torch-Pruning index c on that conv
    assert info[conv1.name]["zero_units"] == [1, 4] and info[conv1.name]["tp_indices"] == [1, 4]
    assert info[conv3.name]["zero_units"] == [0] and info[conv3.name]["tp_indices"] == [0]
    assert info[conv1.name]["root_module"] == "conv1"
    assert conv1.name in str(view) and "3 zero units" in str(view)
    assert tracker.view_zero_structures().to_dict() == info


def test_reported_indices_drive_torch_pruning_to_the_same_model(tiny):
    """Oracle: Torch-Pruning prunes a copy with the reported indices; both must agree."""
    model, tracker = tiny
    tracker.fake_prune_units({group(tracker, "conv1").id: [2, 5], group(tracker, "conv3").id: [7]})
    reference = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(reference, example_inputs=conv_input())
    for name, info in tracker.view_zero_units().to_dict().items():
        layer = reference.get_submodule(info["root_module"])
        dg.get_pruning_group(layer, tp.prune_conv_out_channels, info["tp_indices"]).prune()
    tracker.prune_zero_units()
    assert_same_state(model, reference.state_dict())


def test_mha_head_view_reports_attention_positions():
    model = MHANet()
    tracker = WeightTracker(model, sequence_input(), num_heads={model.attn: 4},
                            prune_num_heads=True)
    heads = next(g for g in tracker.groups if g.kind == "head")
    tracker.fake_prune_unit(heads.id, 1)
    info = tracker.view_zero_units().to_dict()[heads.name]
    assert info["zero_units"] == [1] and info["tp_indices"] == [4, 5, 6, 7]  # head 1 of width 4


# ---------------------------------------------------------------------------- prune_unit


def test_prune_unit_removes_exactly_one_coupled_channel(tiny):
    model, tracker = tiny
    before = state(model)
    keep = [c for c in range(8) if c != 3]
    report = tracker.prune_unit(group(tracker, "conv1").id, 3)
    assert report.units == {"conv1:prune_out_channels": [3]} and not report.dry_run
    expected = {
        "conv1.weight": before["conv1.weight"][keep], "conv1.bias": before["conv1.bias"][keep],
        "bn1.weight": before["bn1.weight"][keep], "bn1.running_mean": before["bn1.running_mean"][keep],
        "conv2.weight": before["conv2.weight"][keep][:, keep], "conv2.bias": before["conv2.bias"][keep],
        "bn2.bias": before["bn2.bias"][keep], "conv3.weight": before["conv3.weight"][:, keep],
        "conv3.bias": before["conv3.bias"], "fc.weight": before["fc.weight"],
    }
    now = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(now[k], v), k
    assert (model.conv1.out_channels, model.bn1.num_features, model.conv2.in_channels) == (7, 7, 7)
    assert report.removed_params == sum(before[k].numel() - now[k].numel()
                                        for k in before if k in dict(model.named_parameters()))


# ------------------------------------------------------------------- ignore / ignore_prune


def test_ignore_changes_only_zero_detection_and_the_whole_group_is_pruned(tiny):
    model, tracker = tiny
    conv1 = group(tracker, "conv1")
    tracker.fake_prune_unit(conv1.id, 2)
    with torch.no_grad():
        model.bn1.weight[2] = 0.5  # the unit is zero everywhere but in bn1
    assert conv1.id not in tracker.zero_units()
    assert tracker.zero_units(ignore=[nn.BatchNorm2d]) == {conv1.id: [2]}
    assert tracker.zero_units(ignore=[model.bn1]) == {conv1.id: [2]}
    bn1 = model.bn1.weight.detach().clone()
    tracker.prune_zero_units(ignore=[nn.BatchNorm2d])
    keep = [c for c in range(8) if c != 2]
    assert model.bn1.num_features == 7 and torch.equal(model.bn1.weight, bn1[keep])


def test_ignore_prune_keeps_the_output_width_of_those_modules(tiny):
    model, tracker = tiny
    conv1, conv3, fc = group(tracker, "conv1"), group(tracker, "conv3"), group(tracker, "fc")
    tracker.fake_prune_units({conv1.id: [0], conv3.id: [5], fc.id: [2]})
    # fc keeps its 5 outputs; conv3's group only cuts fc's inputs, so it is still pruned
    report = tracker.prune_zero_units(ignore_prune=[model.fc])
    assert report.units == {conv1.name: [0], conv3.name: [5]}
    assert report.left_zero == {fc.name: "1 zero units left in place: ignore_prune keeps the output width of fc"}
    assert "left in place" in str(report)
    assert model.conv1.out_channels == 7 and model.conv3.out_channels == 15 and model.fc.out_features == 5
    assert model.fc.in_features == 15
    tracker.fake_prune_units({group(tracker, "conv3").id: [3]})
    version = tracker.structure.version
    report = tracker.prune_zero_units(ignore_prune=[nn.BatchNorm2d])  # every conv group cuts a BN
    assert report.units == {group(tracker, "fc").name: [2]} and tracker.structure.version == version + 1
    assert model.conv3.out_channels == 15 and model.fc.out_features == 4


def test_dry_run_reports_and_changes_nothing(tiny):
    model, tracker = tiny
    calls = []
    tracker.post_prune_hooks = (calls.append,)
    tracker.fake_prune_units({group(tracker, "conv1").id: [1, 6]})
    handle = tracker.create_tracker("test_units")
    before = state(model)
    params = dict(model.named_parameters())
    report = tracker.prune_zero_units(dry_run=True)
    assert report.dry_run and report.units == {"conv1:prune_out_channels": [1, 6]}
    assert report.params_after == report.params_before and "would remove" in str(report)
    assert_same_state(model, before)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert calls == [] and tracker.structure.version == 0
    assert handle.track() == {"test_units": {"units": tracker.num_units}}


# ----------------------------------------------------------------- hooks, rebuild, stale


def test_post_prune_hooks_run_once_per_prune_on_the_pruned_model(tiny):
    model, tracker = tiny
    seen = []
    tracker.post_prune_hooks = (lambda t: seen.append((t, model.conv1.out_channels)),)
    tracker.prune_unit(group(tracker, "conv1").id, 0)
    tracker.prune_unit(group(tracker, "conv3").id, 0)
    tracker.prune_zero_units()  # nothing is zero: no prune, no hook
    assert seen == [(tracker, 7), (tracker, 7)]


def test_structure_is_rebuilt_with_new_sizes(tiny):
    model, tracker = tiny
    sizes = {g.name: g.n_units for g in tracker.groups}
    tracker.fake_prune_units({group(tracker, "conv1").id: [0, 1, 2], group(tracker, "fc").id: [4]})
    tracker.prune_zero_units()
    assert tracker.structure.version == 1
    sizes["conv1:prune_out_channels"] -= 3
    sizes["fc:prune_out_channels"] -= 1
    assert {g.name: g.n_units for g in tracker.groups} == sizes
    assert [g.id for g in tracker.groups] == list(range(len(sizes)))
    offsets = [g.offset for g in tracker.groups]
    assert offsets == [sum(g.n_units for g in tracker.groups[:i]) for i in range(len(offsets))]
    assert tracker.num_units == sum(sizes.values())
    for g in tracker.groups:  # every slice still fits the pruned parameters
        for member, piece in g.iter_slices():
            param = model.get_submodule(member.module_name).get_parameter(piece.param)
            assert max(piece.positions) < piece.axis_length(tuple(param.shape))


def test_trackers_and_regularizers_become_stale_after_a_physical_prune(tiny):
    model, tracker = tiny
    metrics = tracker.create_tracker("test_units")
    loss = tracker.create_regularizer("test_norm")
    before = metrics.track()["test_units"]["units"]
    loss().backward()
    tracker.prune_unit(group(tracker, "conv1").id, 0)
    with pytest.raises(StaleConsumerError, match=r"create_tracker"):
        metrics.track()
    with pytest.raises(StaleConsumerError, match=r"create_regularizer"):
        loss()
    assert tracker.track() == {}  # trackers from before the prune are dropped
    fresh = tracker.create_tracker("test_units")
    assert tracker.track() == {"test_units": {"units": before - 1}} == fresh.track()
    assert torch.isfinite(tracker.create_regularizer("test_norm")())


# ------------------------------------------------------------------------------ refusals


def capture(model):
    return state(model), dict(model.named_parameters())


def assert_untouched(model, captured):
    values, params = captured
    assert_same_state(model, values)
    assert all(p is params[n] for n, p in model.named_parameters())


def test_removing_every_unit_of_a_group_is_refused(tiny):
    model, tracker = tiny
    conv1, conv3, fc = group(tracker, "conv1"), group(tracker, "conv3"), group(tracker, "fc")
    tracker.fake_prune_units({conv3.id: range(16), fc.id: [0]})  # conv3 entirely zero
    captured = capture(model)
    with pytest.raises(PruningError, match=r"all 16 units of group .*conv3.*ignore_prune"):
        tracker.prune_zero_units()
    for dry_run in (True, False):
        with pytest.raises(PruningError, match="all 8 units"):
            tracker.prune_units({conv1.id: range(8)}, dry_run=dry_run)
    assert_untouched(model, captured)
    assert tracker.structure.version == 0
    report = tracker.prune_zero_units(ignore_prune=[model.conv3])  # the way out it names
    assert report.units == {fc.name: [0]}


def test_bad_ids_for_prune_unit_change_nothing(tiny):
    model, tracker = tiny
    captured = capture(model)
    n = len(tracker.groups)
    with pytest.raises(UnitIndexError, match=rf"0\.\.{n - 1}"):
        tracker.prune_unit(n, 0)
    g = tracker.groups[0]
    with pytest.raises(UnitIndexError, match=rf"0\.\.{g.n_units - 1}"):
        tracker.prune_unit(g.id, g.n_units)
    with pytest.raises(UnitIndexError, match="must be an int"):
        tracker.prune_unit(g.id, "0")
    with pytest.raises(UnitIndexError, match="must be an int"):
        tracker.prune_unit(0.0, 0)
    assert_untouched(model, captured)


class GroupedNet(nn.Module):
    """stem -> grouped conv (2 groups of 4) -> GroupNorm (2 groups) -> head conv."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.grouped(torch.relu(self.stem(x))))))


def test_grouped_conv_balanced_removal_works_with_parity():
    model = GroupedNet().eval()
    model.norm = nn.Identity()  # GroupNorm statistics would see the removed channels
    x = conv_input()
    tracker = WeightTracker(model, x, ignored_layers=[model.head])
    tracker.fake_prune_units({group(tracker, "stem").id: [1, 5],  # local input 1 of each group
                              group(tracker, "grouped").id: [0, 6]})  # one output per group
    with torch.no_grad():
        expected = model(x)
    tracker.prune_zero_units()
    assert (model.grouped.in_channels, model.grouped.out_channels) == (6, 6)
    assert model.grouped.weight.shape == (6, 3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("root, units, message", [
    ("stem", [1, 6], "same input channels"),  # local inputs 1 and 2
    ("grouped", [0, 1], "as many channels"),  # both from group 0
])
def test_grouped_conv_unbalanced_removal_is_refused_before_anything_changes(root, units, message):
    model = GroupedNet()
    model.norm = nn.Identity()
    tracker = WeightTracker(model, conv_input(), ignored_layers=[model.head])
    captured = capture(model)
    g = group(tracker, root)
    with pytest.raises(PruningError, match=message):
        tracker.prune_units({g.id: units}, dry_run=False)
    with pytest.raises(PruningError, match=message):
        tracker.prune_units({g.id: units}, dry_run=True)
    assert_untouched(model, captured)


def test_group_norm_balanced_removal_works_and_unbalanced_is_refused():
    model = GroupedNet(groups=1)
    tracker = WeightTracker(model, conv_input(), ignored_layers=[model.head])
    g = group(tracker, "grouped")
    assert "norm" in g.module_names()
    captured = capture(model)
    with pytest.raises(PruningError, match="num_groups=2"):
        tracker.prune_unit(g.id, 0)  # one channel from group 0 only
    assert_untouched(model, captured)
    tracker.prune_units({g.id: [3, 4]}, dry_run=False)  # one channel from each group
    assert (model.norm.num_channels, model.norm.num_groups) == (6, 2)
    assert model.norm.weight.shape == (6,)
    model(conv_input())
