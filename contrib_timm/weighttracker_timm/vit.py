"""timm attention heads as canonical units, and the metadata sync after physical pruning.

The integration registered here (``timm_vit``) applies itself to every model holding a
supported timm attention module (see :mod:`weighttracker_timm.layouts`): it fills
``num_heads`` for ``WeightTracker`` (so ``prune_num_heads=True`` / ``prune_head_dims=True``
get head units without the user listing the ``qkv`` layers) and, after every physical
prune, rewrites what the attention forward reads so the pruned model runs.

Attention temperature: the fake-pruned model scales its scores by the ``scale`` it was
built with, ``original_head_dim ** -0.5``. Removing head dimensions must not change that,
so ``scale`` is kept. timm's fused path calls ``F.scaled_dot_product_attention`` without
``scale=``, i.e. with ``1 / sqrt(current head_dim)``; a module whose ``scale`` no longer
equals that is switched to timm's explicit path (``fused_attn = False``), which multiplies
by ``scale``. Example: head_dim 64 -> 48 keeps ``scale = 1/8``; SDPA would use
``1/sqrt(48) ~ 0.144``, so the block runs the explicit path and matches the fake-pruned
model exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from weighttracker_core import ConfigError, PruningError
from weighttracker_core.plugin import IntegrationSpec, hookimpl

from .layouts import AttentionLayout, attention_modules, has_real_layer

HEADS_FN = "prune_num_heads"
HEAD_DIMS_FN = "prune_head_dims"


def infer_vit_num_heads(model: nn.Module) -> dict[nn.Linear, int]:
    """Map each fused ``qkv`` projection of a supported timm attention to its head count.

    The result is what ``WeightTracker(num_heads=...)`` expects. The counts are read from
    the modules' metadata and checked against the current shapes.

    Example: a ``vit_tiny_patch16_224`` gives ``{blocks.0.attn.qkv: 3, ...,
    blocks.11.attn.qkv: 3}`` (``qkv`` is ``Linear(192, 576)``: 3 x 3 heads x 64).

    Raises:
        ConfigError: A module's ``qkv`` / ``proj`` shapes do not fit its ``num_heads``
            (its metadata is out of date: run :func:`sync_vit_attention_metadata`).
    """
    out: dict[nn.Linear, int] = {}
    for name, attn, layout in attention_modules(model):
        heads = int(attn.num_heads)
        width = _width(name, attn)
        dim = _stored_head_dim(attn, layout)
        if width % heads or (dim is not None and heads * dim != width):
            raise ConfigError(
                f"{name} ({type(attn).__name__}) has num_heads={heads}"
                + (f", head_dim={dim}" if dim is not None else "")
                + f" but its qkv projection gives {width} channels per q/k/v: the attention "
                "metadata is out of date. After pruning with Torch-Pruning directly, call "
                "sync_vit_attention_metadata(model) (or prune through WeightTracker, which "
                "does it for you)."
            )
        out[attn.qkv] = heads
    return out


@attrs.frozen(kw_only=True)
class _Update:
    """New metadata of one attention module, computed before anything changes."""

    name: str
    module: nn.Module
    layout: AttentionLayout
    old_heads: int
    heads: int
    head_dim: int
    kept_heads: tuple[int, ...] | None  # head ids (old numbering) to keep in head_params


def sync_vit_attention_metadata(tracker_or_model: Any) -> None:
    """Make timm attention metadata match the ``qkv`` / ``proj`` shapes after a prune.

    Use it as a ``post_prune_hooks`` entry (it receives the ``WeightTracker``); the
    ``timm_vit`` integration runs it automatically. Per supported module it sets
    ``num_heads``, ``head_dim`` and ``attn_dim`` (where the class stores them), slices
    per-head parameters (Swin's ``relative_position_bias_table``) to the kept heads, keeps
    ``scale`` (the fake-pruned temperature) and turns the fused SDPA path off where it
    would use a different one (see the module docstring). Running it twice is harmless.

    With a tracker inside its post-prune hooks, the heads and head dimensions removed are
    read from ``tracker.pruned_units``. With a bare model (after pruning with Torch-Pruning
    directly), or a tracker outside a prune, they are inferred from the shapes and the old ``num_heads`` / ``head_dim``;
    that works when only heads or only head dimensions were removed from a module, and
    is refused where the shapes cannot tell which (or where per-head parameters need the
    removed head ids).

    Raises:
        PruningError: The new shapes cannot be explained, or head dimensions were removed
            from a module whose ``q_norm`` / ``k_norm`` normalizes over them. Inside a
            tracker's prune this restores the model exactly.
        ConfigError: A bare model whose change is ambiguous.
    """
    model, pruned, structure = _unpack(tracker_or_model)
    updates = []
    for name, attn, layout in attention_modules(model):
        if pruned is None:
            update = _infer_from_shapes(name, attn, layout)
        else:
            update = _from_request(name, attn, layout, pruned, structure)
        _validate(update)
        updates.append(update)
    for update in updates:
        _apply(update)


# ------------------------------------------------------------------------------ geometry


def _unpack(obj: Any) -> tuple[nn.Module, Mapping[str, Sequence[int]] | None, Any]:
    if isinstance(obj, nn.Module):
        return obj, None, None
    model = getattr(obj, "model", None)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            "sync_vit_attention_metadata expects a WeightTracker or an nn.Module, got "
            f"{type(obj).__name__}."
        )
    return model, getattr(obj, "pruned_units", None), getattr(obj, "structure", None)


def _width(name: str, attn: nn.Module) -> int:
    """Channels per q/k/v of the ``qkv`` projection, checked against ``proj``."""
    out = attn.qkv.out_features
    if out % 3 or attn.proj.in_features * 3 != out:
        raise PruningError(
            f"{name}: qkv gives {out} channels and proj reads {attn.proj.in_features}; a "
            "fused q/k/v projection needs 3 x the proj input. Torch-Pruning cut them "
            "inconsistently; only head and head-dimension units keep them aligned."
        )
    return out // 3


def _stored_head_dim(attn: nn.Module, layout: AttentionLayout) -> int | None:
    return None if layout.head_dim_attr is None else int(getattr(attn, layout.head_dim_attr))


def _old_heads(attn: nn.Module, layout: AttentionLayout) -> int:
    """Head count before the prune: per-head parameters are cut by this module only."""
    for param, dim in layout.head_params:
        value = getattr(attn, param, None)
        if value is not None:
            return int(value.shape[dim])
    return int(attn.num_heads)


def _from_request(
    name: str, attn: nn.Module, layout: AttentionLayout,
    pruned: Mapping[str, Sequence[int]], structure: Any,
) -> _Update:
    """Geometry from the units the tracker is removing (old numbering)."""
    qkv = f"{name}.qkv" if name else "qkv"
    removed = sorted({int(h) for h in pruned.get(f"{qkv}:{HEADS_FN}", ())})
    width = _width(name, attn)
    current = int(attn.num_heads)
    group = _group(structure, f"{qkv}:{HEADS_FN}")
    old_heads = group.n_units if group is not None else current
    if not removed or current != old_heads:
        # no head removed here, or already synced for this prune (a second sync hook)
        if width % current:
            raise PruningError(
                f"{name}: qkv gives {width} channels per q/k/v, which its {current} heads "
                "cannot share."
            )
        return _Update(name=name, module=attn, layout=layout, old_heads=current,
                       heads=current, head_dim=width // current, kept_heads=None)
    heads = old_heads - len(removed)
    if heads < 1 or width % heads:
        raise PruningError(
            f"{name}: removing heads {removed} of {old_heads} leaves qkv with {width} "
            f"channels per q/k/v, which {max(heads, 0)} heads cannot share."
        )
    kept = tuple(h for h in range(old_heads) if h not in set(removed))
    return _Update(name=name, module=attn, layout=layout, old_heads=old_heads, heads=heads,
                   head_dim=width // heads, kept_heads=kept)


def _group(structure: Any, name: str) -> Any:
    for group in getattr(structure, "groups", ()):
        if group.name == name:
            return group
    return None


def _infer_from_shapes(name: str, attn: nn.Module, layout: AttentionLayout) -> _Update:
    """Geometry from the shapes and the old metadata alone (no tracker)."""
    width = _width(name, attn)
    heads = int(attn.num_heads)
    dim = _stored_head_dim(attn, layout)
    if dim is None:
        # classes that store no head_dim: only an untouched module can be confirmed
        scale = getattr(attn, "scale", None)
        dim = round(float(scale) ** -2) if scale else None
        if dim is None or heads * dim != width or _old_heads(attn, layout) != heads:
            raise ConfigError(
                f"{name}: {type(attn).__name__} stores no head_dim, so which heads were "
                "removed cannot be read from its shapes. Prune through WeightTracker (the "
                "timm_vit integration syncs it) or call sync_vit_attention_metadata(tracker)."
            )
    same = dict(name=name, module=attn, layout=layout, old_heads=heads, kept_heads=None)
    if heads * dim == width:
        return _Update(heads=heads, head_dim=dim, **same)
    by_heads = width % dim == 0 and width // dim < heads
    by_dims = width % heads == 0 and width // heads < dim
    if by_heads == by_dims:
        fits = "both fewer heads and shorter heads" if by_heads else "neither fewer nor shorter heads alone"
        raise ConfigError(
            f"{name}: qkv now gives {width} channels per q/k/v (was {heads} heads x {dim}); "
            f"that fits {fits}. Prune through WeightTracker (or pass the tracker to "
            "sync_vit_attention_metadata) so the removed units are known."
        )
    if by_heads and layout.head_params:
        raise ConfigError(
            f"{name}: heads were removed, and its per-head parameters "
            f"({', '.join(p for p, _ in layout.head_params)}) need to know which. Pass the "
            "WeightTracker to sync_vit_attention_metadata."
        )
    if by_heads:
        return _Update(heads=width // dim, head_dim=dim, **same)
    return _Update(heads=heads, head_dim=width // heads, **same)


def _validate(update: _Update) -> None:
    attn, layout = update.module, update.layout
    old_dim = _stored_head_dim(attn, layout)
    if old_dim is not None and update.head_dim != old_dim:
        norms = [n for n in layout.head_norms if has_real_layer(attn, n)]
        if norms:
            raise PruningError(
                f"{update.name}: head dimensions were removed, but "
                f"{', '.join(update.name + '.' + n for n in norms)} normalize over head_dim "
                "(qk_norm): their statistics include the zeroed dimensions, so the pruned "
                "model could not match the fake-pruned one. Build the tracker with "
                "prune_head_dims=False for this model, or exclude these groups with "
                "ignore_prune=[...]."
            )
    for param, dim in layout.head_params:
        value = getattr(attn, param, None)
        if value is None:
            continue
        slices = int(value.shape[dim])
        fits = slices == update.heads or (
            update.kept_heads is not None and slices == update.old_heads
        )
        if not fits:
            raise PruningError(
                f"{update.name}.{param} has {slices} head slices on dim {dim}, but the "
                f"module now has {update.heads} heads (had {update.old_heads}); the "
                "removed head ids are needed to cut it."
            )


def _apply(update: _Update) -> None:
    attn, layout = update.module, update.layout
    attn.num_heads = update.heads
    if layout.head_dim_attr is not None:
        setattr(attn, layout.head_dim_attr, update.head_dim)
    for attr in layout.width_attrs:
        if hasattr(attn, attr):
            setattr(attn, attr, update.heads * update.head_dim)
    for param, dim in layout.head_params:
        value = getattr(attn, param, None)
        if value is None or update.kept_heads is None or value.shape[dim] == update.heads:
            continue
        keep = torch.tensor(update.kept_heads, dtype=torch.long, device=value.device)
        with torch.no_grad():
            sliced = value.detach().index_select(dim, keep).clone()
        setattr(attn, param, nn.Parameter(sliced, requires_grad=value.requires_grad))
    scale = getattr(attn, "scale", None)
    if getattr(attn, "fused_attn", False) and scale is not None and not math.isclose(
        float(scale), update.head_dim ** -0.5, rel_tol=1e-6
    ):
        # F.scaled_dot_product_attention would use 1/sqrt(head_dim), not the kept scale
        attn.fused_attn = False


# ---------------------------------------------------------------------------- the plugin


def applies_to(model: nn.Module) -> bool:
    """Whether ``model`` holds a supported timm attention module."""
    return any(True for _ in attention_modules(model))


def tracker_options(model: nn.Module) -> dict[str, Any]:
    """``num_heads`` for every supported attention (the user's own ``num_heads`` wins)."""
    return {"num_heads": infer_vit_num_heads(model)}


def per_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Per-head parameters (Swin's ``relative_position_bias_table``).

    Torch-Pruning reaches them through an index op and couples them to the value rows,
    which it cannot map onto heads; they are left out of its groups and cut by
    :func:`sync_vit_attention_metadata` instead, by head id.
    """
    out = []
    for _name, attn, layout in attention_modules(model):
        for param, _dim in layout.head_params:
            value = getattr(attn, param, None)
            if isinstance(value, nn.Parameter):
                out.append(value)
    return out


TIMM_VIT = IntegrationSpec(
    name="timm_vit",
    applies_to=applies_to,
    tracker_options=tracker_options,
    after_prune=sync_vit_attention_metadata,
    ignored_parameters=per_head_parameters,
    summary="Heads of timm ViT/DeiT/Swin attention as units; resyncs num_heads, head_dim, "
    "attn_dim, scale and per-head tables after physical pruning.",
)


@hookimpl
def wt_register_integrations() -> tuple[IntegrationSpec, ...]:
    return (TIMM_VIT,)
