"""Llama, Mistral, Qwen2 (GQA), BERT and HF ViT: heads found without num_heads; a pruned
model saved with save_pretrained reloads with the stock class and gives the same logits.

Oracles: head counts from the configs the models were built with; the fake-pruned model's
logits; ``from_pretrained``'s own loading report (missing / unexpected / mismatched keys)
and a fresh ``cls(config)`` built from the reloaded config.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from _hf_models import D, FAMILIES, G_GQA, H_GQA, H_MHA, MLP, group, groups, logits, make, uniform_request  # noqa: E402

from weighttracker_core import WeightTracker  # noqa: E402

RELOADABLE = ["llama", "mistral", "qwen2", "vit"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_head_groups_are_found_without_num_heads(name):
    family, model, x = make(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no uncovered layer (HF RMSNorm), no unreached module
        tracker = WeightTracker(model, x, prune_num_heads=True)
    assert [i.name for i in tracker.integrations] == ["transformers"]
    for layer in range(2):
        heads = group(tracker, family, layer, "prune_num_heads")
        assert heads.kind == "head" and heads.n_units == (H_GQA if family.gqa else H_MHA)
        layout = tracker.structure.layouts[f"{family.layer.format(layer)}.{family.q}"]
        assert layout.source == "graph" and layout.head_dim == D
        if family.gqa:
            kv = group(tracker, family, layer, "prune_kv_heads")
            assert kv.kind == "kv_head" and kv.n_units == G_GQA and layout.rotary == "half"
        else:
            assert not any(g.kind == "kv_head" for g in tracker.groups)
        assert groups(tracker)[f"{family.mlp.format(layer)}:prune_out_channels"].n_units == MLP
    # the outputs (vocabulary, classes) are the interface: never units
    assert not any(g.root_module in ("lm_head", "classifier") for g in tracker.groups)


def _reload(family, model, tmp_path):
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reloaded, info = family.reload.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # nothing missing, unexpected, mismatched
    assert type(reloaded) is type(model)
    return reloaded.eval()


def _attention_matches_config(family, model):
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        attn = model.get_submodule(family.layer.format(layer))
        q = getattr(attn, family.q)
        k = getattr(attn, "k_proj", None) or attn.key
        assert q.out_features == config.num_attention_heads * head_dim
        assert k.out_features == kv_heads * head_dim
        assert q.in_features == config.hidden_size
        assert model.get_submodule(family.mlp.format(layer)).out_features == config.intermediate_size


@pytest.mark.parametrize("name", RELOADABLE)
def test_pruned_model_reloads_with_the_stock_class_and_the_same_logits(name, tmp_path):
    family, model, x = make(name)
    tracker = WeightTracker(model, x, prune_num_heads=True)
    tracker.fake_prune_units(uniform_request(tracker, family))
    fake = logits(model, x)
    tracker.prune_zero_units()
    config = model.config
    expected_heads = 2 if family.gqa else H_MHA - 1
    assert config.num_attention_heads == expected_heads
    assert getattr(config, "num_key_value_heads", expected_heads) == (1 if family.gqa else expected_heads)
    assert config.intermediate_size == MLP * 3 // 4 and config.head_dim == D
    _attention_matches_config(family, model)
    torch.testing.assert_close(logits(model, x), fake, rtol=1e-5, atol=1e-6)
    reloaded = _reload(family, model, tmp_path)
    torch.testing.assert_close(logits(reloaded, x), fake, rtol=1e-5, atol=1e-6)
    _attention_matches_config(family, reloaded)
    for key in ("num_attention_heads", "hidden_size", "intermediate_size", "head_dim"):
        assert getattr(reloaded.config, key) == getattr(config, key), key
    if family.gqa:
        attn = reloaded.get_submodule(family.layer.format(0))
        assert attn.num_key_value_groups == 2 == model.get_submodule(family.layer.format(0)).num_key_value_groups


def test_bert_mlp_prune_reloads_with_the_fake_pruned_logits(tmp_path):
    family, model, x = make("bert")
    tracker = WeightTracker(model, x, prune_num_heads=True)
    tracker.fake_prune_units(uniform_request(tracker, family, heads=False))
    fake = logits(model, x)
    tracker.prune_zero_units()
    assert model.config.intermediate_size == MLP * 3 // 4
    reloaded = _reload(family, model, tmp_path)
    torch.testing.assert_close(logits(reloaded, x), fake, rtol=1e-5, atol=1e-6)
    _attention_matches_config(family, reloaded)


def test_bert_heads_with_the_matching_hidden_channels_reload(tmp_path):
    """BERT's head width is hidden_size // heads: one head goes with 8 hidden channels.

    Removing hidden channels changes what the LayerNorms normalise over (the fake-pruned
    model still averages over the zeros), so the oracle here is the physically pruned model.
    """
    family, model, x = make("bert")
    tracker = WeightTracker(model, x, prune_num_heads=True)
    hidden = next(g for g in tracker.groups if any(m.module_name == "bert.embeddings.word_embeddings"
                                                    for m in g.members))
    # the pooler is hidden_size x hidden_size too: its output channels go with them
    pooler = groups(tracker)["bert.pooler.dense:prune_out_channels"]
    request = uniform_request(tracker, family)
    request[hidden.id] = list(range(0, 32, 4))
    request[pooler.id] = list(range(1, 32, 4))
    tracker.prune_units(request)
    assert (model.config.hidden_size, model.config.num_attention_heads) == (24, 3)
    pruned = logits(model, x)
    reloaded = _reload(family, model, tmp_path)
    torch.testing.assert_close(logits(reloaded, x), pruned, rtol=1e-5, atol=1e-6)
    _attention_matches_config(family, reloaded)
    assert reloaded.get_submodule(family.layer.format(1)).attention_head_size == D
