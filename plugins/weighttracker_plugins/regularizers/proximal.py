"""Scale every weight a canonical unit owns by a per-unit factor, in place.

This is the write half of a proximal step: a regularizer computes one factor per global
unit (from the reduction plan's per-unit norms) and :class:`UnitScaler` multiplies every
slice each unit owns, in every coupled layer, by that factor. A factor of 0 makes the
unit exactly zero everywhere, so ``tracker.prune_zero_units()`` can then remove it.

The index bookkeeping is compiled once per structure; each call runs one gather and one
in-place multiply per distinct parameter slice (never a loop over units).

Frozen parameters (``requires_grad=False``) are never written: a frozen layer keeps its
values, and a unit that owns elements there is scaled in its trainable layers only (so it
becomes exactly zero only if its frozen elements already are). A NaN or infinite weight
is refused by name before anything is written: its units' norms would be NaN, and
soft-thresholding would zero their finite weights while the NaN stayed.

Example: a ``Linear(2, 2)`` whose rows are units 0 and 1 with
``weight = [[3, 4], [1, 1]]`` and factors ``[0.5, 0.0]`` becomes
``[[1.5, 2.0], [0.0, 0.0]]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from weighttracker_core.plugin import (
    ConfigError,
    MemberSlice,
    NonFiniteWeightError,
    Selection,
    Structure,
    stored_parameter,
)


def check_rate(name: str, value: Any) -> float:
    """``value`` as a finite float >= 0, else a ``ConfigError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"proximal_step_ needs a number for {name}=, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"proximal_step_ needs a finite {name} >= 0, got {value!r}. Pass the optimizer's "
            "learning rate as lr= and the penalty's multiplier in the loss as strength=."
        )
    return value


class _SliceScaler:
    """One distinct (module, parameter, dims, view) slice and the unit of each position."""

    __slots__ = ("module", "name", "piece", "positions", "units", "direct")

    def __init__(self, module: Any, name: str, piece: MemberSlice, positions: list[int],
                 units: list[int], length: int) -> None:
        self.module = module
        self.name = name
        self.piece = piece
        pos = torch.tensor(positions, dtype=torch.long)
        unit = torch.tensor(units, dtype=torch.long)
        order = torch.argsort(pos, stable=True)
        # the common case: every position is owned by exactly one unit, so the factor of
        # position p is simply factors[unit of p] (a gather, no scatter needed)
        self.direct = bool(len(positions) == length and torch.equal(pos[order], torch.arange(length)))
        self.positions = pos if not self.direct else None
        self.units = unit[order] if self.direct else unit

    def scale_(self, factors: torch.Tensor) -> None:
        tensor = stored_parameter(self.module, self.piece.param)
        if tensor is None or (isinstance(tensor, nn.Parameter) and not tensor.requires_grad):
            return  # frozen parameters stay as they are
        shape = self.piece.viewed_shape(tuple(tensor.shape))
        ndim = len(shape)
        dims = tuple(d % ndim for d in self.piece.dims)
        sizes = [shape[d] for d in dims]
        length = math.prod(sizes)
        if self.units.device != tensor.device:
            self.units = self.units.to(tensor.device)
            if self.positions is not None:
                self.positions = self.positions.to(tensor.device)
        owned = factors.to(tensor.device).index_select(0, self.units)
        if self.direct:
            per_position = owned
        else:
            # positions owned by several units get the product of their factors
            per_position = torch.ones(length, device=tensor.device, dtype=owned.dtype)
            per_position.scatter_reduce_(0, self.positions, owned, reduce="prod")
        per_position = per_position.reshape(sizes)
        if list(dims) != sorted(dims):
            per_position = per_position.permute(*sorted(range(len(dims)), key=lambda i: dims[i]))
        broadcast = [shape[d] if d in dims else 1 for d in range(ndim)]
        per_position = per_position.reshape(broadcast).to(tensor.dtype)
        viewed = tensor.view(shape) if self.piece.view is not None else tensor
        viewed.mul_(per_position)


