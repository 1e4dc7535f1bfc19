"""Structure discovery that can be trusted: one test per rule, each on a model of that shape.

Oracles: fvcore's MACs and parameter counts of the physically pruned model, output parity
between fake and physical pruning, couplings written out by hand, and every piece of
advice an error gives, followed.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torchvision
from models import MHANet, TinyConvNet, conv_input, sequence_input
from torch import nn

from weighttracker_core import (
    ConfigError,
    CouplingError,
    PruneAxis,
    PruningError,
    UnsupportedModuleError,
    WeightTracker,
    WeightTrackerError,
    train_mode_forward,
)
from weighttracker_core.cli import main

ADVICE = re.compile(r"ignored_layers=\[([^\]]*)\]")


def follow(model, err):
    """The modules an error's ``ignored_layers=[model.a, ...]`` advice names (the message
    and the error's ``ignored_layers`` attribute must agree)."""
    match = ADVICE.search(str(err))
    assert match, f"no ignored_layers advice in: {err}"
    names = [n.strip()[len("model."):] for n in match.group(1).split(",")]
    assert list(err.ignored_layers) == names
    return [model.get_submodule(n) for n in names]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fvcore_macs(model, inputs):
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model.eval(), inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return dict(analysis.by_module())


def parity_after_prune(tracker, model, inputs, units):
    """Fake-prune ``units``, prune physically; the outputs must not change."""
    tracker.fake_prune_units(units)
    with torch.no_grad():
        expected = model(*inputs)
    report = tracker.prune_zero_units()
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), expected, rtol=1e-5, atol=1e-6)
    return report


# ------------------------------------------------------------ coarsest units through flatten


