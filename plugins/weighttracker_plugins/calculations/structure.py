"""Per-unit calculations from the reduction plans: norms, zero counts, active units.

All are over every member of every group; consumers with ``include`` / ``ignore`` build
their own plan through ``ctx.structure.plan(selection)``.

``weight_scan`` is the one read of the weights that every "is it zero" metric shares:
whether each unit owns a non-zero weight (``unit_active``), the non-zero count of every
weight parameter of the layer table (``weight_param_zeros``) and the histogram of zeros
per block of 4 along the input axis of every weight with 2 or more dims (the 2:4
tracker). Each parameter is read once per ``track()``, whichever of those trackers exist.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from weighttracker_core.plugin import CalculationSpec, Evaluation, Lifetime, hookimpl

from ._memo import reuse

#: Block length of the N:M block histograms in ``weight_scan`` (NVIDIA 2:4).
BLOCK = 4


def input_axis(module: nn.Module) -> int:
    """The dim of a weight that a GEMM reduces over (1, or 0 for transposed convs)."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        return 0
    return 1


def block_params(structure: Any) -> list[tuple[str, int]]:
    """``(weight name, input axis)`` of every weight of the layer table with 2+ dims.

    Embedding tables are left out (a lookup, not a GEMM): the 2:4 tracker histograms one
    itself when ``include=`` names it.
    """
    out = []
    for info in structure.modules:
        module = structure.module(info.name)
        if isinstance(module, nn.Embedding):
            continue
        for name in info.weight_params:
            if structure.resolver(name).dim() >= 2:
                out.append((name, input_axis(module)))
    return out


def weight_scanner(evaluation: Evaluation) -> Any:
    """The compiled one-pass scan (static; see ``ReductionPlan.scanner``)."""
    table = evaluation["weight_param_table"]
    return _plan(evaluation).scanner(count=table.names, blocks=block_params(evaluation.structure), block=BLOCK)


def weight_scan(evaluation: Evaluation) -> Any:
    """One read of every weight: ``unit_nonzero``, ``nonzeros``, ``block_zeros``, ``totals``."""
    return evaluation["weight_scanner"]()


def _plan(evaluation: Evaluation) -> Any:
    return evaluation.structure.plan()


def unit_numel(evaluation: Evaluation) -> torch.Tensor:
    return _plan(evaluation).unit_numel()


def unit_sum_sq(evaluation: Evaluation) -> torch.Tensor:
    with torch.no_grad():
        return _plan(evaluation).unit_reduce("sum_sq")


def unit_l2_norm(evaluation: Evaluation) -> torch.Tensor:
    return torch.sqrt(evaluation["unit_sum_sq"])


def unit_max_abs(evaluation: Evaluation) -> torch.Tensor:
    with torch.no_grad():
        return _plan(evaluation).unit_reduce("max_abs")


def unit_zero_count(evaluation: Evaluation) -> torch.Tensor:
    with torch.no_grad():
        return _plan(evaluation).unit_reduce("zeros")


def unit_active(evaluation: Evaluation) -> torch.Tensor:
    """A unit is active while any of its weights is non-zero (units without weights count).

    Raises ``NonFiniteWeightError`` (naming the parameter) when a unit holds NaN or inf:
    such a unit is neither zero nor active in any meaningful sense.
    """
    scan = evaluation["weight_scan"]
    evaluation["weight_scanner"].check_finite(scan)
    numel = evaluation["unit_numel"].to(scan.unit_nonzero.device)
    return reuse(evaluation.structure, "unit_active", (scan.unit_nonzero, numel),
                 lambda: scan.unit_nonzero | (numel == 0))


def unit_l2_norm_grad(evaluation: Evaluation) -> torch.Tensor:
    return _plan(evaluation).unit_reduce("l2", grad=True)


CALCULATIONS = (
    CalculationSpec(name="unit_numel", compute=unit_numel, lifetime=Lifetime.STATIC,
                    summary="Weight elements each unit owns."),
    CalculationSpec(name="unit_sum_sq", compute=unit_sum_sq,
                    summary="Sum of squared weights per unit."),
    CalculationSpec(name="unit_l2_norm", compute=unit_l2_norm, requires=("unit_sum_sq",),
                    summary="L2 norm of all coupled weights per unit."),
    CalculationSpec(name="weight_scanner", compute=weight_scanner, requires=("weight_param_table",),
                    lifetime=Lifetime.STATIC,
                    summary="The compiled one-pass scan of every weight (zero tests, counts, 2:4 blocks)."),
    CalculationSpec(name="weight_scan", compute=weight_scan, requires=("weight_scanner",),
                    summary="Per-unit non-zero flags, per-weight non-zeros and 2:4 block histograms, in one read."),
    CalculationSpec(name="unit_max_abs", compute=unit_max_abs,
                    summary="Largest absolute weight per unit."),
    CalculationSpec(name="unit_zero_count", compute=unit_zero_count,
                    summary="Zero weights per unit."),
    CalculationSpec(name="unit_active", compute=unit_active,
                    requires=("unit_numel", "weight_scanner", "weight_scan"),
                    summary="Whether each unit has a non-zero weight."),
    CalculationSpec(name="unit_l2_norm_grad", compute=unit_l2_norm_grad, lifetime=Lifetime.DIFFERENTIABLE,
                    summary="Per-unit L2 norm with autograd (regularizers)."),
)


@hookimpl
def wt_register_calculations() -> tuple[CalculationSpec, ...]:
    return CALCULATIONS
