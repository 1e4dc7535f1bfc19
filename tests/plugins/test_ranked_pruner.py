"""The ``ranked`` pruner against Torch-Pruning's own BasePruner and brute-force rankings."""

from __future__ import annotations

import copy
import warnings

import attrs
import pytest
import torch
import torch_pruning as tp
import torchvision
from _unit_oracle import unit_elements
from models import TinyConvNet, conv_input

from weighttracker_core import WeightTracker
from weighttracker_core.plugin import ParamRole, ReductionPlan

X64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def shapes(model):
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def torch_pruning_reference(model, **options):
    """Torch-Pruning's MagnitudePruner(p=2) run on ``model`` (a deepcopy), its ``fc`` ignored."""
    tp.pruner.MagnitudePruner(
        model, X64, importance=tp.importance.MagnitudeImportance(p=2), ignored_layers=[model.fc],
        **options).step()
    return model


def test_local_l2_half_matches_torch_pruning_on_resnet18():
    model = torchvision.models.resnet18(weights=None)
    reference = torch_pruning_reference(copy.deepcopy(model), pruning_ratio=0.5)
    tracker = WeightTracker(model, X64)
    pruner = tracker.create_pruner("ranked", importance="l2", pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    assert shapes(model) == shapes(reference)
    assert param_count(model) == param_count(reference)
    # the same channels were kept, not only as many
    for (name, ours), (_, theirs) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(ours, theirs), name
    assert model(X64).shape == (1, 1000)


def _ratio_dict(model, kind):
    if kind == "layers":
        return {model.layer2: 0.2, model.layer3[0].conv1: 0.8}
    return {(model.layer2, model.layer3): 0.3}


@pytest.mark.parametrize("case", [
    dict(pruning_ratio=0.3, round_to=8),
    dict(pruning_ratio=0.5, iterative_steps=5),
    dict(pruning_ratio=0.6, iterative_steps=3, global_pruning=True),
    dict(pruning_ratio=0.5, pruning_ratio_dict="layers"),
    dict(pruning_ratio=0.5, pruning_ratio_dict="tuple", global_pruning=True),
], ids=["round_to", "iterative", "global_iterative", "ratio_dict", "shared_scope"])
def test_options_match_torch_pruning_on_resnet18(case):
    model = torchvision.models.resnet18(weights=None)
    reference = copy.deepcopy(model)
    ours, theirs = dict(case), dict(case)
    if "pruning_ratio_dict" in case:
        ours["pruning_ratio_dict"] = _ratio_dict(model, case["pruning_ratio_dict"])
        theirs["pruning_ratio_dict"] = _ratio_dict(reference, case["pruning_ratio_dict"])
    steps = case.get("iterative_steps", 1)
    theirs.pop("iterative_steps", None)
    tp_pruner = tp.pruner.MagnitudePruner(
        reference, X64, importance=tp.importance.MagnitudeImportance(p=2),
        ignored_layers=[reference.fc], iterative_steps=steps, **theirs)
    tracker = WeightTracker(model, X64)
    # Torch-Pruning ranks by the sum of squares; across groups that is l2 ** 2
    pruner = tracker.create_pruner("ranked", importance="l2", importance_options={"power": 2},
                                   ignored_layers=[model.fc], **ours)
    first = {g.name: g.n_units for g in tracker.groups}
    for step in range(steps):
        pruner.step()
        tp_pruner.step()
        assert shapes(model) == shapes(reference), f"after step {step + 1}"
    if case.get("round_to"):
        for group in tracker.groups:
            if group.n_units != first[group.name]:
                assert group.n_units % 8 == 0, group.name
        assert {tuple(p.shape)[0] % 8 for n, p in model.named_parameters() if "conv" in n} == {0}
    if steps > 1 and not case.get("global_pruning"):
        # local scopes reach the target on the last step, exactly
        for group in tracker.groups:
            if group.root_module != "fc":
                assert group.n_units == int(first[group.name] * (1 - case["pruning_ratio"])), group.name
    assert model(X64).shape == (1, 1000)


def test_iterative_steps_follow_the_linear_schedule_and_stop():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    pruner = tracker.create_pruner("ranked", pruning_ratio=0.5, iterative_steps=4, ignored_layers=[model.fc])
    first = {g.name: g.n_units for g in tracker.groups if g.root_module != "fc"}
    for step in range(1, 5):
        pruner.step()
        now = {g.name: g.n_units for g in tracker.groups if g.root_module != "fc"}
        # after step s: int(n * (1 - 0.5 * s / 4)) units remain (16 -> 14, 12, 10, 8)
        assert now == {name: int(n * (1 - 0.5 * step / 4)) for name, n in first.items()}
    with pytest.warns(UserWarning, match="already took all 4 steps"):
        assert pruner.step() == []
    assert {g.name: g.n_units for g in tracker.groups if g.root_module != "fc"} == {
        name: n // 2 for name, n in first.items()}


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["global", "isomorphic"])
def test_global_and_isomorphic_match_torch_pruning_on_resnet50(scope):
    model = torchvision.models.resnet50(weights=None)
    reference = torch_pruning_reference(copy.deepcopy(model), pruning_ratio=0.5, global_pruning=True,
                                        isomorphic=scope == "isomorphic")
    tracker = WeightTracker(model, X64)
    pruner = tracker.create_pruner("ranked", importance="l2", importance_options={"power": 2},
                                   pruning_ratio=0.5, ignored_layers=[model.fc], scope=scope)
    pruner.step()
    assert shapes(model) == shapes(reference)
    assert model(X64).shape == (1, 1000)


def _vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    heads = {block.attn.qkv: block.attn.num_heads for block in model.blocks}
    return model, heads


def _tp_vit_widths(model, heads, scope):
    with warnings.catch_warnings():  # Torch-Pruning warns about cls_token / pos_embed dims
        warnings.simplefilter("ignore")
        tp.pruner.MagnitudePruner(
            model, X64, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
            ignored_layers=[model.head], global_pruning=scope != "local",
            isomorphic=scope == "isomorphic", num_heads=heads, prune_head_dims=True).step()
    widths = {"embed": model.patch_embed.proj.out_channels}
    for i, block in enumerate(model.blocks):
        widths[f"blocks.{i}.mlp.fc1"] = block.mlp.fc1.out_features
        widths[f"blocks.{i}.attn.head_dim"] = block.attn.qkv.out_features // (3 * block.attn.num_heads)
    return widths


def _our_vit_widths(tracker, selections):
    removed = {s.group_name: len(s.units) for s in selections}
    widths = {}
    for group in tracker.groups:
        left = group.n_units - removed.get(group.name, 0)
        if group.kind == "head_dim":
            widths[group.root_module.replace(".qkv", ".head_dim")] = left
        elif group.root_module.endswith("mlp.fc1"):
            widths[group.root_module] = left
        elif any(m.module_name == "patch_embed.proj" for m in group.members):
            widths["embed"] = left
    return widths


def _layer_weights_only(tracker):
    """l2 ** 2 over conv/linear/norm weights only: what Torch-Pruning's importance reads
    (it skips cls_token / pos_embed, which are part of our embedding units)."""
    structure = tracker.structure
    groups = [
        attrs.evolve(g, members=tuple(
            attrs.evolve(m, slices=tuple(s for s in m.slices if s.role is ParamRole.WEIGHT))
            for m in g.members if m.module_name in structure.module_index))
        for g in structure.groups
    ]
    plan = ReductionPlan(groups, structure.resolver)

    def score(values):
        return plan.unit_reduce("sum_sq")

    return score


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["local", "global", "isomorphic"])
def test_vit_scopes_match_torch_pruning(scope):
    model, heads = _vit()
    reference = copy.deepcopy(model)
    reference_heads = {block.attn.qkv: block.attn.num_heads for block in reference.blocks}
    tracker = WeightTracker(model, X64, num_heads=heads, integrations=None)
    importance = _layer_weights_only(tracker) if scope == "global" else "l2"
    options = {"importance_options": {"power": 2}} if scope != "global" else {}
    pruner = tracker.create_pruner("ranked", importance=importance, pruning_ratio=0.5,
                                   ignored_layers=[model.head], scope=scope, apply="mask", **options)
    selections = pruner.step()
    assert _our_vit_widths(tracker, selections) == _tp_vit_widths(reference, reference_heads, scope)
    masked = {}
    for s in selections:
        masked.setdefault(s.group_id, []).extend(s.units)
    assert tracker.zero_units() == {gid: sorted(units) for gid, units in masked.items()}
    assert model(X64).shape == (1, 1000)


