"""How a reduction plan lays its work out: keys, batches, packs, chunks and positions.

Pure bookkeeping, compiled once per plan (no tensors of the model are read here):

* a :class:`Key` is one distinct ``(parameter, dims, view)`` reduction; :func:`reduce_keep`
  reduces a ``[n, *shape]`` tensor over the dims a key does not keep, in contiguous stages;
* a :class:`Batch` is parameters of one shape and the same keys, reduced as one
  ``[n, *shape]`` tensor; a :class:`Pack` is either several small batches copied into one
  flat buffer per call, or one large parameter reduced in place;
* a large parameter is cut into :class:`Chunk` runs of whole rows so that no scratch buffer
  exceeds the plan's bound: chunk boundaries follow the common refinement of the
  parameter's shape and its keys' views, so each chunk is a box in every key's view;
* a :class:`Layout` orders all of it and says at which offset each key's positions start.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .errors import PlanError
from .units import MemberSlice


def flat_copy(pack: Any, tensors: Sequence[torch.Tensor], resolver: Any) -> torch.Tensor:
    """The members of ``pack`` (one dtype and device) one after the other, in reused scratch.

    One ``torch._foreach_copy_`` into views of the scratch buffer that are cached on the
    pack (rebuilt when the buffer is): one C++ call for every member, no Python per member
    beyond listing them. The result may be overwritten until the next call.
    """
    sources = [tensors[m] for m in pack.members]
    first = sources[0]
    buffer, views = resolver.pack_views(pack, first.dtype, first.device)
    with torch.no_grad():
        torch._foreach_copy_(views, sources)
    return buffer


def spans_devices(pack: Any, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the members of ``pack`` sit on more than one device (no flat copy then)."""
    return len({tensors[m].device for b in pack.batches for m in b.members}) > 1


def index_dtype(upper: int) -> torch.dtype:
    """The smallest index dtype ``index_select`` takes that holds ``0..upper``."""
    return torch.int32 if upper < 2**31 else torch.long


class Key:
    """One distinct (parameter, dims, view) reduction."""

    __slots__ = ("name", "dims", "view", "shape", "length", "per_position", "offset", "keep", "_steps")

    def __init__(self, name: str, piece: MemberSlice, shape: tuple[int, ...]) -> None:
        self.name = name
        self.view = piece.view
        self.shape = piece.viewed_shape(shape)
        self.length = piece.axis_length(shape)
        self.per_position = piece.elements_per_position(shape)
        self.offset = 0
        ndim = len(self.shape)
        if any(not -ndim <= d < ndim for d in piece.dims):
            raise PlanError(f"Slice of {name!r} uses dims {piece.dims} on shape {self.shape}.")
        self.dims = tuple(d % ndim for d in piece.dims)
        self.keep = tuple(sorted(self.dims))
        self._steps: dict[int, tuple[Any, Any]] = {}

    @property
    def sig(self) -> tuple[Any, ...]:
        """What decides the reduction: dims and viewed shape."""
        return (self.dims, self.shape)

    @property
    def leading_rows(self) -> bool:
        """Whether the positions are the leading dims (rows of a contiguous 2-D view)."""
        return self.dims == tuple(range(len(self.dims)))

    @property
    def reduces_nothing(self) -> bool:
        return len(self.keep) == len(self.shape)

    def sorted_sizes(self) -> list[int]:
        return [self.shape[d] for d in self.keep]

    def order_back(self) -> list[int] | None:
        """Permutation from sorted-dims order to the given dims order (``None``: same)."""
        if list(self.dims) == list(self.keep):
            return None
        return [self.keep.index(d) for d in self.dims]

    def steps(self, n: int) -> tuple[tuple[tuple[tuple[int, ...], Any], ...], Any]:
        """The reshapes and reductions :meth:`positions` runs for ``n`` members (cached):
        :func:`reduction_stages`, then a permutation when the dims are not listed in order."""
        cached = self._steps.get(n)
        if cached is None:
            order = self.order_back()
            final = None if order is None else ((n, *self.sorted_sizes()), (0, *[1 + o for o in order]))
            cached = (reduction_stages(n, self.shape, self.keep), final)
            self._steps[n] = cached
        return cached

    def positions(self, values: torch.Tensor, how: str, copy: bool, n: int | None = None) -> torch.Tensor:
        """Per-position reduction of ``values`` (``n`` members of ``shape``), flat ``[n * length]``.

        ``values`` is ``[n, *shape]`` or any view with those elements in that order.
        ``copy``: ``values`` is scratch, so a key that reduces nothing must not return a
        view of it.
        """
        if n is None:
            n = values.shape[0]
        stages, final = self.steps(n)
        reduce = _REDUCERS[how]
        t = values
        for shape, dim in stages:
            t = reduce(t.reshape(shape), dim)
        if final is not None:
            return t.reshape(final[0]).permute(final[1]).reshape(-1)
        if copy and not stages:
            return t.reshape(-1).clone()
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