class UnitScaler:
    """Multiplies the slices of every unit by a per-unit factor (in place, no autograd).

    Writes go to the tensor a layer stores: ``weight_orig`` under
    ``torch.nn.utils.prune`` (so ``orig * mask`` is scaled too), the ``original`` of a
    parametrization, else the parameter itself.

    Args:
        structure: The tracker's structure (``ctx.structure``).
        selection: Only members in selected layers are scaled (``ctx.selection``).
    """

    def __init__(self, structure: Structure, selection: Selection | None = None) -> None:
        self.num_units = structure.num_units
        collected: dict[tuple[Any, ...], tuple[MemberSlice, list[int], list[int], int]] = {}
        modules: dict[str, Any] = {}
        everything = selection is None or selection.is_everything
        for group in structure.groups:
            for member, piece in group.iter_slices():
                if not everything and not selection.selects(member.module_name):  # type: ignore[union-attr]
                    continue
                module = modules.setdefault(member.module_name, structure.module(member.module_name))
                tensor = stored_parameter(module, piece.param)
                if tensor is None:
                    continue
                key = (member.module_name, piece.param, piece.dims, piece.view)
                if key not in collected:
                    collected[key] = (piece, [], [], piece.axis_length(tuple(tensor.shape)))
                _, positions, units, _ = collected[key]
                positions.extend(piece.positions)
                units.extend(group.offset + u for u in piece.units)
        self._slices = [
            _SliceScaler(modules[key[0]], f"{key[0]}.{key[1]}" if key[0] else key[1], piece,
                         positions, units, length)
            for key, (piece, positions, units, length) in collected.items()
        ]

    @property
    def num_slices(self) -> int:
        """Distinct parameter slices one call touches."""
        return len(self._slices)

    def non_finite(self) -> dict[str, str]:
        """``{parameter name: what is wrong}`` for every scaled parameter with NaN or inf values.

        One sum per distinct tensor (NaN or inf anywhere makes it non-finite); only a
        tensor whose sum is not finite is scanned element by element, so finite weights
        whose sum overflows are not reported. Example: ``{"0.weight": "1 NaN (first at
        index (2, 1, 0, 0))"}``.
        """
        named: dict[int, tuple[str, torch.Tensor]] = {}
        for piece in self._slices:
            tensor = stored_parameter(piece.module, piece.piece.param)
            if tensor is not None:
                named.setdefault(id(tensor), (piece.name, tensor))
        found: dict[str, str] = {}
        if not named:
            return found
        with torch.no_grad():
            # one sum per tensor and a single sync (tensors may live on several devices)
            sums = [tensor.sum().to("cpu", torch.float64) for _, tensor in named.values()]
            if bool(torch.isfinite(torch.stack(sums)).all()):
                return found
            for name, tensor in named.values():
                finite = torch.isfinite(tensor)
                if bool(finite.all()):
                    continue
                num_nan = int(torch.isnan(tensor).sum())
                num_inf = int((~finite).sum()) - num_nan
                first = tuple(int(i) for i in (~finite).nonzero()[0])
                parts = [f"{num_nan} NaN"] if num_nan else []
                parts += [f"{num_inf} infinite"] if num_inf else []
                found[name] = f"{' and '.join(parts)} value(s) (first at index {first})"
        return found

    def scale_(self, factors: torch.Tensor) -> None:
        """Multiply every slice of unit ``u`` by ``factors[u]`` (length ``num_units``).

        Parameters with ``requires_grad=False`` are left as they are.
        """
        if factors.shape != (self.num_units,):
            raise ValueError(
                f"factors must have one value per unit (shape ({self.num_units},)); "
                f"got shape {tuple(factors.shape)}."
            )
        with torch.no_grad():
            for piece in self._slices:
                piece.scale_(factors)


class ProximalStep:
    """Block soft-thresholding of canonical units, shared by the group-lasso regularizers.

    ``step(lr, strength, coefficients)`` multiplies every element of unit ``u`` by
    ``max(0, 1 - lr * strength * c_u / ||w_u||_2)`` in place (no autograd), where
    ``coefficients(norms)`` gives ``c_u``; it returns those factors. Example: norms
    ``[5, 0.5]``, ``c = [1, 1]``, ``lr * strength = 1`` give factors ``[0.8, 0.0]``.
    Frozen parameters are not written; NaN or infinite weights raise ``ConfigError``
    naming them, and nothing is changed.
    """

    def __init__(self, structure: Structure, selection: Selection, plan: Any) -> None:
        self.structure = structure
        self.selection = selection
        self.plan = plan
        self._scaler: UnitScaler | None = None

    def __call__(
        self, lr: Any, strength: Any, coefficients: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        lr = check_rate("lr", lr)
        strength = check_rate("strength", strength)
        with torch.no_grad():
            if self._scaler is None:
                self._scaler = UnitScaler(self.structure, self.selection)
            culprits = self._scaler.non_finite()
            if culprits:
                raise _non_finite_error(culprits)
            norms = self.plan.unit_reduce("l2")
            threshold = (lr * strength) * coefficients(norms)
            tiny = torch.finfo(norms.dtype).tiny
            factors = torch.where(norms > threshold, 1 - threshold / norms.clamp_min(tiny), 0.0)
            self._scaler.scale_(factors)
        return factors


def _non_finite_error(culprits: dict[str, str]) -> NonFiniteWeightError:
    listed = "; ".join(f"{name!r} has {what}" for name, what in culprits.items())
    return NonFiniteWeightError(
        f"proximal_step_ refused: {listed}. Nothing was changed: the norm of a unit with a "
        "non-finite weight is meaningless, and the step would zero its finite weights while the "
        "NaN stayed. Replace those values (reload a checkpoint; if training diverged, lower the "
        "learning rate) and call proximal_step_ again."
    )
