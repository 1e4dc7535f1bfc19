"""A pruning record that removes kv heads replays: the query heads that read them go too.

Oracle: the outputs and ``state_dict`` of the model that was pruned in the first place.
"""

from __future__ import annotations

import copy

import torch

from transformer_models import LlamaLike, sync_heads, token_ids
from weighttracker_core import WeightTracker, apply_pruning_record


def test_kv_head_prunes_replay_and_the_checkpoint_loads():
    torch.manual_seed(0)
    model = LlamaLike().eval()
    fresh = copy.deepcopy(model)
    tracker = WeightTracker(model, token_ids(), prune_num_heads=True, post_prune_hooks=[sync_heads])
    groups = {g.name: g for g in tracker.groups}
    # kv head 1 of layer 0 (and its 4 query heads), then a query head of each kv group
    tracker.prune_units({groups["layers.0.self_attn.q_proj:prune_kv_heads"].id: [1]})
    groups = {g.name: g for g in tracker.groups}
    tracker.prune_units({groups["layers.1.self_attn.q_proj:prune_num_heads"].id: [0, 7]})
    groups = {g.name: g for g in tracker.groups}
    tracker.prune_units({groups["layers.0.self_attn.q_proj:prune_num_heads"].id: [2]})
    assert model.layers[0].self_attn.num_heads == 3
    replayed = apply_pruning_record(fresh, token_ids(), tracker.pruning_record(),
                                    post_prune_hooks=[sync_heads])
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(token_ids()), model(token_ids()))
    assert replayed.pruning_record()["prunes"] == tracker.pruning_record()["prunes"]
