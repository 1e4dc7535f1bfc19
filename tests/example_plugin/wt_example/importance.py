"""A third-party importance criterion: ``wt_peak``, the largest |weight| of a unit.

Proves that ranked pruning takes importances from any plugin: this module only returns an
``ImportanceSpec``; ``tracker.create_pruner("ranked", importance="wt_peak")`` uses it.

Example: a unit owning ``[0.5, -2, 1]`` scores 2.
"""

from __future__ import annotations

import torch

from weighttracker_core.plugin import BuildContext, Evaluation, ImportanceSpec, UnitPlan, hookimpl


class PeakMagnitude:
    """``score(values) -> tensor[num_units]``: max |w| over every slice of each unit."""

    def __init__(self, ctx: BuildContext) -> None:
        self.plan: UnitPlan = ctx.structure.plan()

    def __call__(self, values: Evaluation) -> torch.Tensor:
        with torch.no_grad():
            return self.plan.unit_reduce("max_abs")


@hookimpl
def wt_register_importances() -> tuple[ImportanceSpec, ...]:
    return (ImportanceSpec(name="wt_peak", build=PeakMagnitude,
                           summary="Largest absolute weight of a unit (wt-example)."),)
