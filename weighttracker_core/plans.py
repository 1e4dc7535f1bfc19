"""Reduction plans: per-unit and per-layer reductions in a handful of kernels.

A plan is compiled once per structure. Every member slice of every group is a *key*
``(parameter, dims, view)`` plus ``(position, unit)`` pairs; slices that share a key share
one reduction. Per call the plan

1. transforms each parameter element-wise (square, abs, or the magnitude bits
   ``bits(w) & 0x7fff...`` whose integer order is the order of ``|w|``), and reduces it for
   each of its keys over the other dims in contiguous stages; no slice is ever copied,
2. concatenates those per-position vectors (one kernel),
3. gathers the owned positions, sorted by unit when the plan is compiled, and reduces
   each unit's run (one ``segment_reduce``: deterministic on every device, unlike an
   ``index_add`` with atomics).

Small parameters (at most :data:`SMALL_ELEMENTS` elements: biases, norms, the convs of a
CIFAR network) are copied into one flat buffer per call and every parameter of the same
shape and keys is reduced by one kernel on a ``[n, *shape]`` view, so a small model costs a
few dozen kernels, not a few per parameter. Larger parameters are reduced in place; the
element-wise values go to a scratch buffer of at most :data:`SCRATCH_ELEMENTS` elements,
filled a slice of whole rows at a time (a parameter whose single row along dim 0 is larger
takes one row at a time). One scratch buffer per dtype and device is shared by every plan
of a structure.

So the work per call grows with the number of distinct parameter shapes and large
parameters, never with the number of groups, members or units, and nothing loops over
members. Index tensors use ``int32`` while they fit.

Example: a ``Linear(2, 2)`` whose rows are units 0 and 1 with
``weight = [[3, 4], [0, 0]]`` gives ``unit_reduce("l2") == tensor([5., 0.])``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import NonFiniteWeightError, PlanError
from .names import join_name, owner_of
from .plan_backward import ANALYTIC_GRADS, PositionReduction, WeightedNorms, backward_recipe
from .plan_layout import Batch, Key, Layout, Member, Pack, flat_copy, index_dtype, reduce_keep, spans_devices
from .plan_scan import Scanner, nonfinite_error
from .units import CanonicalUnitGroup

UNIT_OPS = ("sum", "sum_sq", "l1", "l2", "max_abs", "zeros", "nonzeros", "numel")

#: Parameters with at most this many elements are batched: copied into one flat buffer per
#: call and reduced together with every parameter of the same shape.
SMALL_ELEMENTS = 1 << 17
#: Upper bound (elements) of the scratch buffer a call writes element-wise values into;
#: larger parameters are processed a slice of whole rows at a time.
SCRATCH_ELEMENTS = 1 << 22

#: Ops whose per-unit result is NaN or inf when a weight is: checked on every call.
_CHECKED_OPS = ("sum", "sum_sq", "l1", "l2", "max_abs")

#: IEEE float dtype -> (integer dtype of the same width, mask clearing the sign bit).
_MAGNITUDE = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}


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
    parameters, parametrizations and pruning masks are always current. The resolver also
    keeps the scratch buffers its plans share (one per dtype and device).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._owners: dict[str, tuple[nn.Module, str]] = {}
        self._scratch: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}
        self._lookups: dict[tuple[str, ...], list[tuple[dict[str, Any], str]]] = {}

    def owner(self, name: str) -> tuple[nn.Module, str]:
        if name not in self._owners:
            try:
                owner, attr = owner_of(self.model, name)
            except AttributeError as err:
                raise PlanError(f"Parameter {name!r} is not in the model any more.") from err
            self._owners[name] = (owner, attr)
        return self._owners[name]

    def __call__(self, name: str) -> torch.Tensor:
        owner, attr = self.owner(name)
        # a registered parameter is never pruned or parametrized (both move it away)
        value = owner._parameters.get(attr)
        if value is None:
            value = effective_parameter(owner, attr)
        if value is None:
            raise PlanError(f"Parameter {name!r} is None; the structure is out of date.")
        return value

    def many(self, names: Iterable[str]) -> list[torch.Tensor]:
        names = tuple(names)
        lookups = self._lookups.get(names)
        if lookups is None:
            lookups = [(self.owner(n)[0]._parameters, self.owner(n)[1]) for n in names]
            self._lookups[names] = lookups
        out = [params.get(attr) for params, attr in lookups]
        if any(t is None for t in out):  # pruned, parametrized or plain tensors: the slow way
            return [t if t is not None else self(n) for t, n in zip(out, names)]
        return out  # type: ignore[return-value]

    def scratch(self, dtype: torch.dtype, device: torch.device, numel: int, slot: int = 0) -> torch.Tensor:
        """A reused 1-D buffer of ``numel`` elements (contents undefined).

        Reuse matters on CPU: a fresh multi-megabyte buffer is fresh pages, and faulting
        them in costs more than the arithmetic written into them. ``slot`` tells apart
        buffers of one dtype that are needed at the same time.
        """
        key = (dtype, device, slot)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._scratch[key] = buffer
        return buffer[:numel]

    def pack_views(self, pack: Pack, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Slot-0 scratch for ``pack`` and views of it shaped like each member (cached on the
        pack while the buffer stays the same)."""
        buffer = self.scratch(dtype, device, pack.numel)
        base = self._scratch[(dtype, device, 0)]
        hit = pack.views.get((dtype, device))
        if hit is None or hit[0] is not base:
            views, offset = [], 0
            for shape in pack.shapes:
                size = math.prod(shape)
                views.append(buffer[offset : offset + size].view(shape))
                offset += size
            hit = (base, views)
            pack.views[(dtype, device)] = hit
        return buffer, hit[1]

    def flag_views(self, pack: Pack, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A ``uint8`` view of the slot-0 ``bool`` scratch for ``pack``, and its ``[n, numel]``
        view per batch (cached on the pack while the buffer stays the same)."""
        flags = self.scratch(torch.bool, device, pack.numel)
        base = self._scratch[(torch.bool, device, 0)]
        hit = pack.views.get(("flags", device))
        if hit is None or hit[0] is not base:
            raw = flags.view(torch.uint8)
            hit = (base, flags, raw, [raw[b.start : b.start + b.n * b.numel].view(b.n, -1) for b in pack.batches])
            pack.views[("flags", device)] = hit
        return hit[1], hit[2], hit[3]

    @property
    def scratch_bytes(self) -> int:
        """Bytes the scratch buffers hold now."""
        return sum(b.numel() * b.element_size() for b in self._scratch.values())


def _full_name(module_name: str, param: str) -> str:
    return join_name(module_name, param)


# ------------------------------------------------------------------------------- plans


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
        self.small = SMALL_ELEMENTS
        self.scratch_limit = SCRATCH_ELEMENTS
        self.num_units = sum(g.n_units for g in groups)
        self.keys, gather, units = self._collect_keys(groups, keep)
        self._compile_layout()
        self._compile_gather(gather, units)
        self._device: torch.device | None = None
        self._scanners: dict[Any, Scanner] = {}

    def _collect_keys(
        self, groups: Sequence[CanonicalUnitGroup], keep: Callable[[CanonicalUnitGroup, str], bool] | None
    ) -> tuple[list[Key], list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Every (parameter, dims, view) key with its owned positions and their global units."""
        keys: dict[tuple[Any, ...], Key] = {}
        index_of: dict[tuple[Any, ...], int] = {}
        gather: list[list[torch.Tensor]] = []
        units: list[list[torch.Tensor]] = []
        for group in groups:
            for member, piece in group.iter_slices():
                if keep is not None and not keep(group, member.module_name):
                    continue
                name = _full_name(member.module_name, piece.param)
                signature = (name, piece.dims, piece.view)
                if signature not in keys:
                    keys[signature] = Key(name, piece, tuple(self.resolver(name).shape))
                    index_of[signature] = len(gather)
                    gather.append([])
                    units.append([])
                index = index_of[signature]
                positions = torch.tensor(piece.positions, dtype=torch.long)
                length = keys[signature].length
                if len(positions) and (int(positions.min()) < 0 or int(positions.max()) >= length):
                    raise PlanError(f"Positions of {name!r} exceed its {length} slices.")
                gather[index].append(positions)
                units[index].append(torch.tensor(piece.units, dtype=torch.long) + group.offset)
        return list(keys.values()), gather, units

    def _compile_layout(self) -> None:
        """The parameters read, their keys, and the layout of packs and batches."""
        self._param_names = list(dict.fromkeys(k.name for k in self.keys))
        param_index = {n: i for i, n in enumerate(self._param_names)}
        self.keys_by_param: dict[int, list[int]] = {}
        for k, key in enumerate(self.keys):
            self.keys_by_param.setdefault(param_index[key.name], []).append(k)
        members = [
            Member(name, tuple(self.resolver(name).shape), list(self.keys_by_param[i]), False, None)
            for i, name in enumerate(self._param_names)
        ]
        self.layout = Layout(members, self.keys, self.small, self.scratch_limit)
        for k, key in enumerate(self.keys):
            key.offset = self.layout.key_offset[k]
        self.num_positions = self.layout.num_positions

    def _compile_gather(self, gather: list[list[torch.Tensor]], units: list[list[torch.Tensor]]) -> None:
        """The gather index of owned positions sorted by unit, run lengths and unit sizes."""
        empty = torch.zeros(0, dtype=torch.long)
        per_key = [(torch.cat(g) if g else empty) for g in gather]
        flat_gather = torch.cat([g + key.offset for g, key in zip(per_key, self.keys)]) if per_key else empty
        flat_units = torch.cat([torch.cat(u) for u in units if u]) if units else empty
        per_position = torch.cat([torch.full((len(g),), float(key.per_position), dtype=torch.float64)
                                  for g, key in zip(per_key, self.keys)]) if per_key else torch.zeros(0, dtype=torch.float64)
        # owned positions sorted by unit: one deterministic segment reduction per call (an
        # index_add would use atomics on GPUs, and the same weights could sum differently)
        order = torch.argsort(flat_units, stable=True)
        self.gather_index = flat_gather[order]
        self._gather = self.gather_index.to(index_dtype(self.num_positions))
        counts = torch.bincount(flat_units, minlength=self.num_units) if len(flat_units) else torch.zeros(self.num_units, dtype=torch.long)
        self.run_lengths = counts.to(index_dtype(int(counts.max()) if len(counts) else 0))
        numel = torch.zeros(self.num_units, dtype=torch.float64)
        numel.index_add_(0, flat_units, per_position)
        self._numel = numel

    # ------------------------------------------------------- used by the backward and scan

    def unit_indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The gather index of owned positions (sorted by unit) and the units' run lengths."""
        if self._device != device:
            self._gather = self._gather.to(device)
            self.run_lengths = self.run_lengths.to(device)
            self._device = device
        return self._gather, self.run_lengths

    def is_uniform(self, pas: Layout, tensors: Sequence[torch.Tensor]) -> bool:
        """Check every tensor's shape; whether those copied into flat buffers share a dtype.

        (A device mismatch among them makes the copy fail; the reduction then falls back.)
        """
        if len(tensors) != len(pas.shapes) or [t.shape for t in tensors] != pas.shapes:
            self._check_shapes(pas, tensors)
        if not pas.flat_members:
            return True
        if len({t.dtype for t in tensors}) == 1 and (
            {t.get_device() for t in tensors} == {-1} or len({t.device for t in tensors}) == 1
        ):  # one dtype, all on the CPU (-1) or all on one device
            return True
        first = tensors[pas.flat_members[0]]
        dtype, device = first.dtype, first.device
        return all(tensors[i].dtype is dtype and tensors[i].device == device for i in pas.flat_members)

    def _check_shapes(self, pas: Layout, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(pas.members):
            raise PlanError(f"Expected {len(pas.members)} tensors (one per parameter), got {len(tensors)}.")
        for member, tensor in zip(pas.members, tensors):
            if tensor.shape != member.shape:
                raise PlanError(
                    f"Parameter {member.name!r} has shape {tuple(tensor.shape)}, but the structure was "
                    f"built for {member.shape}; the structure is out of date (rebuild the WeightTracker)."
                )

    def position_values(self, op: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-position reductions of every key, concatenated in position order (no grad).

        ``op``: ``sum``, ``sum_sq``, ``l1``, ``max_abs`` (exact, from magnitude bits) or
        ``nonzeros`` (int counts per position).
        """
        kind = {"max_abs": "max", "nonzeros": "nz"}.get(op, op)
        with torch.no_grad():
            return torch.cat(self._run(self.layout, kind, tensors))

    def _run(self, pas: Layout, kind: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-key parts of every pack of ``pas``, in position order."""
        uniform = self.is_uniform(pas, tensors)
        parts: list[torch.Tensor] = []
        for pack in pas.packs:
            first = tensors[pack.batches[0].members[0]]
            if pack.flat and uniform and _runs_flat(first.dtype, kind):
                mark = len(parts)
                try:
                    self._run_flat(pack, kind, tensors, parts)
                    continue
                except RuntimeError:  # parameters on several devices: one at a time below
                    if not spans_devices(pack, tensors):
                        raise
                    del parts[mark:]
            if pack.flat or not _runs_flat(first.dtype, kind):
                for batch in pack.batches:
                    _run_each(batch, kind, tensors, parts)
            else:
                self._run_large(pack.batches[0], kind, first, parts)
        return parts

    def _run_flat(self, pack: Pack, kind: str, tensors: Sequence[torch.Tensor], parts: list[torch.Tensor]) -> None:
        first = tensors[pack.batches[0].members[0]]
        dtype = first.dtype
        flat = flat_copy(pack, tensors, self.resolver)
        values = _transform_(flat, kind)
        how = _HOW[kind]
        batches = pack.batches
        for batch in batches[: pack.plain]:
            chunk = values[batch.start : batch.start + batch.n * batch.numel]
            for key, _ in batch.keys:
                part = key.positions(chunk, how, copy=True, n=batch.n)
                parts.append(part.view(dtype) if how == "max" else part)
        if pack.plain < len(batches):  # positions that are elements: one copy for all of them
            part = values[batches[pack.plain].start :].clone()
            parts.append(part.view(dtype) if how == "max" else part)

    def _run_large(self, batch: Batch, kind: str, tensor: torch.Tensor, parts: list[torch.Tensor]) -> None:
        dtype = tensor.dtype
        how = _HOW[kind]
        if kind == "sum" or (kind == "sum_sq" and batch.rows):
            for key, _ in batch.keys:
                if kind == "sum":
                    parts.append(key.positions(tensor, "sum", copy=False, n=1))
                else:  # every key is leading rows: one fused norm per row, nothing written
                    rows = tensor.reshape(key.length, -1)
                    parts.append(torch.linalg.vector_norm(rows, 2, dim=1).square_())
            return
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        source = tensor.reshape(-1)
        if batch.chunks is None:
            values = _transform(source, kind, self.resolver.scratch(dtype, tensor.device, batch.numel))
            for key, _ in batch.keys:
                part = key.positions(values, how, copy=True, n=1)
                parts.append(part.view(dtype) if how == "max" else part)
            return
        acc_dtype = {"max": _MAGNITUDE[dtype][0], "nz": torch.long}.get(kind, dtype)
        accs = [torch.zeros(key.length, dtype=acc_dtype, device=tensor.device) for key, _ in batch.keys]
        views = [acc.view([key.shape[d] for d in key.dims]).permute(*[key.dims.index(d) for d in key.keep])
                 for acc, (key, _) in zip(accs, batch.keys)]
        scratch = self.resolver.scratch(dtype, tensor.device, max(c.stop - c.start for c in batch.chunks))
        for chunk in batch.chunks:
            values = _transform(source[chunk.start : chunk.stop], kind, scratch[: chunk.stop - chunk.start])
            for (key, _), view, (extents, where) in zip(batch.keys, views, chunk.boxes):
                result = reduce_keep(values.view(1, *extents), extents, key.keep, how)
                target = view[where]
                result = result.view(target.shape)
                if how == "max":
                    target.copy_(torch.maximum(target, result))
                else:
                    target.add_(result)
        parts.extend(acc.view(dtype) if how == "max" else acc for acc in accs)

    def recipe(self, batch: Batch) -> Any:
        """The cached backward recipe of one batch (see ``plan_backward.backward_recipe``)."""
        if batch.recipe is False:  # widening a short broadcast pays off from ~64K elements
            batch.recipe = backward_recipe(batch.keys, widen=batch.n * batch.numel >= 1 << 16)
        return batch.recipe

    def _positions_autograd(self, op: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Positions with autograd through plain tensor ops (ops without a hand-written backward)."""
        self.is_uniform(self.layout, tensors)
        parts: list[torch.Tensor] = []
        for pack in self.layout.packs:
            for batch in pack.batches:
                for key, _ in batch.keys:
                    for m in batch.members:
                        values = _elementwise(tensors[m], op).reshape(1, *key.shape)
                        parts.append(key.positions(values, "max" if op == "max_abs" else "sum", copy=False))
        if op == "zeros":
            return torch.cat([p.to(torch.float64) for p in parts])
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

        Raises:
            NonFiniteWeightError: ``sum``, ``sum_sq``, ``l1``, ``l2`` or ``max_abs`` met a
                NaN or inf weight (names the parameter).
        """
        if op not in UNIT_OPS:
            raise PlanError(f"Unknown reduction {op!r}; choose one of {', '.join(UNIT_OPS)}.")
        if op == "numel":
            return self.unit_numel()
        given = tensors is not None
        if tensors is None:
            tensors = self.resolver.many(self._param_names)
        if not tensors:
            return torch.zeros(self.num_units, dtype=torch.float64 if op in ("zeros", "nonzeros") else torch.float32)
        device, dtype = tensors[0].device, tensors[0].dtype
        gather, lengths = self.unit_indices(device)
        if op in ("zeros", "nonzeros"):
            return self._count_nonzeros(op, tensors, gather, lengths)
        return self._reduce(op, tensors, gather, lengths, grad=grad, given=given).to(dtype)

    def _count_nonzeros(
        self, op: str, tensors: list[torch.Tensor], gather: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Non-zero (or zero) weight elements per unit, float64, without autograd."""
        with torch.no_grad():
            positions = self.position_values("nonzeros", tensors)
            values = positions.index_select(0, gather).to(torch.float64)
            nonzeros = (torch.segment_reduce(values, "sum", lengths=lengths, unsafe=True, initial=0.0)
                        if self.num_units else values.new_zeros(0))
            return nonzeros if op == "nonzeros" else self._numel.to(nonzeros) - nonzeros

    def _reduce(
        self, op: str, tensors: list[torch.Tensor], gather: torch.Tensor, lengths: torch.Tensor,
        *, grad: bool, given: bool,
    ) -> torch.Tensor:
        """Per-position values of ``op`` reduced per unit (checked for NaN / inf)."""
        inner = "sum_sq" if op == "l2" else op
        grad = grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            if grad and inner in ANALYTIC_GRADS:
                positions = PositionReduction.apply(self, inner, *tensors)
            elif grad:
                positions = self._positions_autograd(inner, tensors)
            else:
                positions = self.position_values(inner, tensors)
            values = positions.index_select(0, gather)
            if self.num_units == 0:
                out = values.new_zeros(0)
            else:
                out = torch.segment_reduce(
                    values, "max" if op == "max_abs" else "sum", lengths=lengths,
                    unsafe=True, initial=0.0,
                )
            if op in _CHECKED_OPS:  # before the square root, which maps NaN to 0
                self.check_finite(out.detach(), tensors, given=given)
            if op == "l2":
                out = safe_sqrt(out)
        return out

    def weighted_l2(self, coefficients: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``sum_u c_u * ||w_u||_2`` over every unit, with autograd (the group lasso).

        Equal to ``(unit_reduce("l2", grad=True) * c).sum()`` with ``c =
        coefficients(norms)`` (a tensor like the norms), value and gradient bit for bit, but
        one autograd node instead of eight.

        Raises:
            NonFiniteWeightError: A weight is NaN or inf (names the parameter).
        """
        tensors = self.resolver.many(self._param_names)
        fused = (torch.is_grad_enabled() and bool(tensors) and tensors[0].is_floating_point()
                 and len({t.dtype for t in tensors}) == 1 and any(t.requires_grad for t in tensors))
        if not fused:
            norms = self.unit_reduce("l2", grad=True, tensors=tensors)
            return (norms * coefficients(norms)).sum()
        return WeightedNorms.apply(self, coefficients, *tensors)

    def scanner(self, count: Sequence[str] = (), blocks: Sequence[tuple[str, int]] = (), block: int = 4) -> Scanner:
        """A compiled one-pass scan (see :class:`Scanner`), cached per arguments.

        Args:
            count: Parameters (full names) whose non-zero elements to count.
            blocks: ``(parameter, axis)`` pairs whose zeros per block of ``block``
                consecutive elements along ``axis`` to histogram.
            block: Block length.
        """
        key = (tuple(count), tuple(blocks), block)
        if key not in self._scanners:
            self._scanners[key] = Scanner(self, count, blocks, block)
        return self._scanners[key]

    def check_finite(self, values: torch.Tensor, tensors: Sequence[torch.Tensor] | None = None, *,
                     given: bool = False) -> None:
        """Raise :class:`NonFiniteWeightError` if per-unit ``values`` hold NaN or inf.

        The check is one reduction of ``values`` (a non-finite weight propagates into every
        per-unit sum and max); only then are the parameters searched for the culprit.
        Values that overflowed from finite weights pass.
        """
        if values.numel() == 0 or bool(torch.isfinite(values).all()):
            return
        if tensors is None:
            tensors = self.resolver.many(self._param_names)
        for name, tensor in zip(self._param_names, tensors):
            error = nonfinite_error(name, tensor, given)
            if error is not None:
                raise error

    def group_values(self, values: torch.Tensor, group: CanonicalUnitGroup) -> torch.Tensor:
        """The slice of a per-unit tensor that belongs to ``group``."""
        return values[group.offset : group.offset + group.n_units]


# ----------------------------------------------------------------------- element-wise


_HOW = {"sum": "sum", "sum_sq": "sum", "l1": "sum", "max": "max", "nz": "isum"}


def _runs_flat(dtype: torch.dtype, kind: str) -> bool:
    """Whether the scratch paths handle ``dtype`` for ``kind`` (bit tricks need IEEE floats)."""
    if kind in ("max", "nz"):
        return dtype in _MAGNITUDE
    return dtype.is_floating_point


def _transform_(flat: torch.Tensor, kind: str) -> torch.Tensor:
    """The element-wise step of ``kind``, in place on a scratch copy."""
    if kind == "sum_sq":
        return flat.mul_(flat)
    if kind == "l1":
        return flat.abs_()
    if kind in ("max", "nz"):
        itype, mask = _MAGNITUDE[flat.dtype]
        bits = flat.view(itype).bitwise_and_(mask)
        return bits.clamp_max_(1) if kind == "nz" else bits
    return flat


def _transform(source: torch.Tensor, kind: str, out: torch.Tensor) -> torch.Tensor:
    """The element-wise step of ``kind`` from ``source`` into scratch ``out``."""
    if kind == "sum_sq":
        return torch.mul(source, source, out=out)
    if kind == "l1":
        return torch.abs(source, out=out)
    if kind in ("max", "nz"):
        itype, mask = _MAGNITUDE[source.dtype]
        bits = torch.bitwise_and(source.view(itype), mask, out=out.view(itype))
        return bits.clamp_max_(1) if kind == "nz" else bits
    return source


def _elementwise(tensor: torch.Tensor, op: str) -> torch.Tensor:
    if op == "sum_sq":
        return tensor * tensor
    if op in ("l1", "max_abs"):
        return tensor.abs()
    if op == "zeros":
        return tensor == 0
    return tensor


def _run_each(batch: Batch, kind: str, tensors: Sequence[torch.Tensor], parts: list[torch.Tensor]) -> None:
    """A batch one parameter at a time with plain tensor ops (mixed dtypes or devices,
    non-IEEE dtypes): no shared scratch, temporaries as large as each parameter."""
    how = _HOW[kind]
    per_key: list[list[torch.Tensor]] = [[] for _ in batch.keys]
    for m in batch.members:
        tensor = tensors[m]
        if kind == "max":
            values = tensor.abs()
        elif kind == "nz":
            values = (tensor != 0).to(torch.int32)
        else:
            values = _elementwise(tensor, kind)
        for j, (key, _) in enumerate(batch.keys):
            per_key[j].append(key.positions(values.reshape(1, *key.shape), how, copy=False))
    for group in per_key:
        parts.extend(group)


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt`` whose gradient at 0 is 0 instead of ``inf`` (so ``0 * inf`` never gives NaN)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)
