"""The wt-example plugin: a unit rule for ``GatedLinear`` and a ``closed_gate_fraction`` tracker.

Declared in this package's ``pyproject.toml`` under ``[project.entry-points.weighttracker]``
as ``wt_example = "wt_example.plugin"``; weighttracker finds it without any core change.
It imports only ``weighttracker_core.plugin`` and passes ``mypy --strict``.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from weighttracker_core.plugin import (
    BuildContext,
    Evaluation,
    StructureQueries,
    TrackerSpec,
    UnitRule,
    hookimpl,
)

from .gated_linear import GATED_LINEAR_RULE, GatedLinear


@attrs.frozen(kw_only=True)
class ClosedGateOptions:
    """``atol``: a gate with ``|gate| <= atol`` counts as closed."""

    atol: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))


def _gate(module: nn.Module) -> torch.Tensor:
    assert isinstance(module, GatedLinear)
    return module.gate.detach()


class ClosedGateFraction:
    """Share of ``GatedLinear`` output features whose gate is closed (e.g. 1 of 4 -> 0.25)."""

    def __init__(self, ctx: BuildContext) -> None:
        self.structure: StructureQueries = ctx.structure
        options: ClosedGateOptions = ctx.options
        self.atol = options.atol
        self.layers = [
            info.name for info in ctx.structure.selected_modules(ctx.selection)
            if issubclass(info.module_type, GatedLinear)
        ]

    def track(self, values: Evaluation) -> dict[str, torch.Tensor | float | int]:
        gates = [_gate(self.structure.module(name)) for name in self.layers]
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
