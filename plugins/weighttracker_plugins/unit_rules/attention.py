"""Unit rule for ``nn.MultiheadAttention``, with exact physical pruning.

An embedding channel owns its input column of ``in_proj_weight`` (q, k and v alike) and its
output row of ``out_proj`` (weight and bias). Heads and head dimensions (with ``num_heads``)
are built by the core from the fused ``in_proj_weight``: a head owns its q, k and v rows
(and ``in_proj_bias``, ``bias_k`` / ``bias_v`` entries) and its input columns of
``out_proj``.

Physical pruning removes exactly those slices and nothing else (Torch-Pruning's own
pruner would also cut the attention width together with the embedding width), so the
pruned layer computes what the fake-pruned one did. Widths that stock
``nn.MultiheadAttention`` cannot represent are handled by turning the layer into
:class:`~weighttracker_plugins.unit_rules.pruned_mha.PrunedMultiheadAttention` in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from weighttracker_core.plugin import ParamRole, ParamSlice, PruneAxis, UnitRule, hookimpl

from .pruned_mha import PrunedMultiheadAttention, make_prunable


def embedding_slices(mha: nn.MultiheadAttention) -> tuple[ParamSlice, ...]:
    inputs = (
        (ParamSlice(param="in_proj_weight", dim=1),)
        if mha._qkv_same_embed_dim
        else (ParamSlice(param="q_proj_weight", dim=1),)
    )
    return inputs + (
        ParamSlice(param="out_proj.weight", dim=0),
        ParamSlice(param="out_proj.bias", dim=0, role=ParamRole.BIAS),
    )


def _replace(owner: nn.Module, name: str, keep: torch.Tensor, dim: int) -> None:
    """``owner.<name>`` keeps only the entries ``keep`` along ``dim`` (gradient too)."""
    old = getattr(owner, name)
    if old is None:
        return
    index = keep.to(old.device)
    new = nn.Parameter(old.detach().index_select(dim, index).clone(), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = old.grad.index_select(dim, index).clone()
    setattr(owner, name, new)


def _kept(size: int, idxs: Sequence[int]) -> torch.Tensor:
    drop = set(int(i) for i in idxs)
    return torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long)


def _check_layer(mha: nn.MultiheadAttention) -> str | None:
    if not mha._qkv_same_embed_dim:
        return ("separate q/k/v projections (kdim/vdim different from embed_dim) cannot be "
                "pruned physically; exclude this group with ignore_prune=[...]")
    if type(mha) not in (nn.MultiheadAttention, PrunedMultiheadAttention):
        return (f"{type(mha).__name__} is a subclass of nn.MultiheadAttention with its own "
                "forward; register a unit rule with a layer_pruner for it")
    for name in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
        if f"{name}_orig" in mha._parameters:
            return (f"{name} is re-parametrised by torch.nn.utils.prune; call "
                    f"torch.nn.utils.prune.remove(layer, {name!r}) first")
    return None


class MultiheadAttentionPruner:
    """Removes embedding channels: ``in_proj_weight`` columns and ``out_proj`` rows.

    Input and output channels are one axis for Torch-Pruning (``prune_in_channels`` is
    ``prune_out_channels``). Example: removing channel 3 of ``MultiheadAttention(16, 4)``
    leaves ``in_proj_weight`` ``[48, 15]`` and ``out_proj.weight`` ``[15, 16]``; the four
    heads of width 4 are untouched.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, nn.MultiheadAttention)
        reason = _check_layer(layer)
        if reason:
            raise ValueError(f"Cannot prune embedding channels: {reason}.")
        mha = make_prunable(layer)
        width = mha.in_proj_weight.shape[1]
        _replace(mha, "in_proj_weight", _kept(width, idxs), 1)
        out = mha.out_proj
        _replace(out, "weight", _kept(out.out_features, idxs), 0)
        _replace(out, "bias", _kept(out.out_features, idxs), 0)
        out.out_features = out.weight.shape[0]
        mha.embed_dim = mha.kdim = mha.vdim = mha.in_proj_weight.shape[1]
        return mha

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.out_proj.out_features)  # type: ignore[union-attr, arg-type]

    def get_in_channels(self, layer: nn.Module) -> int:
        return self.get_out_channels(layer)