def test_interactive_selections_can_be_inspected_and_applied_one_by_one():
    model = TinyConvNet()
    x = conv_input()
    tracker = WeightTracker(model, x)
    pruner = tracker.create_pruner("ranked", pruning_ratio=0.5, ignored_layers=[model.fc], iterative_steps=2)
    selections = list(pruner.step(interactive=True))
    assert {s.group_name for s in selections} == {"conv1:prune_out_channels", "conv3:prune_out_channels"}
    assert tracker.structure.version == 0 and not any(s.applied for s in selections)
    conv3 = next(s for s in selections if s.group_name.startswith("conv3"))
    group = tracker.structure.group(conv3.group_id)
    assert conv3.n_units == 16 and len(conv3.units) == 16 - int(16 * 0.75)
    assert conv3.tp_indices == tuple(group.root_member.indices_of(set(conv3.units)))
    assert conv3.modules == ("conv3", "bn3", "fc") and conv3.kind == "channel"
    # the chosen units are the lowest l2 norms of the group (brute force over its slices)
    norms = unit_elements(model, [group], lambda m, p: p.role is ParamRole.WEIGHT)
    ranked = sorted(range(16), key=lambda u: float(norms[group.offset + u].norm()))
    assert sorted(conv3.units) == sorted(ranked[:4])
    conv3.apply()
    conv3.apply()  # a second call does nothing
    assert model.conv3.out_channels == 12 and model.conv1.out_channels == 8
    assert tracker.structure.version == 1
    other = next(s for s in selections if s is not conv3)
    other.apply()  # resolved by name in the rebuilt structure
    assert model.conv1.out_channels == 6
    pruner.step()  # the pruner survives physical prunes
    assert (model.conv1.out_channels, model.conv3.out_channels) == (4, 8)
    assert pruner.report()["removed_units"] == {"conv3:prune_out_channels": 8, "conv1:prune_out_channels": 4}
    assert model(x).shape == (2, 5)
