"""``infer_vit_num_heads`` / ``sync_vit_attention_metadata`` used by hand, the plugin's
registration, and the ``timm:`` model source (SPEC §9, §11)."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import torch_pruning as tp  # noqa: E402
from _timm_models import attentions, make, outputs  # noqa: E402
from models import TinyConvNet, conv_input  # noqa: E402

from weighttracker_core import (  # noqa: E402
    ConfigError,
    PruningError,
    UnknownNameError,
    WeightTracker,
    default_plugin_manager,
)
from weighttracker_timm import infer_vit_num_heads, sync_vit_attention_metadata  # noqa: E402
from weighttracker_timm.sources import load_timm_model  # noqa: E402


def _zero_and_cut(model, x, attn, rows, columns):
    """Zero ``rows`` of qkv and ``columns`` of proj by hand, then let Torch-Pruning itself
    remove those rows (and what it couples to them). Returns the zeroed model's outputs."""
    with torch.no_grad():
        attn.qkv.weight[rows] = 0
        attn.qkv.bias[rows] = 0
        attn.proj.weight[:, columns] = 0
    fake = outputs(model, x)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    graph.get_pruning_group(attn.qkv, tp.prune_linear_out_channels, rows).prune()
    return fake


def test_infer_maps_every_qkv_to_its_head_count_and_checks_it():
    model, _ = make("vit_small_patch16_224", depth=2)
    assert infer_vit_num_heads(model) == {b.attn.qkv: 6 for b in model.blocks}
    model.blocks[1].attn.num_heads = 4  # 4 x 64 != 384: stale metadata
    with pytest.raises(ConfigError, match=r"blocks\.1\.attn .*num_heads=4.*out of date"):
        infer_vit_num_heads(model)


def test_bare_model_after_torch_pruning_removed_a_head():
    model, x = make("vit_tiny_patch16_224", depth=2)
    attn = model.blocks[1].attn  # 3 heads x 64; head 1 is rows 64..127 of q, k and v
    rows = [c * 192 + 64 + d for c in range(3) for d in range(64)]
    fake = _zero_and_cut(model, x, attn, rows, list(range(64, 128)))
    with pytest.raises(RuntimeError):
        model(x)  # num_heads=3 no longer fits the 384-row qkv
    sync_vit_attention_metadata(model)
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (2, 64, 128)
    assert attn.fused_attn is True  # the scale still matches the head size
    torch.testing.assert_close(outputs(model, x), fake, rtol=1e-5, atol=1e-5)


def test_bare_model_after_torch_pruning_removed_head_dimensions():
    model, x = make("vit_tiny_patch16_224", depth=2)
    attn = model.blocks[0].attn
    dims = [0, 7, 63]  # removed from every head of q, k and v
    rows = [c * 192 + h * 64 + d for c in range(3) for h in range(3) for d in dims]
    fake = _zero_and_cut(model, x, attn, rows, [h * 64 + d for h in range(3) for d in dims])
    sync_vit_attention_metadata(model)
    assert (attn.num_heads, attn.head_dim, attn.attn_dim, attn.scale) == (3, 61, 183, 64 ** -0.5)
    assert attn.fused_attn is False
    torch.testing.assert_close(outputs(model, x), fake, rtol=1e-5, atol=1e-5)


def test_bare_model_whose_change_is_ambiguous_is_refused():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=4,
                              num_classes=3).eval()
    x = torch.randn(1, 3, 8, 8)
    attn = model.blocks[0].attn  # 4 heads x 4: 8 channels left = 2 heads x 4 or 4 heads x 2
    rows = [c * 16 + r for c in range(3) for r in range(8)]
    _zero_and_cut(model, x, attn, rows, list(range(8)))
    with pytest.raises(ConfigError, match=r"blocks\.0\.attn: .*both fewer heads and shorter heads"):
        sync_vit_attention_metadata(model)
    assert (attn.num_heads, attn.head_dim) == (4, 4)  # nothing changed


def test_bare_swin_needs_the_tracker_once_pruned():
    model, x = make("swin_tiny_patch4_window7_224", batch=1, depths=(1, 1, 1, 1))
    sync_vit_attention_metadata(model)  # untouched: nothing to do, nothing refused
    attn = model.layers[0].blocks[0].attn  # 3 heads x 32
    rows = [c * 96 + r for c in range(3) for r in range(32)]
    _zero_and_cut(model, x, attn, rows, list(range(32)))
    with pytest.raises(ConfigError, match=r"layers\.0\.blocks\.0\.attn: WindowAttention stores no head_dim"):
        sync_vit_attention_metadata(model)


