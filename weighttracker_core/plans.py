"""Reduction plans: per-unit and per-layer reductions in a handful of kernels (SPEC §3.4).

A plan is compiled once per structure. Every member slice of every group is a *key*
``(parameter, dims, view)`` plus ``(position, unit)`` pairs; slices that share a key share
one reduction. Per call the plan

1. reduces each key's parameter over all dims but the sliced ones (one kernel per key:
   ``vector_norm`` / ``sum`` / ``amax`` along the other dims, never a copy of a slice),
2. concatenates those per-position vectors (one kernel),
3. gathers the owned positions and scatters them into units (one ``index_add`` or
   ``scatter_reduce``).

So the work per call grows with the number of distinct parameter slices, never with the
number of groups, members or units, and nothing loops over members.

Example: a ``Linear(2, 2)`` whose rows are units 0 and 1 with
``weight = [[3, 4], [0, 0]]`` gives ``unit_reduce("l2") == tensor([5., 0.])``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import PlanError
from .units import CanonicalUnitGroup, MemberSlice

UNIT_OPS = ("sum", "sum_sq", "l1", "l2", "max_abs", "zeros", "nonzeros", "numel")


def effective_parameter(module: nn.Module, attr: str) -> torch.Tensor:
    """The weight a layer really uses: ``orig * mask`` under ``torch.nn.utils.prune``.

    Parametrized parameters are computed by the attribute access itself.
    """
    orig = module._parameters.get(f"{attr}_orig") if hasattr(module, "_parameters") else None
    mask = getattr(module, f"{attr}_mask", None)
    if orig is not None and isinstance(mask, torch.Tensor):
        return orig * mask
    return getattr(module, attr)


class ParamResolver:
    """Resolves full parameter names to their current effective tensors.

    Owners are looked up once; the attribute is read on every call so that replaced
    parameters, parametrizations and pruning masks are always current.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._owners: dict[str, tuple[nn.Module, str]] = {}

    def owner(self, name: str) -> tuple[nn.Module, str]:
        if name not in self._owners:
            owner_name, _, attr = name.rpartition(".")
            try:
                owner = self.model.get_submodule(owner_name) if owner_name else self.model
            except AttributeError as err:
                raise PlanError(f"Parameter {name!r} is not in the model any more.") from err
            self._owners[name] = (owner, attr)
        return self._owners[name]

    def __call__(self, name: str) -> torch.Tensor:
        owner, attr = self.owner(name)
        value = effective_parameter(owner, attr)
        if value is None:
            raise PlanError(f"Parameter {name!r} is None; the structure is out of date.")
        return value

    def many(self, names: Iterable[str]) -> list[torch.Tensor]:
        return [self(n) for n in names]


