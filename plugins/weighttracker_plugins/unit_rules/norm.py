"""Unit rules for normalisation layers: BatchNorm, LayerNorm, GroupNorm, InstanceNorm.

A channel owns its scale (a weight) and its shift (reported as a bias). BOPs trackers skip
these layers by default (``category="normalization"``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from weighttracker_core import LayerCategory, ParamRole, ParamSlice, PruneAxis, UnitRule, hookimpl


def _affine(dim: int) -> tuple[ParamSlice, ...]:
    return (ParamSlice(param="weight", dim=dim), ParamSlice(param="bias", dim=dim, role=ParamRole.BIAS))


def validate_group_norm(norm: nn.GroupNorm, axis: PruneAxis, idxs: Sequence[int]) -> str | None:
    """GroupNorm keeps ``num_groups``: every group must lose as many channels."""
    per_group = norm.num_channels // norm.num_groups
    counts = [0] * norm.num_groups
    for i in idxs:
        counts[i // per_group] += 1
    if len(set(counts)) > 1:
        return f"num_groups={norm.num_groups}: each group must lose as many channels (got {counts})"
    return None


BATCH_NORM = UnitRule(
    name="batch_norm",
    module_types=(nn.modules.batchnorm._BatchNorm,),
    out_slices=_affine(0),
    in_slices=_affine(0),
    category=LayerCategory.NORMALIZATION,
)
LAYER_NORM = UnitRule(
    name="layer_norm",
    module_types=(nn.LayerNorm,),
    out_slices=_affine(-1),
    in_slices=_affine(-1),
    category=LayerCategory.NORMALIZATION,
)
GROUP_NORM = UnitRule(
    name="group_norm",
    module_types=(nn.GroupNorm,),
    out_slices=_affine(0),
    in_slices=_affine(0),
    category=LayerCategory.NORMALIZATION,
    validate_prune=validate_group_norm,
)
INSTANCE_NORM = UnitRule(
    name="instance_norm",
    module_types=(nn.modules.instancenorm._InstanceNorm,),
    out_slices=_affine(0),
    in_slices=_affine(0),
    category=LayerCategory.NORMALIZATION,
)


@hookimpl
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    return (BATCH_NORM, LAYER_NORM, GROUP_NORM, INSTANCE_NORM)
