"""Count the parameter elements that physically removing some units would delete.

Private helper of ``group_pruning_summary`` (no hooks). Physical pruning deletes, in every
member of a group, the positions its removed units own (``MemberSlice``). One element can
be deleted by several slices: a conv weight element by its output channel (one group) and
its input channel (another group), or twice within one group when a layer's input and
output channel are coupled. Each element is counted once and attributed to the **lowest
group id** among the slices deleting it (within a group: its first slice, in member order).

Per parameter:

* no slice, or a single slice, with removed positions: ``positions * elements per
  position`` (no tensor work beyond one gather over all slices);
* several slices with removed positions: the slices' views are refined into one common
  factorisation of the parameter (e.g. ``[3E, E]`` and ``(3, H, d, -1)`` both become
  ``(3, H, d, E)``); each slice's removed positions become a boolean mask over the factors
  it cuts. When the slices cut disjoint factor sets ("axes": a conv's output and input
  channels; heads, head dimensions and embedding columns of a fused projection) the counts
  have a closed form over channel-length vectors (:func:`_axis_counts`). Otherwise an
  "owner" grid over the cut factors keeps the lowest slice rank covering each cell;
  counting ranks times the uncut factors gives exact per-slice counts (the grid is at most
  as large as the parameter). Views with no common factorisation use the flat elements.

Worked example: ``Conv2d(4, 4, 3)`` weight ``[4, 4, 3, 3]``, output channel 0 removed by
group 1, input channels 0 and 1 by group 2: group 1 gets ``1 * 4 * 9 = 36`` elements,
group 2 gets ``3 * 2 * 9 = 54`` (its ``2 * 9`` elements in row 0 already went to group 1),
90 in all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from weighttracker_core.plugin import ParamRole, Selection, Structure, common_factorisation


class _Slice:
    __slots__ = ("group", "role", "dims", "view", "per_position", "length", "positions", "units", "_on")

    def __init__(self, group: int, role: ParamRole, dims: tuple[int, ...], view: tuple[int, ...],
                 positions: Sequence[int], units: Sequence[int]) -> None:
        self.group = group
        self.role = role
        self.view = view
        self.dims = tuple(d % len(view) for d in dims)
        self.length = math.prod(view[d] for d in self.dims)
        self.per_position = math.prod(view) // max(self.length, 1)
        self.positions = torch.tensor(positions, dtype=torch.long)
        self.units = torch.tensor(units, dtype=torch.long)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def removed(self, removed_units: torch.Tensor) -> torch.Tensor:
        """Boolean mask over this slice's positions (row-major over ``dims`` as listed)."""
        device = removed_units.device
        if device not in self._on:
            self._on[device] = (self.positions.to(device), self.units.to(device))
        positions, units = self._on[device]
        mask = torch.zeros(self.length, dtype=torch.bool, device=device)
        return mask.index_put_((positions,), removed_units.index_select(0, units))


def _boundaries(shape: Sequence[int]) -> set[int]:
    """Suffix products of a shape: the strides at which its dims start, plus numel."""
    out, acc = {1}, 1
    for size in reversed(shape):
        acc *= size
        out.add(acc)
    return out


def _factor_mask(
    piece: _Slice, mask: torch.Tensor, cuts: list[int], grid: list[int]
) -> tuple[torch.Tensor, list[int]]:
    """``mask`` over ``piece``'s positions as a tensor over refined factors it spans."""
    view = piece.view
    order = sorted(range(len(piece.dims)), key=lambda i: piece.dims[i])
    tensor = mask.reshape([view[d] for d in piece.dims]).permute(order)
    factors: list[int] = []
    for d in sorted(piece.dims):
        start = cuts.index(math.prod(view[d:]))
        stop = cuts.index(math.prod(view[d + 1 :]))
        factors.extend(range(start, stop))
    return tensor.reshape([grid[f] for f in factors]), factors


