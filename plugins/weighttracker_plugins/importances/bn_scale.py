"""BN-scale importance: |gamma| of a unit's normalization layers (network slimming).

A unit's score is the mean absolute scale (``weight``) over the normalization layers of
its group (BatchNorm, LayerNorm, GroupNorm, InstanceNorm: the layers unit rules put in the
``normalization`` category). With one batch norm in the group that is exactly
``bn.weight.abs()``; a residual group of a ResNet couples several, and their mean is used
(as Torch-Pruning's ``BNScaleImportance`` does).

Units of groups without an affine normalization layer get NaN: the criterion cannot rank
them, and ranked pruners leave such groups alone.

Example: channel 2 coupled through ``bn_a.weight[2] = -0.5`` and ``bn_b.weight[2] = 1.5``
scores ``(0.5 + 1.5) / 2 = 1.0``.
"""

from __future__ import annotations

from typing import Any

import torch

from weighttracker_core.plugin import (
    BuildContext,
    Evaluation,
    ImportanceSpec,
    LayerCategory,
    ParamRole,
    hookimpl,
)

from ._unit_plans import filtered_plan, mark_unscored


class BNScaleScore:
    """``score(values) -> tensor[num_units]``: mean |scale| over the unit's norm layers."""

    def __init__(self, ctx: BuildContext) -> None:
        structure = ctx.structure
        norms = {
            info.name for info in structure.modules if info.category is LayerCategory.NORMALIZATION
        }

        def keep(group: Any, member: Any, piece: Any) -> bool:
            return member.module_name in norms and piece.role is ParamRole.WEIGHT

        self.plan = filtered_plan(structure, keep)

    def __call__(self, values: Evaluation) -> torch.Tensor:
        with torch.no_grad():
            total = self.plan.unit_reduce("l1")
        count = self.plan.unit_numel().to(total)
        return mark_unscored(total / count.clamp(min=1), self.plan)


IMPORTANCES = (
    ImportanceSpec(name="bn_scale", build=BNScaleScore,
                   summary="Mean |gamma| of the normalization layers coupled to a unit."),
)


@hookimpl
def wt_register_importances() -> tuple[ImportanceSpec, ...]:
    return IMPORTANCES
