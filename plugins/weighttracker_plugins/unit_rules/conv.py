"""Unit rules for convolutions: Conv1d/2d/3d and ConvTranspose1d/2d/3d, grouped and depthwise.

Weights are ``[out, in/groups, *kernel]`` (``[in, out/groups, *kernel]`` when transposed).
For grouped convolutions a channel owns a block of the weight rather than a whole row or
column; the slices view the weight as ``(groups, rows per group, columns per group, -1)``
so that position ``g * per_group + j`` is channel ``j`` of group ``g``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from weighttracker_core.plugin import ParamRole, ParamSlice, PruneAxis, UnitRule, hookimpl

_BIAS = ParamSlice(param="bias", dim=0, role=ParamRole.BIAS)


def _is_depthwise(conv: nn.modules.conv._ConvNd) -> bool:
    return conv.groups == conv.out_channels and conv.out_channels > 1


def _grouped_view(conv: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    rows, cols = conv.weight.shape[0], conv.weight.shape[1]
    return (conv.groups, rows // conv.groups, cols, -1)


def out_slices(conv: nn.modules.conv._ConvNd) -> tuple[ParamSlice, ...]:
    """Slices an output channel owns."""
    if not conv.transposed:
        weight = ParamSlice(param="weight", dim=0)
    elif conv.groups == 1:
        weight = ParamSlice(param="weight", dim=1)
    else:  # [in, out/groups, ...]: output channel g * per + j
        weight = ParamSlice(param="weight", dim=(0, 2), view=_grouped_view(conv))
    return (weight, _BIAS)


def in_slices(conv: nn.modules.conv._ConvNd) -> tuple[ParamSlice, ...]:
    """Slices an input channel owns."""
    if conv.transposed:
        return (ParamSlice(param="weight", dim=0),)
    if conv.groups == 1:
        return (ParamSlice(param="weight", dim=1),)
    return (ParamSlice(param="weight", dim=(0, 2), view=_grouped_view(conv)),)


def feature_slices(conv: nn.modules.conv._ConvNd) -> tuple[ParamSlice, ...]:
    """Depthwise convolutions: channel ``c`` is both input and output channel ``c``."""
    return (ParamSlice(param="weight", dim=0), _BIAS)


def validate_prune(conv: nn.modules.conv._ConvNd, axis: PruneAxis, idxs: Sequence[int]) -> str | None:
    """Grouped (not depthwise) convolutions need the same removal in every group."""
    if conv.groups == 1 or _is_depthwise(conv) or not idxs:
        return None
    size = conv.out_channels if axis is PruneAxis.OUT_CHANNEL else conv.in_channels
    per_group = size // conv.groups
    local = [set() for _ in range(conv.groups)]
    for i in idxs:
        local[i // per_group].add(i % per_group)
    if axis is PruneAxis.IN_CHANNEL and any(s != local[0] for s in local):
        return (f"groups={conv.groups}: every group must lose the same input channels "
                f"(got per-group positions {[sorted(s) for s in local]})")
    if any(len(s) != len(local[0]) for s in local):
        return (f"groups={conv.groups}: every group must lose as many channels "
                f"(got {[len(s) for s in local]} per group)")
    return None


CONV = UnitRule(
    name="conv",
    module_types=(nn.modules.conv._ConvNd,),
    out_slices=out_slices,
    in_slices=in_slices,
    feature_slices=feature_slices,
    unit_kind="channel",
    validate_prune=validate_prune,
)


@hookimpl
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    return (CONV,)
