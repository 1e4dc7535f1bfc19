"""Structure on the meta device: groups and unit counts without weights; values refused.

Oracles: the same model built on the CPU (every group, member and slice must be equal),
unit counts derived by hand from the shapes, the kernel's count of resident memory (a
70B-shaped model's weights are 128 GiB in bfloat16), and the advice of the refusal, followed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transformer_models import LlamaLike, token_ids
from weighttracker_core import ConfigError, WeightTracker


def _on_meta(**shape):
    with torch.device("meta"):
        return LlamaLike(**shape)


def _peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_meta_structure_equals_the_cpu_structure():
    torch.manual_seed(0)
    real = LlamaLike(layers=2).eval()
    meta = _on_meta(layers=2).eval()
    ids = token_ids()
    on_cpu = WeightTracker(real, ids, prune_num_heads=True)
    on_meta = WeightTracker(meta, ids.to("meta"), prune_num_heads=True)
    assert on_meta.groups == on_cpu.groups            # names, kinds, members, every slice
    assert on_meta.num_units == on_cpu.num_units
    assert all(p.is_meta for p in meta.parameters())


@pytest.mark.slow  # about 60 s; the 2-layer meta test above checks the same structure code
def test_70b_shaped_structure_on_meta_allocates_no_weights():
    """80 layers, hidden 8192, 64 query / 8 kv heads of 128, SwiGLU 28672: counts by hand."""
    model = _on_meta(vocab=32000, hidden=8192, heads=64, kv_heads=8, inner=28672, layers=80).to(torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights > 128 * 1024**3
    measured = _peak_reset()
    before = _peak_bytes() if measured else 0
    tracker = WeightTracker(model, torch.zeros(1, 4, dtype=torch.long, device="meta"), prune_num_heads=True)
    by_kind: dict[str, list[int]] = {}
    for group in tracker.groups:
        by_kind.setdefault(str(group.kind), []).append(group.n_units)
    # one residual stream of 8192 features (embedding, norms, every projection's input,
    # o_proj / down_proj outputs, lm_head's input) and one SwiGLU group per layer
    assert sorted(by_kind["feature"]) == [8192] + [28672] * 80
    assert by_kind["head"] == [64] * 80 and by_kind["kv_head"] == [8] * 80
    assert by_kind["head_dim"] == [64] * 80            # rotate_half pairs of 128 dimensions
    assert tracker.num_units == 8192 + 80 * (28672 + 64 + 8 + 64)
    assert all(p.is_meta for p in model.parameters())
    if measured:
        assert _peak_bytes() - before < 1024**3        # nothing near the weights' 128 GiB


def test_values_are_refused_on_meta_and_the_advice_works():
    torch.manual_seed(0)
    twin = LlamaLike().eval()
    state = twin.state_dict()
    model = _on_meta().eval()
    tracker = WeightTracker(model, token_ids().to("meta"), prune_num_heads=True)
    group = tracker.groups[0]
    attempts = {
        "create_tracker": lambda: tracker.create_tracker("unstructured_sparsity"),
        "create_regularizer": lambda: tracker.create_regularizer("group_lasso"),
        "create_pruner": lambda: tracker.create_pruner("ranked", pruning_ratio=0.5),
        "fake_prune_unit": lambda: tracker.fake_prune_unit(group.id, 0),
        "fake_prune_units": lambda: tracker.fake_prune_units({group.id: [0]}),
        "zero_units": lambda: tracker.zero_units(),
        "prune_units": lambda: tracker.prune_unit(group.id, 0),
        "prune_zero_units": lambda: tracker.prune_zero_units(),
        "track()": lambda: tracker.track(),
    }
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for action, attempt in attempts.items():
        with pytest.raises(ConfigError, match="meta device") as info:
            attempt()
        message = str(info.value)
        assert message.startswith(action) and "embed_tokens.weight" in message
        assert "to_empty" in message and "load_state_dict" in message and "new WeightTracker" in message
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
    assert all(p.is_meta for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    # the advice: materialise, load the weights, build a new tracker with real inputs
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    with pytest.raises(ConfigError, match="built while the model's parameters were on the meta"):
        tracker.create_tracker("unstructured_sparsity")
    fresh = WeightTracker(model, token_ids(), prune_num_heads=True)
    reference = WeightTracker(twin, token_ids(), prune_num_heads=True)
    assert fresh.groups == reference.groups
    names = ["l2_norm_distribution", "unstructured_sparsity"]
    assert fresh.create_tracker(names).track() == reference.create_tracker(names).track()
