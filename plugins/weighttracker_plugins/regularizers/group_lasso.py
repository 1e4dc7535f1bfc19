"""``group_lasso``: the group lasso over canonical units, with its proximal step.

The penalty is ``sum_u c_u * ||w_u||_2`` where ``w_u`` is every parameter element unit
``u`` owns — all coupled members, all slices, weights *and* biases (conv/linear biases,
norm shifts) — and ``c_u = sqrt(p_u)`` with ``p_u`` the number of those elements (Yuan &
Lin's weighting, so wide and narrow units are pressed alike), or ``c_u = 1`` with
``weighting="none"``.

Why biases count: a unit is zero, and ``prune_zero_units()`` removes it, only when every
element it owns is zero — biases and norm shifts included. A penalty that left biases
alone could never empty a unit with a bias.

Worked example: units 0 and 1 are the rows of a ``Linear(2, 2)`` without bias,
``weight = [[3, 4], [0, 0]]``; each owns ``p_u = 2`` elements, so the penalty is
``sqrt(2) * 5 + sqrt(2) * 0 = 7.071`` (and ``5.0`` with ``weighting="none"``).

The proximal step (``proximal_step_(lr=..., strength=...)``) is block soft-thresholding
per unit: every element of unit ``u`` is multiplied by
``max(0, 1 - lr * strength * c_u / ||w_u||_2)``. For the example above with
``lr * strength = 1`` and ``weighting="none"``, row 0 becomes ``[3, 4] * (1 - 1/5) =
[2.4, 3.2]`` and row 1 stays zero.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from weighttracker_core.plugin import BuildContext, ConfigError, RegularizerSpec, hookimpl

from .proximal import ProximalStep

WEIGHTINGS = ("sqrt_numel", "none")


@attrs.frozen(kw_only=True)
class GroupLassoOptions:
    """Options of ``group_lasso``.

    Attributes:
        weighting: ``"sqrt_numel"`` (default) multiplies each unit's norm by the square
            root of its element count (Yuan & Lin); ``"none"`` sums the plain norms.
    """

    weighting: str = attrs.field(default="sqrt_numel", validator=attrs.validators.in_(WEIGHTINGS))


class GroupLasso:
    """The built ``group_lasso`` regularizer; calling it returns the penalty.

    Created by ``tracker.create_regularizer("group_lasso", include=..., ignore=...,
    weighting=...)``; only coupled members in layers the ``include`` / ``ignore``
    selection picks count, both in the penalty and in the proximal step.
    """

    def __init__(self, ctx: BuildContext) -> None:
        self.structure = ctx.structure
        self.selection = ctx.selection
        self.options: GroupLassoOptions = ctx.options or GroupLassoOptions()
        if not self.selection.is_everything:
            self.structure.selected_modules(self.selection)  # raises if nothing is selected
        self.plan = self.structure.plan(self.selection)
        if not self.plan.param_names:
            raise ConfigError(
                "group_lasso: the include/ignore selection leaves no layer that belongs to a "
                "canonical unit group, so the penalty would always be 0. Select layers "
                "listed by tracker.view_structures()."
            )
        numel = self.plan.unit_numel()
        if self.options.weighting == "sqrt_numel":
            self._coefficients = torch.sqrt(numel)
        else:
            self._coefficients = (numel > 0).to(numel.dtype)
        self._proximal = ProximalStep(self.structure, self.selection, self.plan)

    def coefficients(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """``c_u`` of every global unit (0 for units with no selected element)."""
        if like is None:
            return self._coefficients.clone()
        if self._coefficients.device != like.device or self._coefficients.dtype != like.dtype:
            self._coefficients = self._coefficients.to(device=like.device, dtype=like.dtype)
        return self._coefficients

    def unit_norms(self) -> torch.Tensor:
        """``||w_u||_2`` of every global unit, without autograd."""
        with torch.no_grad():
            return self.plan.unit_reduce("l2")

    def __call__(self, evaluation: Any = None) -> torch.Tensor:
        return self.plan.weighted_l2(self.coefficients)

    def proximal_step_(self, lr: float, strength: float) -> torch.Tensor:
        """Block soft-thresholding: shrink every unit, and zero the weak ones exactly.

        Every element of unit ``u`` (all members and slices, biases included) is
        multiplied, in place and without autograd, by
        ``max(0, 1 - lr * strength * c_u / ||w_u||_2)``; units whose norm is at most the
        threshold become exactly zero. Factors are computed from the norms before the
        step; an element shared by two units (a conv weight is in its output channel's
        unit and in its input channel's unit) gets the product of both factors.

        Use it *instead of* adding ``strength * group_lasso()`` to the loss (the proximal
        gradient method), after ``optimizer.step()``, with the learning rate the optimizer
        just used. With momentum or Adam it is the usual approximation.

        Args:
            lr: The learning rate of the step just taken (``>= 0``).
            strength: The penalty's multiplier (``>= 0``).

        Returns:
            The factor applied to each global unit (0: the unit is now exactly zero).

        Example::

            import torch
            from torch import nn
            from weighttracker_core import WeightTracker

            model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
            tracker = WeightTracker(model, torch.randn(1, 3, 8, 8), ignored_layers=[model[2]])
            lasso = tracker.create_regularizer("group_lasso")
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(50):
                optimizer.zero_grad()
                model(torch.randn(4, 3, 8, 8)).square().mean().backward()
                optimizer.step()
                lasso.proximal_step_(lr=0.1, strength=0.05)
            tracker.prune_zero_units()
        """
        return self._proximal(lr, strength, self.coefficients)


@hookimpl
def wt_register_regularizers() -> tuple[RegularizerSpec, ...]:
    return (
        RegularizerSpec(
            name="group_lasso",
            build=GroupLasso,
            options=GroupLassoOptions,
            summary="sum_u sqrt(p_u) * ||w_u||_2 over canonical units, with proximal_step_().",
        ),
    )