def head_plan(num_heads: int, head_dim: int, idxs: Sequence[int]) -> tuple[list[int], list[int]] | str:
    """Kept heads and kept dimensions for removing attention positions ``idxs``.

    A position is ``head * head_dim + d``. Whole heads may go, and the same dimensions of
    every remaining head; anything else is refused (a reason string). Example: 2 heads of
    width 3 and ``idxs = [1, 3, 4, 5]`` remove head 1 and dimension 1: kept ``([0], [0, 2])``.
    """
    removed: list[set[int]] = [set() for _ in range(num_heads)]
    for i in idxs:
        i = int(i)
        if not 0 <= i < num_heads * head_dim:
            return f"position {i} is outside the attention width {num_heads * head_dim}"
        removed[i // head_dim].add(i % head_dim)
    kept_heads = [h for h in range(num_heads) if len(removed[h]) < head_dim]
    if not kept_heads:
        return "every head would be removed"
    dims = {frozenset(removed[h]) for h in kept_heads}
    if len(dims) > 1:
        return ("the remaining heads would lose different dimensions "
                f"({[sorted(removed[h]) for h in kept_heads]}); heads must keep one width")
    drop = next(iter(dims))
    return kept_heads, [d for d in range(head_dim) if d not in drop]


class MultiheadAttentionHeadPruner:
    """Removes whole heads and head dimensions: q, k, v rows and ``out_proj`` columns."""

    def check_heads(self, layer: nn.Module, idxs: Sequence[int]) -> str | None:
        assert isinstance(layer, nn.MultiheadAttention)
        reason = _check_layer(layer)
        if reason:
            return reason
        plan = head_plan(layer.num_heads, layer.head_dim, idxs)
        return plan if isinstance(plan, str) else None

    def prune_heads(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, nn.MultiheadAttention)
        reason = self.check_heads(layer, idxs)
        if reason:
            raise ValueError(f"Cannot prune heads of {type(layer).__name__}: {reason}.")
        mha = make_prunable(layer)
        heads, dim = mha.num_heads, mha.head_dim
        width = heads * dim
        kept_heads, kept_dims = head_plan(heads, dim, idxs)  # type: ignore[misc]
        rows = torch.tensor([h * dim + d for h in kept_heads for d in kept_dims], dtype=torch.long)
        qkv_rows = torch.cat([rows, rows + width, rows + 2 * width])
        _replace(mha, "in_proj_weight", qkv_rows, 0)
        _replace(mha, "in_proj_bias", qkv_rows, 0)
        _replace(mha, "bias_k", rows, 2)
        _replace(mha, "bias_v", rows, 2)
        _replace(mha.out_proj, "weight", rows, 1)
        mha.out_proj.in_features = len(rows)
        mha.num_heads = len(kept_heads)
        mha.head_dim = len(kept_dims)
        mha.attn_dim = len(rows)
        mha.head_ids = tuple(mha.head_ids[h] for h in kept_heads)
        return mha


def validate_prune(mha: nn.MultiheadAttention, axis: PruneAxis, idxs: Sequence[int]) -> str | None:
    """Embedding channels: fused projections only; the layer must keep one channel."""
    if not idxs:
        return None
    return _check_layer(mha)


MULTIHEAD_ATTENTION = UnitRule(
    name="multihead_attention",
    module_types=(nn.MultiheadAttention,),
    out_slices=embedding_slices,
    in_slices=embedding_slices,
    weight_params=("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"),
    cost_axes=("feature", "head"),
    unit_kind="feature",
    layer_pruner=MultiheadAttentionPruner(),
    head_pruner=MultiheadAttentionHeadPruner(),
    validate_prune=validate_prune,
)


@hookimpl
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    return (MULTIHEAD_ATTENTION,)
