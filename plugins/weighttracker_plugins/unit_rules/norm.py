"""Unit rules for normalisation layers: BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm.

A channel owns its scale (a weight) and its shift (reported as a bias; RMSNorm has none).
BOPs trackers skip these layers by default (``category="normalization"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from weighttracker_core.plugin import (
    LayerCategory,
    ParamRole,
    ParamSlice,
    PruneAxis,
    UnitRule,
    hookimpl,
)


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


class RMSNormPruner:
    """Removes features of a ``torch.nn.RMSNorm``: entries of its last normalised axis.

    Torch-Pruning has no pruner for RMSNorm; input and output are one axis. Example:
    removing feature 1 of ``RMSNorm(4)`` leaves ``weight`` ``[3]`` and
    ``normalized_shape == (3,)``. The mean of squares is then taken over the remaining
    features, exactly as for a LayerNorm.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        assert isinstance(layer, nn.RMSNorm)
        drop = {int(i) for i in idxs}
        size = int(layer.normalized_shape[-1])
        keep = torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long)
        if layer.weight is not None:
            old = layer.weight
            new = nn.Parameter(old.detach().index_select(-1, keep.to(old.device)).clone(),
                               requires_grad=old.requires_grad)
            layer.weight = new
        layer.normalized_shape = (*tuple(layer.normalized_shape)[:-1], len(keep))
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.normalized_shape[-1])  # type: ignore[index]

    def get_in_channels(self, layer: nn.Module) -> int:
        return self.get_out_channels(layer)


RMS_NORM = UnitRule(
    name="rms_norm",
    module_types=(nn.RMSNorm,),
    out_slices=(ParamSlice(param="weight", dim=-1),),
    in_slices=(ParamSlice(param="weight", dim=-1),),
    category=LayerCategory.NORMALIZATION,
    layer_pruner=RMSNormPruner(),
)


@hookimpl
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    return (BATCH_NORM, LAYER_NORM, GROUP_NORM, INSTANCE_NORM, RMS_NORM)
