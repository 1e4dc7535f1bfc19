"""Per-unit calculations from the reduction plans: norms, zero counts, active units.

All are over every member of every group; consumers with ``include`` / ``ignore`` build
their own plan through ``ctx.structure.plan(selection)``.
"""

from __future__ import annotations

from typing import Any

import torch

from weighttracker_core import CalculationSpec, Lifetime, hookimpl


def _plan(ctx: Any) -> Any:
    return ctx.structure.plan()


def unit_numel(ctx: Any) -> torch.Tensor:
    return _plan(ctx).unit_numel()


def unit_sum_sq(ctx: Any) -> torch.Tensor:
    with torch.no_grad():
        return _plan(ctx).unit_reduce("sum_sq")


def unit_l2_norm(ctx: Any) -> torch.Tensor:
    return torch.sqrt(ctx["unit_sum_sq"])


def unit_max_abs(ctx: Any) -> torch.Tensor:
    with torch.no_grad():
        return _plan(ctx).unit_reduce("max_abs")


def unit_zero_count(ctx: Any) -> torch.Tensor:
    with torch.no_grad():
        return _plan(ctx).unit_reduce("zeros")


def unit_active(ctx: Any) -> torch.Tensor:
    """A unit is active while any of its weights is non-zero (units without weights count)."""
    numel = ctx["unit_numel"].to(ctx["unit_max_abs"].device)
    return (ctx["unit_max_abs"] != 0) | (numel == 0)


def unit_l2_norm_grad(ctx: Any) -> torch.Tensor:
    return _plan(ctx).unit_reduce("l2", grad=True)


CALCULATIONS = (
    CalculationSpec(name="unit_numel", compute=unit_numel, lifetime=Lifetime.STATIC,
                    summary="Weight elements each unit owns."),
    CalculationSpec(name="unit_sum_sq", compute=unit_sum_sq,
                    summary="Sum of squared weights per unit."),
    CalculationSpec(name="unit_l2_norm", compute=unit_l2_norm, requires=("unit_sum_sq",),
                    summary="L2 norm of all coupled weights per unit."),
    CalculationSpec(name="unit_max_abs", compute=unit_max_abs,
                    summary="Largest absolute weight per unit."),
    CalculationSpec(name="unit_zero_count", compute=unit_zero_count,
                    summary="Zero weights per unit."),
    CalculationSpec(name="unit_active", compute=unit_active, requires=("unit_numel", "unit_max_abs"),
                    summary="Whether each unit has a non-zero weight."),
    CalculationSpec(name="unit_l2_norm_grad", compute=unit_l2_norm_grad, lifetime=Lifetime.DIFFERENTIABLE,
                    summary="Per-unit L2 norm with autograd (regularizers)."),
)


@hookimpl
def wt_register_calculations() -> tuple[CalculationSpec, ...]:
    return CALCULATIONS
