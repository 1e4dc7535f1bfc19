"""Attention with separate q / k / v / o projections: head, kv-head and head-dim units.

Oracles: index maps written out from the definition of a head (row ``h * D + d`` of q),
the outputs of the fake-pruned model (physical parity), the pruned layers' shapes, and
refusals that leave the model exactly as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from transformer_models import BertLike, LlamaLike, sync_heads, token_ids
from weighttracker_core import (
    AttentionLayout,
    ConfigError,
    CouplingError,
    PruneAxis,
    PruningError,
    WeightTracker,
)

H, G, D = 8, 2, 8  # LlamaLike defaults: 8 query heads, 2 kv heads, head_dim 8


def _groups(tracker):
    return {g.name: g for g in tracker.groups}


def _unit_map(member):
    return dict(zip(member.tp_indices, member.tp_units))


def _members(group):
    return {(m.module_name.rpartition(".")[2], m.axis): m for m in group.members}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key


# ------------------------------------------------------------------------------- groups


@pytest.mark.parametrize("rope", ["half", "interleaved", None])
def test_llama_head_and_kv_head_units_own_exactly_their_rows(rope):
    model = LlamaLike(rope=rope).eval()
    tracker = WeightTracker(model, token_ids(), prune_num_heads=True)
    groups = _groups(tracker)
    a = "layers.1.self_attn"
    heads = groups[f"{a}.q_proj:prune_num_heads"]
    assert heads.kind == "head" and heads.n_units == H
    members = _members(heads)
    assert set(members) == {("q_proj", PruneAxis.OUT_CHANNEL), ("o_proj", PruneAxis.IN_CHANNEL)}
    rows = {h * D + d: h for h in range(H) for d in range(D)}
    assert _unit_map(members["q_proj", PruneAxis.OUT_CHANNEL]) == rows
    assert _unit_map(members["o_proj", PruneAxis.IN_CHANNEL]) == rows
    kv = groups[f"{a}.q_proj:prune_kv_heads"]
    assert kv.kind == "kv_head" and kv.n_units == G
    members = _members(kv)
    # kv head g: its k and v rows, and every query head that reads it (h // 4 == g)
    assert _unit_map(members["k_proj", PruneAxis.OUT_CHANNEL]) == {g * D + d: g for g in range(G) for d in range(D)}
    assert _unit_map(members["v_proj", PruneAxis.OUT_CHANNEL]) == {g * D + d: g for g in range(G) for d in range(D)}
    assert _unit_map(members["q_proj", PruneAxis.OUT_CHANNEL]) == {h * D + d: h // 4 for h in range(H) for d in range(D)}
    assert _unit_map(members["o_proj", PruneAxis.IN_CHANNEL]) == {h * D + d: h // 4 for h in range(H) for d in range(D)}
    # the slices are the projections' weight rows / columns
    q = members["q_proj", PruneAxis.OUT_CHANNEL]
    assert [(s.param, s.dims) for s in q.slices] == [("weight", (0,))]
    o = members["o_proj", PruneAxis.IN_CHANNEL]
    assert [(s.param, s.dims) for s in o.slices] == [("weight", (1,))]


def test_llama_hidden_and_mlp_groups():
    model = LlamaLike(layers=1).eval()
    tracker = WeightTracker(model, token_ids(), prune_num_heads=True)
    groups = _groups(tracker)
    mlp = groups["layers.0.mlp.up_proj:prune_out_channels"]
    assert mlp.n_units == 128
    assert {(m.module_name, m.axis) for m in mlp.members} == {
        ("layers.0.mlp.up_proj", PruneAxis.OUT_CHANNEL),
        ("layers.0.mlp.gate_proj", PruneAxis.OUT_CHANNEL),
        ("layers.0.mlp.down_proj", PruneAxis.IN_CHANNEL),
    }
    (hidden,) = [g for g in tracker.groups if g.n_units == 64]
    coupled = {(m.module_name, m.axis) for m in hidden.members}
    for name, axis in [
        ("embed_tokens", PruneAxis.FEATURE), ("layers.0.input_layernorm", PruneAxis.FEATURE),
        ("layers.0.self_attn.q_proj", PruneAxis.IN_CHANNEL), ("layers.0.self_attn.k_proj", PruneAxis.IN_CHANNEL),
        ("layers.0.self_attn.v_proj", PruneAxis.IN_CHANNEL), ("layers.0.self_attn.o_proj", PruneAxis.OUT_CHANNEL),
        ("layers.0.post_attention_layernorm", PruneAxis.FEATURE), ("layers.0.mlp.down_proj", PruneAxis.OUT_CHANNEL),
        ("norm", PruneAxis.FEATURE), ("lm_head", PruneAxis.IN_CHANNEL),
    ]:
        assert (name, axis) in coupled, name
    # the vocabulary is the model's output: no units unless asked for
    assert not any(g.root_module == "lm_head" for g in tracker.groups)
    with_outputs = WeightTracker(model, token_ids(), prune_model_outputs=True)
    assert _groups(with_outputs)["lm_head:prune_out_channels"].n_units == 96


def test_bert_heads_own_query_key_value_rows_and_output_columns():
    model = BertLike().eval()
    tracker = WeightTracker(model, token_ids(vocab=50), prune_num_heads=True)
    heads = _groups(tracker)["layers.0.attention.query:prune_num_heads"]
    assert heads.n_units == 4
    rows = {h * 8 + d: h for h in range(4) for d in range(8)}
    members = {(m.module_name, m.axis): m for m in heads.members}
    assert set(members) == {
        ("layers.0.attention.query", PruneAxis.OUT_CHANNEL), ("layers.0.attention.key", PruneAxis.OUT_CHANNEL),
        ("layers.0.attention.value", PruneAxis.OUT_CHANNEL), ("layers.0.output", PruneAxis.IN_CHANNEL),
    }
    assert all(_unit_map(m) == rows for m in members.values())
    # biases go with their rows
    query = members["layers.0.attention.query", PruneAxis.OUT_CHANNEL]
    assert [s.param for s in query.slices] == ["weight", "bias"]
    assert not any(g.kind == "kv_head" for g in tracker.groups)  # no GQA


@pytest.mark.parametrize("rope,pairs", [
    ("half", {d: d % 4 for d in range(8)}),
    ("interleaved", {d: d // 2 for d in range(8)}),
    (None, {d: d for d in range(8)}),
])
def test_head_dim_units_pair_the_rotated_dimensions(rope, pairs):
    model = LlamaLike(rope=rope).eval()
    tracker = WeightTracker(model, token_ids())
    dims = _groups(tracker)["layers.0.self_attn.q_proj:prune_head_dims"]
    assert dims.n_units == len(set(pairs.values()))
    members = _members(dims)
    assert _unit_map(members["q_proj", PruneAxis.OUT_CHANNEL]) == {h * D + d: pairs[d] for h in range(H) for d in range(D)}
    assert _unit_map(members["k_proj", PruneAxis.OUT_CHANNEL]) == {g * D + d: pairs[d] for g in range(G) for d in range(D)}


def test_torch_pruning_convention_for_num_heads_is_accepted_and_checked():
    model = LlamaLike(layers=1).eval()
    attn = model.layers[0].self_attn
    heads = {attn.q_proj: 8, attn.k_proj: 2, attn.v_proj: 2}
    tracker = WeightTracker(model, token_ids(), num_heads=heads, prune_num_heads=True)
    assert tracker.structure.layouts["layers.0.self_attn.q_proj"].source == "num_heads"
    with pytest.raises(ConfigError, match=r"num_heads\[layers\.0\.self_attn\.k_proj\]=4.*2 heads of 8"):
        WeightTracker(model, token_ids(), num_heads={attn.q_proj: 8, attn.k_proj: 4, attn.v_proj: 4})
    with pytest.raises(ConfigError, match=r"num_heads\[layers\.0\.mlp\.up_proj\].*not a fused qkv projection"):
        WeightTracker(model, token_ids(), num_heads={model.layers[0].mlp.up_proj: 4})


# --------------------------------------------------------------------- physical pruning


def _fake_prune_the_issue_request(tracker, layers=2):
    """One query head per kv group, one kv head (last layer) and 25 % of the MLP channels."""
    groups = _groups(tracker)
    request = {}
    for i in range(layers):
        a = f"layers.{i}.self_attn.q_proj"
        request[groups[f"{a}:prune_num_heads"].id] = [1, 6]  # kv groups 0 (heads 0-3) and 1
        mlp = groups[f"layers.{i}.mlp.up_proj:prune_out_channels"]
        request[mlp.id] = list(range(0, mlp.n_units, 4))
    request[groups[f"layers.{layers - 1}.self_attn.q_proj:prune_kv_heads"].id] = [0]
    tracker.fake_prune_units(request)
    return request


@pytest.mark.parametrize("rope,repeat,tie", [
    ("half", "repeat_kv", False), ("interleaved", "interleave", False), ("half", "repeat_kv", True),
])
def test_llama_physical_prune_equals_fake_prune(rope, repeat, tie):
    torch.manual_seed(0)
    model = LlamaLike(rope=rope, repeat=repeat, tie=tie).eval()
    ids = token_ids()
    tracker = WeightTracker(model, ids, prune_num_heads=True, prune_head_dims=False,
                            post_prune_hooks=[sync_heads])
    _fake_prune_the_issue_request(tracker)
    with torch.no_grad():
        fake = model(ids)
    report = tracker.prune_zero_units()
    # kv head 0 of layer 1 zeroes the q rows of query heads 0..3, so their head units are
    # zero too: layer 0 loses heads 1, 6; layer 1 heads 0, 1, 2, 3, 6 and kv head 0
    assert report.units["layers.1.self_attn.q_proj:prune_num_heads"] == [0, 1, 2, 3, 6]
    assert report.num_units == 2 + 5 + 1 + 2 * 32
    with torch.no_grad():
        torch.testing.assert_close(model(ids), fake, rtol=1e-5, atol=1e-5)
    first, last = model.layers[0].self_attn, model.layers[1].self_attn
    # layer 0 lost heads 1 and 6; layer 1 also kv head 0 and with it query heads 0..3
    assert (first.q_proj.out_features, first.k_proj.out_features, first.o_proj.in_features) == (6 * D, 2 * D, 6 * D)
    assert (first.num_heads, first.num_kv_heads) == (6, 2)
    assert (last.q_proj.out_features, last.k_proj.out_features, last.v_proj.out_features) == (3 * D, D, D)
    assert (last.o_proj.in_features, last.num_heads, last.num_kv_heads) == (3 * D, 3, 1)
    assert model.layers[0].mlp.up_proj.out_features == model.layers[0].mlp.down_proj.in_features == 96
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    model.train()
    model(ids).sum().backward()  # forward and backward run on the pruned model
    assert all(p.grad is not None for p in model.parameters())
    # the rebuilt structure has the pruned counts
    rebuilt = _groups(tracker)["layers.1.self_attn.q_proj:prune_num_heads"]
    assert rebuilt.n_units == 3


def test_bert_physical_prune_of_heads_and_head_dims_equals_fake_prune():
    torch.manual_seed(0)
    model = BertLike().eval()
    ids = token_ids(vocab=50)

    def sync(tracker):
        for name, change in tracker.pruned_attention.items():
            attention = tracker.model.get_submodule(name)
            attention.num_heads, attention.head_dim = change.num_heads, change.head_dim

    tracker = WeightTracker(model, ids, prune_num_heads=True, post_prune_hooks=[sync])
    groups = _groups(tracker)
    tracker.fake_prune_units({
        groups["layers.0.attention.query:prune_num_heads"].id: [2],
        groups["layers.1.attention.query:prune_head_dims"].id: [0, 5],
        groups["layers.1.intermediate:prune_out_channels"].id: list(range(16)),
    })
    with torch.no_grad():
        fake = model(ids)
    tracker.prune_zero_units()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), fake, rtol=1e-5, atol=1e-5)
    assert model.layers[0].attention.query.out_features == 24 and model.layers[0].output.in_features == 24
    assert model.layers[1].attention.key.out_features == 4 * 6 and model.layers[1].attention.head_dim == 6


def test_gqa_heads_must_go_the_same_number_per_kv_group():
    model = LlamaLike(layers=1).eval()
    tracker = WeightTracker(model, token_ids(), prune_num_heads=True, post_prune_hooks=[sync_heads])
    heads = _groups(tracker)["layers.0.self_attn.q_proj:prune_num_heads"]
    before = _state(model)
    with pytest.raises(PruningError, match=r"kv head 0: 1, kv head 1: 0.*as many heads from each kv group"):
        tracker.prune_units({heads.id: [1]})
    _assert_state(model, before)
    assert tracker.structure.version == 0
    # the advice: as many from each kv group
    tracker.prune_units({heads.id: [1, 5]})
    assert model.layers[0].self_attn.q_proj.out_features == 6 * D
    # or whole kv heads
    kv = _groups(tracker)["layers.0.self_attn.q_proj:prune_kv_heads"]
    tracker.prune_units({kv.id: [1]})
    attn = model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.k_proj.out_features) == (3, 1, D)


def test_head_dims_under_rotary_embeddings_are_refused_physically_but_fake_prune():
    model = LlamaLike(layers=1).eval()
    tracker = WeightTracker(model, token_ids())
    dims = _groups(tracker)["layers.0.self_attn.q_proj:prune_head_dims"]
    tracker.fake_prune_unit(dims.id, 1)
    q = model.layers[0].self_attn.q_proj.weight.detach().view(H, D, -1)
    assert (q[:, [1, 5]] == 0).all() and (q[:, [0, 2, 3, 4, 6, 7]] != 0).any()
    before = _state(model)
    with pytest.raises(PruningError, match="rotary embeddings.*whole heads"):
        tracker.prune_zero_units()
    _assert_state(model, before)


class OddRotation(nn.Module):
    """Rotates only the first half of each head (partial rotary): not a recognised pairing."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(16, 16), nn.Linear(16, 16)
        self.v_proj, self.o_proj = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, 2, 8).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        rot, keep = q[..., :4], q[..., 4:]
        q = torch.cat((torch.cat((-rot[..., 2:], rot[..., :2]), -1), keep), -1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, 16))


