"""structured_bops (SPEC §5.1): per-module BOPs of a fake-pruned model equal fvcore's MACs
of the physically pruned copy times the bit-widths."""

from __future__ import annotations

import pytest
import torch
import torchvision
from _cost_oracle import fake_prune_randomly, fvcore_macs, pruned_copy
from models import CatNet, MHANet, QKVNet, TinyConvNet, conv_input, sequence_input
from torch import nn

from weighttracker_core import ConfigError, StaleConsumerError, TrackerType, WeightTracker


def weight_bits(name, module):
    # non-trivial: 1x1 convs at 4 bits, other convs 8, linear layers 6, attention 5
    if isinstance(module, nn.Conv2d):
        return 4 if module.kernel_size == (1, 1) else 8
    return 5 if isinstance(module, nn.MultiheadAttention) else 6


def activation_bits(name, module):
    return 2 + len(name) % 7


def _check_against_pruned_copy(model, inputs, sync=None, **options):
    """``sync(clone, zero_units)`` optionally returns a post-prune hook for the copy."""
    def build(m, **extra):
        return WeightTracker(m, inputs, weight_bitwidth_fn=weight_bits,
                             activation_bitwidth_fn=activation_bits, **{**options, **extra})

    baseline = fvcore_macs(model, inputs)
    model.train()
    tracker = build(model)
    handle = tracker.create_tracker("structured_bops", log_total_bops=True, log_layerwise_stats=True)
    dense = handle.track()["structured_bops"]
    assert dense["compression"] == pytest.approx(1 - dense["bops"] / dense["baseline"])
    chosen = fake_prune_randomly(tracker)
    assert chosen
    metrics = handle.track()["structured_bops"]
    assert metrics["bops"] < dense["bops"]

    def copy_factory(clone):
        extra = {}
        if "num_heads" in options:
            names = {m: n for n, m in model.named_modules()}
            extra["num_heads"] = {clone.get_submodule(names[m]): h for m, h in options["num_heads"].items()}
        if sync is not None:
            extra["post_prune_hooks"] = (sync(clone, build(clone, **extra).zero_units()),)
        return build(clone, **extra)

    clone = pruned_copy(model, inputs, copy_factory)
    after = fvcore_macs(clone, inputs)
    assert set(metrics["modules"]) == {
        info.name for info in tracker.structure.modules if info.category == "weighted"
    }
    total = total_baseline = 0.0
    for name, stats in metrics["modules"].items():
        module = clone.get_submodule(name)
        bits = weight_bits(name, module) * activation_bits(name, module)
        assert stats["bops"] == pytest.approx(after.get(name, 0) * bits, rel=1e-9, abs=1e-6), name
        assert stats["baseline"] == pytest.approx(baseline.get(name, 0) * 32 * 32, rel=1e-12), name
        total += after.get(name, 0) * bits
        total_baseline += baseline.get(name, 0) * 32 * 32
    assert metrics["bops"] == pytest.approx(total, rel=1e-9)
    assert metrics["baseline"] == pytest.approx(total_baseline, rel=1e-12)
    assert metrics["compression"] == pytest.approx(1 - total / total_baseline, rel=1e-9)


def test_resnet18_matches_pruned_copy():
    _check_against_pruned_copy(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32))


def test_mobilenet_v2_matches_pruned_copy():
    # depthwise convolutions: input and output channel are one cost axis
    _check_against_pruned_copy(torchvision.models.mobilenet_v2(num_classes=10), torch.randn(1, 3, 32, 32))


def test_concat_matches_pruned_copy():
    # merge's input channels 0..3 come from `left`, 4..8 from `right`
    _check_against_pruned_copy(CatNet(), conv_input())


def test_multihead_attention_matches_pruned_copy():
    # embedding channels, heads and head dimensions of nn.MultiheadAttention
    model = MHANet()
    _check_against_pruned_copy(model, sequence_input(), num_heads={model.attn: 4}, prune_num_heads=True)


def test_fused_qkv_heads_match_pruned_copy():
    # a qkv row is active only while its head unit and its head-dim unit both are
    model = QKVNet()

    def sync(clone, zero_units):
        # the test model reads num_heads in forward: keep it in step with removed heads
        tracker = WeightTracker(clone, sequence_input(), num_heads={clone.attn.qkv: 4}, prune_num_heads=True)
        head = next(g for g in tracker.groups if g.kind == "head")
        kept = head.n_units - len(zero_units.get(head.id, []))
        return lambda _: setattr(clone.attn, "num_heads", kept)

    _check_against_pruned_copy(model, sequence_input(), sync=sync, num_heads={model.attn.qkv: 4},
                               prune_num_heads=True)


def test_hand_worked_linear_example():
    # Linear(4, 2) on one token: 8 MACs. Input feature 1 inactive (it is the output row 1
    # of `first`, a Linear(3, 4)) -> 8 * 3/4 = 6 MACs; 8-bit weights and activations give
    # 6 * 64 = 384 BOPs against 8 * 1024. `first` (12 MACs) loses output row 1: 12 * 3/4 = 9.
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    tracker = WeightTracker(model, torch.randn(1, 3), weight_bitwidth_fn=lambda n, m: 8,
                            activation_bitwidth_fn=lambda n, m: 8)
    group = next(g for g in tracker.groups if g.root_module == "0")
    tracker.fake_prune_unit(group.id, 1)
    metrics = tracker.create_tracker("structured_bops", log_total_bops=True,
                                     log_layerwise_stats=True).track()["structured_bops"]
    assert metrics["modules"]["1"] == {"bops": 384.0, "baseline": 8192.0, "compression_rate": 1 - 384 / 8192}
    assert metrics["modules"]["0"]["bops"] == 9 * 64
    assert metrics["bops"] == 384 + 576
    assert metrics["baseline"] == 20 * 1024
    assert metrics["compression"] == pytest.approx(1 - 960 / 20480)


