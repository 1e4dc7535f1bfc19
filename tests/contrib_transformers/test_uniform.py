"""``prune_zero_units_uniformly``: zero units removed so that every layer keeps one shape.

Oracle: the request worked out by hand from the zero units set up; the reloaded model's
logits equal the fake-pruned ones.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from _hf_models import FAMILIES, group, groups, logits, make  # noqa: E402

from weighttracker_core import WeightTracker  # noqa: E402
from weighttracker_transformers import prune_zero_units_uniformly, uniform_zero_units  # noqa: E402


def test_as_many_zero_units_per_layer_and_kv_group_as_the_scarcest_layer_has(tmp_path):
    family, model, x = make("llama")
    tracker = WeightTracker(model, x, prune_num_heads=True)
    mlp = [groups(tracker)[f"model.layers.{i}.mlp.up_proj:prune_out_channels"] for i in range(2)]
    heads = [group(tracker, family, i, "prune_num_heads") for i in range(2)]
    # layer 0: MLP channels 3, 9, 20 and query heads 0, 1 (kv 0), 4 (kv 1); layer 1: channel 5
    # and heads 2 (kv 0), 3, 5 (kv 1)
    tracker.fake_prune_units({mlp[0].id: [3, 9, 20], mlp[1].id: [5],
                              heads[0].id: [0, 1, 4], heads[1].id: [2, 3, 5]})
    fake = logits(model, x)
    assert uniform_zero_units(tracker) == {mlp[0].id: [3], mlp[1].id: [5],
                                           heads[0].id: [0, 4], heads[1].id: [2, 3]}
    prune_zero_units_uniformly(tracker)
    assert (model.config.num_attention_heads, model.config.intermediate_size) == (4, 63)
    torch.testing.assert_close(logits(model, x), fake, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path)
    reloaded = family.reload.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, x), fake, rtol=1e-5, atol=1e-6)
    # what stayed behind is still zero: another call finds it and removes nothing more
    left = uniform_zero_units(tracker)
    assert left == {}
    assert sum(len(u) for u in tracker.zero_units().values()) >= 3


def test_kv_heads_as_many_per_layer_and_heads_without_gqa_per_layer():
    family, model, x = make("qwen2")
    tracker = WeightTracker(model, x, prune_num_heads=True)
    kv = [group(tracker, family, i, "prune_kv_heads") for i in range(2)]
    tracker.fake_prune_units({kv[0].id: [0], kv[1].id: [1]})
    request = uniform_zero_units(tracker)
    assert request[kv[0].id] == [0] and request[kv[1].id] == [1]
    prune_zero_units_uniformly(tracker)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (3, 1)
    family, model, x = make("vit")
    tracker = WeightTracker(model, x, prune_num_heads=True)
    heads = [group(tracker, family, i, "prune_num_heads") for i in range(2)]
    tracker.fake_prune_units({heads[0].id: [1, 2], heads[1].id: [3]})
    assert uniform_zero_units(tracker) == {heads[0].id: [1], heads[1].id: [3]}
    assert prune_zero_units_uniformly(tracker, dry_run=True).dry_run
    assert FAMILIES["vit"].gqa is False
