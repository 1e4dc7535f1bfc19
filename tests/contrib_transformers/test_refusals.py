"""Prunes a stock Hugging Face class could not rebuild are refused before anything changes;
the advice in the refusal works; ``transformers_any_shape`` and ``integrations=None`` opt out.

Oracles: the model's state, config and module attributes compared with copies taken before
the call; the fake-pruned logits; a real ``torch.save`` / pruning-record round trip.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

pytest.importorskip("transformers")

from _hf_models import D, group, groups, logits, make, same_state, state, uniform_request  # noqa: E402

from weighttracker_core import PruningError, WeightTracker, apply_pruning_record  # noqa: E402


def _snapshot(model):
    return state(model), copy.deepcopy(model.config.to_dict()), model.config, {
        n: dict(vars(m)) for n, m in model.named_modules() if n.endswith(("self_attn", "attention", "mlp"))
    }


def _unchanged(model, snap):
    values, config, config_obj, attrs_before = snap
    assert same_state(model, values)
    assert model.config is config_obj and model.config.to_dict() == config
    for name, before in attrs_before.items():
        now = vars(model.get_submodule(name))
        assert {k: v for k, v in now.items() if isinstance(v, int)} == \
            {k: v for k, v in before.items() if isinstance(v, int)}, name


def test_different_head_counts_per_layer_are_refused_before_anything_changes():
    family, model, x = make("llama")
    tracker = WeightTracker(model, x, prune_num_heads=True)
    snap = _snapshot(model)
    request = uniform_request(tracker, family, kv=False, mlp=False, layers=(0,))
    for dry_run in (True, False):
        with pytest.raises(PruningError) as err:
            tracker.prune_units(request, dry_run=dry_run)
        _unchanged(model, snap)
    message = str(err.value)
    assert "LlamaConfig could not describe" in message
    assert "different numbers of query heads (model.layers.0.self_attn: 4, model.layers.1.self_attn: 6)" in message
    assert "Nothing was changed" in message and "integrations=['transformers_any_shape']" in message
    # the tracker is still current; following the advice (same units in every layer) works
    tracker.prune_units(uniform_request(tracker, family, kv=False, mlp=False))
    assert model.config.num_attention_heads == 4
    assert all(layer.self_attn.num_key_value_groups == 2 for layer in model.model.layers)


def test_many_layers_are_summarised_by_value():
    import transformers as T

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=8,
                                             num_hidden_layers=8, num_attention_heads=2,
                                             num_key_value_heads=1)).eval()
    tracker = WeightTracker(model, torch.randint(0, 32, (1, 4)))
    mlp = groups(tracker)["model.layers.5.mlp.up_proj:prune_out_channels"]
    with pytest.raises(PruningError, match=r"widths \(7 in 2 layers \(model\.layers\.5\.mlp\.gate_proj, "
                                           r"model\.layers\.5\.mlp\.up_proj\), 8 in 14 layers \(model\.layers\.0"):
        tracker.prune_units({mlp.id: [0]})


def test_different_mlp_widths_are_refused():
    family, model, x = make("qwen2")
    tracker = WeightTracker(model, x)
    snap = _snapshot(model)
    widths = r"the MLPs would have different widths \(model\.layers\.0\.mlp\.gate_proj: 48"
    with pytest.raises(PruningError, match=widths):
        tracker.prune_units(uniform_request(tracker, family, heads=False, kv=False, layers=(0,)))
    _unchanged(model, snap)


def test_bert_heads_without_the_hidden_channels_are_refused_with_the_width_it_needs():
    family, model, x = make("bert")
    tracker = WeightTracker(model, x, prune_num_heads=True)
    snap = _snapshot(model)
    with pytest.raises(PruningError, match=r"3 heads of 8 need a hidden size of 24, but it would be 32 "
                                           r"\(remove 8 hidden channels with the heads"):
        tracker.prune_units(uniform_request(tracker, family, mlp=False))
    _unchanged(model, snap)
    # following it: test_families.test_bert_heads_with_the_matching_hidden_channels_reload


def test_head_dims_are_refused_the_reloaded_model_would_scale_differently():
    family, model, x = make("vit")
    tracker = WeightTracker(model, x)
    snap = _snapshot(model)
    request = {group(tracker, family, i, "prune_head_dims").id: [0, 1] for i in range(2)}
    scale = r"head_dim 6 instead of 8: .* scale the scores by 0\.4082 instead of 0\.3536"
    with pytest.raises(PruningError, match=scale):
        tracker.prune_units(request)
    _unchanged(model, snap)


def test_a_config_the_class_validates_away_is_refused():
    family, model, x = make("llama")  # LlamaConfig wants hidden_size % num_attention_heads == 0
    tracker = WeightTracker(model, x)
    hidden = groups(tracker)["model.norm:prune_out_channels"]
    snap = _snapshot(model)
    with pytest.raises(PruningError, match=r"LlamaConfig refuses the new sizes .*hidden size \(44\) is not a multiple"):
        tracker.prune_units({hidden.id: [0, 1, 2, 3]})
    _unchanged(model, snap)


def test_any_shape_prunes_what_the_modules_can_run_and_the_record_replays():
    family, model, x = make("llama")
    fresh = copy.deepcopy(model)
    options = dict(prune_num_heads=True, integrations=["transformers_any_shape"])
    tracker = WeightTracker(model, x, **options)
    assert [i.name for i in tracker.integrations] == ["transformers_any_shape"]
    request = uniform_request(tracker, family, layers=(0,))
    tracker.fake_prune_units(request)
    fake = logits(model, x)
    tracker.prune_units(request)
    torch.testing.assert_close(logits(model, x), fake, rtol=1e-5, atol=1e-6)
    first, second = (layer.self_attn for layer in model.model.layers)
    assert (first.q_proj.out_features, first.num_key_value_groups) == (2 * D, 2)
    assert (second.q_proj.out_features, second.num_key_value_groups) == (6 * D, 3)
    # the config keeps what every layer shares; the rest stays as it was
    assert (model.config.num_attention_heads, model.config.hidden_size) == (6, 48)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(logits(torch.load(buffer, weights_only=False), x), fake, rtol=1e-5, atol=1e-6)
    replayed = apply_pruning_record(fresh, x, tracker.pruning_record(), integrations=["transformers_any_shape"])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(fresh, x), fake, rtol=1e-5, atol=1e-6)
    assert replayed.model is fresh


def test_integrations_none_opts_out_and_other_models_are_left_alone():
    family, model, x = make("llama")
    assert [i.name for i in WeightTracker(model, x).integrations] == ["transformers"]
    bare = WeightTracker(model, {"input_ids": x, "use_cache": False}, integrations=None,
                         output_transform=lambda out: out.logits)
    assert bare.integrations == () and bare.structure.options.forward_fn is None
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert WeightTracker(plain, torch.randn(1, 3)).integrations == ()


def test_a_failure_after_the_prune_brings_the_old_config_back():
    family, model, x = make("mistral")
    snap = _snapshot(model)

    def broken(tracker):
        assert tracker.model.config.num_attention_heads == 4  # synced before user hooks run
        raise RuntimeError("hook failed")

    tracker = WeightTracker(model, x, prune_num_heads=True, post_prune_hooks=[broken])
    with pytest.raises(RuntimeError, match="hook failed"):
        tracker.prune_units(uniform_request(tracker, family, kv=False, mlp=False))
    _unchanged(model, snap)
    assert all(layer.self_attn.config is model.config for layer in model.model.layers)
