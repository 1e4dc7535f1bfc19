"""Unit rule for ``nn.Linear`` (and subclasses): output rows, input columns."""

from __future__ import annotations

from torch import nn

from weighttracker_core.plugin import ParamRole, ParamSlice, UnitRule, hookimpl

LINEAR = UnitRule(
    name="linear",
    module_types=(nn.Linear,),
    out_slices=(ParamSlice(param="weight", dim=0), ParamSlice(param="bias", dim=0, role=ParamRole.BIAS)),
    in_slices=(ParamSlice(param="weight", dim=1),),
    unit_kind="feature",
)


@hookimpl
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    return (LINEAR,)