def test_unrecognised_rotation_refuses_head_dims_and_both_pieces_of_advice_work():
    model = OddRotation()
    x = torch.randn(2, 5, 16)
    with pytest.raises(CouplingError, match=r"prune_head_dims=False.*rotary='half' or 'interleaved'"):
        WeightTracker(model, x, prune_model_outputs=True)
    heads_only = WeightTracker(model, x, prune_head_dims=False, prune_num_heads=True)
    assert [g.kind for g in heads_only.groups if g.root_module == "q_proj"] == ["head"]
    layout = AttentionLayout(q_proj=model.q_proj, k_proj=model.k_proj, v_proj=model.v_proj,
                             o_proj=model.o_proj, num_heads=2, rotary="half")
    declared = WeightTracker(model, x, attention_layouts=[layout])
    assert _groups(declared)["q_proj:prune_head_dims"].n_units == 4


def test_attention_layout_declares_what_the_graph_cannot_see():
    class Einsum(nn.Module):
        """Heads split with einsum-free reshape hidden inside a helper the graph sees fine,
        but declared explicitly anyway: the declaration wins and is checked."""

        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(12, 12) for _ in range(4))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (m(x).view(b, t, 3, 4).transpose(1, 2) for m in (self.q, self.k, self.v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.o(out.transpose(1, 2).reshape(b, t, 12))

    model = Einsum()
    x = torch.randn(1, 4, 12)
    good = AttentionLayout(q_proj=model.q, k_proj=model.k, v_proj=model.v, o_proj=model.o, num_heads=3)
    tracker = WeightTracker(model, x, attention_layouts=[good], prune_num_heads=True)
    assert tracker.structure.layouts["q"].source == "attention_layouts"
    bad = AttentionLayout(q_proj=model.q, k_proj=model.k, v_proj=model.v, o_proj=model.o, num_heads=3, head_dim=5)
    with pytest.raises(ConfigError, match=r"q has 12 output channels, but 3 query heads.*width 5 need 15"):
        WeightTracker(model, x, attention_layouts=[bad])
    with pytest.raises(ConfigError, match="num_heads must be an int >= 1"):
        AttentionLayout(q_proj=model.q, k_proj=model.k, v_proj=model.v, o_proj=model.o, num_heads=0)
    with pytest.raises(ConfigError, match="attention_layouts takes AttentionLayout objects"):
        WeightTracker(model, x, attention_layouts=[{"q_proj": model.q}])


def test_user_num_heads_follow_a_physical_prune():
    model = LlamaLike(layers=1).eval()
    attn = model.layers[0].self_attn
    tracker = WeightTracker(model, token_ids(), num_heads={attn.q_proj: 8, attn.k_proj: 2, attn.v_proj: 2},
                            prune_num_heads=True, post_prune_hooks=[sync_heads])
    kv = _groups(tracker)["layers.0.self_attn.q_proj:prune_kv_heads"]
    tracker.prune_units({kv.id: [0]})  # rebuilt with num_heads {q: 4, k: 1, v: 1}
    layout = tracker.structure.layouts["layers.0.self_attn.q_proj"]
    assert (layout.num_heads, layout.num_kv_heads, layout.source) == (4, 1, "num_heads")


def test_tied_embedding_counts_once_and_stays_tied():
    model = LlamaLike(layers=1, tie=True).eval()
    tracker = WeightTracker(model, token_ids())
    (hidden,) = [g for g in tracker.groups if g.n_units == 64]
    tied = [(m.module_name, s.param) for m in hidden.members for s in m.slices
            if m.module_name in ("embed_tokens", "lm_head")]
    assert len(tied) == 1 and tied[0][1] == "weight"  # one parameter: one slice
    numel = tracker.structure.plan().unit_numel()
    per_unit = numel[hidden.offset]
    # a hidden channel owns: its embedding column (96, shared with lm_head), q/k/v columns
    # (64 + 16 + 16), its o_proj / down_proj rows (64, 128), gate/up columns (2 * 128),
    # three RMSNorm weights (input, post-attention, final)
    assert per_unit == 96 + 96 + 64 + 128 + 256 + 3
    tracker.prune_units({hidden.id: [0, 5]})
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.embed_tokens.weight.shape == (96, 62)


def test_failed_physical_prune_restores_shapes_and_leaves_no_hooks():
    model = LlamaLike(layers=1).eval()  # no sync hook: the stored head counts break the forward
    tracker = WeightTracker(model, token_ids(), prune_num_heads=True)
    heads = _groups(tracker)["layers.0.self_attn.q_proj:prune_num_heads"]
    before = _state(model)
    with pytest.raises(PruningError, match="restored unchanged"):
        tracker.prune_units({heads.id: [0, 4]})
    _assert_state(model, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    copy.deepcopy(model)


def test_cutting_a_tied_parameter_in_one_place_is_refused_and_untying_works():
    model = LlamaLike(layers=1, tie=True).eval()
    tracker = WeightTracker(model, token_ids(), prune_model_outputs=True)
    vocab = _groups(tracker)["lm_head:prune_out_channels"]  # the embedding keeps its rows
    before = _state(model)
    with pytest.raises(PruningError, match=r"lm_head\.weight is tied to embed_tokens\.weight.*untie"):
        tracker.prune_units({vocab.id: [0, 1]})
    _assert_state(model, before)
    assert model.lm_head.weight is model.embed_tokens.weight
    # the advice: untie, then the vocabulary rows of lm_head go alone
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    tracker = WeightTracker(model, token_ids(), prune_model_outputs=True)
    tracker.prune_units({_groups(tracker)["lm_head:prune_out_channels"].id: [0, 1]})
    assert model.lm_head.out_features == 94 and model.embed_tokens.num_embeddings == 96
