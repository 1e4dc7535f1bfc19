"""Reduction plans: per-unit and per-layer reductions in a handful of kernels (SPEC §3.4).

A plan is compiled once per structure. Every member slice of every group is a *key*
``(parameter, dims, view)`` plus ``(position, unit)`` pairs; slices that share a key share
one reduction. Per call the plan

1. transforms each parameter once, element-wise (square, abs, ``== 0``), into a buffer the
   plan reuses, and reduces it for each of its keys over the other dims in contiguous
   stages (a parameter cut on rows only takes one fused ``vector_norm``); no slice is
   ever copied,
2. concatenates those per-position vectors (one kernel),
3. gathers the owned positions, sorted by unit when the plan is compiled, and reduces
   each unit's run (one ``segment_reduce``: deterministic on every device, unlike an
   ``index_add`` with atomics).

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
from .plan_backward import ANALYTIC_GRADS, PositionReduction, backward_recipe
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

    @property
    def leading_rows(self) -> bool:
        """Whether the positions are the leading dims (rows of a contiguous 2-D view)."""
        return self.dims == tuple(range(len(self.dims)))

    def reduce(self, values: torch.Tensor, maximum: bool = False) -> torch.Tensor:
        """Sum (or max) ``values`` (already element-wise transformed) over the other dims.

        Reductions run in contiguity-friendly stages on views: the dims before the first
        sliced dim are reduced as columns of a 2-D view, then the dims after the last one as
        rows, and anything in between on the (by then small) remainder. No slice is ever
        copied. Returns one value per position, row-major over ``dims`` in their given order.
        """
        t = values.reshape(self.shape)
        kept = sorted(self.dims)
        first, last = kept[0], kept[-1]
        # leading dims first: a column reduction of the full tensor streams contiguously
        # and leaves a much smaller tensor for the (short) trailing rows
        if first > 0:
            t = t.reshape(math.prod(self.shape[:first]), -1)
            t = t.amax(0) if maximum else t.sum(0)
        if last < len(self.shape) - 1:
            t = t.reshape(math.prod(self.shape[first : last + 1]), -1)
            t = t.amax(1) if maximum else t.sum(1)
        t = t.reshape(self.shape[first : last + 1])
        middle = [d - first for d in range(first, last + 1) if d not in kept]
        if middle:
            t = t.amax(dim=middle) if maximum else t.sum(dim=middle)
        if list(self.dims) != kept:
            order = sorted(range(len(self.dims)), key=lambda i: self.dims[i])
            t = t.permute(*[order.index(i) for i in range(len(self.dims))])
        if len(kept) == len(self.shape):
            return t.reshape(-1).clone()  # nothing was reduced: do not hand out the scratch
        return t.reshape(-1)


    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """Per-position ``values`` spread over the viewed shape (an expanded view, no copy)."""
        kept = sorted(self.dims)
        if list(self.dims) != kept:
            sizes = [self.shape[d] for d in self.dims]
            order = [self.dims.index(d) for d in kept]
            values = values.reshape(sizes).permute(*order)
        shape = [self.shape[d] if d in kept else 1 for d in range(len(self.shape))]
        return values.reshape(shape).expand(self.shape)


def _elementwise(tensor: torch.Tensor, op: str) -> torch.Tensor:
    if op == "sum_sq":
        return tensor * tensor
    if op in ("l1", "max_abs"):
        return tensor.abs()
    if op == "zeros":
        return tensor == 0
    return tensor


_ROW_NORMS = {"sum_sq": 2, "l1": 1, "max_abs": math.inf}


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
        units_tensor = torch.tensor(flat_units, dtype=torch.long)
        # owned positions sorted by unit: one deterministic segment reduction per call (an
        # index_add would use atomics on GPUs, and the same weights could sum differently)
        order = torch.argsort(units_tensor, stable=True)
        self._gather = torch.tensor(flat_gather, dtype=torch.long)[order]
        self._lengths = torch.bincount(units_tensor, minlength=self.num_units)
        self._units = units_tensor
        self._param_names = list(dict.fromkeys(k.name for k in self.keys))
        self._scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._recipes: dict[int, Any] = {}
        self._largest = max((math.prod(resolver(n).shape) for n in self._param_names), default=0)
        self._keys_by_param: dict[int, list[int]] = {}
        for k, key in enumerate(self.keys):
            self._keys_by_param.setdefault(self._param_names.index(key.name), []).append(k)
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
            self._lengths = self._lengths.to(device)
            self._device = device
        return self._gather, self._lengths

    def _positions(self, op: str, tensors: Sequence[torch.Tensor], fused: bool = True) -> torch.Tensor:
        """Per-position reductions of every key, concatenated in key order.

        Each parameter is transformed element-wise once (square, abs, ``== 0``) and every
        key of it reduces that one tensor. With ``fused``, parameters whose keys are all
        leading rows use one ``vector_norm`` per row and write nothing.
        """
        parts: list[torch.Tensor | None] = [None] * len(self.keys)
        maximum = op == "max_abs"
        for pi, key_ids in self._keys_by_param.items():
            tensor = tensors[pi]
            keys = [self.keys[k] for k in key_ids]
            if fused and op in _ROW_NORMS and all(k.leading_rows for k in keys):
                for k, key in zip(key_ids, keys):
                    rows = tensor.reshape(key.length, -1)
                    norm = torch.linalg.vector_norm(rows, _ROW_NORMS[op], dim=1)
                    parts[k] = norm.square() if op == "sum_sq" else norm
                continue
            if tensor.requires_grad and torch.is_grad_enabled():
                values = _elementwise(tensor, op)
            else:
                values = self._elementwise_scratch(tensor, op)
            for k, key in zip(key_ids, keys):
                parts[k] = key.reduce(values, maximum)
        if op == "zeros":
            return torch.cat([p.to(torch.float64) for p in parts])  # type: ignore[union-attr]
        return torch.cat(parts)  # type: ignore[arg-type]

    def _elementwise_scratch(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """``_elementwise`` written into a buffer the plan keeps between calls.

        Large temporaries would otherwise be fresh allocations on every call, and on CPU
        the page faults of fresh memory cost as much as the arithmetic. One buffer, the
        size of the largest parameter, is reused parameter after parameter.
        """
        if op == "sum":
            return tensor
        dtype = torch.bool if op == "zeros" else tensor.dtype
        key = (dtype, tensor.device)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < tensor.numel():
            buffer = torch.empty(self._largest, dtype=dtype, device=tensor.device)
            self._scratch[key] = buffer
        out = buffer[: tensor.numel()].view(tensor.shape)
        if op == "sum_sq":
            return torch.mul(tensor, tensor, out=out)
        if op == "zeros":
            return torch.eq(tensor, 0, out=out)
        return torch.abs(tensor, out=out)

    def _recipe(self, param_index: int) -> Any:
        """The cached backward recipe of one parameter (see ``plan_backward.backward_recipe``)."""
        if param_index not in self._recipes:
            keys = [self.keys[k] for k in self._keys_by_param[param_index]]
            self._recipes[param_index] = backward_recipe(keys)
        return self._recipes[param_index]

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
        gather, lengths = self._indices(device)
        inner = "sum_sq" if op == "l2" else op
        grad = grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            if grad and inner in ANALYTIC_GRADS:
                positions = PositionReduction.apply(self, inner, *tensors)
            else:
                positions = self._positions(inner, tensors, fused=not grad)
            values = positions.index_select(0, gather)
            if self.num_units == 0:
                out = values.new_zeros(0)
            else:
                out = torch.segment_reduce(
                    values, "max" if op == "max_abs" else "sum", lengths=lengths,
                    unsafe=True, initial=0.0,
                )
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