def test_single_zero_weights_do_not_change_structured_bops():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    handle = tracker.create_tracker(TrackerType.STRUCTURED_BOPS, log_total_bops=True)
    before = handle.track()["structured_bops"]["bops"]
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = 0.0
        model.fc.weight[1, 3] = 0.0
    assert handle.track()["structured_bops"]["bops"] == before


def test_default_keys_and_wandb_format():
    tracker = WeightTracker(TinyConvNet(), conv_input())
    assert set(tracker.create_tracker("structured_bops").track()["structured_bops"]) == {"compression"}
    flat = tracker.create_tracker("structured_bops", log_total_bops=True, wandb_format=True).track()
    assert set(flat) == {"structured_bops/compression", "structured_bops/bops", "structured_bops/baseline"}
    raw = tracker.create_tracker("structured_bops", convert_tensors=False).track()
    assert isinstance(raw["structured_bops"]["compression"], torch.Tensor)


def test_normalization_layers_excluded_unless_included():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    default = tracker.create_tracker("structured_bops", log_layerwise_stats=True).track()
    assert set(default["structured_bops"]["modules"]) == {"conv1", "conv2", "conv3", "fc"}
    with_norms = tracker.create_tracker("structured_bops", include=[nn.Conv2d, nn.BatchNorm2d],
                                        log_layerwise_stats=True).track()
    assert set(with_norms["structured_bops"]["modules"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3"}


def test_include_and_ignore_select_layers():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    only = tracker.create_tracker("structured_bops", include=[model.conv3, model.fc],
                                  log_layerwise_stats=True).track()["structured_bops"]
    assert set(only["modules"]) == {"conv3", "fc"}
    rest = tracker.create_tracker("structured_bops", ignore=[nn.Linear],
                                  log_layerwise_stats=True).track()["structured_bops"]
    assert set(rest["modules"]) == {"conv1", "conv2", "conv3"}


def test_include_that_selects_nothing_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    tracker = WeightTracker(model, conv_input())
    with pytest.raises(ConfigError, match="include"):
        tracker.create_tracker("structured_bops", include=[nn.Linear])
    with pytest.raises(ConfigError):
        tracker.create_tracker("structured_bops", include=[model[1]])


def test_normalization_macs_replace_the_baseline():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    before = tracker.create_tracker("structured_bops", log_total_bops=True,
                                    log_layerwise_stats=True).track()["structured_bops"]
    earlier = [stats["baseline"] / 1024 for stats in before["modules"].values()]
    group = next(g for g in tracker.groups if g.root_module == "conv1")
    tracker.fake_prune_units({group.id: [0, 1, 2]})
    tracker.prune_zero_units()
    after = tracker.create_tracker("structured_bops", log_total_bops=True, log_layerwise_stats=True,
                                   normalization_macs_pr_module=earlier).track()["structured_bops"]
    plain = tracker.create_tracker("structured_bops", log_total_bops=True).track()["structured_bops"]
    assert plain["compression"] == pytest.approx(0.0)
    assert after["baseline"] == pytest.approx(before["baseline"])
    assert after["compression"] == pytest.approx(1 - after["bops"] / before["baseline"])
    assert after["compression"] > 0
    by_name = tracker.create_tracker(
        "structured_bops", normalization_macs_pr_module=dict(zip(before["modules"], earlier))
    ).track()["structured_bops"]
    assert by_name["compression"] == pytest.approx(after["compression"])


@pytest.mark.parametrize("bad", [[1.0, 2.0], {"conv1": 1.0}, [1, 2, 3, float("nan")], [1, 2, 3, -1], "abc"])
def test_bad_normalization_macs_are_refused(bad):
    tracker = WeightTracker(TinyConvNet(), conv_input())
    with pytest.raises(ConfigError, match="normalization_macs_pr_module"):
        tracker.create_tracker("structured_bops", normalization_macs_pr_module=bad)


def test_stale_after_physical_prune():
    tracker = WeightTracker(TinyConvNet(), conv_input())
    handle = tracker.create_tracker("structured_bops")
    group = next(g for g in tracker.groups if g.root_module == "conv1")
    tracker.prune_unit(group.id, 0)
    with pytest.raises(StaleConsumerError):
        handle.track()


def test_physically_pruned_attention_matches_a_second_pruned_copy():
    # after a first physical prune the attention width (heads x head dims) and the
    # embedding width differ; a new tracker must size each axis by its own width
    model, inputs = MHANet(), sequence_input()
    tracker = WeightTracker(model, inputs, num_heads={model.attn: 4}, prune_num_heads=True)
    fake_prune_randomly(tracker, seed=11, share=1.0)
    tracker.prune_zero_units()
    width = model.attn.in_proj_weight.shape[0] // 3
    assert width != model.attn.out_proj.out_features
    _check_against_pruned_copy(model, inputs, num_heads={model.attn: model.attn.num_heads}, prune_num_heads=True)
