"""Head units of a fused qkv projection on the explicit attention path, and what
post-prune hooks see (``tracker.pruned_units``).

On the explicit path (``q * scale @ k.T``, softmax, ``@ v``) Torch-Pruning reaches the
output projection through the query first and maps its columns onto the query rows; the
head units must still be right, and pruning them must keep the outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from plugin_managers import core_plugin_manager
from weighttracker_core import PruneAxis, WeightTracker


class ExplicitAttention(nn.Module):
    """Fused ``qkv`` ([q; k; v], head-major), explicit softmax attention, ``proj``."""

    def __init__(self, dim: int = 12, heads: int = 3, head_dim: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.scale = head_dim ** -0.5  # kept when head dimensions are removed
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(y)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 12)
        self.attn = ExplicitAttention()
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head((h + self.attn(h)).mean(dim=1))


def _resync(tracker):
    """Hook: new head count / size from what is being removed (3 heads x 4 dims before)."""
    attn = tracker.model.attn
    removed = tracker.pruned_units
    attn.num_heads -= len(removed.get("attn.qkv:prune_num_heads", ()))
    attn.head_dim -= len(removed.get("attn.qkv:prune_head_dims", ()))


def _tracker(model, x, **kwargs):
    return WeightTracker(model, x, plugin_manager=core_plugin_manager(),
                         num_heads={model.attn.qkv: 3}, post_prune_hooks=[_resync], **kwargs)


def test_projection_columns_belong_to_the_heads_of_the_concatenated_output():
    model = Net().eval()
    tracker = _tracker(model, torch.randn(2, 4, 5), prune_num_heads=True, prune_head_dims=True)
    groups = {g.kind: g for g in tracker.groups if g.root_module == "attn.qkv"}
    for kind, unit_of in (("head", lambda c: c // 4), ("head_dim", lambda c: c % 4)):
        (proj,) = [m for m in groups[kind].members if m.module_name == "attn.proj"]
        assert proj.axis is PruneAxis.IN_CHANNEL
        # column c of proj reads head c // 4, dimension c % 4 (the reshape of the heads)
        assert dict(zip(proj.tp_indices, proj.tp_units)) == {c: unit_of(c) for c in range(12)}


def test_head_and_head_dim_pruning_keep_outputs_on_the_explicit_path():
    model = Net().eval()
    x = torch.randn(2, 4, 5)
    tracker = _tracker(model, x, prune_num_heads=True, prune_head_dims=True)
    groups = {g.kind: g for g in tracker.groups if g.root_module == "attn.qkv"}
    tracker.fake_prune_unit(groups["head"].id, 1)
    tracker.fake_prune_unit(groups["head_dim"].id, 2)
    with torch.no_grad():
        fake = model(x)
    tracker.prune_zero_units()
    assert (model.attn.num_heads, model.attn.head_dim) == (2, 3)
    assert tuple(model.attn.qkv.weight.shape) == (3 * 2 * 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fake, rtol=1e-5, atol=1e-6)
    # the rebuilt structure describes the pruned projection the same way
    rebuilt = {g.kind: g.n_units for g in tracker.groups if g.root_module == "attn.qkv"}
    assert rebuilt == {"head": 2, "head_dim": 3}


def test_hooks_see_the_removed_units_in_the_old_numbering():
    model = Net().eval()
    seen = []

    def spy(tracker):
        seen.append((dict(tracker.pruned_units), tracker.structure.version))

    tracker = WeightTracker(model, torch.randn(1, 4, 5), plugin_manager=core_plugin_manager(),
                            num_heads={model.attn.qkv: 3}, prune_num_heads=True,
                            post_prune_hooks=[_resync, spy])
    (heads,) = [g for g in tracker.groups if g.kind == "head"]
    tracker.prune_unit(heads.id, 2)
    assert seen == [({"attn.qkv:prune_num_heads": [2]}, 0)]
    assert tracker.pruned_units is None and tracker.structure.version == 1
