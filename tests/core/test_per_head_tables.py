"""Windowed attention with a per-head bias table, as in Swin (SPEC §3.1, §8, §9).

Two things the core must get right for such models:

* Channels-last window partitions (``(B, H, W, C)`` viewed as windows, permuted, reshaped)
  split a spatial axis, not the channel axis: they are not channel shuffles.
* An integration can keep a parameter Torch-Pruning cannot map (the table, read through an
  index op) out of every group, and cut it itself after a prune by head id
  (``tracker.pruned_units``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plugin_managers import core_plugin_manager
from weighttracker_core import CouplingError, WeightTracker
from weighttracker_core.plugin import IntegrationSpec, hookimpl


class WindowAttention(nn.Module):
    """Fused qkv, explicit attention plus a relative-position bias with one column per head."""

    def __init__(self, dim: int = 8, heads: int = 4, window: int = 2) -> None:
        super().__init__()
        self.num_heads = heads
        self.scale = (dim // heads) ** -0.5
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = ((q * self.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class WindowNet(nn.Module):
    """Channels-last tokens on a 2x2 grid, partitioned into (one) 2x2 window and back."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = WindowAttention()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 2, 2, 3)
        h = self.embed(x)
        b, hh, ww, c = h.shape
        win = h.view(b, hh // 2, 2, ww // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        out = self.attn(win).view(b, hh // 2, ww // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)
        return self.head((h + out).mean(dim=(1, 2)))


def _cut_table(tracker):
    attn = tracker.model.attn
    removed = set(tracker.pruned_units.get("attn.qkv:prune_num_heads", ()))
    keep = [h for h in range(attn.table.shape[1]) if h not in removed]
    attn.table = nn.Parameter(attn.table.detach()[:, keep].clone())
    attn.num_heads = len(keep)


class TableIntegration:
    """Heads for ``attn.qkv``; the bias table is left out of Torch-Pruning's groups."""

    def __init__(self, ignore_table: bool = True) -> None:
        self.ignore_table = ignore_table

    @hookimpl
    def wt_register_integrations(self):
        return (
            IntegrationSpec(
                name="window_table",
                applies_to=lambda model: isinstance(getattr(model, "attn", None), WindowAttention),
                tracker_options=lambda model: {"num_heads": {model.attn.qkv: model.attn.num_heads}},
                ignored_parameters=lambda model: [model.attn.table] if self.ignore_table else [],
                after_prune=_cut_table,
            ),
        )


def _tracker(model, x, integration):
    return WeightTracker(model, x, plugin_manager=core_plugin_manager(integration),
                         prune_num_heads=True, prune_head_dims=False)


def test_channels_last_window_partition_is_not_a_channel_shuffle():
    model = WindowNet().eval()
    tracker = _tracker(model, torch.randn(1, 2, 2, 3), TableIntegration())
    # the embedding channels stay one group through the partition and its reverse
    (embed,) = [g for g in tracker.groups if g.root_module == "embed"]
    assert embed.n_units == 8
    assert {m.module_name for m in embed.members} >= {"embed", "attn.qkv", "attn.proj", "head"}


def test_ignored_table_is_cut_by_head_id_and_outputs_are_kept():
    model = WindowNet().eval()
    x = torch.randn(3, 2, 2, 3)
    tracker = _tracker(model, x, TableIntegration())
    (heads,) = [g for g in tracker.groups if g.kind == "head"]
    assert heads.n_units == 4
    assert all(m.module_name in ("attn.qkv", "attn.proj") for m in heads.members)
    table = model.attn.table.detach().clone()
    tracker.fake_prune_unit(heads.id, 1)
    tracker.fake_prune_unit(heads.id, 2)
    with torch.no_grad():
        fake = model(x)
    tracker.prune_zero_units()
    # columns 0 and 3 survive, in order: the kept heads keep their own biases
    torch.testing.assert_close(model.attn.table.detach(), table[:, [0, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(x), fake, rtol=1e-5, atol=1e-6)
    (heads,) = [g for g in tracker.groups if g.kind == "head"]
    assert heads.n_units == 2  # the rebuild re-read the (new) table to leave out


def test_without_leaving_the_table_out_the_coupling_is_refused():
    with pytest.raises(CouplingError, match="attn"):
        _tracker(WindowNet().eval(), torch.randn(1, 2, 2, 3), TableIntegration(ignore_table=False))


class SingletonPermute(nn.Module):
    """``(B, 6) -> (B, 1, 6) -> permute -> (B, 6)``: a singleton axis moves, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        n, c = y.shape
        return self.b(y.view(n, 1, c).permute(0, 2, 1).reshape(n, c))


def test_moving_a_singleton_axis_is_not_a_channel_shuffle():
    model = SingletonPermute().eval()
    x = torch.randn(2, 3)
    tracker = WeightTracker(model, x, plugin_manager=core_plugin_manager())
    (group,) = [g for g in tracker.groups if g.root_module == "a"]
    (b,) = [m for m in group.members if m.module_name == "b"]
    assert dict(zip(b.tp_indices, b.tp_units)) == {c: c for c in range(6)}  # identity
    tracker.fake_prune_unit(group.id, 4)
    with torch.no_grad():
        fake = model(x)
    tracker.prune_zero_units()
    with torch.no_grad():
        torch.testing.assert_close(model(x), fake)