class FlattenResidual(nn.Module):
    """A conv's 8 channels flattened into 128 features and added to a linear layer's output.

    Channel c of ``conv`` is features 16c .. 16c+15 of the sum: ``side`` rows and ``head``
    columns 16c .. 16c+15 are coupled to it.
    """

    def __init__(self, conv_first: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.side = nn.Linear(5, 128)
        self.head = nn.Linear(128, 4)
        self.conv_first = conv_first

    def forward(self, image, vector):
        flat, side = self.conv(image).flatten(1), self.side(vector)
        y = flat + side if self.conv_first else side + flat
        return self.head(torch.relu(y))


def flatten_inputs():
    return torch.randn(2, 3, 4, 4), torch.randn(2, 5)


@pytest.mark.parametrize("conv_first", [True, False])
def test_units_through_a_flatten_are_whole_channels(conv_first):
    model = FlattenResidual(conv_first).eval()
    inputs = flatten_inputs()
    tracker = WeightTracker(model, inputs)
    (group,) = tracker.groups
    assert (group.root_module, group.kind, group.n_units) == ("conv", "channel", 8)
    maps = {m.module_name: dict(zip(m.tp_indices, m.tp_units)) for m in group.members}
    assert maps["side"] == maps["head"] == {f: f // 16 for f in range(128)}
    assert maps["conv"] == {c: c for c in range(8)}

    chosen = [1, 6]
    tracker.fake_prune_units({group.id: chosen})
    bops = tracker.create_tracker("structured_bops", log_layerwise_stats=True).track()[
        "structured_bops"]["modules"]
    summary = tracker.create_tracker("group_pruning_summary").track()["group_pruning_summary"]
    params = sum(p.numel() for p in model.parameters())
    report = parity_after_prune(tracker, model, inputs, {})
    assert report.units == {group.name: chosen}
    # 2 channels: 2 x (27 + 1) conv, 2 x 16 x (5 + 1) side rows, 2 x 16 x 4 head columns
    removed = 2 * 28 + 32 * 6 + 32 * 4
    assert params - sum(p.numel() for p in model.parameters()) == removed == report.removed_params
    assert summary["pruned_physical_params"] == removed
    assert (model.conv.out_channels, model.side.out_features, model.head.in_features) == (6, 96, 96)
    macs = fvcore_macs(model, inputs)
    assert {n: s["bops"] for n, s in bops.items()} == {n: macs[n] * 32 * 32 for n in bops}


class Ghost(nn.Module):
    """GhostNet's module: a conv's 4 channels concatenated with a depthwise conv of them.

    Channel c of ``primary`` is positions c and 4 + c of the concatenation: removing one
    of them alone is impossible (``cheap`` channel c is computed from ``primary`` channel c).
    """

    def __init__(self) -> None:
        super().__init__()
        self.primary = nn.Conv2d(3, 4, 1)
        self.cheap = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.out = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x1 = self.primary(x)
        return self.out(self.dw(torch.cat([x1, self.cheap(x1)], 1)))


def test_a_channel_concatenated_with_a_function_of_itself_is_one_unit():
    model = Ghost().eval()
    x = torch.randn(2, 3, 6, 6)
    tracker = WeightTracker(model, x)
    (group,) = [g for g in tracker.groups if g.root_module != "out"]
    assert (group.root_module, group.n_units) == ("primary", 4)
    maps = {m.module_name: dict(zip(m.tp_indices, m.tp_units)) for m in group.members}
    assert maps["cheap"] == {c: c for c in range(4)}
    assert maps["dw"] == maps["out"] == {p: p % 4 for p in range(8)}
    parity_after_prune(tracker, model, (x,), {group.id: [2]})
    assert (model.primary.out_channels, model.dw.in_channels, model.out.in_channels) == (3, 6, 6)


# ---------------------------------------------------------------- no group without consumer


class ExpandedKeys(nn.Module):
    """``a``'s 8 outputs viewed as 2 heads of 4 and repeated to 4 heads (``repeat_kv``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        y = self.a(torch.relu(self.stem(x)))
        batch, length, _ = y.shape
        heads = y.view(batch, length, 2, 4).transpose(1, 2)
        heads = heads[:, :, None].expand(batch, 2, 2, length, 4).reshape(batch, 4, length, 4)
        return self.b(heads.transpose(1, 2).reshape(batch, length, 16))


def test_a_group_whose_consumer_is_lost_is_refused_and_ignoring_its_root_builds_the_rest():
    model = ExpandedKeys().eval()
    x = sequence_input()
    with pytest.raises(CouplingError, match=r"output channels of a reach b but .* coupled them to no layer") as err:
        WeightTracker(model, x)
    ignored = follow(model, err.value)
    assert ignored == [model.a]
    tracker = WeightTracker(model, x, ignored_layers=ignored)
    assert [g.root_module for g in tracker.groups] == ["stem"]
    (stem,) = tracker.groups
    assert {(m.module_name, m.axis) for m in stem.members} == {
        ("stem", PruneAxis.OUT_CHANNEL), ("a", PruneAxis.IN_CHANNEL)}
    parity_after_prune(tracker, model, (x,), {stem.id: [0, 4]})
    assert model.a.in_features == 4


class MisreadExpand(nn.Module):
    """A 5-D expand Torch-Pruning takes for ``repeat_kv``: it would divide by zero."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        y = self.a(torch.relu(self.stem(x)))
        batch, length, _ = y.shape
        y = y.view(batch, length, 2, 1, 4).expand(batch, length, 2, 2, 4).reshape(batch, length, 16)
        return self.b(y)


def test_an_expand_torch_pruning_misreads_is_refused_not_a_zero_division():
    model = MisreadExpand().eval()
    x = sequence_input()
    with pytest.raises(CouplingError, match=r"expand \(ExpandBackward0\) that feeds b as a repeat of key/value heads") as err:
        WeightTracker(model, x)
    tracker = WeightTracker(model, x, ignored_layers=follow(model, err.value))
    (stem,) = tracker.groups
    parity_after_prune(tracker, model, (x,), {stem.id: [3]})


class Widened(nn.Module):
    """``a``'s 8 channels made 16 before ``b``: repeated, interleaved, or padded with zeros."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(16, 3)
        self.how = how

    def forward(self, x):
        y = self.a(torch.relu(self.stem(x)))
        if self.how == "repeat":
            y = y.repeat(1, 1, 2)
        elif self.how == "interleave":
            y = y.repeat_interleave(2, dim=-1)
        else:
            y = nn.functional.pad(y, (0, 8))
        return self.b(y)


@pytest.mark.parametrize("how, owned", [
    ("repeat", {c: c % 8 for c in range(16)}),  # channel c is inputs c and c + 8
    ("interleave", {c: c // 2 for c in range(16)}),  # channel c is inputs 2c and 2c + 1
])
def test_a_repeated_channel_owns_every_copy(how, owned):
    model = Widened(how).eval()
    x = sequence_input()
    tracker = WeightTracker(model, x)
    a = next(g for g in tracker.groups if g.root_module == "a")
    (b,) = [m for m in a.members if m.module_name == "b"]
    assert dict(zip(b.tp_indices, b.tp_units)) == owned
    parity_after_prune(tracker, model, (x,), {a.id: [0, 5]})
    assert model.b.in_features == 12


def test_inputs_that_no_unit_owns_are_refused_and_the_advice_works():
    # padded channels belong to no unit: Torch-Pruning would map a's channel c to b's
    # input c only and let b keep 16 inputs after a lost some
    model = Widened("pad").eval()
    x = sequence_input()
    with pytest.raises(CouplingError, match=r"Only 8 of the 16 input channels of b belong to a unit .*ConstantPadNdBackward0") as err:
        WeightTracker(model, x)
    tracker = WeightTracker(model, x, ignored_layers=follow(model, err.value))
    (stem,) = tracker.groups
    parity_after_prune(tracker, model, (x,), {stem.id: [1]})


# -------------------------------------------------------------------- honest build errors


class Outputs(nn.Module):
    """Two linear layers; ``mode`` decides what the forward returns."""

    def __init__(self, mode: str = "tensor") -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)
        self.mode = mode

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        if self.mode == "tuple_with_none":
            return y, None
        if self.mode == "detached":
            return y.detach()
        return {"logits": y, "name": "outputs"} if self.mode == "dict_with_str" else y


def assert_untouched(model, before):
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.training


def test_inputs_the_model_fails_on_are_reported_as_not_fitting():
    model = Outputs()
    before = state(model)
    with pytest.raises(ConfigError, match=r"example_inputs \(\{'inputs': tensor of shape \(2, 4\)\}\) do not fit Outputs"):
        WeightTracker(model, {"inputs": torch.randn(2, 4)})  # forward takes x
    assert_untouched(model, before)


def test_a_failing_output_transform_is_named():
    model = Outputs("dict_with_str")
    with pytest.raises(ConfigError, match=r"output_transform failed on the output of Outputs \(dict\) with KeyError"):
        WeightTracker(model, torch.randn(2, 4), output_transform=lambda out: out["missing"])
    assert_untouched(model, state(model))
    # the transform the error asks for: the output's tensors
    assert WeightTracker(model, torch.randn(2, 4), output_transform=lambda out: out["logits"]).groups


@pytest.mark.parametrize("mode, where, fix", [
    ("tuple_with_none", r"NoneType at out\[1\]", lambda out: out[0]),
    ("dict_with_str", r"str at out\['name'\]", lambda out: out["logits"]),
])
def test_outputs_that_are_not_tensors_are_named_and_output_transform_fixes_them(mode, where, fix):
    model = Outputs(mode)
    before = state(model)
    with pytest.raises(ConfigError, match=rf"The output of Outputs holds {where} .*output_transform=") as err:
        WeightTracker(model, torch.randn(2, 4))
    assert "do not fit" not in str(err.value)
    assert_untouched(model, before)
    tracker = WeightTracker(model, torch.randn(2, 4), output_transform=fix)
    assert [g.root_module for g in tracker.groups] == ["a"]


def test_an_output_without_autograd_graph_is_named():
    model = Outputs("detached")
    with pytest.raises(ConfigError, match=r"traced no layer of Outputs: .*detached"):
        WeightTracker(model, torch.randn(2, 4))
    model.mode = "tensor"  # the advice: return what the layers compute
    assert [g.root_module for g in WeightTracker(model, torch.randn(2, 4)).groups] == ["a"]


def test_a_failure_inside_torch_pruning_is_reported_as_such(monkeypatch):
    import torch_pruning as tp

    def broken(self, *args, **kwargs):
        raise KeyError("a node it did not expect")

    monkeypatch.setattr(tp.DependencyGraph, "_trace_computational_graph", broken)
    model = Outputs()
    before = state(model)
    with pytest.raises(UnsupportedModuleError, match=r"Torch-Pruning could not trace Outputs although the model runs") as err:
        WeightTracker(model, torch.randn(2, 4))
    assert "do not fit" not in str(err.value) and "KeyError" in str(err.value)
    assert_untouched(model, before)


# ------------------------------------------------------- refusals whose advice is followed


class ChannelsLastFlatten(nn.Module):
    """Channels moved last, then flattened. ``square``: 2 channels pooled to 2 x 2, so that
    the tensor entering the permute has three axes of size 2, and the pooling hides which
    the convolution's channel axis was."""

    def __init__(self, square: bool) -> None:
        super().__init__()
        channels = 2 if square else 4
        self.stem = nn.Conv2d(3, 5, 1)
        self.conv = nn.Conv2d(5, channels, 1)
        self.pool = nn.AvgPool2d(2) if square else nn.Identity()
        self.fc = nn.Linear(channels * 4, 3)

    def forward(self, x):
        y = self.pool(self.conv(torch.relu(self.stem(x))))
        return self.fc(y.permute(0, 2, 3, 1).flatten(1))


def test_a_flatten_after_a_permute_is_mapped_when_the_channel_axis_is_clear():
    # (B, H, W, C) flattened: channel c is feature 4 * position + c
    model = ChannelsLastFlatten(square=False).eval()
    x = torch.randn(2, 3, 2, 2)
    tracker = WeightTracker(model, x)
    conv = next(g for g in tracker.groups if g.root_module == "conv")
    (fc,) = [m for m in conv.members if m.module_name == "fc"]
    assert dict(zip(fc.tp_indices, fc.tp_units)) == {f: f % 4 for f in range(16)}
    parity_after_prune(tracker, model, (x,), {conv.id: [3]})


def test_a_flatten_after_a_permute_is_refused_when_the_axes_are_ambiguous_and_the_advice_works():
    # 2 channels on a 2 x 2 grid: after the permute no shape says which axis holds them
    model = ChannelsLastFlatten(square=True).eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(CouplingError, match=r"A PermuteBackward0 before the flatten \(\w+\) that feeds fc") as err:
        WeightTracker(model, x)
    ignored = follow(model, err.value)
    assert ignored == [model.conv]
    tracker = WeightTracker(model, x, ignored_layers=ignored)
    (stem,) = tracker.groups
    parity_after_prune(tracker, model, (x,), {stem.id: [0, 2]})


class TwoPathConcat(nn.Module):
    """One tensor reaches a cat whole and through a BatchNorm (DLA's roots): channel c of
    ``conv`` is inputs c and 4 + c of ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 1)
        self.conv = nn.Conv2d(5, 4, 1)
        self.side = nn.Conv2d(4, 2, 1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Conv2d(4 + 4 + 2, 3, 1)

    def forward(self, x):
        y = self.conv(torch.relu(self.stem(x)))
        return self.fc(torch.cat([y, self.bn(y), self.side(y)], 1))


def test_a_concat_of_one_tensor_along_plain_paths_owns_both_copies():
    model = TwoPathConcat().eval()
    x = torch.randn(2, 3, 2, 2)
    tracker = WeightTracker(model, x)
    conv = next(g for g in tracker.groups if g.root_module == "conv")
    (fc,) = [m for m in conv.members if m.module_name == "fc"]
    assert dict(zip(fc.tp_indices, fc.tp_units)) == {p: p % 4 for p in range(8)}
    parity_after_prune(tracker, model, (x,), {conv.id: [1]})
    assert model.fc.in_channels == 8


class SlicedConcat(nn.Module):
    """RexNet's partial residual: ``cat([y[:, :4] + shortcut, y[:, 4:]])``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 6, 1)
        self.fc = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        shortcut = torch.relu(self.stem(x))
        y = self.conv(shortcut)
        return self.fc(torch.cat([y[:, :4] + shortcut, y[:, 4:]], 1))


def test_a_concat_of_one_tensor_through_slices_is_refused_and_the_advice_works():
    model = SlicedConcat().eval()
    x = torch.randn(2, 3, 2, 2)
    # Torch-Pruning maps conv's channels through the slices onto positions conv lacks
    with pytest.raises(CouplingError, match=r"Group conv:prune_out_channels maps indices outside conv") as err:
        WeightTracker(model, x)
    ignored = follow(model, err.value)
    assert ignored == [model.conv]
    # stem's channels are added to four of conv's: that group keeps its width too
    assert WeightTracker(model, x, ignored_layers=ignored).groups == ()


class ChunkReadTwice(nn.Module):
    """``qkv``'s output unbound into 3 chunks: the first read by two layers, the last by
    none (XCiT-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.qkv = nn.Linear(6, 12)
        self.p = nn.Linear(4, 3)
        self.q = nn.Linear(4, 3)

    def forward(self, x):
        chunks = self.qkv(torch.relu(self.stem(x))).reshape(*x.shape[:-1], 3, 4).permute(2, 0, 1, 3)
        first, second, _ = chunks.unbind(0)
        return self.p(first) + self.q(first) * second.sum(-1, keepdim=True)


def test_chunks_read_twice_are_refused_and_the_advice_works():
    model = ChunkReadTwice().eval()
    x = sequence_input()
    with pytest.raises(CouplingError, match=r"chunks of UnbindBackward0 feed .*consumers read outputs") as err:
        WeightTracker(model, x)
    tracker = WeightTracker(model, x, ignored_layers=follow(model, err.value))
    stem = next(g for g in tracker.groups if g.root_module == "stem")
    parity_after_prune(tracker, model, (x,), {stem.id: [2]})


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.c1 = nn.Conv2d(6, 4, 1)
        self.c2 = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        y = self.c1(torch.relu(self.stem(x)))
        b, c, h, w = y.shape
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.c2(y)


def test_a_channel_shuffle_is_refused_and_the_advice_works():
    model = Shuffle().eval()
    x = conv_input()
    with pytest.raises(CouplingError, match=r"channel shuffle \(view, TransposeBackward0, reshape\) feeds c2") as err:
        WeightTracker(model, x)
    tracker = WeightTracker(model, x, ignored_layers=follow(model, err.value))
    (stem,) = tracker.groups
    parity_after_prune(tracker, model, (x,), {stem.id: [0, 5]})


def test_shufflenet_v2_is_refused_naming_the_shuffle_and_the_advice_builds_the_rest_at_once():
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(CouplingError, match=r"A channel shuffle \(view, TransposeBackward0, reshape\) feeds") as err:
        WeightTracker(model, x)
    ignored = follow(model, err.value)
    tracker = WeightTracker(model, x, ignored_layers=ignored)  # no second refusal
    names = {n for n, m in model.named_modules() if any(m is i for i in ignored)}
    assert tracker.groups and not names & {g.root_module for g in tracker.groups}


class FunctionalLinear(nn.Module):
    """``proj`` is never called: its weight is used by ``F.linear`` (torchvision's Swin)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.a = nn.Linear(6, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = self.a(torch.relu(self.stem(x)))
        return self.head(nn.functional.linear(y, self.proj.weight, self.proj.bias) + y)


def test_a_layer_used_through_its_weights_is_refused_and_the_advice_works():
    model = FunctionalLinear().eval()
    x = sequence_input()
    with pytest.raises(CouplingError, match=r"proj \(Linear\) is not called as a module") as err:
        WeightTracker(model, x)
    tracker = WeightTracker(model, x, ignored_layers=follow(model, err.value))
    assert [g.root_module for g in tracker.groups] == ["stem"]
    parity_after_prune(tracker, model, (x,), {tracker.groups[0].id: [1]})


# -------------------------------------------------------------------------- ignore_prune


def test_a_refused_zero_classifier_is_left_in_place_by_the_advice_and_the_rest_is_pruned():
    model = TinyConvNet().eval()
    x = conv_input()
    tracker = WeightTracker(model, x, prune_model_outputs=True)
    by_root = {g.root_module: g for g in tracker.groups}
    tracker.fake_prune_units({by_root["fc"].id: range(5), by_root["conv3"].id: [2, 9],
                              by_root["conv1"].id: [0]})
    with pytest.raises(PruningError, match=r"all 5 units of group .*fc.*ignore_prune=\[model\.fc\]"):
        tracker.prune_zero_units()
    report = tracker.prune_zero_units(ignore_prune=[model.fc])
    # conv3's group cuts fc's inputs only: it is pruned; fc keeps its outputs, and says so
    assert report.units == {by_root["conv3"].name: [2, 9], by_root["conv1"].name: [0]}
    assert report.left_zero == {
        by_root["fc"].name: "5 zero units left in place: ignore_prune keeps the output width of fc"}
    assert "fc:prune_out_channels: 5 zero units left in place" in str(report)
    assert (model.fc.in_features, model.fc.out_features, model.conv1.out_channels) == (14, 5, 7)


# ------------------------------------------------------- layers the trace does not reach


class AuxHead(nn.Module):
    """An auxiliary classifier that only runs in training (GoogLeNet-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.aux = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 16, 3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        out = self.head(self.body(y).mean((2, 3)))
        return (out, self.aux(y)) if self.training else out


def test_untraced_layers_are_named_and_the_advised_forward_covers_them():
    model = AuxHead().eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"never runs these layers: aux\.0, aux\.1, aux\.3\. .*train_mode_forward"):
        WeightTracker(model, x)
    before = state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer reached now
        tracker = WeightTracker(model, x, forward_fn=train_mode_forward)
        tracker.create_tracker("structured_bops").track()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats kept
    assert not model.training
    stem = next(g for g in tracker.groups if g.root_module == "stem")
    assert ("aux.0", PruneAxis.IN_CHANNEL) in {(m.module_name, m.axis) for m in stem.members}
    aux = next(g for g in tracker.groups if g.root_module == "aux.0")
    parity_after_prune(tracker, model, (x,), {stem.id: [3], aux.id: [1]})
    out, aux_out = model.train()(x)  # the training forward still runs after the prune
    assert aux_out.shape == (2, 3) and model.aux[3].in_features == 3 * 16


def test_googlenet_aux_heads_are_named_and_covered_by_train_mode_forward():
    model = torchvision.models.googlenet(num_classes=10, init_weights=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.warns(UserWarning, match=r"aux1\.conv\.conv, aux1\.conv\.bn, aux1\.fc1, aux1\.fc2, aux2"):
        WeightTracker(model, x)
    tracker = WeightTracker(model, x, forward_fn=train_mode_forward)
    assert tracker.structure.untraced_modules() == []
    tracker.fake_prune_units({g.id: [0] for g in tracker.groups if g.n_units > 1})
    tracker.prune_zero_units()
    outputs = model.train()(x)
    assert outputs.aux_logits1.shape == outputs.aux_logits2.shape == (2, 10)


def test_removing_the_aux_head_as_advised_silences_the_warning():
    model = AuxHead().eval()
    model.aux = None  # "remove them before pruning"
    model.forward = lambda x: model.head(model.body(torch.relu(model.bn(model.stem(x)))).mean((2, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WeightTracker(model, torch.randn(2, 3, 4, 4))


# ---------------------------------------------------------------------------- num_heads


def test_multihead_attention_heads_come_from_the_module():
    model = MHANet()
    tracker = WeightTracker(model, sequence_input(), prune_num_heads=True)
    heads = next(g for g in tracker.groups if g.kind == "head")
    assert (heads.root_module, heads.n_units) == ("attn", model.attn.num_heads)
    given = WeightTracker(model, sequence_input(), num_heads={model.attn: 4}, prune_num_heads=True)
    assert [(g.name, g.n_units) for g in given.groups] == [(g.name, g.n_units) for g in tracker.groups]


@pytest.mark.parametrize("key, message", [
    ("fc1", r"num_heads\[fc1\]=4: fc1 is not a fused qkv projection of that many heads"),
    ("attn.out_proj", r"num_heads names attn\.out_proj \(NonDynamicallyQuantizableLinear\), which is not a projection of an attention"),
])
def test_a_num_heads_key_that_is_no_attention_projection_is_refused(key, message):
    model = MHANet()
    with pytest.raises(ConfigError, match=message):
        WeightTracker(model, sequence_input(), num_heads={model.get_submodule(key): 4, model.attn: 4})
    # the advice: keys must be attention projections
    WeightTracker(model, sequence_input(), num_heads={model.attn: 4})


# ------------------------------------------------------------------------ inference_mode


def _small():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(),
                         nn.Conv2d(6, 2, 1))


def _signature(tracker):
    return [(g.name, g.n_units, [(m.module_name, m.axis) for m in g.members]) for g in tracker.groups]


def test_tracing_and_pruning_inside_inference_mode_work():
    model = _small().eval()
    x = torch.randn(1, 3, 8, 8)
    reference = _signature(WeightTracker(model, x))
    with torch.inference_mode():
        inference_x = torch.randn(1, 3, 8, 8)
        tracker = WeightTracker(model, inference_x)
        assert _signature(tracker) == reference
        tracker.fake_prune_unit(0, 1)
        report = tracker.prune_zero_units()
    assert report.num_units == 1
    assert not any(p.is_inference() for p in model.parameters())
    tracker.prune_unit(0, 0)  # the model is still traceable


def test_a_model_built_under_inference_mode_is_refused_and_a_deep_copy_works():
    with torch.inference_mode():
        model = _small().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"0\.weight, 0\.bias, .* inference tensors .*copy\.deepcopy\(model\)"):
        WeightTracker(model, x)
    model = copy.deepcopy(model)  # the advice, outside inference_mode
    assert _signature(WeightTracker(model, x)) == _signature(WeightTracker(_small(), x))


# ---------------------------------------------------------------------- tied parameters


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 12, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(torch.relu(self.mix(self.embed(ids))) + self.embed(ids))


def test_tied_parameters_count_once_are_pruned_together_and_stay_tied():
    model = TiedLM().eval()
    ids = torch.randint(0, 12, (2, 5))
    tracker = WeightTracker(model, ids, prune_model_outputs=True)
    hidden = next(g for g in tracker.groups if g.root_module == "mix")
    # a hidden channel owns one column of the shared weight (12), mix's row and bias (7)
    # and mix's column (6) - the shared column once
    numel = tracker.structure.plan().unit_numel()
    assert int(numel[hidden.offset]) == 12 + 7 + 6
    report = parity_after_prune(tracker, model, (ids,), {hidden.id: [1, 4]})
    assert model.out.weight is model.embed.weight and model.embed.weight.shape == (12, 4)
    # 2 shared columns, 2 rows and biases of mix, 2 columns of mix less the 2 x 2 elements
    # the rows took
    assert report.removed_params == 2 * 12 + 2 * 7 + (2 * 6 - 4)


# ------------------------------------------------------------------ outputs are no units


def test_model_outputs_are_no_units_unless_asked(capsys):
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 32, 32)
    assert not any(g.root_module == "fc" for g in WeightTracker(model, x).groups)
    with_outputs = WeightTracker(model, x, prune_model_outputs=True)
    assert next(g for g in with_outputs.groups if g.root_module == "fc").n_units == 1000
    assert main(["inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "fc:prune_out_channels" not in out and "units=1000" not in out