def _axis_counts(per_piece: Sequence[tuple[torch.Tensor, tuple[int, ...]]], sizes: dict[tuple[int, ...], int],
                 uncut: int) -> list[int]:
    """Closed form when every piece cuts exactly one of several disjoint factor sets ("axes").

    An element survives the pieces ranked before ``r`` iff, on every axis, its coordinate
    is outside the positions those pieces removed there. So piece ``r`` on axis ``a`` takes
    ``|mask_r \\ removed_a| * prod_{b != a} (size_b - |removed_b|) * uncut`` elements:
    a few channel-length vector operations instead of a grid.
    """
    removed: dict[tuple[int, ...], torch.Tensor] = {}
    counts = []
    for mask, axis in per_piece:
        flat = mask.reshape(-1)
        before = removed.get(axis)
        new = flat if before is None else flat & ~before
        others = [
            sizes[b] - removed[b].sum() if b in removed else torch.tensor(sizes[b], device=flat.device)
            for b in sizes if b != axis
        ]
        count = new.sum() * uncut
        for value in others:
            count = count * value
        counts.append(count)
        removed[axis] = flat if before is None else flat | before
    return [int(c) for c in torch.stack(counts).tolist()]


def owner_counts(pieces: Sequence[_Slice], masks: Sequence[torch.Tensor], numel: int) -> list[int]:
    """Elements each piece deletes first (pieces in rank order; see the module docstring)."""
    views = [p.view for p in pieces]
    grid_shape = common_factorisation(views)
    if grid_shape is None:  # no common factorisation: work on the flat elements
        flat = []
        for piece, mask in zip(pieces, masks):
            shape = [piece.view[d] if d in piece.dims else 1 for d in range(len(piece.view))]
            order = sorted(range(len(piece.dims)), key=lambda i: piece.dims[i])
            full = mask.reshape([piece.view[d] for d in piece.dims]).permute(order)
            flat.append((full.reshape(shape).expand(piece.view).reshape(-1), [0]))
        grid, per_piece, factor = [numel], flat, 1
    else:
        grid = list(grid_shape)
        cuts = sorted(set().union(*(_boundaries(v) for v in views)), reverse=True)
        per_piece = [_factor_mask(p, m, cuts, grid) for p, m in zip(pieces, masks)]
        touched = sorted({f for _, fs in per_piece for f in fs})
        factor = math.prod(grid[f] for f in range(len(grid)) if f not in touched)
        axes = {tuple(fs) for _, fs in per_piece}
        if all(not set(a) & set(b) for a in axes for b in axes if a != b):
            sizes = {a: math.prod(grid[f] for f in a) for a in sorted(axes)}
            return _axis_counts([(t, tuple(fs)) for t, fs in per_piece], sizes, factor)
        grid = [grid[f] for f in touched]
        per_piece = [
            (t.reshape([grid[touched.index(f)] if f in fs else 1 for f in touched]), [0])
            for t, fs in per_piece
        ]
    device = masks[0].device
    sentinel = len(pieces)
    owner = torch.full(grid, sentinel, dtype=torch.int32, device=device)
    for rank, (tensor, _) in enumerate(per_piece):
        owner = torch.minimum(owner, torch.where(tensor, rank, sentinel).to(torch.int32))
    counts = torch.stack([(owner == rank).sum() for rank in range(len(pieces))])
    return [int(c) * factor for c in counts.tolist()]


