"""``bops_group_lasso``: group lasso whose per-unit weights follow hardware cost.

The penalty is ``sum_u lambda_u * ||w_u||_2``. ``w_u`` is every element unit ``u`` owns in
the selected layers (all coupled members and slices, biases included, exactly as in
``group_lasso``). The weight ``lambda_u`` is the BOPs the unit stands for:

    c_u = sum over counted layers m, cost terms t of m, cost axes a of t:
              BaselineMACs_t * b_weight_m * b_act_m * k_{u,a} / n_a

where ``k_{u,a}`` is the number of channels of axis ``a`` that unit ``u`` covers and ``n_a``
the axis' size (see ``calculations/cost_model.py``; most layers have a single term holding
all their MACs and scaling with their input and output channels). So ``c_u`` is what
removing ``u`` alone from the dense model saves, to first order: a channel between two
wide, high-resolution, 8-bit convolutions costs more than one feeding a small linear head.
With ``normalize=True`` (default) ``lambda_u = c_u / mean(c)``, the mean over the units
that own a selected element, so the penalty has the scale of a plain group lasso and the
same strength can be reused; with ``normalize=False`` ``lambda_u = c_u``.

Worked example (one token, 32-bit widths): ``fc1 = Linear(2, 4)`` (8 MACs) feeding
``fc2 = Linear(4, 1)`` (4 MACs). Each hidden unit covers one of fc1's 4 output rows and one
of fc2's 4 input columns: ``c = 1024 * (8 / 4 + 4 / 4) = 3072``; fc2's output unit covers
its single row: ``c = 1024 * 4 = 4096``. The mean over the 5 units is 3276.8, so
``lambda = 0.9375`` for the hidden units and ``1.25`` for the output unit.

Bit-widths are read on every call (they may change during quantization-aware training);
baseline MACs are static. The norm has a zero (not NaN) gradient at all-zero units.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from weighttracker_core.plugin import BuildContext, ConfigError, RegularizerSpec, hookimpl

from ..calculations.cost import read_bitwidths
from ..calculations.cost_model import CostModel
from ..trackers._layers import counted_layers
from .proximal import ProximalStep


@attrs.frozen(kw_only=True)
class BopsGroupLassoOptions:
    """Options of ``bops_group_lasso``.

    Attributes:
        normalize: Divide every unit's BOPs by their mean (default), so that the weights
            average 1; ``False`` uses raw BOPs (then scale the strength down accordingly).
    """

    normalize: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))


class BopsGroupLasso:
    """The built ``bops_group_lasso`` regularizer; calling it returns the penalty.

    Created by ``tracker.create_regularizer("bops_group_lasso", include=..., ignore=...,
    normalize=...)``. Costs count the layers a BOPs tracker with the same ``include`` /
    ``ignore`` would count (weighted layers unless others are named in ``include``); norms
    cover every selected member.
    """

    def __init__(self, ctx: BuildContext) -> None:
        self.structure = ctx.structure
        self.bitwidths = ctx.bitwidths
        self.selection = ctx.selection
        self.options: BopsGroupLassoOptions = ctx.options or BopsGroupLassoOptions()
        self.layers = counted_layers(ctx.structure, ctx.selection, ctx.name)
        self.plan = self.structure.plan(self.selection)
        model: CostModel = ctx.graph.evaluation()["cost_model"]  # static: cached per structure
        units, terms, shares = model.unit_term_shares()
        position = {info.index: i for i, info in enumerate(self.layers)}
        term_layer = model.term_layer.tolist()
        keep_term = torch.tensor([layer in position for layer in term_layer], dtype=torch.bool)
        keep = keep_term[terms] if len(terms) else torch.zeros(0, dtype=torch.bool)
        term_ids = keep_term.nonzero().flatten()
        local = torch.full((len(term_layer),), -1, dtype=torch.long)
        local[term_ids] = torch.arange(len(term_ids))
        self._pair_unit = units[keep]
        self._pair_term = local[terms[keep]]
        self._pair_share = shares[keep]
        self._term_macs = model.term_macs[term_ids]
        self._term_layer = torch.tensor([position[term_layer[t]] for t in term_ids.tolist()], dtype=torch.long)
        self._owned = self.plan.unit_numel() > 0
        costs = self.unit_costs()
        if not bool((costs[self._owned] > 0).any()):
            raise ConfigError(
                f"{ctx.name}: the selected layers cost no MACs that any unit could remove "
                "(no counted layer with baseline MACs is cut by a selected unit), so every "
                "weight would be 0. Select layers listed by tracker.view_structures() that "
                "have MACs, or use group_lasso."
            )
        self._proximal = ProximalStep(self.structure, self.selection, self.plan)

    # --------------------------------------------------------------------------- weights

    def _layer_bits(self) -> torch.Tensor:
        weight = read_bitwidths(self.bitwidths, self.structure, self.layers, "weight")
        activation = read_bitwidths(self.bitwidths, self.structure, self.layers, "activation")
        return torch.tensor([w * a for w, a in zip(weight, activation)], dtype=torch.float64)

    def unit_costs(self) -> torch.Tensor:
        """``c_u``: BOPs each global unit stands for (float64 ``[num_units]``, CPU)."""
        term_bops = self._term_macs * self._layer_bits()[self._term_layer]
        costs = torch.zeros(self.structure.num_units, dtype=torch.float64)
        return costs.index_add_(0, self._pair_unit, self._pair_share * term_bops[self._pair_term])

    def unit_weights(self) -> torch.Tensor:
        """``lambda_u`` of every global unit (float64 ``[num_units]``, CPU).

        Units that own no selected element get 0.
        """
        costs = torch.where(self._owned, self.unit_costs(), 0.0)
        if not self.options.normalize:
            return costs
        return costs / costs[self._owned].mean()

    def unit_norms(self) -> torch.Tensor:
        """``||w_u||_2`` of every global unit, without autograd."""
        with torch.no_grad():
            return self.plan.unit_reduce("l2")

    # ---------------------------------------------------------------------------- penalty

    def __call__(self, evaluation: Any = None) -> torch.Tensor:
        return self.plan.weighted_l2(
            lambda norms: self.unit_weights().to(device=norms.device, dtype=norms.dtype))

    def proximal_step_(self, lr: float, strength: float) -> torch.Tensor:
        """Block soft-thresholding with BOPs-weighted thresholds (in place, no autograd).

        Every element of unit ``u`` is multiplied by
        ``max(0, 1 - lr * strength * lambda_u / ||w_u||_2)``, so expensive units shrink
        faster and weak ones become exactly zero (then ``prune_zero_units()`` removes
        them). Use it instead of adding ``strength * penalty`` to the loss, after
        ``optimizer.step()``, with the learning rate just used.

        Returns:
            The factor applied to each global unit (0: the unit is now exactly zero).
        """
        return self._proximal(
            lr, strength, lambda norms: self.unit_weights().to(device=norms.device, dtype=norms.dtype)
        )


@hookimpl
def wt_register_regularizers() -> tuple[RegularizerSpec, ...]:
    return (
        RegularizerSpec(
            name="bops_group_lasso",
            build=BopsGroupLasso,
            options=BopsGroupLassoOptions,
            requires=("cost_model",),
            summary="sum_u lambda_u * ||w_u||_2 with lambda_u the BOPs unit u costs (normalized).",
        ),
    )
