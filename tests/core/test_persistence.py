"""Pruning records: ``tracker.pruning_record()`` and ``apply_pruning_record``.

Oracles: the outputs and ``state_dict`` of the model that was pruned in the first place
(in another process for ResNet-18 and a timm ViT), the model state captured before a
refused call, and records damaged by hand.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from models import TinyConvNet, conv_input
from torch import nn

from weighttracker_core import (
    ConfigError,
    PruningError,
    WeightTracker,
    apply_pruning_record,
)


def state(model):
    return {k: (v.detach().clone(), v.dtype) for k, v in model.state_dict().items()}


def hooks(model):
    return [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for n, m in model.named_modules()]


def assert_unchanged(model, before_state, before_hooks):
    now = state(model)
    assert list(now) == list(before_state)
    for key, (value, dtype) in before_state.items():
        assert now[key][1] == dtype and torch.equal(now[key][0], value), key
    assert hooks(model) == before_hooks


def pruned_convnet():
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    tracker = WeightTracker(model, conv_input())
    ids = {g.name: g.id for g in tracker.groups}
    tracker.prune_units({ids["conv1:prune_out_channels"]: [1, 4]})
    ids = {g.name: g.id for g in tracker.groups}  # ids may move; names do not
    tracker.prune_units({ids["conv3:prune_out_channels"]: [0, 2, 3],
                         ids["conv1:prune_out_channels"]: [5]})
    return model, tracker


def fresh_convnet():
    torch.manual_seed(1)  # other weights: the record must not depend on them
    return TinyConvNet().eval()


# ----------------------------------------------------------------------------- records


def test_record_is_json_and_lists_every_prune_in_order():
    model, tracker = pruned_convnet()
    record = tracker.pruning_record()
    assert json.loads(json.dumps(record)) == record
    assert [p["units"] for p in record["prunes"]] == [
        {"conv1:prune_out_channels": [1, 4]},
        {"conv3:prune_out_channels": [0, 2, 3], "conv1:prune_out_channels": [5]},
    ]
    assert record["prunes"][-1]["params_after"] == sum(p.numel() for p in model.parameters())
    # the fingerprint describes the dense model, not the pruned one
    dense = dict(TinyConvNet().named_parameters())
    assert record["fingerprint"]["parameters"] == [[n, list(p.shape)] for n, p in dense.items()]
    assert record["fingerprint"]["model"] == "models.TinyConvNet"
    groups = {g["name"]: g["n_units"] for g in record["fingerprint"]["groups"]}
    assert groups["conv1:prune_out_channels"] == 8 and groups["conv3:prune_out_channels"] == 16


def test_dry_runs_failed_prunes_and_empty_prunes_are_not_recorded():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    tracker.prune_units({0: [0]}, dry_run=True)
    tracker.prune_zero_units()  # nothing is zero
    with pytest.raises(PruningError):
        tracker.prune_units({0: list(range(tracker.groups[0].n_units))})
    assert tracker.pruning_record()["prunes"] == []


def test_replay_rebuilds_the_pruned_architecture_and_the_checkpoint_loads():
    model, tracker = pruned_convnet()
    record = json.loads(json.dumps(tracker.pruning_record()))
    fresh = fresh_convnet()
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(model.state_dict())  # why the record is needed
    again = apply_pruning_record(fresh, conv_input(), record)
    fresh.load_state_dict(model.state_dict())
    x = conv_input(batch=3)
    assert torch.equal(fresh(x), model(x))
    assert again.pruning_record() == record
    # the tracker keeps recording: a later prune extends the same record
    again.prune_units({0: [0]})
    assert again.pruning_record()["prunes"][:2] == record["prunes"]
    assert len(again.pruning_record()["prunes"]) == 3


def test_prunes_of_the_ranked_pruner_are_recorded():
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    tracker = WeightTracker(model, conv_input())
    pruner = tracker.create_pruner("ranked", pruning_ratio=0.5, iterative_steps=2,
                                   ignored_layers=[model.fc])
    pruner.step()
    pruner.step()
    record = tracker.pruning_record()
    assert len(record["prunes"]) == 2
    fresh = fresh_convnet()
    apply_pruning_record(fresh, conv_input(), record)
    fresh.load_state_dict(model.state_dict())
    x = conv_input()
    assert torch.equal(fresh(x), model(x))


def test_ignored_layers_default_to_those_of_the_record():
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    tracker = WeightTracker(model, conv_input(), ignored_layers=[model.conv2])
    tracker.prune_units({0: [0]})
    record = tracker.pruning_record()
    assert record["options"]["ignored_layers"] == ["conv2"]
    fresh = fresh_convnet()
    again = apply_pruning_record(fresh, conv_input(), record)
    assert [g.name for g in again.groups] == [g.name for g in tracker.groups]


# ---------------------------------------------------------------------------- refusals


class Wider(TinyConvNet):
    def __init__(self):
        super().__init__()
        self.conv3 = nn.Conv2d(8, 24, 3, padding=1, stride=2)
        self.bn3 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 5)


@pytest.mark.parametrize("build, message", [
    (lambda: TinyConvNet(classes=7), r"parameter 'fc\.weight' has shape 7x16 here, 5x16 in the record"),
    (Wider, r"the record is for a models\.TinyConvNet, this model is a .*Wider"),
])
def test_a_record_for_another_model_is_refused_naming_the_first_difference(build, message):
    _, tracker = pruned_convnet()
    record = tracker.pruning_record()
    other = build().eval()
    before, before_hooks = state(other), hooks(other)
    with pytest.raises(ConfigError, match=message):
        apply_pruning_record(other, conv_input(), record)
    assert_unchanged(other, before, before_hooks)
    torch.save(other, __import__("io").BytesIO())  # nothing unpicklable left behind


def test_a_different_group_is_named():
    _, tracker = pruned_convnet()
    record = tracker.pruning_record()
    record["fingerprint"]["groups"][1]["n_units"] += 1
    with pytest.raises(ConfigError, match=r"group 1 \(.*\) has n_units \d+ here, \d+ in the record"):
        apply_pruning_record(fresh_convnet(), conv_input(), record)


def _damaged(change):
    _, tracker = pruned_convnet()
    record = copy.deepcopy(tracker.pruning_record())
    change(record)
    return record


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(format="something else"), r"record\['format'\] is 'something else'"),
    (lambda r: r.update(version=99), r"version 99 cannot be read"),
    (lambda r: r.update(prunes={"a": 1}), r"record\['prunes'\] must be a list"),
    (lambda r: r["prunes"][0].update(units={"conv1:prune_out_channels": ["1"]}), r"Prune 1 .* damaged"),
    (lambda r: r["prunes"][1]["units"].update({"nope:prune_out_channels": [0]}),
     r"Prune 2 .*group 'nope:prune_out_channels', which the model does not have"),
    (lambda r: r["prunes"][1]["units"].update({"conv1:prune_out_channels": [5, 6]}),
     r"Prune 2 .*units \[5, 6\] of group 'conv1:prune_out_channels', which has 6 units"),
    (lambda r: r["prunes"][0]["units"].update({"conv1:prune_out_channels": list(range(8))}),
     r"at least one must stay"),
])
def test_damaged_records_are_refused_before_anything_changes(change, message):
    record = _damaged(change)
    model = fresh_convnet()
    before, before_hooks = state(model), hooks(model)
    with pytest.raises(ConfigError, match=message):
        apply_pruning_record(model, conv_input(), record)
    assert_unchanged(model, before, before_hooks)


def test_not_a_record():
    with pytest.raises(ConfigError, match="A pruning record is a dict .* got list"):
        apply_pruning_record(fresh_convnet(), conv_input(), [])


def test_a_replay_that_does_not_give_the_recorded_model_is_undone():
    record = _damaged(lambda r: r["prunes"][1].update(params_after=1))
    model = fresh_convnet()
    before, before_hooks = state(model), hooks(model)
    with pytest.raises(PruningError, match=r"prune 2 of the record .* restored unchanged"):
        apply_pruning_record(model, conv_input(), record)
    assert_unchanged(model, before, before_hooks)


def test_head_options_mismatch_names_the_option_and_the_advice_works():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    def vit():
        torch.manual_seed(0)
        return VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=3,
                                 num_classes=4).eval()

    x = torch.randn(2, 3, 16, 16)
    model = vit()
    tracker = WeightTracker(model, x, prune_num_heads=True)
    heads = next(g for g in tracker.groups if g.kind == "head")
    tracker.prune_units({heads.id: [2]})
    record = tracker.pruning_record()
    fresh = vit()
    with pytest.raises(ConfigError, match=r"made with prune_num_heads=True .*pass the same") as err:
        apply_pruning_record(fresh, x, record, prune_num_heads=False)
    assert "apply_pruning_record(model, example_inputs, record, ...)" in str(err.value)
    assert timm  # the advice, followed:
    apply_pruning_record(fresh, x, record, prune_num_heads=True)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))


# -------------------------------------------------------------- across two processes

_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    import torchvision
    from timm.models.vision_transformer import VisionTransformer
    from weighttracker_core import WeightTracker, apply_pruning_record

    torch.set_num_threads(1)
    mode, folder = sys.argv[1], Path(sys.argv[2])

    def resnet():
        return torchvision.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 64, 64)

    def vit():
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                  num_classes=5).eval()
        return model, torch.randn(2, 3, 32, 32)

    MODELS = {"resnet18": (resnet, {}), "vit": (vit, {"prune_num_heads": True})}

    for name, (build, options) in MODELS.items():
        if mode == "save":
            torch.manual_seed(0)
            model, x = build()
            tracker = WeightTracker(model, x, **options)
            for round_ in range(2):  # two prunes: ids of later prunes are numbered anew
                request = {}
                for group in tracker.groups:
                    if group.root_module in ("fc", "head"):
                        continue  # the classes stay
                    if group.kind == "head":
                        request[group.id] = [round_]
                    elif group.n_units > 4:
                        request[group.id] = list(range(round_, group.n_units, 5))
                tracker.prune_units(request)
            torch.save(model.state_dict(), folder / f"{name}.pt")
            (folder / f"{name}.json").write_text(json.dumps(tracker.pruning_record()))
            torch.save((x, model(x)), folder / f"{name}.io.pt")
        else:
            torch.manual_seed(123)  # other dense weights
            model, _ = build()
            record = json.loads((folder / f"{name}.json").read_text())
            apply_pruning_record(model, torch.zeros_like(torch.load(folder / f"{name}.io.pt")[0]), record)
            model.load_state_dict(torch.load(folder / f"{name}.pt"))
            x, expected = torch.load(folder / f"{name}.io.pt")
            assert torch.equal(model(x), expected), name
            dense = sum(p.numel() for p in build()[0].parameters())
            print(name, "identical", dense, "->", sum(p.numel() for p in model.parameters()))
''')


@pytest.mark.slow
def test_pruned_resnet18_and_vit_saved_in_one_process_load_in_another(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    script = tmp_path / "roundtrip.py"
    script.write_text(_SCRIPT)
    for mode in ("save", "load"):
        result = subprocess.run([sys.executable, str(script), mode, str(tmp_path)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["resnet18", "identical"], ["vit", "identical"]]
    for line in lines:
        dense, pruned = int(line.split()[2]), int(line.split()[4])
        assert pruned < dense


def test_missing_num_heads_is_named_and_the_advice_works():
    # a fused qkv projection needs num_heads (nn.MultiheadAttention would be read off the module)
    from models import QKVNet, sequence_input

    torch.manual_seed(0)
    model = QKVNet().eval()
    x = sequence_input()

    def sync(tracker):
        tracker.model.attn.num_heads = 4 - len(tracker.pruned_units.get("attn.qkv:prune_num_heads", []))

    tracker = WeightTracker(model, x, num_heads={model.attn.qkv: 4}, prune_num_heads=True,
                            post_prune_hooks=[sync])
    heads = next(g for g in tracker.groups if g.kind == "head")
    tracker.prune_units({heads.id: [1]})
    record = tracker.pruning_record()
    fresh = QKVNet().eval()
    with pytest.raises(ConfigError, match=r"made with num_heads=\{'attn.qkv': 4\}"):
        apply_pruning_record(fresh, x, record, num_heads={fresh.attn.qkv: 2})
    apply_pruning_record(fresh, x, record, num_heads={fresh.attn.qkv: 4},
                         post_prune_hooks=[sync])  # the advice
    other = QKVNet().eval()
    apply_pruning_record(other, x, record, post_prune_hooks=[sync])  # num_heads from the record
    assert other.attn.qkv.out_features == fresh.attn.qkv.out_features == 36
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