class RemovalCounter:
    """Per-group element counts that removing units would delete, split by role.

    Args:
        structure: Groups and parameter shapes.
        selection: Only members of selected layers are counted.
    """

    def __init__(self, structure: Structure, selection: Selection | None = None) -> None:
        self.num_groups = len(structure.groups)
        by_param: dict[str, list[_Slice]] = {}
        numel: dict[str, int] = {}
        for group in structure.groups:
            for member, piece in group.iter_slices():
                if selection is not None and not selection.selects(member.module_name):
                    continue
                name = f"{member.module_name}.{piece.param}" if member.module_name else piece.param
                if name not in numel:
                    numel[name] = structure.resolver(name).numel()
                shape = tuple(structure.resolver(name).shape)
                view = piece.viewed_shape(shape)
                by_param.setdefault(name, []).append(
                    _Slice(group.id, piece.role, piece.dims, view, piece.positions,
                           [group.offset + u for u in piece.units])
                )
        # slices ordered by group id (stable: member order within a group) = attribution rank
        self.params = [(name, sorted(pieces, key=lambda s: s.group)) for name, pieces in by_param.items()]
        self.numel = numel
        flat = [s for _, pieces in self.params for s in pieces]
        self._slices = flat
        self._entry_units = torch.cat([s.units for s in flat]) if flat else torch.zeros(0, dtype=torch.long)
        self._entry_units = self._entry_units.to(torch.int32)
        self._entry_slice = torch.repeat_interleave(
            torch.arange(len(flat), dtype=torch.int32), torch.tensor([len(s.units) for s in flat], dtype=torch.long)
        )
        self._static = self._closed_forms()
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _closed_forms(self) -> tuple[torch.Tensor, ...]:
        """Per slice: how its count follows from the removed positions per slice alone.

        A parameter with one slice, or with two slices cutting disjoint factor sets (a
        conv's output and input channels), needs no masks: the first slice deletes
        ``hits * per_position`` elements, the second ``hits * (per_position / L0) * (L0 -
        hits0)`` (``L0``: positions of the first). Every other parameter is ``general``
        and counted by :func:`owner_counts` when two of its slices remove something.
        """
        scale, prev, prev_length, general, target = [], [], [], [], []
        self._general: list[tuple[int, str, list[_Slice]]] = []
        index = 0
        for name, pieces in self.params:
            closed = len(pieces) == 1 or (len(pieces) == 2 and _disjoint(pieces))
            if not closed:
                self._general.append((index, name, pieces))
            for rank, piece in enumerate(pieces):
                target.append((0 if piece.role is ParamRole.WEIGHT else 1) * self.num_groups + piece.group)
                general.append(not closed)
                if closed and rank == 1:
                    first = pieces[0]
                    scale.append(piece.per_position // first.length)
                    prev.append(index)
                    prev_length.append(first.length)
                else:
                    scale.append(piece.per_position)
                    prev.append(index + rank)  # itself; its term is 1 (see count)
                    prev_length.append(0)
            index += len(pieces)
        return (
            torch.tensor(scale, dtype=torch.long), torch.tensor(prev, dtype=torch.long),
            torch.tensor(prev_length, dtype=torch.long), torch.tensor(general, dtype=torch.bool),
            torch.tensor(target, dtype=torch.long),
        )

    def count(self, removed_units: torch.Tensor) -> dict[str, list[int]]:
        """``{"weight": [per group], "bias": [per group]}`` elements deleted.

        Args:
            removed_units: Boolean ``[num_units]``: which global units are removed.
        """
        groups = self.num_groups
        if not self._slices:
            return {"weight": [0] * groups, "bias": [0] * groups}
        device = removed_units.device
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self._entry_units, self._entry_slice, *self._static))
        units, slice_of, scale, prev, prev_length, general, target = self._on[device]
        hits = removed_units.index_select(0, units).to(torch.int64)
        per_slice = torch.zeros(len(self._slices), dtype=torch.int64, device=device).index_add_(0, slice_of, hits)
        # second slices of closed pairs keep the elements their first slice did not delete
        survive = torch.where(prev_length > 0, prev_length - per_slice.index_select(0, prev), 1)
        counts = (per_slice * scale * survive).masked_fill_(general, 0)
        out = torch.zeros(2 * groups, dtype=torch.int64, device=device).index_add_(0, target, counts).tolist()
        result = {"weight": out[:groups], "bias": out[groups:]}
        if self._general:
            hits_list = per_slice.tolist()
            for index, name, pieces in self._general:
                active = [(p, n) for p, n in zip(pieces, hits_list[index : index + len(pieces)]) if n]
                if len(active) == 1:
                    piece, n = active[0]
                    result[str(piece.role)][piece.group] += n * piece.per_position
                elif active:
                    chosen = [p for p, _ in active]
                    masks = [p.removed(removed_units) for p in chosen]
                    for piece, n in zip(chosen, owner_counts(chosen, masks, self.numel[name])):
                        result[str(piece.role)][piece.group] += n
        return result


def _disjoint(pieces: Sequence[_Slice]) -> bool:
    """Whether the slices cut disjoint factor sets of one common refinement (static)."""
    views = [p.view for p in pieces]
    grid = common_factorisation(views)
    if grid is None:
        return False
    cuts = sorted(set().union(*(_boundaries(v) for v in views)), reverse=True)
    sets = []
    for piece in pieces:
        factors: set[int] = set()
        for d in piece.dims:
            start = cuts.index(math.prod(piece.view[d:]))
            stop = cuts.index(math.prod(piece.view[d + 1 :]))
            factors.update(range(start, stop))
        sets.append(factors)
    return not (sets[0] & sets[1])
