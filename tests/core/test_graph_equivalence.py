"""Canonical groups couple exactly the modules and axes of Torch-Pruning's own groups."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from models import MHANet, sequence_input
from plugin_managers import core_plugin_manager as PM
from weighttracker_core import PruneAxis, WeightTracker

ROOTS = (nn.modules.conv._ConvNd, nn.Linear)


def tp_groups(model, example_inputs):
    """``{root name: (n_units, {(module or param name, axis)})}`` straight from the graph."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    params = {p: n for n, p in model.named_parameters()}
    out = {}
    for group in graph.get_all_groups(root_module_types=ROOTS):
        root = group[0].dep.target.module
        coupled = set()
        for item in group.items:
            target = item.dep.target.module
            is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
            is_in = graph.is_in_channel_pruning_fn(item.dep.handler)
            axis = "feature" if is_out and is_in else ("out_channel" if is_out else "in_channel")
            if isinstance(target, nn.Parameter):
                coupled.add((params[target].rpartition(".")[0], "feature"))
            elif isinstance(target, nn.Module) and target in names:
                coupled.add((names[target], axis))
        out[f"{names[root]}:{group[0].dep.handler.__name__}"] = (len(group[0].idxs), coupled)
    return out


def ours(tracker):
    return {
        g.name: (g.n_units, {(m.module_name, str(m.axis)) for m in g.members}) for g in tracker.groups
    }


def _assert_same(model, x, **kwargs):
    reference = tp_groups(model, x)
    # Torch-Pruning also groups the classifier's outputs: compare with them as units
    tracker = WeightTracker(model, x, plugin_manager=PM(), prune_model_outputs=True, **kwargs)
    mine = ours(tracker)
    assert set(mine) == set(reference)
    for name, (n_units, coupled) in reference.items():
        assert mine[name][0] == n_units, name
        assert mine[name][1] == coupled, name
    return tracker


@pytest.mark.parametrize(
    "factory",
    [torchvision.models.resnet18, torchvision.models.resnet50, torchvision.models.mobilenet_v2],
    ids=["resnet18", "resnet50", "mobilenet_v2"],
)
def test_torchvision_groups_match_torch_pruning(factory):
    _assert_same(factory(), torch.randn(1, 3, 32, 32))


def test_multihead_attention_groups_match_torch_pruning():
    model = MHANet()
    tracker = _assert_same(model, sequence_input(), prune_head_dims=False)  # heads: extra groups
    mha = [m for g in tracker.groups for m in g.members if m.module_name == "attn"]
    assert mha and all(m.axis is PruneAxis.FEATURE for m in mha)


def test_multihead_attention_heads_are_extra_groups():
    model = MHANet(dim=16, heads=4)
    tracker = WeightTracker(model, sequence_input(), num_heads={model.attn: 4},
                            prune_num_heads=True, prune_head_dims=True, plugin_manager=PM())
    by_name = {g.name: g for g in tracker.groups}
    assert by_name["attn:prune_num_heads"].n_units == 4
    assert by_name["attn:prune_head_dims"].n_units == 4
    reference = tp_groups(model, sequence_input())
    assert set(by_name) - set(reference) == {"attn:prune_num_heads", "attn:prune_head_dims"}


def test_vit_groups_match_torch_pruning_with_heads():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    reference = tp_groups(model, x)
    heads = {b.attn.qkv: b.attn.num_heads for b in model.blocks}
    tracker = WeightTracker(model, x, num_heads=heads, prune_num_heads=True,
                            prune_head_dims=True, plugin_manager=PM(), prune_model_outputs=True)
    mine = ours(tracker)
    qkv_roots = {f"blocks.{i}.attn.qkv:prune_out_channels" for i in range(len(model.blocks))}
    for name, (n_units, coupled) in reference.items():
        if name in qkv_roots:
            root = name.split(":")[0]
            block = model.get_submodule(root.rpartition(".")[0])
            for suffix, expected in (("prune_num_heads", block.num_heads),
                                     ("prune_head_dims", block.head_dim)):
                assert mine[f"{root}:{suffix}"] == (expected, coupled)
        else:
            assert mine[name] == (n_units, coupled), name
    assert len(tracker.groups) == len(reference) + len(qkv_roots)


def test_member_indices_match_torch_pruning_on_resnet18():
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 32, 32)
    graph = tp.DependencyGraph().build_dependency(model, x, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    tracker = WeightTracker(model, x, plugin_manager=PM(), prune_model_outputs=True)
    by_name = {g.name: g for g in tracker.groups}
    for group in graph.get_all_groups(root_module_types=ROOTS):
        root = group[0].dep.target.module
        mine = by_name[f"{names[root]}:{group[0].dep.handler.__name__}"]
        expected = {
            (names[item.dep.target.module], tuple(item.idxs), tuple(item.root_idxs))
            for item in group.items if item.dep.target.module in names
        }
        assert {(m.module_name, m.tp_indices, m.tp_units) for m in mine.members} == expected
