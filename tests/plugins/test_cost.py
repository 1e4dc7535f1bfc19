"""Cost calculations: fvcore baseline MACs, cost axes and active MACs (calculations/cost.py)."""

from __future__ import annotations

import logging
import warnings

import attrs
import pytest
import torch
from _cost_oracle import fvcore_macs, pruned_copy
from models import QKVNet, TinyConvNet, conv_input, sequence_input
from torch import nn

from weighttracker_core import WeightTracker
from weighttracker_core.plugin import ParamRole, ParamSlice, UnitRule, hookimpl


def _layer(tracker, values, name):
    return values[next(i.index for i in tracker.structure.modules if i.name == name)].item()


def test_hand_worked_conv_chain():
    # stem Conv2d(2, 4, 1) -> conv Conv2d(4, 6, 3) -> head Conv2d(6, 2, 1), input 5x5.
    # Dense MACs: stem 2*4*25 = 200, conv 4*6*9*9 = 1944, head 6*2*9 = 108.
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Conv2d(4, 6, 3), nn.Conv2d(6, 2, 1))
    tracker = WeightTracker(model, torch.randn(1, 2, 5, 5))
    stem = next(g for g in tracker.groups if g.root_module == "0")
    conv = next(g for g in tracker.groups if g.root_module == "1")
    tracker.fake_prune_units({stem.id: [1], conv.id: [0, 5]})
    values = tracker.graph.evaluation()
    baseline, active = values["layer_baseline_macs"], values["layer_active_macs"]
    assert [_layer(tracker, baseline, n) for n in "012"] == [200, 1944, 108]
    # stem keeps 3/4 outputs; conv keeps 3/4 inputs and 4/6 outputs; head keeps 4/6 inputs
    assert [_layer(tracker, active, n) for n in "012"] == pytest.approx([150, 972, 72])
    assert _layer(tracker, values["layer_active_fraction"], "1") == pytest.approx(0.5)
    # the stem's RGB-like input channels belong to no group: no cost axis, always active
    assert ("0", "in_channel") not in values["cost_model"].axis_names


def test_head_and_head_dim_units_both_cover_qkv_rows():
    # 4 heads of 4 dims; removing head 1 and head dimension 2 leaves 3 heads x 3 dims:
    # 27 of qkv's 48 rows (q, k and v alike) and 9 of proj's 16 inputs
    model = QKVNet()
    tracker = WeightTracker(model, sequence_input(), num_heads={model.attn.qkv: 4}, prune_num_heads=True)
    head = next(g for g in tracker.groups if g.kind == "head")
    head_dim = next(g for g in tracker.groups if g.kind == "head_dim")
    tracker.fake_prune_units({head.id: [1], head_dim.id: [2]})
    values = tracker.graph.evaluation()
    fraction = values["layer_active_fraction"]
    assert _layer(tracker, fraction, "attn.qkv") == pytest.approx(27 / 48)
    assert _layer(tracker, fraction, "attn.proj") == pytest.approx(9 / 16)
    names = values["cost_model"].axis_names
    active = values["cost_axis_active"]
    assert active[names.index(("attn.qkv", "out_channel"))].item() == 27


