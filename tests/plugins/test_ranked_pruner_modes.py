"""The ``ranked`` pruner: masks, heads, scopes, options and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
import wt_example.importance
from _unit_oracle import unit_elements
from models import FusedQKVAttention, MHANet, QKVNet, TinyConvNet, conv_input, sequence_input
from test_importances import GroupedNet
from torch import nn

from weighttracker_core import ConfigError, StaleConsumerError, UnknownNameError, WeightTracker
from weighttracker_core.plugin import ParamRole
from weighttracker_plugins.pruners.ranked import RankedPrunerConfig, geometric_scheduler
from weighttracker_plugins.pruners.ranked.unit_masks import has_prune_masks


def weights(member, piece):
    return piece.role is ParamRole.WEIGHT


def lowest(values, k):
    return sorted(sorted(range(len(values)), key=lambda u: values[u])[:k])


def by_group(selections):
    return {s.group_name: sorted(s.units) for s in selections}


# ------------------------------------------------------------------------------ masks


@pytest.mark.slow
def test_mask_mode_on_resnet18_survives_training_and_finalizes():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    x = torch.randn(2, 3, 16, 16)
    physical = copy.deepcopy(model)
    tracker = WeightTracker(model, x)
    pruner = tracker.create_pruner("ranked", pruning_ratio=0.5, ignored_layers=[model.fc], apply="mask")
    selections = pruner.step()
    # the same units a physical run chooses, by group name
    physical_tracker = WeightTracker(physical, x)
    chosen = physical_tracker.create_pruner("ranked", pruning_ratio=0.5, ignored_layers=[physical.fc])
    assert by_group(selections) == by_group(chosen.step())
    masked = {s.group_id: sorted(s.units) for s in selections}
    assert tracker.zero_units() == masked
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
        optimizer.step()
    elements = unit_elements(model, tracker.groups)
    for gid, units in masked.items():
        group = tracker.groups[gid]
        for u in units:
            assert torch.count_nonzero(elements[group.offset + u]) == 0
    assert tracker.zero_units() == masked
    pruner.finalize()
    assert not has_prune_masks(model)
    assert all(not n.endswith("_orig") for n, _ in model.named_parameters())
    assert tracker.zero_units() == masked  # the zeros are baked in
    model.eval()
    before = model(x)
    tracker.prune_zero_units()
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    assert model.layer1[0].conv1.out_channels == 32
    with pytest.raises(StaleConsumerError):  # mask pruners hold unit ids of the old structure
        pruner.step()


def test_physical_mode_refuses_models_with_prune_masks():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    masker = tracker.create_pruner("ranked", pruning_ratio=0.25, ignored_layers=[model.fc], apply="mask")
    masker.step()
    physical = tracker.create_pruner("ranked", pruning_ratio=0.5, ignored_layers=[model.fc])
    shapes = [tuple(p.shape) for p in model.parameters()]
    with pytest.raises(Exception, match="finalize"):
        physical.step()
    assert [tuple(p.shape) for p in model.parameters()] == shapes
    masker.finalize()
    physical.step()
    assert model.conv3.out_channels == 8


def test_iterative_mask_steps_rank_only_live_units():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    pruner = tracker.create_pruner("ranked", pruning_ratio=0.5, iterative_steps=2,
                                   ignored_layers=[model.fc], apply="mask")
    first = by_group(pruner.step())
    second = by_group(pruner.step())
    for name in first:
        assert not set(first[name]) & set(second[name])
    assert {name: len(first[name]) + len(second[name]) for name in first} == {
        "conv3:prune_out_channels": 8, "conv1:prune_out_channels": 4}


# ------------------------------------------------------------------------------ heads


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.a = FusedQKVAttention(16, 4)
        self.b = FusedQKVAttention(16, 4)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.a(h)
        h = h + self.b(h)
        return self.head(h.mean(dim=1))


def _head_l2(model, group):
    elements = unit_elements(model, [group], weights)
    return [float(elements[group.offset + u].double().norm()) for u in range(group.n_units)]


def test_local_head_pruning_removes_the_weakest_heads():
    model = QKVNet()
    tracker = WeightTracker(model, sequence_input(), num_heads={model.attn.qkv: 4}, prune_num_heads=True)
    heads = next(g for g in tracker.groups if g.kind == "head")
    expected = lowest(_head_l2(model, heads), 2)
    pruner = tracker.create_pruner("ranked", pruning_ratio=0.0, head_pruning_ratio=0.5,
                                   ignored_layers=[model.head], apply="mask")
    assert by_group(pruner.step()) == {heads.name: expected}


def test_global_head_pruning_ranks_heads_of_all_layers_together():
    model = TwoBlocks()
    x = sequence_input()
    tracker = WeightTracker(model, x, num_heads={model.a.qkv: 4, model.b.qkv: 4},
                            prune_num_heads=True, prune_head_dims=False)
    heads = [g for g in tracker.groups if g.kind == "head"]
    scores = []
    for group in heads:  # l2 per head, divided by the layer's mean (normalizer="mean")
        norms = _head_l2(model, group)
        scores += [(n / (sum(norms) / len(norms)), group.name, u) for u, n in enumerate(norms)]
    expected: dict[str, list[int]] = {}
    for _, name, unit in sorted(scores)[:4]:
        expected.setdefault(name, []).append(unit)
    pruner = tracker.create_pruner("ranked", pruning_ratio=0.0, head_pruning_ratio=0.5, scope="global",
                                   ignored_layers=[model.head], apply="mask")
    assert by_group(pruner.step()) == {k: sorted(v) for k, v in expected.items()}


def test_physical_head_pruning_matches_the_masked_model():
    model = QKVNet()
    x = sequence_input()
    masked = copy.deepcopy(model)

    def sync(tracker):  # the model keeps its own head count (an integration would do this)
        model.attn.num_heads = model.attn.qkv.out_features // 12

    tracker = WeightTracker(model, x, num_heads={model.attn.qkv: 4}, prune_num_heads=True,
                            prune_head_dims=False, post_prune_hooks=[sync])
    pruner = tracker.create_pruner("ranked", pruning_ratio=0.0, head_pruning_ratio=0.5, ignored_layers=[model.head])
    mask_tracker = WeightTracker(masked, x, num_heads={masked.attn.qkv: 4}, prune_num_heads=True,
                                 prune_head_dims=False)
    mask_pruner = mask_tracker.create_pruner("ranked", pruning_ratio=0.0, head_pruning_ratio=0.5,
                                             ignored_layers=[masked.head], apply="mask")
    assert by_group(pruner.step()) == by_group(mask_pruner.step())
    assert model.attn.num_heads == 2 and model.attn.qkv.out_features == 24
    model.eval()
    masked.eval()
    torch.testing.assert_close(model(x), masked(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- importances


def test_third_party_importance_is_used_without_core_changes():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(), plugins=[wt_example.importance])
    pruner = tracker.create_pruner("ranked", importance="wt_peak", pruning_ratio=0.5,
                                   ignored_layers=[model.fc], apply="mask")
    selections = pruner.step()
    elements = unit_elements(model, tracker.groups)
    for sel in selections:
        group = tracker.structure.group(sel.group_id)
        peaks = [float(elements[group.offset + u].abs().max()) for u in range(group.n_units)]
        assert sorted(sel.units) == lowest(peaks, len(sel.units))
    assert pruner.report()["importance"] == "wt_peak"


def test_taylor_pruning_removes_the_lowest_first_order_terms():
    model = TinyConvNet()
    x = conv_input()
    tracker = WeightTracker(model, x)
    model(x).square().sum().backward()
    terms = unit_elements(model, tracker.groups, weights,
                          read=lambda m, n, p: m.get_submodule(n).get_parameter(p) * m.get_submodule(n).get_parameter(p).grad)
    pruner = tracker.create_pruner("ranked", importance="taylor", pruning_ratio=0.5,
                                   ignored_layers=[model.fc], apply="mask")
    for sel in pruner.step():
        group = tracker.structure.group(sel.group_id)
        values = [float(terms[group.offset + u].abs().sum()) for u in range(group.n_units)]
        assert sorted(sel.units) == lowest(values, len(sel.units))


def test_callable_importance_and_unscorable_groups():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input(), prune_model_outputs=True)
    calls = []

    def by_index(values):  # higher unit ids are more important; the fc group is unscorable
        calls.append(values.structure.version)
        out = torch.arange(values.structure.num_units, dtype=torch.float32)
        fc = next(g for g in values.structure.groups if g.root_module == "fc")
        out[fc.offset : fc.offset + fc.n_units] = float("nan")
        return out

    pruner = tracker.create_pruner("ranked", importance=by_index, pruning_ratio=0.5, apply="mask")
    assert by_group(pruner.step()) == {"conv3:prune_out_channels": list(range(8)),
                                       "conv1:prune_out_channels": [0, 1, 2, 3]}
    assert calls == [0]


def test_bn_scale_prunes_only_groups_with_norm_layers():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    with torch.no_grad():
        model.bn3.weight.copy_(torch.linspace(-1.6, 1.5, 16))
    pruner = tracker.create_pruner("ranked", importance="bn_scale", pruning_ratio=0.25, apply="mask")
    selections = by_group(pruner.step())
    assert "fc:prune_out_channels" not in selections  # no norm layer, not ignored, still left alone
    assert selections["conv3:prune_out_channels"] == lowest(model.bn3.weight.abs().tolist(), 4)


# ---------------------------------------------------------------------- scopes, options


def test_grouped_channels_lose_the_same_positions_in_every_group():
    model = GroupedNet()
    x = conv_input()
    tracker = WeightTracker(model, x)
    stem = next(g for g in tracker.groups if g.root_module == "stem")
    norms = unit_elements(model, [stem], weights)
    per_unit = [float(norms[stem.offset + u].norm()) for u in range(8)]
    slot_means = [(per_unit[s] + per_unit[s + 4]) / 2 for s in range(4)]  # 2 chunks of 4
    pruner = tracker.create_pruner("ranked", pruning_ratio=0.25, ignored_layers=[model.out])
    chosen = by_group(pruner.step())
    slot = lowest(slot_means, 1)[0]
    assert chosen["stem:prune_out_channels"] == [slot, slot + 4]
    assert model.grouped.in_channels == 6 and model.norm.num_channels == 6
    assert model(x).shape == (2, 4)


def test_ignored_layers_and_max_pruning_ratio():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    pruner = tracker.create_pruner("ranked", pruning_ratio=0.9, max_pruning_ratio=0.4,
                                   ignored_layers=[model.fc, model.bn3])
    pruner.step()
    assert model.conv3.out_channels == 16  # bn3 sits on conv3's output side
    assert model.conv1.out_channels == 5  # 8 * (1 - 0.4) = 4.8: at most 40% go
    typed = TinyConvNet()
    typed_tracker = WeightTracker(typed, conv_input(), prune_model_outputs=True)
    typed_tracker.create_pruner("ranked", pruning_ratio=0.5, ignored_layers=[nn.BatchNorm2d]).step()
    assert (typed.conv1.out_channels, typed.conv3.out_channels, typed.fc.out_features) == (8, 16, 2)


def test_geometric_scheduler_and_config_objects():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    config = RankedPrunerConfig(pruning_ratio=0.75, iterative_steps=2, ignored_layers=[model.fc],
                                iterative_pruning_ratio_scheduler=geometric_scheduler, apply="mask")
    pruner = tracker.create_pruner("ranked", config=config)
    # geometric: after step 1 half remains (16 -> 8), after step 2 a quarter (-> 4)
    assert len(by_group(pruner.step())["conv3:prune_out_channels"]) == 8
    assert len(by_group(pruner.step())["conv3:prune_out_channels"]) == 4
    from_dict = tracker.create_pruner("ranked", config={"pruning_ratio": 0.25, "apply": "mask"})
    assert from_dict.config.pruning_ratio == 0.25
    yaml_config = RankedPrunerConfig.from_yaml("pruning_ratio: 0.3\nscope: global\nround_to: 4\n")
    assert (yaml_config.ranking, yaml_config.round_to) == ("global", 4)
    assert yaml_config.as_dict()["pruning_ratio"] == 0.3


@pytest.mark.parametrize("options,message", [
    (dict(pruning_ratio=1.5), "pruning_ratio must be a number in \\[0, 1\\], got 1.5"),
    (dict(max_pruning_ratio=-0.1), "max_pruning_ratio .* got -0.1"),
    (dict(head_pruning_ratio=2), "head_pruning_ratio .* got 2"),
    (dict(pruning_ratio_dict="conv1:1.2"), "got 1.2"),
    (dict(iterative_steps=0), "iterative_steps .* got 0"),
    (dict(round_to=0), "round_to .* got 0"),
    (dict(apply="soft"), "apply must be one of \\['physical', 'mask'\\], got 'soft'"),
    (dict(scope="galactic"), "got 'galactic'"),
    (dict(scope="local", global_pruning=True), "contradicts"),
    (dict(iterative_pruning_ratio_scheduler=lambda r, s: [r]), "returned 1 ratios"),
    (dict(ignored_layers=["fc"]), "got 'fc'"),
])
def test_bad_options_are_value_errors_naming_the_value(options, message):
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    if options.get("pruning_ratio_dict") == "conv1:1.2":
        options = dict(pruning_ratio_dict={model.conv1: 1.2})
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=message) as info:
        tracker.create_pruner("ranked", **options)
    assert isinstance(info.value, ValueError)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unknown_importance_lists_the_installed_ones():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    with pytest.raises(UnknownNameError, match=r"No importance named 'l3'.*Installed importances:") as info:
        tracker.create_pruner("ranked", importance="l3")
    assert all(name in str(info.value) for name in ("bn_scale", "l1", "l2", "taylor"))
    with pytest.raises(ConfigError, match="config=.*or keyword"):
        tracker.create_pruner("ranked", config={"pruning_ratio": 0.2}, pruning_ratio=0.3)
    with pytest.raises(ConfigError, match="Unknown option.*'ratio'"):
        tracker.create_pruner("ranked", config={"ratio": 0.2})
    outsider = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="not part of the model"):
        tracker.create_pruner("ranked", pruning_ratio_dict={outsider: 0.5})
    with pytest.raises(ConfigError, match="not part of the model"):
        tracker.create_pruner("ranked", ignored_layers=[outsider])


def test_multihead_attention_physical_pruning_matches_the_masked_model():
    model = MHANet()
    x = sequence_input()
    masked = copy.deepcopy(model)
    options = dict(pruning_ratio=0.25, head_pruning_ratio=0.5)
    tracker = WeightTracker(model, x, num_heads={model.attn: 4}, prune_num_heads=True)
    physical = tracker.create_pruner("ranked", ignored_layers=[model.head], **options)
    mask_tracker = WeightTracker(masked, x, num_heads={masked.attn: 4}, prune_num_heads=True)
    mask = mask_tracker.create_pruner("ranked", ignored_layers=[masked.head], apply="mask", **options)
    chosen = by_group(physical.step())
    assert chosen == by_group(mask.step())
    assert len(chosen["attn:prune_num_heads"]) == 2 and len(chosen["attn:prune_head_dims"]) == 1
    model.eval()
    masked.eval()
    torch.testing.assert_close(model(x), masked(x), rtol=1e-4, atol=1e-5)
