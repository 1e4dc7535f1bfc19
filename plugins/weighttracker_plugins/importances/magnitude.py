"""Magnitude importance: the L1 or L2 norm of every coupled weight of a unit.

A unit's weights are all its slices in every member of its group: a ResNet channel owns
its conv filter, its batch-norm scale and the input column of every consumer. The score is
the norm of all of them together, computed with the structure's reduction plans.

Example: a unit owning the row ``[3, 4]`` of a Linear and the column ``[0, 12]`` of the
next Linear has ``l1 = 3 + 4 + 0 + 12 = 19`` and ``l2 = sqrt(9 + 16 + 144) = 13``; with
``power=2``, ``l2`` gives ``169``, the sum of squares Torch-Pruning's
``MagnitudeImportance(p=2)`` ranks by.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from weighttracker_core.plugin import BuildContext, Evaluation, ImportanceSpec, hookimpl

from ._unit_plans import mark_unscored, role_plan


def _positive(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{attribute.name} must be a number > 0, got {value!r}.")


@attrs.frozen(kw_only=True)
class MagnitudeOptions:
    """Options of the ``l1`` / ``l2`` importances.

    Args:
        include_bias: Count biases (conv/linear biases, norm shifts) too. Torch-Pruning's
            default leaves them out, and so does this.
        power: Raise the norm to this power. ``power=2`` with ``l2`` is the sum of
            squares; only rankings *across* groups (global scopes) change with it.
    """

    include_bias: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    power: float = attrs.field(default=1.0, validator=_positive)


class MagnitudeScore:
    """``score(values) -> tensor[num_units]``: the unit norms of the structure it was built for."""

    def __init__(self, ctx: BuildContext, op: str) -> None:
        options = ctx.options if ctx.options is not None else MagnitudeOptions()
        self.op = op
        self.power = float(options.power)
        self.plan = role_plan(ctx.structure, options.include_bias)

    def __call__(self, values: Evaluation) -> torch.Tensor:
        with torch.no_grad():
            scores = self.plan.unit_reduce(self.op)
        if self.power != 1.0:
            scores = scores.pow(self.power)
        return mark_unscored(scores, self.plan)


def build_l1(ctx: BuildContext) -> MagnitudeScore:
    return MagnitudeScore(ctx, "l1")


def build_l2(ctx: BuildContext) -> MagnitudeScore:
    return MagnitudeScore(ctx, "l2")


IMPORTANCES = (
    ImportanceSpec(name="l1", build=build_l1, options=MagnitudeOptions,
                   summary="Sum of |w| over every coupled weight of a unit."),
    ImportanceSpec(name="l2", build=build_l2, options=MagnitudeOptions,
                   summary="L2 norm of every coupled weight of a unit."),
)


@hookimpl
def wt_register_importances() -> tuple[ImportanceSpec, ...]:
    return IMPORTANCES