def _full_name(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


class _Key:
    """One distinct (parameter, dims, view) reduction."""

    __slots__ = ("name", "dims", "view", "shape", "length", "per_position", "offset")

    def __init__(self, name: str, piece: MemberSlice, shape: tuple[int, ...]) -> None:
        self.name = name
        self.dims = piece.dims
        self.view = piece.view
        self.shape = piece.viewed_shape(shape)
        self.length = piece.axis_length(shape)
        self.per_position = piece.elements_per_position(shape)
        self.offset = 0
        ndim = len(self.shape)
        if any(not -ndim <= d < ndim for d in self.dims):
            raise PlanError(f"Slice of {name!r} uses dims {self.dims} on shape {self.shape}.")
        self.dims = tuple(d % ndim for d in self.dims)

    def others(self) -> tuple[int, ...]:
        return tuple(d for d in range(len(self.shape)) if d not in self.dims)

    def reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """Reduce ``tensor`` over every dim but the sliced ones: one value per position.

        Reductions run on the (viewed) tensor in place, so no slice is ever copied.
        """
        t = tensor.reshape(self.shape) if self.view is not None else tensor
        others = self.others()
        if not others:  # a 1-D slice (bias, norm weight): element-wise
            if op == "sum_sq":
                out = t * t
            elif op in ("l1", "max_abs"):
                out = t.abs()
            elif op == "sum":
                out = t
            else:
                out = (t == 0).to(torch.float64)
        elif op == "sum_sq":
            out = (t * t).sum(dim=others) if t.requires_grad else (
                torch.linalg.vector_norm(t, 2, dim=others).square()
            )
        elif op == "l1":
            out = torch.linalg.vector_norm(t, 1, dim=others)
        elif op == "sum":
            out = t.sum(dim=others)
        elif op == "max_abs":
            out = torch.linalg.vector_norm(t, math.inf, dim=others)
        else:
            total = math.prod(self.shape[d] for d in others)
            out = (total - torch.count_nonzero(t, dim=others)).to(torch.float64)
        if list(self.dims) != sorted(self.dims):
            order = sorted(range(len(self.dims)), key=lambda i: self.dims[i])
            out = out.permute(*[order.index(i) for i in range(len(self.dims))])
        return out.reshape(-1)


class ReductionPlan:
    """Compiled index tensors reducing member slices into per-unit values.

    Args:
        groups: The canonical groups; units are numbered ``0..num_units-1`` globally.
        resolver: Maps full parameter names to current tensors.
        keep: Optional ``(group, member_name) -> bool``; members for which it is false
            are left out (``include`` / ``ignore`` filters).
    """

    def __init__(
        self,
        groups: Sequence[CanonicalUnitGroup],
        resolver: ParamResolver,
        keep: Callable[[CanonicalUnitGroup, str], bool] | None = None,
    ) -> None:
        self.resolver = resolver
        self.num_units = sum(g.n_units for g in groups)
        keys: dict[tuple[Any, ...], _Key] = {}
        index_of: dict[tuple[Any, ...], int] = {}
        gather: list[list[int]] = []
        units: list[list[int]] = []
        for group in groups:
            for member, piece in group.iter_slices():
                if keep is not None and not keep(group, member.module_name):
                    continue
                name = _full_name(member.module_name, piece.param)
                signature = (name, piece.dims, piece.view)
                if signature not in keys:
                    shape = tuple(resolver(name).shape)
                    keys[signature] = _Key(name, piece, shape)
                    index_of[signature] = len(gather)
                    gather.append([])
                    units.append([])
                index = index_of[signature]
                key = keys[signature]
                if any(not 0 <= p < key.length for p in piece.positions):
                    raise PlanError(f"Positions of {name!r} exceed its {key.length} slices.")
                gather[index].extend(piece.positions)
                units[index].extend(group.offset + u for u in piece.units)
        self.keys = list(keys.values())
        offset = 0
        for key in self.keys:
            key.offset = offset
            offset += key.length
        self.num_positions = offset
        flat_gather = [k.offset + p for k, g in zip(self.keys, gather) for p in g]
        flat_units = [u for us in units for u in us]
        self._gather = torch.tensor(flat_gather, dtype=torch.long)
        self._units = torch.tensor(flat_units, dtype=torch.long)
        self._param_names = list(dict.fromkeys(k.name for k in self.keys))
        self._key_param = [self._param_names.index(k.name) for k in self.keys]
        per_position = torch.tensor(
            [k.per_position for k, g in zip(self.keys, gather) for _ in g], dtype=torch.float64
        )
        numel = torch.zeros(self.num_units, dtype=torch.float64)
        numel.index_add_(0, self._units, per_position)
        self._numel = numel
        self._device: torch.device | None = None

    # ------------------------------------------------------------------------- internals

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._device != device:
            self._gather = self._gather.to(device)
            self._units = self._units.to(device)
            self._device = device
        return self._gather, self._units

    def _positions(self, op: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Per-position reductions of every key, concatenated."""
        parts = [key.reduce(tensors[pi], op) for key, pi in zip(self.keys, self._key_param)]
        if op == "zeros":
            parts = [p.to(torch.float64) for p in parts]
        return torch.cat(parts)

    # ---------------------------------------------------------------------------- public

    @property
    def param_names(self) -> list[str]:
        """Full names of the parameters this plan reads."""
        return list(self._param_names)

    def unit_numel(self) -> torch.Tensor:
        """Number of weight elements each unit owns (float64; slices counted per owner)."""
        return self._numel.clone()

    def unit_reduce(
        self, op: str, *, grad: bool = False, tensors: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """One value per global unit.

        Args:
            op: ``sum``, ``sum_sq``, ``l1``, ``l2``, ``max_abs``, ``zeros``, ``nonzeros``
                or ``numel``.
            grad: Keep the autograd graph (regularizers). ``l2`` then has a zero (not NaN)
                gradient at units whose weights are all zero.
            tensors: Parameter tensors in ``param_names`` order (default: the model's
                current effective parameters).

        Returns:
            A tensor of length ``num_units`` on the parameters' device.
        """
        if op not in UNIT_OPS:
            raise PlanError(f"Unknown reduction {op!r}; choose one of {', '.join(UNIT_OPS)}.")
        if op == "numel":
            return self.unit_numel()
        if op == "nonzeros":
            zeros = self.unit_reduce("zeros", tensors=tensors)
            return self._numel.to(zeros) - zeros
        if tensors is None:
            tensors = self.resolver.many(self._param_names)
        if not tensors:
            return torch.zeros(self.num_units)
        device, dtype = tensors[0].device, tensors[0].dtype
        gather, units = self._indices(device)
        inner = "sum_sq" if op == "l2" else op
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            values = self._positions(inner, tensors).index_select(0, gather)
            out = torch.zeros(self.num_units, device=device, dtype=values.dtype)
            if op == "max_abs":
                out = out.scatter_reduce(0, units, values, reduce="amax", include_self=True)
            else:
                out = out.index_add(0, units, values)
            if op == "l2":
                out = safe_sqrt(out)
        return out if op == "zeros" else out.to(dtype)

    def group_values(self, values: torch.Tensor, group: CanonicalUnitGroup) -> torch.Tensor:
        """The slice of a per-unit tensor that belongs to ``group``."""
        return values[group.offset : group.offset + group.n_units]


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt`` whose gradient at 0 is 0 instead of ``inf`` (so ``0 * inf`` never gives NaN)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)
