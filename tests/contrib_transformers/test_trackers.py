"""Every tracker, the group lasso and its proximal step on the five families; structured BOPs
equal fvcore's MACs of the physically pruned copy, layer by layer.

Oracles: fvcore ``FlopCountAnalysis`` called directly on the dense model and on a pruned
deep copy; parameter counts of that copy; gradients checked for finiteness.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from _hf_models import FAMILIES, groups, make, uniform_request  # noqa: E402
from fvcore_oracle import fvcore_macs as module_macs  # noqa: E402

from weighttracker_core import WeightTracker  # noqa: E402
from weighttracker_transformers import hf_forward  # noqa: E402

TRACKERS = ["structured_bops", "unstructured_sparsity", "unstructured_bops", "nvidia_2_4_sparsity",
            "group_pruning_summary", "l2_norm_distribution"]


class _Logits(torch.nn.Module):
    """Only tensors in and out, for fvcore's JIT trace."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return hf_forward(self.model, x).logits


def fvcore_macs(model, x):
    """MACs by module; an attention module's entry is what it runs itself (the products)."""
    counts = module_macs(_Logits(model), (x,))
    totals = {name[len("model."):]: int(v) for name, v in counts.items() if name.startswith("model.")}
    own = {}
    for name, module in model.named_modules():
        children = [f"{name}.{c}" if name else c for c, _ in module.named_children()]
        own[name] = totals.get(name, 0) - sum(totals.get(c, 0) for c in children)
    return totals, own


def _request(tracker, family):
    """The uniform request; BERT's heads go with 8 hidden and 8 pooler channels."""
    request = uniform_request(tracker, family)
    if family.name == "bert":
        named = groups(tracker)
        hidden = next(g for g in tracker.groups
                      if any(m.module_name == "bert.embeddings.word_embeddings" for m in g.members))
        request[hidden.id] = list(range(0, 32, 4))
        request[named["bert.pooler.dense:prune_out_channels"].id] = list(range(1, 32, 4))
    return request


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trackers_and_lasso_run_and_bops_equal_fvcore_on_the_pruned_copy(name):
    family, model, x = make(name, seed=1)
    baseline, baseline_own = fvcore_macs(model, x)
    tracker = WeightTracker(model, x, prune_num_heads=True)
    products = {m.name for m in tracker.structure.modules if str(m.category) == "attention"}
    assert products  # the attention products are counted under their modules
    handle = tracker.create_tracker(TRACKERS, log_total_bops=True, log_layerwise_stats=True)
    lasso = tracker.create_regularizer("group_lasso")
    penalty = lasso()
    penalty.backward()
    assert torch.isfinite(penalty) and all(
        p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad()
    tracker.create_regularizer("bops_group_lasso")().backward()
    model.zero_grad()
    tracker.fake_prune_units(_request(tracker, family))
    metrics = handle.track()
    assert set(metrics) == set(TRACKERS)
    lasso.proximal_step_(lr=1e-3, strength=1e-3)  # keeps zero units zero, shrinks the rest
    clone = copy.deepcopy(model)
    before = sum(p.numel() for p in clone.parameters())
    WeightTracker(clone, x, prune_num_heads=True).prune_zero_units()
    assert metrics["group_pruning_summary"]["pruned_physical_params"] == \
        before - sum(p.numel() for p in clone.parameters())
    after_total, after_own = fvcore_macs(clone, x)
    after = {n: (after_own[n] if n in products else after_total.get(n, 0)) for n in after_total}
    before = {n: (baseline_own[n] if n in products else baseline[n]) for n in baseline}
    bops = metrics["structured_bops"]
    assert bops["compression"] > 0
    for layer, stats in bops["modules"].items():
        assert stats["baseline"] == pytest.approx(before[layer] * 32 * 32, rel=1e-12), layer
        assert stats["bops"] == pytest.approx(after.get(layer, 0) * 32 * 32, rel=1e-9, abs=1e-6), layer
    attention = family.layer.format(0)
    assert any(layer.startswith(attention) for layer in bops["modules"])
    assert all(before[p] > 0 for p in products)
    assert bops["bops"] == pytest.approx(sum(after.get(layer, 0) for layer in bops["modules"]) * 1024)
