"""Exact physical pruning of nn.MultiheadAttention (SPEC §3.3, §7).

Oracles: the stock ``nn.MultiheadAttention`` itself (on weights zeroed by hand from the
slice definitions of SPEC §3.3, written out below independently of the unit rules), a
hand-worked head plan, and fvcore's MAC count against the closed-form MAC formula.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from models import MHANet, sequence_input
from torch import nn

from weighttracker_core import PruningError, WeightTracker
from weighttracker_plugins.unit_rules.attention import (
    MultiheadAttentionHeadPruner,
    MultiheadAttentionPruner,
    head_plan,
)
from weighttracker_plugins.unit_rules.pruned_mha import PrunedMultiheadAttention, make_prunable

E, H, D = 12, 3, 4  # embedding width, heads, head width (A = H * D = E)


def zero_by_hand_(mha: nn.MultiheadAttention, channels=(), heads=(), dims=()) -> None:
    """Fake-prune a stock layer from SPEC §3.3, written out index by index.

    Embedding channel c: column c of in_proj_weight, row c of out_proj (weight, bias).
    Head h / head dim d: rows j*A + h*D + d (j = q, k, v) of in_proj (weight, bias) and
    columns h*D + d of out_proj.weight.
    """
    a = mha.num_heads * mha.head_dim
    with torch.no_grad():
        for c in channels:
            mha.in_proj_weight[:, c] = 0
            mha.out_proj.weight[c, :] = 0
            mha.out_proj.bias[c] = 0
        for h in range(mha.num_heads):
            for d in range(mha.head_dim):
                if h in heads or d in dims:
                    for j in range(3):
                        mha.in_proj_weight[j * a + h * mha.head_dim + d, :] = 0
                        mha.in_proj_bias[j * a + h * mha.head_dim + d] = 0
                    mha.out_proj.weight[:, h * mha.head_dim + d] = 0


def prune_(mha: nn.MultiheadAttention, channels=(), heads=(), dims=()) -> nn.MultiheadAttention:
    positions = [h * mha.head_dim + d for h in range(mha.num_heads) for d in range(mha.head_dim)
                 if h in heads or d in dims]
    if channels:
        MultiheadAttentionPruner().prune_out_channels(mha, list(channels))
    if positions:
        MultiheadAttentionHeadPruner().prune_heads(mha, positions)
    return mha


def stock(**kwargs) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(E, H, **kwargs)
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_()
    return mha.eval()


def _kept(n: int, removed) -> list[int]:
    return [i for i in range(n) if i not in set(removed)]


# ------------------------------------------------------------------- conversion, forward


CASES = [
    dict(batch_first=True),
    dict(batch_first=False),
    dict(batch_first=True, add_bias_kv=True),
    dict(batch_first=False, add_zero_attn=True),
    dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
]


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("need_weights", [True, False])
def test_converted_layer_computes_what_the_stock_layer_does(kwargs, need_weights):
    ref = stock(**kwargs)
    conv = make_prunable(copy.deepcopy(ref))
    assert isinstance(conv, PrunedMultiheadAttention)
    assert list(conv.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 5, E) if kwargs["batch_first"] else torch.randn(5, 2, E)
    mem = torch.randn(2, 7, E) if kwargs["batch_first"] else torch.randn(7, 2, E)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.triu(torch.ones(5, 7, dtype=torch.bool), diagonal=3)
    with torch.no_grad():
        for args, extra in (
            ((x, x, x), {}),  # self-attention
            ((x, mem, mem), {"key_padding_mask": pad}),  # cross-attention, padded keys
            ((x, mem, mem.flip(0)), {"attn_mask": causal}),  # separate key and value
            ((x, mem, mem), {"attn_mask": torch.randn(5, 7)}),  # float mask
            ((x, mem, mem), {"attn_mask": torch.randn(2 * H, 5, 7), "average_attn_weights": False}),
        ):
            out, w = conv(*args, need_weights=need_weights, **extra)
            out_ref, w_ref = ref(*args, need_weights=need_weights, **extra)
            torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
            if need_weights:
                torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
            else:
                assert w is None and w_ref is None


def test_unbatched_inputs_work_like_the_stock_layer():
    ref = stock(batch_first=True)
    conv = make_prunable(copy.deepcopy(ref))
    x = torch.randn(5, E)
    with torch.no_grad():
        out, w = conv(x, x, x)
        out_ref, w_ref = ref(x, x, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


def test_is_causal_without_mask_is_refused_like_the_stock_layer():
    conv = make_prunable(stock(batch_first=True))
    x = torch.randn(1, 3, E)
    with pytest.raises(RuntimeError, match="attn_mask"):
        conv(x, x, x, is_causal=True)


# ----------------------------------------------------------------- exact pruning, by hand


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize(
    "channels, heads, dims",
    [((1, 5), (), ()), ((), (1,), ()), ((), (), (0, 3)), ((0, 7, 11), (2,), (1,))],
)
def test_pruned_layer_equals_stock_layer_with_zeroed_slices(kwargs, channels, heads, dims):
    ref = stock(**kwargs)
    zero_by_hand_(ref, channels, heads, dims)
    pruned = prune_(copy.deepcopy(ref), channels, heads, dims)
    keep = _kept(E, channels)
    keep_heads = _kept(H, heads)
    assert pruned.in_proj_weight.shape == (3 * len(keep_heads) * (D - len(dims)), len(keep))
    assert pruned.out_proj.weight.shape == (len(keep), len(keep_heads) * (D - len(dims)))
    assert (pruned.num_heads, pruned.head_dim) == (len(keep_heads), D - len(dims))
    assert pruned.embed_dim == len(keep) and pruned.scale == D ** -0.5
    bf = kwargs["batch_first"]
    x = torch.randn(2, 5, E) if bf else torch.randn(5, 2, E)
    mem = torch.randn(2, 6, E) if bf else torch.randn(6, 2, E)
    mask3 = torch.randn(2 * H, 5, 6)  # one mask per original head
    with torch.no_grad():
        for args, extra in (((x, x, x), {}), ((x, mem, mem), {"attn_mask": mask3})):
            for need_weights in (True, False):
                out_ref, w_ref = ref(*args, need_weights=need_weights,
                                     average_attn_weights=False, **extra)
                out, w = pruned(*(t[..., keep] for t in args), need_weights=need_weights,
                                average_attn_weights=False, **extra)
                torch.testing.assert_close(out, out_ref[..., keep], rtol=1e-5, atol=1e-5)
                assert out_ref[..., list(channels)].abs().max() == 0 if channels else True
                if need_weights:  # per-head weights of the remaining heads are unchanged
                    torch.testing.assert_close(w, w_ref[:, keep_heads], rtol=1e-5, atol=1e-6)


def test_head_plan_hand_example():
    # 2 heads of width 3; positions 1, 3, 4, 5 = dim 1 of head 0 and all of head 1
    assert head_plan(2, 3, [1, 3, 4, 5]) == ([0], [0, 2])
    assert head_plan(4, 2, []) == ([0, 1, 2, 3], [0, 1])
    assert "different dimensions" in head_plan(2, 3, [0, 4])
    assert "every head" in head_plan(2, 2, [0, 1, 2, 3])


def test_head_pruner_refuses_ragged_heads_and_leaves_layer_alone():
    mha = stock(batch_first=True)
    before = {k: v.clone() for k, v in mha.state_dict().items()}
    with pytest.raises(ValueError, match="different dimensions"):
        MultiheadAttentionHeadPruner().prune_heads(mha, [0, 5])
    assert type(mha) is nn.MultiheadAttention
    for k, v in mha.state_dict().items():
        assert torch.equal(v, before[k])


def test_separate_qkv_projections_are_refused():
    mha = nn.MultiheadAttention(E, H, kdim=5, vdim=7)
    assert "kdim" in MultiheadAttentionHeadPruner().check_heads(mha, [0])
    with pytest.raises(ValueError, match="kdim"):
        MultiheadAttentionPruner().prune_out_channels(mha, [0])
    assert type(mha) is nn.MultiheadAttention


def test_gradients_flow_through_pruned_layer_in_training():
    mha = prune_(stock(batch_first=True), channels=(2,), heads=(0,)).train()
    x = torch.randn(2, 4, E - 1, requires_grad=True)
    out, _ = mha(x, x, x)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mha.parameters())


# ----------------------------------------------------------------------------- fvcore


@pytest.mark.parametrize("need_weights", [True, False])
def test_fvcore_counts_pruned_layer_like_a_stock_layer_of_those_widths(need_weights):
    fvcore = pytest.importorskip("fvcore.nn")

    class Wrap(nn.Module):
        def __init__(self, mha):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=need_weights)[0]

    def macs(model, x):
        counter = fvcore.FlopCountAnalysis(model, x)
        counter.unsupported_ops_warnings(False)
        counter.uncalled_modules_warnings(False)
        return counter.by_module()["attn"]

    b, n = 2, 5
    stock_macs = macs(Wrap(stock(batch_first=True)), torch.randn(b, n, E))
    pruned = prune_(stock(batch_first=True), channels=(0, 1, 2), heads=(1,), dims=(3,))
    e, a, h, d = E - 3, 2 * 3, 2, 3
    pruned_macs = macs(Wrap(pruned), torch.randn(b, n, e))
    # projections: b*n*(E*3A + A*E); attention (counted only when weights are returned:
    # otherwise SDPA runs, which fvcore skips in the stock layer too): 2 * b*h*n*n*d
    attention = (lambda h_, d_: 2 * b * h_ * n * n * d_) if need_weights else (lambda h_, d_: 0)
    assert stock_macs == b * n * (E * 3 * E + E * E) + attention(H, D)
    assert pruned_macs == b * n * (e * 3 * a + a * e) + attention(h, d)


# ------------------------------------------------------------------- through the tracker


class CrossNet(nn.Module):
    """Queries from one sequence, keys/values from another; default need_weights=True."""

    def __init__(self) -> None:
        super().__init__()
        self.q_embed = nn.Linear(6, 16)
        self.kv_embed = nn.Linear(5, 16)
        self.attn = nn.MultiheadAttention(16, 4)  # sequence-first
        self.head = nn.Linear(16, 3)

    def forward(self, x, y):
        q = self.q_embed(x).transpose(0, 1)
        kv = self.kv_embed(y).transpose(0, 1)
        out, _ = self.attn(q, kv, kv)
        return self.head(out.mean(dim=0))


def _random_units(tracker: WeightTracker, rng: random.Random) -> dict[int, list[int]]:
    out = {}
    for g in tracker.groups:
        if g.n_units > 1:
            out[g.id] = rng.sample(range(g.n_units), rng.randint(1, g.n_units - 1))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mhanet_parity_heads_dims_and_embedding(seed):
    rng = random.Random(seed)
    model = MHANet().eval()
    x = sequence_input()
    tracker = WeightTracker(model, x, num_heads={model.attn: 4}, prune_num_heads=True,
                            ignored_layers=[model.head])
    kinds = {g.kind for g in tracker.groups}
    assert {"head", "head_dim", "feature"} <= kinds
    tracker.fake_prune_units(_random_units(tracker, rng))
    with torch.no_grad():
        expected = model(x)
    report = tracker.prune_zero_units()
    assert report.num_units > 0 and type(model.attn) is PrunedMultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    # the rebuilt structure describes the pruned layer and can be pruned again
    heads = next(g for g in tracker.groups if g.kind == "head")
    dims = next(g for g in tracker.groups if g.kind == "head_dim")
    assert (heads.n_units, dims.n_units) == (model.attn.num_heads, model.attn.head_dim)
    feature = next(g for g in tracker.groups if "attn" in g.module_names() and g.kind == "feature")
    assert feature.n_units == model.attn.embed_dim == model.embed.out_features
    tracker.fake_prune_units(_random_units(tracker, rng))
    with torch.no_grad():
        expected = model(x)
    tracker.prune_zero_units()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_cross_attention_parity_and_coupled_producers():
    model = CrossNet().eval()
    inputs = (sequence_input(), torch.randn(2, 7, 5))
    tracker = WeightTracker(model, inputs, num_heads={model.attn: 4}, prune_num_heads=True,
                            ignored_layers=[model.head])
    embed = next(g for g in tracker.groups if "attn" in g.module_names() and g.kind == "feature")
    assert {"q_embed", "kv_embed", "attn", "head"} <= set(embed.module_names())
    heads = next(g for g in tracker.groups if g.kind == "head")
    tracker.fake_prune_units({embed.id: [0, 9], heads.id: [2]})
    with torch.no_grad():
        expected = model(*inputs)
    tracker.prune_zero_units()
    assert model.q_embed.out_features == model.kv_embed.out_features == 14
    assert model.attn.num_heads == 3 and model.attn.in_proj_weight.shape == (36, 14)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), expected, rtol=1e-5, atol=1e-6)


def test_mha_with_separate_kdim_refuses_physical_embedding_prune():
    class KDimNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=5, batch_first=True)

        def forward(self, x, y):
            return self.attn(self.q(x), y, y)[0]

    model = KDimNet()
    inputs = (sequence_input(), torch.randn(2, 4, 5))
    tracker = WeightTracker(model, inputs, prune_model_outputs=True)
    group = next(g for g in tracker.groups if "attn" in g.module_names())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="kdim"):
        tracker.prune_unit(group.id, 0)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_transformer_encoder_layer_head_pruning_parity_in_eval_no_grad():
    """The encoder layer's fused fast path must not receive the pruned widths."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 16)
            self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            return self.out(self.layer(self.inp(x)).mean(1))

    model = Encoder().eval()
    x = sequence_input()
    attn = model.layer.self_attn
    tracker = WeightTracker(model, x, num_heads={attn: 4}, prune_num_heads=True,
                            ignored_layers=[model.out])
    heads = next(g for g in tracker.groups if g.kind == "head")
    dims = next(g for g in tracker.groups if g.kind == "head_dim")
    tracker.fake_prune_units({heads.id: [1, 3], dims.id: [0, 2]})  # an even head count left
    with torch.no_grad():
        expected = model(x)
    tracker.prune_zero_units()
    assert (attn.num_heads, attn.head_dim) == (2, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