def test_explicit_setup_and_a_second_sync_hook_are_harmless():
    model, x = make("swin_tiny_patch4_window7_224", depths=(1, 1, 2, 1))
    tracker = WeightTracker(
        model, x, num_heads=infer_vit_num_heads(model), prune_num_heads=True,
        post_prune_hooks=[sync_vit_attention_metadata],  # the integration syncs too
    )
    attn = model.layers[2].blocks[1].attn  # 12 heads
    table = attn.relative_position_bias_table.detach().clone()
    # (local head ids to remove, original ids of the heads left afterwards)
    rounds = (([2, 3], [0, 1] + list(range(4, 12))), ([0], [1] + list(range(4, 12))))
    for removed, kept in rounds:
        (group,) = [g for g in tracker.groups if g.name == "layers.2.blocks.1.attn.qkv:prune_num_heads"]
        tracker.fake_prune_units({group.id: removed})
        fake = outputs(model, x)
        tracker.prune_zero_units()
        assert attn.num_heads == len(kept)
        torch.testing.assert_close(attn.relative_position_bias_table.detach(), table[:, kept])
        torch.testing.assert_close(outputs(model, x), fake, rtol=1e-5, atol=1e-5)


def test_without_the_integration_the_explicit_hooks_do_the_same():
    model, x = make("deit_tiny_patch16_224", depth=2)
    tracker = WeightTracker(model, x, num_heads=infer_vit_num_heads(model), prune_num_heads=True,
                            post_prune_hooks=(sync_vit_attention_metadata,), integrations=None)
    assert tracker.integrations == ()
    (group,) = [g for g in tracker.groups if g.name == "blocks.0.attn.qkv:prune_num_heads"]
    tracker.fake_prune_unit(group.id, 2)
    fake = outputs(model, x)
    tracker.prune_zero_units()
    assert model.blocks[0].attn.num_heads == 2
    torch.testing.assert_close(outputs(model, x), fake, rtol=1e-5, atol=1e-5)


def test_the_integration_leaves_other_models_alone():
    tracker = WeightTracker(TinyConvNet(), conv_input())
    assert "timm_vit" not in [i.name for i in tracker.integrations]
    model, _ = make("vit_tiny_patch16_224", depth=1)
    assert attentions(model)  # and it applies to timm ViTs
    spec = {s.name: s for r in default_plugin_manager().hook.wt_register_integrations() for s in r}
    assert spec["timm_vit"].applies_to(model) and not spec["timm_vit"].applies_to(TinyConvNet())


def test_timm_model_source_loads_by_name_and_suggests_close_names():
    sources = {s.prefix: s for r in default_plugin_manager().hook.wt_register_model_sources() for s in r}
    model = sources["timm"].load("deit_tiny_patch16_224")
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    with pytest.raises(UnknownNameError, match=r"vit_tny_patch16_224.*Did you mean: vit_tiny_patch16_224"):
        load_timm_model("vit_tny_patch16_224")


def test_head_dimensions_removed_under_qk_norm_are_refused():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=8, patch_size=4, embed_dim=12, depth=1, num_heads=2,
                              qk_norm=True, num_classes=3).eval()
    attn = model.blocks[0].attn  # 2 heads x 6; keep dimensions 0..4 of every head by hand
    keep = [c * 12 + h * 6 + d for c in range(3) for h in range(2) for d in range(5)]
    with torch.no_grad():
        qkv, proj = torch.nn.Linear(12, 30), torch.nn.Linear(10, 12)
        qkv.weight.copy_(attn.qkv.weight[keep]), qkv.bias.copy_(attn.qkv.bias[keep])
        proj.weight.copy_(attn.proj.weight[:, [h * 6 + d for h in range(2) for d in range(5)]])
    attn.qkv, attn.proj = qkv, proj
    with pytest.raises(PruningError, match=r"blocks\.0\.attn\.q_norm, blocks\.0\.attn\.k_norm normalize over head_dim"):
        sync_vit_attention_metadata(model)
    assert (attn.num_heads, attn.head_dim) == (2, 6)  # nothing changed


def test_sync_names_what_it_accepts():
    with pytest.raises(ConfigError, match="expects a WeightTracker or an nn.Module, got dict"):
        sync_vit_attention_metadata({})
