"""Unit rule for parameters outside any layer (``cls_token``, ``pos_embed``, ...).

Torch-Pruning cuts such a parameter along one dimension (the last non-singleton one unless
``unwrapped_parameters`` says otherwise); a channel owns that slice.
"""

from __future__ import annotations

from weighttracker_core.plugin import (
    LayerCategory,
    ParamSlice,
    UnitRule,
    UnwrappedParameter,
    hookimpl,
)


def unwrapped_slices(param: UnwrappedParameter) -> tuple[ParamSlice, ...]:
    return (ParamSlice(param=param.name, dim=param.dim),)


UNWRAPPED = UnitRule(
    name="unwrapped_parameter",
    module_types=(UnwrappedParameter,),
    out_slices=unwrapped_slices,
    in_slices=unwrapped_slices,
    category=LayerCategory.OTHER,
    weight_params=(),
)


@hookimpl
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    return (UNWRAPPED,)
