"""Unit rule for ``nn.Embedding``: a feature owns one column of the table."""

from __future__ import annotations

from torch import nn

from weighttracker_core.plugin import ParamSlice, UnitRule, hookimpl

EMBEDDING = UnitRule(
    name="embedding",
    module_types=(nn.Embedding,),
    out_slices=(ParamSlice(param="weight", dim=1),),
    in_slices=(ParamSlice(param="weight", dim=1),),
    unit_kind="feature",
)


@hookimpl
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    return (EMBEDDING,)
