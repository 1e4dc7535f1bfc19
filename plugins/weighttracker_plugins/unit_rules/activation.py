"""Unit rule for ``nn.PReLU``: one slope per channel (a shared slope belongs to no unit)."""

from __future__ import annotations

from torch import nn

from weighttracker_core.plugin import LayerCategory, ParamSlice, UnitRule, hookimpl


def prelu_slices(prelu: nn.PReLU) -> tuple[ParamSlice, ...]:
    return () if prelu.num_parameters == 1 else (ParamSlice(param="weight", dim=0),)


PRELU = UnitRule(
    name="prelu",
    module_types=(nn.PReLU,),
    out_slices=prelu_slices,
    in_slices=prelu_slices,
    category=LayerCategory.OTHER,
)


@hookimpl
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    return (PRELU,)
