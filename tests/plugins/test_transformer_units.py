"""Trackers, group lasso, proximal step and the ranked pruner on transformer units.

Oracles: the group lasso written out from the projections' weights head by head (no
groups, no plans), fvcore MACs of the physically pruned copy, parameter counts of a
physically pruned copy, and the pruned layers' shapes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _cost_oracle import fvcore_macs, own_macs

from transformer_models import BertLike, LlamaLike, sync_heads, token_ids
from weighttracker_core import WeightTracker

D = 8
TRACKERS = ["structured_bops", "unstructured_sparsity", "unstructured_bops", "nvidia_2_4_sparsity",
            "group_pruning_summary", "l2_norm_distribution"]


def _tracker(model, **options):
    return WeightTracker(model, token_ids(), prune_num_heads=True, prune_head_dims=False,
                         post_prune_hooks=[sync_heads], **options)


def _groups(tracker):
    return {g.name: g for g in tracker.groups}


def _request(tracker):
    """One query head per kv group in layer 0, one kv head in layer 1, 25 % of each MLP."""
    groups = _groups(tracker)
    request = {groups["layers.0.self_attn.q_proj:prune_num_heads"].id: [2, 5],
               groups["layers.1.self_attn.q_proj:prune_kv_heads"].id: [1]}
    for i in range(2):
        mlp = groups[f"layers.{i}.mlp.up_proj:prune_out_channels"]
        request[mlp.id] = list(range(1, mlp.n_units, 4))
    return request


def test_every_tracker_runs_and_the_summary_equals_a_physical_prune():
    torch.manual_seed(0)
    model = LlamaLike().eval()
    tracker = _tracker(model)
    handle = tracker.create_tracker(TRACKERS)
    tracker.fake_prune_units(_request(tracker))
    metrics = handle.track()
    assert set(metrics) == set(TRACKERS)
    summary = metrics["group_pruning_summary"]
    clone = copy.deepcopy(model)
    before = sum(p.numel() for p in clone.parameters())
    _tracker(clone).prune_zero_units()
    removed = before - sum(p.numel() for p in clone.parameters())
    assert summary["pruned_physical_params"] == removed
    # kv head 1 of layer 1 takes query heads 4..7 with it: their head units are zero too
    assert summary["groups"]["layers.1.self_attn.q_proj:prune_num_heads"]["pruned_units"] == 4
    assert metrics["unstructured_sparsity"]["sparsity"] > 0


def _brute_lasso(model, heads=8, kv=2):
    """sum over units of sqrt(p_u) * ||w_u||: heads, kv heads, MLP channels, hidden channels."""
    total = 0.0
    rep = heads // kv

    def term(parts):
        flat = torch.cat([p.detach().reshape(-1) for p in parts]).double()
        return math.sqrt(flat.numel()) * float(flat.norm())

    for layer in model.layers:
        attn = layer.self_attn
        q = attn.q_proj.weight.detach()
        k, v, o = attn.k_proj.weight.detach(), attn.v_proj.weight.detach(), attn.o_proj.weight.detach()
        for h in range(heads):  # a query head: its q rows and o columns
            total += term([q[h * D:(h + 1) * D], o[:, h * D:(h + 1) * D]])
        for g in range(kv):  # a kv head: its k, v rows and its query heads' q rows, o columns
            rows = slice(g * rep * D, (g + 1) * rep * D)
            total += term([k[g * D:(g + 1) * D], v[g * D:(g + 1) * D], q[rows], o[:, rows]])
        mlp = layer.mlp
        for c in range(mlp.up_proj.out_features):
            total += term([mlp.up_proj.weight[c], mlp.gate_proj.weight[c], mlp.down_proj.weight[:, c]])
    hidden = model.embed_tokens.weight.shape[1]
    for c in range(hidden):
        parts = [model.embed_tokens.weight[:, c], model.norm.weight[c:c + 1]]
        if model.lm_head.weight is not model.embed_tokens.weight:
            parts.append(model.lm_head.weight[:, c])
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            parts += [layer.input_layernorm.weight[c:c + 1], layer.post_attention_layernorm.weight[c:c + 1],
                      attn.q_proj.weight[:, c], attn.k_proj.weight[:, c], attn.v_proj.weight[:, c],
                      attn.o_proj.weight[c], mlp.gate_proj.weight[:, c], mlp.up_proj.weight[:, c],
                      mlp.down_proj.weight[c]]
        total += term([p.detach() for p in parts])
    return total


@pytest.mark.parametrize("tie", [False, True])
def test_group_lasso_equals_a_sum_over_head_slices(tie):
    torch.manual_seed(1)
    model = LlamaLike(tie=tie).eval()
    tracker = _tracker(model)
    penalty = tracker.create_regularizer("group_lasso")
    value = penalty()
    assert value.item() == pytest.approx(_brute_lasso(model), rel=1e-5)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_proximal_step_zeroes_weak_heads_which_then_prune():
    torch.manual_seed(2)
    model = LlamaLike(layers=1).eval()
    tracker = _tracker(model)
    heads = _groups(tracker)["layers.0.self_attn.q_proj:prune_num_heads"]
    with torch.no_grad():  # heads 0 and 4 (one per kv group) much weaker than the rest
        model.layers[0].self_attn.q_proj.weight[0:D] *= 1e-3
        model.layers[0].self_attn.q_proj.weight[4 * D:5 * D] *= 1e-3
        model.layers[0].self_attn.o_proj.weight[:, 0:D] *= 1e-3
        model.layers[0].self_attn.o_proj.weight[:, 4 * D:5 * D] *= 1e-3
    lasso = tracker.create_regularizer("group_lasso", include=[model.layers[0].self_attn])
    lasso.proximal_step_(lr=1.0, strength=0.01)
    zero = tracker.zero_units()
    assert zero[heads.id] == [0, 4]
    report = tracker.prune_units({heads.id: zero[heads.id]})
    assert report.num_units == 2 and model.layers[0].self_attn.num_heads == 6


def _macs(model, inputs, name, attention):
    macs = fvcore_macs(model, inputs)
    return own_macs(macs, model, name) if name in attention else macs.get(name, 0)


def test_structured_bops_equal_fvcore_on_the_physically_pruned_copy():
    # the attention products (q k^T and softmax(.) v, T x T per head) count under the
    # attention module: its own MACs, which shrink with the query heads
    torch.manual_seed(3)
    model = LlamaLike().eval()
    ids = token_ids()
    tracker = _tracker(model)
    attention = {"layers.0.self_attn", "layers.1.self_attn"}
    bops = tracker.create_tracker("structured_bops", log_total_bops=True, log_layerwise_stats=True)
    tracker.fake_prune_units(_request(tracker))
    metrics = bops.track()["structured_bops"]
    clone = copy.deepcopy(model)
    _tracker(clone).prune_zero_units()
    for name, stats in metrics["modules"].items():
        assert stats["baseline"] == pytest.approx(_macs(model, ids, name, attention) * 32 * 32, rel=1e-12), name
        assert stats["bops"] == pytest.approx(_macs(clone, ids, name, attention) * 32 * 32, rel=1e-9, abs=1e-6), name
    assert {"layers.1.self_attn.q_proj", "layers.1.self_attn.o_proj"} | attention <= set(metrics["modules"])
    # batch 2, 12 tokens, 8 heads of 8: (q k^T) + (p v) = 2 * (2 * 8 * 12 * 12 * 8)
    assert metrics["modules"]["layers.0.self_attn"]["baseline"] == 2 * (2 * 8 * 12 * 12 * 8) * 32 * 32
    # layer 0 keeps 6 of 8 query heads
    assert metrics["modules"]["layers.0.self_attn"]["bops"] == 2 * (2 * 6 * 12 * 12 * 8) * 32 * 32


def test_explicit_attention_products_count_and_scale_with_head_dims():
    torch.manual_seed(5)
    model = BertLike().eval()
    ids = token_ids(vocab=50)

    def tracker_of(m):
        def sync(t):
            for name, change in t.pruned_attention.items():
                attn = t.model.get_submodule(name)
                attn.num_heads, attn.head_dim = change.num_heads, change.head_dim

        return WeightTracker(m, ids, prune_num_heads=True, post_prune_hooks=[sync],
                             activation_bitwidth_fn=lambda n, mod: 8)

    tracker = tracker_of(model)
    groups = _groups(tracker)
    bops = tracker.create_tracker("structured_bops", log_layerwise_stats=True)
    tracker.fake_prune_units({groups["layers.0.attention.query:prune_num_heads"].id: [1],
                              groups["layers.1.attention.query:prune_head_dims"].id: [2, 3, 7]})
    metrics = bops.track()["structured_bops"]["modules"]
    clone = copy.deepcopy(model)
    tracker_of(clone).prune_zero_units()
    attention = {"layers.0.attention", "layers.1.attention"}
    for name in attention:
        # both operands are activations: 8 x 8 bits
        assert metrics[name]["bops"] == pytest.approx(_macs(clone, ids, name, attention) * 64, rel=1e-9), name
    assert clone.layers[1].attention.head_dim == 5


def test_ranked_pruner_removes_as_many_query_heads_from_every_kv_group():
    torch.manual_seed(4)
    model = LlamaLike().eval()
    ids = token_ids()
    tracker = _tracker(model)
    pruner = tracker.create_pruner("ranked", pruning_ratio=0.0, head_pruning_ratio=0.5)
    chosen = {}
    for selection in pruner.step(interactive=True):
        chosen[selection.group_name] = selection.units
        selection.apply()
    for name, units in chosen.items():
        assert sorted(u // 4 for u in units) == [0, 0, 1, 1], name  # two of each kv group's four
    for layer in model.layers:
        attn = layer.self_attn
        assert (attn.num_heads, attn.num_kv_heads, attn.q_proj.out_features) == (4, 2, 4 * D)
    with torch.no_grad():
        model(ids)  # runs


def test_ranked_pruner_kv_head_ratio_takes_query_heads_along():
    model = LlamaLike().eval()
    tracker = _tracker(model)
    tracker.create_pruner("ranked", pruning_ratio=0.0, kv_head_pruning_ratio=0.5).step()
    for layer in model.layers:
        attn = layer.self_attn
        assert (attn.num_heads, attn.num_kv_heads, attn.k_proj.out_features) == (4, 1, D)


def test_bert_trackers_and_lasso_run_with_head_and_head_dim_units():
    model = BertLike().eval()
    tracker = WeightTracker(model, token_ids(vocab=50), prune_num_heads=True)
    assert {g.kind for g in tracker.groups} >= {"head", "head_dim", "feature"}
    metrics = tracker.create_tracker(TRACKERS).track()
    assert metrics["group_pruning_summary"]["pruned_units"] == 0
    tracker.create_regularizer("bops_group_lasso")().backward()
