"""Canonical groups couple exactly the modules and axes that Torch-Pruning's own pruning cuts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from models import MHANet, sequence_input
from plugin_managers import core_plugin_manager as PM
from weighttracker_core import PruneAxis, WeightTracker

ROOTS = (nn.modules.conv._ConvNd, nn.Linear)


def _shapes(model):
    """``{module name: {own parameter name: shape}}``."""
    return {
        name: {p: tuple(t.shape) for p, t in module.named_parameters(recurse=False)}
        for name, module in model.named_modules()
    }


def _axis(module, before, after):
    """The axis a prune cut ``module`` on, read off its parameter shapes alone.

    Convolutions and linear layers: ``out_channel`` when only dim 0 of the weight shrank,
    ``in_channel`` when only dim 1 did; every other layer (norms, depthwise convolutions,
    attention, containers with their own parameters) changed as a whole: ``feature``.
    """
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and "weight" in before:
        changed = [d for d, (b, a) in enumerate(zip(before["weight"], after["weight"])) if b != a]
        depthwise = isinstance(module, nn.modules.conv._ConvNd) and before["weight"][1] == 1 and module.groups > 1
        if changed == [0] and not depthwise:
            return "out_channel"
        if changed == [1]:
            return "in_channel"
    return "feature"


def tp_groups(model, example_inputs):
    """``{group name: (n_units, {(module, axis)})}`` from Torch-Pruning's own pruning.

    For every group Torch-Pruning finds, channel 0 is pruned physically (on a copy, one group
    after the other) and the coupled layers are the ones whose parameter shapes changed; the
    axis comes from which dimensions shrank. A layer inside a pruned ``nn.MultiheadAttention``
    (its ``out_proj``) is pruned by the attention itself and not listed separately.
    """
    model = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    roots = [(group[0].dep.target.module, group[0].dep.handler)
             for group in graph.get_all_groups(root_module_types=ROOTS)]
    out = {}
    for root, handler in roots:
        before = _shapes(model)
        size = handler.__self__.get_out_channels(root)
        graph.get_pruning_group(root, handler, idxs=[0]).prune()
        after = _shapes(model)
        changed = {n for n in before if before[n] != after[n]}
        attention = {n for n in changed if isinstance(model.get_submodule(n), nn.MultiheadAttention)}
        coupled = {
            (n, _axis(model.get_submodule(n), before[n], after[n])) for n in changed
            if not any(n.startswith(a + ".") for a in attention)
        }
        out[f"{names[root]}:{handler.__name__}"] = (size, coupled)
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