def test_baseline_is_computed_once_and_leaves_the_model_as_it_was():
    model = TinyConvNet()
    model.train()
    model.bn1.eval()  # a mixed state must come back exactly
    running = model.bn2.running_mean.clone()
    tracker = WeightTracker(model, conv_input())
    handle = tracker.create_tracker(["structured_bops", "unstructured_bops"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            handle.track()
    assert not [w for w in caught if "fvcore" in str(w.filename) or "jit" in str(w.message).lower()]
    assert tracker.graph.compute_counts["layer_macs_by_operator"] == 1
    assert [m.training for m in model.modules()] == [
        True, True, False, True, True, True, True, True
    ]
    assert torch.equal(model.bn2.running_mean, running)


def test_fvcore_messages_are_silenced(caplog):
    tracker = WeightTracker(TinyConvNet(), conv_input())
    with caplog.at_level(logging.WARNING):
        tracker.create_tracker("structured_bops").track()
    assert not [r for r in caplog.records if r.name.startswith("fvcore")]


def test_multihead_attention_is_counted_in_eval_mode():
    # MultiheadAttention(16, 4) on 2 x 5 tokens: in_proj 10*16*48 + out_proj 10*16*16 = 10240,
    # plus the attention products in scaled_dot_product_attention: 2 * 4 heads * 5 * 5 *
    # (4 + 4) = 1600. (Its eval-mode fast path is one fused op fvcore cannot see; it is
    # switched off.)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = Net().eval()
    tracker = WeightTracker(model, torch.randn(2, 5, 16))
    assert _layer(tracker, tracker.graph.evaluation()["layer_baseline_macs"], "attn") == 10240 + 1600
    assert torch.backends.mha.get_fastpath_enabled()
    assert not model.training


def test_attention_products_scale_with_the_attention_width_only():
    # with need_weights=True fvcore also counts the attention bmm, which does not depend on
    # the embedding width: removing embedding channels scales only the projections
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            h = self.embed(x)
            a, _ = self.attn(h, h, h)
            return self.head(h + a)

    inputs = sequence_input()
    model = Net()
    options = {"num_heads": {model.attn: 4}, "prune_num_heads": True}
    tracker = WeightTracker(model, inputs, **options)
    ops = tracker.graph.evaluation()["layer_macs_by_operator"]
    assert any(op != "linear" and value > 0 for op, value in ops[1].items())
    embed = next(g for g in tracker.groups if g.root_module == "embed")
    heads = next(g for g in tracker.groups if g.kind == "head")
    tracker.fake_prune_units({embed.id: [0, 3, 7], heads.id: [2]})
    active = tracker.graph.evaluation()["layer_active_macs"]

    def factory(clone):
        return WeightTracker(clone, inputs, num_heads={clone.attn: 4}, prune_num_heads=True)

    after = fvcore_macs(pruned_copy(model, inputs, factory), inputs)
    for info in tracker.structure.modules:
        assert active[info.index].item() == pytest.approx(after[info.name]), info.name


def test_dict_inputs_and_forward_fn():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, scale=1.0):
            return {"out": self.fc(x) * scale}

    model = Net()
    # 2 x 4 -> 3: 24 MACs either way
    by_dict = WeightTracker(model, {"x": torch.randn(2, 4)}, output_transform=lambda out: out["out"])
    assert by_dict.graph.evaluation()["layer_baseline_macs"].tolist() == [24.0]
    by_fn = WeightTracker(model, (torch.randn(2, 4),), forward_fn=lambda m, xs: m(*xs, scale=2.0)["out"])
    assert by_fn.graph.evaluation()["layer_baseline_macs"].tolist() == [24.0]


class SquaredLinear(nn.Linear):
    """A layer whose (pretend) cost grows with the square of its active inputs."""


def squared_cost(module, baseline_macs, ratios):
    return baseline_macs * ratios.get("in_channel", 1.0) ** 2


class SquaredPlugin:
    @hookimpl
    def wt_register_unit_rules(self):
        return (
            UnitRule(
                name="squared_linear",
                module_types=(SquaredLinear,),
                out_slices=(ParamSlice(param="weight", dim=0), ParamSlice(param="bias", dim=0, role=ParamRole.BIAS)),
                in_slices=(ParamSlice(param="weight", dim=1),),
                cost_fn=squared_cost,
            ),
        )


def test_rule_cost_fn_replaces_the_product():
    model = nn.Sequential(nn.Linear(3, 4), SquaredLinear(4, 2))
    tracker = WeightTracker(model, torch.randn(1, 3), plugins=[SquaredPlugin()])
    group = next(g for g in tracker.groups if g.root_module == "0")
    tracker.fake_prune_units({group.id: [0, 1]})
    active = tracker.graph.evaluation()["layer_active_macs"]
    # SquaredLinear: 8 MACs * (2/4)**2 = 2; the plain Linear: 12 * 2/4 = 6
    assert active.tolist() == pytest.approx([6.0, 2.0])


def test_rule_cost_axes_limit_the_axes_that_count():
    only_out = attrs.evolve(SquaredPlugin().wt_register_unit_rules()[0], cost_fn=None, cost_axes=("out_channel",))

    class Plugin:
        @hookimpl
        def wt_register_unit_rules(self):
            return (only_out,)

    model = nn.Sequential(nn.Linear(3, 4), SquaredLinear(4, 2))
    tracker = WeightTracker(model, torch.randn(1, 3), plugins=[Plugin()])
    group = next(g for g in tracker.groups if g.root_module == "0")
    tracker.fake_prune_units({group.id: [0, 1]})
    values = tracker.graph.evaluation()
    assert ("1", "in_channel") not in values["cost_model"].axis_names
    assert values["layer_active_macs"].tolist() == pytest.approx([6.0, 8.0])