_REDUCERS = {
    "max": lambda t, dim: t.amax(dim),
    "sum": lambda t, dim: t.sum(dim),
    "isum": lambda t, dim: t.sum(dim, dtype=torch.int32),
}


def _reduce(t: torch.Tensor, dim: Any, how: str) -> torch.Tensor:
    if how == "max":
        return t.amax(dim)
    if how == "isum":
        return t.sum(dim, dtype=torch.int32)
    return t.sum(dim)


#: The dims after the last kept one are reduced first (as rows) when they hold at least this
#: many elements: a reduction along the outermost dims is a slow kernel on CPU, so it should
#: see the small per-row sums, not the whole tensor (a fused qkv weight's heads); shorter
#: rows (a 3x3 kernel) reduce faster the other way round.
ROWS_FIRST = 64


def reduction_stages(
    n: int, shape: Sequence[int], keep: Sequence[int]
) -> tuple[tuple[tuple[int, ...], Any], ...]:
    """``(view, dims)`` steps reducing ``[n, *shape]`` over every dim not in ``keep`` (sorted).

    Contiguous stages on views: the dims before the first kept dim (as columns), the dims
    after the last one (as rows), in the cheaper order (:data:`ROWS_FIRST`), then the (by
    then small) remainder between kept dims. The result is ``[n, prod(kept sizes)]``,
    row-major over ``keep``.
    """
    first, last = keep[0], keep[-1]
    before, after = math.prod(shape[:first]), math.prod(shape[last + 1 :])
    kept = math.prod(shape[first : last + 1])
    stages: list[tuple[tuple[int, ...], Any]] = []
    if before > 1 and after >= ROWS_FIRST:
        stages += [((n * before * kept, after), 1), ((n, before, kept), 1)]
    else:  # (a stage over a dim of size 1 still converts the dtype of an "isum")
        if first > 0:
            stages.append(((n, before, kept * after), 1))
        if last < len(shape) - 1:
            stages.append(((n * kept, after), 1))
    middle = tuple(d - first + 1 for d in range(first, last + 1) if d not in keep)
    if middle:
        stages.append(((n, *shape[first : last + 1]), middle))
    return tuple(stages)


def reduce_keep(t: torch.Tensor, shape: Sequence[int], keep: Sequence[int], how: str) -> torch.Tensor:
    """Reduce ``t`` (``[n, *shape]``) over every dim of ``shape`` not in ``keep`` (sorted),
    in the stages of :func:`reduction_stages`. ``how``: ``"sum"``, ``"max"`` or ``"isum"``
    (an int32 sum). Returns ``[n, prod(kept sizes)]``, row-major over ``keep``.
    """
    n = t.shape[0]
    for view, dims in reduction_stages(n, shape, keep):
        t = _reduce(t.reshape(view), dims, how)
    return t.reshape(n, -1)


