"""timm attention heads found automatically, pruned physically, outputs kept (SPEC §9)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")

from _timm_models import MODELS, attentions, head_columns, head_rows, make, outputs  # noqa: E402

from weighttracker_core import CouplingError, PruningError, WeightTracker  # noqa: E402


def _pick(model):
    """The attention module with the most heads (the middle one among equals)."""
    atts = attentions(model)
    most = max(a.num_heads for a in atts.values())
    names = [n for n, a in atts.items() if a.num_heads == most]
    return names[len(names) // 2], atts[names[len(names) // 2]]


def _group(tracker, attn_name, kind):
    (group,) = [g for g in tracker.groups if g.root_module == f"{attn_name}.qkv" and g.kind == kind]
    return group


@pytest.mark.parametrize("name", list(MODELS))
def test_two_heads_of_a_block_pruned_match_the_fake_pruned_model(name):
    model, x = make(name)
    tracker = WeightTracker(model, x, prune_num_heads=True)  # no num_heads passed
    assert [i.name for i in tracker.integrations] == ["timm_vit"]
    heads = {g.root_module: g.n_units for g in tracker.groups if g.kind == "head"}
    assert heads == {f"{n}.qkv": a.num_heads for n, a in attentions(model).items()}

    attn_name, attn = _pick(model)
    before = attn.num_heads
    pruned, kept = [0, before - 1], list(range(1, before - 1))
    base = outputs(model, x)
    tables = getattr(attn, "relative_position_bias_table", None)
    tables = None if tables is None else tables.detach().clone()
    group = _group(tracker, attn_name, "head")
    for head in pruned:
        tracker.fake_prune_unit(group.id, head)
    # a head owns its q, k, v rows and its proj columns, and nothing of the other heads
    for head in range(before):
        zero = head in pruned
        assert bool((head_rows(attn, head) == 0).all()) is zero
        assert bool((head_columns(attn, head) == 0).all()) is zero
    fake = outputs(model, x)
    assert not torch.allclose(fake, base, rtol=1e-3, atol=1e-4)  # the heads mattered

    tracker.prune_zero_units()
    assert attn.num_heads == before - 2
    assert attn.qkv.out_features == 3 * attn.proj.in_features
    if tables is not None:  # Swin: the kept heads keep their own bias columns
        torch.testing.assert_close(attn.relative_position_bias_table.detach(), tables[:, kept])
    torch.testing.assert_close(outputs(model, x), fake, rtol=1e-5, atol=1e-5)
    # the rebuilt structure (num_heads re-read from the synced model) has the new count
    assert _group(tracker, attn_name, "head").n_units == before - 2


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_head_dimensions_pruned_keep_the_attention_scale(name):
    model, x = make(name, depths=(1, 1, 2, 1)) if name.startswith("swin") else make(name, depth=3)
    for attn in attentions(model).values():
        attn.fused_attn = True  # Swin defaults to the explicit path; exercise SDPA too
    tracker = WeightTracker(model, x, prune_head_dims=True)
    attn_name, attn = _pick(model)
    dim = attn.qkv.out_features // (3 * attn.num_heads)
    scale = attn.scale
    group = _group(tracker, attn_name, "head_dim")
    assert group.n_units == dim
    tracker.fake_prune_units({group.id: [0, 5, dim - 1]})
    fake = outputs(model, x)
    tracker.prune_zero_units()
    assert attn.qkv.out_features == 3 * attn.num_heads * (dim - 3)
    if hasattr(attn, "head_dim"):
        assert (attn.head_dim, attn.attn_dim) == (dim - 3, attn.num_heads * (dim - 3))
    assert attn.scale == scale  # the fake-pruned model's temperature, 1/sqrt(old head_dim)
    assert attn.fused_attn is False  # SDPA would use 1/sqrt(new head_dim)
    torch.testing.assert_close(outputs(model, x), fake, rtol=1e-5, atol=1e-5)
    # control: SDPA's default scale would change the outputs
    attn.fused_attn = True
    assert not torch.allclose(outputs(model, x), fake, rtol=1e-4, atol=1e-4)


def test_heads_and_head_dimensions_pruned_together_and_again():
    model, x = make("vit_small_patch16_224", depth=2)
    tracker = WeightTracker(model, x, prune_num_heads=True, prune_head_dims=True)
    attn = model.blocks[1].attn
    tracker.fake_prune_units({
        _group(tracker, "blocks.1.attn", "head").id: [1, 4],
        _group(tracker, "blocks.1.attn", "head_dim").id: [2, 3],
    })
    fake = outputs(model, x)
    tracker.prune_zero_units()
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (4, 62, 248)
    torch.testing.assert_close(outputs(model, x), fake, rtol=1e-5, atol=1e-5)
    # a second round on the rebuilt structure
    tracker.fake_prune_unit(_group(tracker, "blocks.1.attn", "head").id, 0)
    fake = outputs(model, x)
    tracker.prune_zero_units()
    assert (attn.num_heads, attn.head_dim) == (3, 62)
    torch.testing.assert_close(outputs(model, x), fake, rtol=1e-5, atol=1e-5)


def test_explicit_attention_path_prunes_heads_too():
    model, x = make("deit_tiny_patch16_224", depth=2)
    for attn in attentions(model).values():
        attn.fused_attn = False  # as with TIMM_FUSED_ATTN=0
    tracker = WeightTracker(model, x, prune_num_heads=True)
    tracker.fake_prune_unit(_group(tracker, "blocks.0.attn", "head").id, 1)
    fake = outputs(model, x)
    tracker.prune_zero_units()
    assert model.blocks[0].attn.num_heads == 2
    torch.testing.assert_close(outputs(model, x), fake, rtol=1e-5, atol=1e-5)


def test_pruning_every_head_of_a_block_is_refused_and_changes_nothing():
    model, x = make("vit_tiny_patch16_224", depth=2)
    tracker = WeightTracker(model, x, prune_num_heads=True)
    group = _group(tracker, "blocks.1.attn", "head")
    tracker.fake_prune_units({group.id: [0, 1, 2]})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fake = outputs(model, x)
    with pytest.raises(PruningError, match=r"all 3 units of group .*blocks\.1\.attn\.qkv:prune_num_heads"):
        tracker.prune_zero_units()
    assert model.blocks[1].attn.num_heads == 3
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    torch.testing.assert_close(outputs(model, x), fake)


def test_qk_normed_attention_is_refused_until_its_norms_can_be_mapped():
    # q_norm / k_norm normalize over head_dim; Torch-Pruning couples them to qkv rows
    model, x = make("vit_tiny_patch16_224", depth=1, qk_norm=True)
    with pytest.raises(CouplingError, match=r"blocks\.0\.attn\.[qk]_norm"):
        WeightTracker(model, x, prune_num_heads=True)


def test_opting_out_leaves_the_fused_projection_to_the_user():
    model, x = make("vit_tiny_patch16_224", depth=1)
    with pytest.raises(CouplingError, match=r"blocks\.0\.attn\.qkv.*num_heads"):
        WeightTracker(model, x, prune_num_heads=True, integrations=None)
