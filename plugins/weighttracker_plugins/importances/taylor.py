"""First-order Taylor importance: sum of |w * dL/dw| over a unit's coupled weights.

Removing a weight changes the loss by about ``-w * dL/dw``; a unit's score adds up the
magnitudes of that estimate over every weight it owns, in every member of its group
(Molchanov et al., CVPR 2019). Gradients are read from ``.grad`` of the tensors the layers
store, so run ``loss.backward()`` on a batch before scoring. Under
``torch.nn.utils.prune`` the stored tensor is ``weight_orig`` and its gradient already
carries the mask, so ``orig * grad`` equals the effective ``w * dL/dw``.

Example: a unit owning ``w = [1, -2]`` with ``grad = [0.5, 0.25]`` scores
``|1 * 0.5| + |-2 * 0.25| = 1.0``; with ``multivariable=True`` it scores
``|0.5 - 0.5| = 0``.
"""

from __future__ import annotations

import attrs
import torch

from weighttracker_core.plugin import (
    BuildContext,
    Evaluation,
    ImportanceSpec,
    PruningError,
    hookimpl,
    stored_parameter,
)

from ._unit_plans import mark_unscored, role_plan


@attrs.frozen(kw_only=True)
class TaylorOptions:
    """Options of the ``taylor`` importance.

    Args:
        include_bias: Count biases too (Torch-Pruning leaves them out by default).
        multivariable: Score ``|sum(w * grad)|`` over the unit (the change of the loss
            when the whole unit goes) instead of ``sum |w * grad|``.
    """

    include_bias: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    multivariable: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


class TaylorScore:
    """``score(values) -> tensor[num_units]`` from the current weights and gradients."""

    def __init__(self, ctx: BuildContext) -> None:
        options = ctx.options if ctx.options is not None else TaylorOptions()
        self.multivariable = options.multivariable
        self.model = ctx.structure.model
        self.plan = role_plan(ctx.structure, options.include_bias)

    def _products(self) -> list[torch.Tensor]:
        out = []
        for name in self.plan.param_names:
            owner_name, _, attr = name.rpartition(".")
            owner = self.model.get_submodule(owner_name) if owner_name else self.model
            stored = stored_parameter(owner, attr)
            grad = None if stored is None else stored.grad
            if grad is None:
                raise PruningError(
                    f"The 'taylor' importance needs gradients, but parameter {name!r} has no "
                    ".grad. Run loss.backward() on a batch right before pruner.step() (and "
                    "do not zero the gradients in between)."
                )
            out.append(stored.detach() * grad.detach())
        return out

    def __call__(self, values: Evaluation) -> torch.Tensor:
        with torch.no_grad():
            products = self._products()
            if self.multivariable:
                scores = self.plan.unit_reduce("sum", tensors=products).abs()
            else:
                scores = self.plan.unit_reduce("l1", tensors=products)
        return mark_unscored(scores, self.plan)


IMPORTANCES = (
    ImportanceSpec(name="taylor", build=TaylorScore, options=TaylorOptions,
                   summary="First-order Taylor: sum of |w * grad| over a unit's weights."),
)


@hookimpl
def wt_register_importances() -> tuple[ImportanceSpec, ...]:
    return IMPORTANCES