def common_factorisation(shapes: Iterable[Sequence[int]]) -> tuple[int, ...] | None:
    """The coarsest shape every one of ``shapes`` (same numel) is a grouping of.

    ``common_factorisation([(12, 4), (3, 2, 2, 4)]) == (3, 2, 2, 4)``; ``None`` when no common
    factorisation exists (``(6, 2)`` and ``(4, 3)``).
    """
    cuts: set[int] = set()
    for shape in shapes:
        acc = 1
        cuts.add(1)
        for size in reversed(shape):
            acc *= size
            cuts.add(acc)
    ordered = sorted(cuts, reverse=True)
    sizes = []
    for big, small in zip(ordered, ordered[1:]):
        if big % small:
            return None
        sizes.append(big // small)
    return tuple(sizes)



def merge_ranges(fine: Sequence[int], coarse: Sequence[int]) -> list[range] | None:
    """For each dim of ``coarse``, the run of ``fine`` dims it merges (``None`` if it does not).

    ``fine = (3, 4, 8, 32)`` and ``coarse = (96, 32)`` give ``[range(0, 3), range(3, 4)]``.
    """
    out, i = [], 0
    for size in coarse:
        start, product = i, 1
        while i < len(fine) and product < size:
            product *= fine[i]
            i += 1
        if product != size:
            return None
        out.append(range(start, i))
    if i != len(fine):
        if any(fine[j] != 1 for j in range(i, len(fine))) or not out:
            return None
        out[-1] = range(out[-1].start, len(fine))
    return out


class Chunk:
    """A run of whole rows of one large parameter, and where it lands in each key."""

    __slots__ = ("start", "stop", "rows", "boxes")

    def __init__(self, start: int, stop: int, rows: int, boxes: list[tuple[tuple[int, ...], tuple[slice, ...]]]):
        self.start, self.stop, self.rows, self.boxes = start, stop, rows, boxes


class Member:
    """One parameter a pass reads."""

    __slots__ = ("name", "shape", "numel", "keys", "count", "block")

    def __init__(self, name: str, shape: tuple[int, ...], keys: list[int], count: bool, block: int | None):
        self.name, self.shape, self.numel = name, shape, math.prod(shape)
        self.keys, self.count, self.block = keys, count, block


class Batch:
    """Parameters of one shape, keys and extras, reduced as one ``[n, *shape]`` tensor.

    ``keys[j] = (template key, base)``: member ``i``'s positions for its ``j``-th key start
    at ``base + i * length``.
    """

    __slots__ = ("members", "n", "shape", "numel", "keys", "count", "block", "start", "chunks",
                 "rows", "recipe", "prepared", "plain")

    def __init__(self, members: list[int], proto: Member, keys: list[Key]) -> None:
        self.members = members
        self.n = len(members)
        self.shape = proto.shape
        self.numel = proto.numel
        self.keys: list[tuple[Key, int]] = [(k, 0) for k in keys]
        self.count, self.block = proto.count, proto.block
        self.start = 0
        self.chunks: list[Chunk] | None = None
        self.rows = bool(keys) and all(k.leading_rows for k in keys)
        self.plain = len(keys) == 1 and keys[0].reduces_nothing
        self.recipe: Any = False  # computed on first backward
        self.prepared: dict[tuple[int, int], Any] = {}  # the recipe for (n, first member)


class Pack:
    """One unit of work: several small batches copied into one flat buffer, or one
    large parameter reduced in place (``flat=False``)."""

    __slots__ = ("batches", "numel", "flat", "members", "shapes", "views", "plain")

    def __init__(self, batches: list[Batch], flat: bool) -> None:
        self.batches = batches
        self.flat = flat
        self.numel = sum(b.n * b.numel for b in batches)
        self.members = [m for b in batches for m in b.members]
        self.shapes: list[tuple[int, ...]] = [b.shape for b in batches for _ in b.members]
        self.views: dict[Any, Any] = {}  # scratch views, see ParamResolver.pack_views
        #: batches from this index on have one key that reduces nothing (set by Layout):
        #: their positions are their elements, in the same order
        self.plain = len(batches)


class Layout:
    """Which parameters, in which packs, at which position offsets.

    Positions are laid out pack by pack, batch by batch, key by key, member by member, so a
    batch's reduction for one key is one contiguous run of ``n * key.length`` positions.
    """

    def __init__(self, members: list[Member], keys: Sequence[Key], small: int, scratch: int) -> None:
        self.members = members
        self.names = [m.name for m in members]
        for m in members:  # a canonical key order, so that parameters of one shape batch
            m.keys.sort(key=lambda k: keys[k].sig)
        self.packs = _packs(members, keys, small, scratch)
        self._place()
        self.shapes = [torch.Size(m.shape) for m in members]

    def _place(self) -> None:
        """Positions: pack by pack, batch by batch, key by key, member by member."""
        members = self.members
        self.key_offset: dict[int, int] = {}
        self.flat_members: list[int] = []
        self.count_layout: list[int] = []
        self.block_layout: list[int] = []
        offset = 0
        for pack in self.packs:
            start = 0
            pack.plain = len(pack.batches)
            while pack.plain and pack.flat and pack.batches[pack.plain - 1].plain:
                pack.plain -= 1
            for batch in pack.batches:
                batch.start = start
                start += batch.n * batch.numel
                for j, (key, _) in enumerate(batch.keys):
                    batch.keys[j] = (key, offset)
                    for i, m in enumerate(batch.members):
                        self.key_offset[members[m].keys[j]] = offset + i * key.length
                    offset += batch.n * key.length
                if pack.flat:
                    self.flat_members.extend(batch.members)
                if batch.count:
                    self.count_layout.extend(batch.members)
                if batch.block is not None:
                    self.block_layout.extend(batch.members)
        self.num_positions = offset


def _packs(members: list[Member], keys: Sequence[Key], small: int, scratch: int) -> list[Pack]:
    """Large parameters one pack each; small ones batched by shape and keys into flat packs."""
    classes: dict[Any, list[int]] = {}
    packs: list[Pack] = []
    for i, m in enumerate(members):
        if m.numel <= small:
            sig = (m.shape, tuple(keys[k].sig for k in m.keys), m.count, m.block)
            classes.setdefault(sig, []).append(i)
        else:
            batch = Batch([i], m, [keys[k] for k in m.keys])
            batch.chunks = compile_chunks(m, batch, scratch)
            packs.append(Pack([batch], flat=False))
    current: list[Batch] = []
    used = 0

    def plain(ids: list[int]) -> bool:  # one key that reduces nothing: positions = elements
        proto = members[ids[0]]
        return len(proto.keys) == 1 and keys[proto.keys[0]].reduces_nothing

    # such batches last in each pack, so that they form one run of positions and elements
    for ids in sorted(classes.values(), key=plain):
        proto = members[ids[0]]
        run: list[int] = []
        for i in ids:
            if used + proto.numel > scratch and (run or current):
                if run:
                    current.append(Batch(run, proto, [keys[k] for k in proto.keys]))
                packs.append(Pack(current, flat=True))
                current, run, used = [], [], 0
            run.append(i)
            used += proto.numel
        current.append(Batch(run, proto, [keys[k] for k in proto.keys]))
    if current:
        packs.append(Pack(current, flat=True))
    return packs


def compile_chunks(member: Member, batch: Batch, limit: int) -> list[Chunk] | None:
    """Runs of whole rows of ``member`` of at most ``limit`` elements (``None``: one run).

    Chunk boundaries follow the common refinement of the parameter's shape and its keys'
    views, so every chunk is a box in every key's view: each key reduces a chunk into a
    contiguous box of its positions (partial when the chunk cuts a reduced dim).
    """
    shape = member.shape
    if member.numel <= limit or len(shape) == 0 or shape[0] <= 1:
        return None
    views = [key.shape for key, _ in batch.keys]
    fine = common_factorisation([shape, *views])
    if fine is None:
        return None
    split, step = _split_dim(shape, fine, limit)
    if member.block == 0:  # 2:4 blocks along dim 0: runs must hold whole blocks of 4
        if _rows_dims(shape, fine) != 1 or step < 4:
            return None
        step -= step % 4
    ranges = [merge_ranges(fine, view) for view in views]
    if any(r is None for r in ranges):
        return None
    inner = math.prod(fine[split + 1 :])
    row_size = math.prod(shape[1:])
    chunks = []
    for prefix in itertools.product(*[range(f) for f in fine[:split]]):
        for a in range(0, fine[split], step):
            b = min(a + step, fine[split])
            start = 0
            for f, i in zip(fine[: split + 1], [*prefix, a]):
                start = start * f + i
            start *= inner
            stop = start + (b - a) * inner
            boxes = [_box(key, spans, fine, prefix, split, a, b)  # type: ignore[arg-type]
                     for (key, _), spans in zip(batch.keys, ranges)]
            chunks.append(Chunk(start, stop, (stop - start) // row_size, boxes))
    return chunks


def _rows_dims(shape: Sequence[int], fine: Sequence[int]) -> int:
    """How many fine dims make up raw dim 0."""
    row_dims, product = 0, 1
    while product < shape[0]:
        product *= fine[row_dims]
        row_dims += 1
    return row_dims


def _split_dim(shape: Sequence[int], fine: Sequence[int], limit: int) -> tuple[int, int]:
    """The fine dim to cut runs along, and how many of its entries one run takes."""
    row_dims = _rows_dims(shape, fine)
    split = row_dims - 1
    for k in range(row_dims):
        if math.prod(fine[k + 1 :]) <= limit:
            split = k
            break
    inner = math.prod(fine[split + 1 :])
    return split, max(1, min(fine[split], limit // inner))


def _box(
    key: Key, spans: Sequence[range], fine: Sequence[int], prefix: Sequence[int], split: int, a: int, b: int
) -> tuple[tuple[int, ...], tuple[slice, ...]]:
    """Extent and place, in ``key``'s view, of the run ``prefix`` + ``[a, b)`` of the split dim."""
    extents, where = [], []
    for size, span in zip(key.shape, spans):
        s, e = span.start, span.stop
        if s == e or s > split:  # whole dim
            extents.append(size)
            where.append(slice(None))
        elif e <= split:  # fixed by the prefix
            pos = 0
            for f in range(s, e):
                pos = pos * fine[f] + prefix[f]
            extents.append(1)
            where.append(slice(pos, pos + 1))
        else:  # the split dim: a range
            pos = 0
            for f in range(s, split):
                pos = pos * fine[f] + prefix[f]
            scale = math.prod(fine[split + 1 : e])
            first = (pos * fine[split] + a) * scale
            extents.append((b - a) * scale)
            where.append(slice(first, first + (b - a) * scale))
    return tuple(extents), tuple(where[d] for d in key.keep)
