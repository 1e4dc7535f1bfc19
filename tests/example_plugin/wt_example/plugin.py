"""The wt-example plugin: a unit rule for ``GatedLinear`` and a ``closed_gate_fraction`` tracker.

Declared in this package's ``pyproject.toml`` under ``[project.entry-points.weighttracker]``
as ``wt_example = "wt_example.plugin"``; weighttracker finds it without any core change.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from weighttracker_core import TrackerSpec, UnitRule, hookimpl

from .gated_linear import GATED_LINEAR_RULE, GatedLinear


@attrs.frozen(kw_only=True)
class ClosedGateOptions:
    """``atol``: a gate with ``|gate| <= atol`` counts as closed."""

    atol: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))


class ClosedGateFraction:
    """Share of ``GatedLinear`` output features whose gate is closed (e.g. 1 of 4 -> 0.25)."""

    def __init__(self, ctx: Any) -> None:
        self.structure = ctx.structure
        self.atol = ctx.options.atol
        self.layers = [
            info.name for info in ctx.structure.selected_modules(ctx.selection)
            if issubclass(info.module_type, GatedLinear)
        ]

    def track(self, values: Any) -> dict[str, Any]:
        gates = [self.structure.module(name).gate.detach() for name in self.layers]
        if not gates:
            return {"closed_gate_fraction": 0.0, "gates": 0}
        flat = torch.cat(gates)
        return {
            "closed_gate_fraction": (flat.abs() <= self.atol).double().mean(),
            "gates": flat.numel(),
        }


@hookimpl
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    return (GATED_LINEAR_RULE,)


@hookimpl
def wt_register_trackers() -> tuple[TrackerSpec, ...]:
    return (
        TrackerSpec(
            name="closed_gate_fraction",
            build=ClosedGateFraction,
            options=ClosedGateOptions,
            summary="Share of GatedLinear features whose gate is closed.",
        ),
    )
