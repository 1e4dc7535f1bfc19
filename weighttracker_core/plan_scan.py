"""One read of the weights for every "is it zero" metric (the trackers' hot path).

Each parameter is read once: converted to ``bool`` (one byte per element; on CPU the
fastest full read torch has, several times faster than a comparison) and summed as floats
(a NaN or inf weight makes its sum non-finite, so the scan notices one without a second
read). From the bytes:

* every key of the plan takes its maximum: whether each position holds a non-zero weight,
  hence whether each unit does;
* each ``count`` parameter's non-zeros;
* each ``blocks`` parameter's histogram of zeros per block of 4 along an axis (NVIDIA 2:4).
  Contiguous blocks (the axis is the last dim) are the four bytes of one int32 word, added
  with two shifts; others add their strided lanes. A long row is histogrammed from four
  sums (``s``, ``s >> 1``, ``s >> 2``, ``(s + 1) >> 2`` of the per-block non-zeros ``s``),
  short rows by one ``bincount``.

Small parameters go through the plan's packs (one flat copy per pack, one kernel per batch
and key); large ones a chunk of rows at a time, in scratch of the plan's bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from .errors import NonFiniteWeightError
from .plan_layout import Batch, Layout, Member, flat_copy, index_dtype, reduce_keep, spans_devices


def nonfinite_error(name: str, tensor: torch.Tensor, given: bool = False) -> NonFiniteWeightError | None:
    """The error naming ``name`` if ``tensor`` holds NaN or inf (``None`` if it does not)."""
    with torch.no_grad():
        bad = ~torch.isfinite(tensor)
        if not bool(bad.any()):
            return None
        where = [int(i) for i in bad.nonzero()[0].tolist()]
        count = int(bad.sum())
        value = tensor[tuple(where)].item()
    what = f"The values given for parameter {name!r} hold" if given else f"Parameter {name!r} holds"
    return NonFiniteWeightError(
        f"{what} {count} NaN or inf value(s) (first: {value} at index {where}). A unit "
        "with such a weight is neither zero nor a norm to penalise, so weighttracker refuses "
        "instead of reporting, pruning or shrinking it. Training has usually diverged: restore "
        "a checkpoint or lower the learning rate; to go on with this model, replace the values "
        "in the stored tensor (e.g. `with torch.no_grad(): param.nan_to_num_(0.0)`; under "
        "torch.nn.utils.prune the stored tensor is `<name>_orig`)."
    )


# ------------------------------------------------------------------------------ blocks


def block_sums(nonzero: torch.Tensor, axis: int, block: int = 4, scratch: Any = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Non-zeros per complete block of ``block`` consecutive elements along ``axis``.

    ``nonzero`` is ``[n, *shape]`` of 0 / 1 (``uint8`` or an integer dtype; 1: the weight
    is non-zero). Returns the int32 sums ``[n, num_blocks]`` and the non-zeros of each
    member's tail (the last ``shape[axis] % block`` elements of every row, which form no
    block; ``None`` without a tail). Contiguous blocks of 4 (the axis is the last dim) are
    the four bytes of one int32 word, added with two shifts; other layouts add their
    strided lanes. ``scratch(dtype, numel, slot)``, if given, supplies reused buffers: the
    sums are then only valid until the next call.
    """
    def buffer(dtype: torch.dtype, numel: int, slot: int) -> torch.Tensor:
        if scratch is None:
            return torch.empty(numel, dtype=dtype, device=nonzero.device)
        return scratch(dtype, numel, slot)

    n, shape = nonzero.shape[0], nonzero.shape[1:]
    outer = math.prod(shape[:axis])
    channels = shape[axis]
    inner = math.prod(shape[axis + 1 :])
    full = channels // block * block
    x = nonzero.reshape(n * outer, channels, inner)
    tail = x[:, full:].reshape(n, -1).sum(1, dtype=torch.int32) if full != channels else None
    if full == 0:
        return torch.zeros(n, 0, dtype=torch.int32, device=x.device), tail
    if block == 4 and inner == 1 and full == channels and x.is_contiguous():
        flat = x.reshape(-1)
        if flat.dtype != torch.uint8 or flat.storage_offset() % 4:
            flat = buffer(torch.uint8, flat.numel(), 2).copy_(flat)  # aligned bytes
        words = flat.view(torch.int32)  # one block per word; byte sums land in byte 0
        sums = torch.bitwise_right_shift(words, 8, out=buffer(torch.int32, words.numel(), 0))
        sums += words
        sums += torch.bitwise_right_shift(sums, 16, out=buffer(torch.int32, words.numel(), 1))
        return sums.bitwise_and_(0xFF).view(n, -1), tail
    if full != channels:
        x = x[:, :full]
    lanes = x.reshape(n * outer, full // block, block, inner)
    count = n * outer * (full // block) * inner
    narrow = torch.add(lanes[:, :, 0], lanes[:, :, 1],
                       out=buffer(x.dtype, count, 2).view(n * outer, full // block, inner))
    for lane in range(2, block):
        narrow += lanes[:, :, lane]
    if narrow.dtype == torch.int32:
        return narrow.view(n, -1), tail
    return buffer(torch.int32, count, 0).view(n, -1).copy_(narrow.view(n, -1)), tail


def block_histogram(sums: torch.Tensor, block: int = 4) -> torch.Tensor:
    """int64 ``[n, block + 1]``: entry ``z`` counts the blocks of each row with ``z`` zeros.

    ``sums`` are non-zeros per block (``[n, num_blocks]``, as :func:`block_sums` gives).
    One ``bincount`` (five comparisons under ``torch.use_deterministic_algorithms`` on an
    accelerator).
    """
    n, bins = sums.shape[0], block + 1
    if sums.device.type != "cpu" and torch.are_deterministic_algorithms_enabled():
        hist = torch.stack([(sums == k).sum(1) for k in range(bins)], dim=1)
    else:
        if n > 1:
            sums = sums.to(torch.int32) + torch.arange(0, n * bins, bins, dtype=torch.int32, device=sums.device)[:, None]
        hist = torch.bincount(sums.reshape(-1), minlength=n * bins).view(n, bins)
    return hist.flip(1)  # by zeros, not by non-zeros


def block_zero_histogram(nonzero: torch.Tensor, axis: int, block: int = 4) -> torch.Tensor:
    """Histogram of zeros per complete block along ``axis`` (``[n, block + 1]``, int64).

    One row with non-zero flags ``[0, 1, 0, 1, 1]`` along axis 1 gives ``[[0, 0, 1, 0, 0]]``:
    one block with 2 zeros (the last element is a tail).
    """
    return block_histogram(block_sums(nonzero, axis, block)[0], block)


#: Zero histogram (block 4, by zeros 0..4) from the sums ``[S1, A, B, C]`` of ``s``,
#: ``s >> 1``, ``s >> 2`` and ``(s + 1) >> 2`` over blocks with ``s`` non-zeros: e.g.
#: 4 non-zeros ``= B``, 3 ``= C - B``, 2 ``= A - C - B``; 0 non-zeros adds the block count.
_MOMENTS = ((0, 0, 1, 0), (0, 0, -1, 1), (0, 1, -1, -1), (1, -2, 1, -1), (-1, 1, 0, 1))
#: Rows with more blocks than this are histogrammed from four sums, not a bincount.
_MOMENT_BLOCKS = 1 << 15


def _long_histogram(sums: torch.Tensor, block: int, scratch: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_histogram` of one long row of int32 block sums (``[1, num_blocks]``),
    and the row's non-zeros (int64 scalar)."""
    if block != 4 or sums.shape[1] <= _MOMENT_BLOCKS or (
        sums.device.type != "cpu" and torch.are_deterministic_algorithms_enabled()
    ):
        return block_histogram(sums, block), sums.sum(dtype=torch.long)
    temp = (torch.empty_like(sums) if scratch is None
            else scratch(torch.int32, sums.numel(), 1).view(sums.shape))
    moments = torch.stack([
        sums.sum(dtype=torch.int32),
        torch.bitwise_right_shift(sums, 1, out=temp).sum(dtype=torch.int32),
        torch.bitwise_right_shift(sums, 2, out=temp).sum(dtype=torch.int32),
        torch.add(sums, 1, out=temp).bitwise_right_shift_(2).sum(dtype=torch.int32),
    ]).to(torch.long)
    hist = (torch.tensor(_MOMENTS, dtype=torch.long, device=sums.device) * moments).sum(1)
    hist[4] += sums.shape[1]
    return hist[None], moments[0]


def count_bytes(flags: torch.Tensor) -> torch.Tensor:
    """Number of non-zero bytes of a 0 / 1 ``uint8`` tensor (int64 scalar).

    Bytes are added 8 at a time as int64 words in runs of 255 words (no byte position can
    carry), then the few partial words are split into bytes: about one read of the bytes.
    """
    flat = flags.reshape(-1)
    group = 8 * 255
    whole = flat.numel() // group * group
    if whole == 0 or flat.storage_offset() % 8:
        return flat.sum(dtype=torch.long)
    partial = flat[:whole].view(torch.int64).view(-1, 255).sum(1)
    total = partial.view(torch.uint8).sum(dtype=torch.long)
    if whole != flat.numel():
        total = total + flat[whole:].sum(dtype=torch.long)
    return total


# ------------------------------------------------------------------------------ scanner


@attrs.frozen
class ScanResult:
    """What one :meth:`Scanner.__call__` read.

    Attributes:
        unit_nonzero: bool ``[num_units]``: the unit owns a non-zero weight (NaN counts as
            non-zero; :meth:`Scanner.check_finite` refuses it).
        nonzeros: Non-zero elements of each ``count`` parameter (float64).
        block_zeros: int64 ``[len(blocks), block + 1]``: complete blocks with 0, 1, ...
            zeros of each ``blocks`` parameter.
        totals: Float sums of the weights, one per pack of the scan (non-finite where a
            weight is NaN or inf).
    """

    unit_nonzero: torch.Tensor
    nonzeros: torch.Tensor
    block_zeros: torch.Tensor
    totals: torch.Tensor


class Scanner:
    """One read of the weights for everything "is it zero" metrics need (module docstring).

    Built by ``ReductionPlan.scanner(count=..., blocks=..., block=...)``: the plan's own
    parameters (for per-unit results) plus the ``count`` and ``blocks`` parameters.
    """

    def __init__(self, plan: Any, count: Sequence[str], blocks: Sequence[tuple[str, int]], block: int) -> None:
        self.plan = plan
        self.block = block
        self.count = tuple(count)
        axes: dict[str, int] = {}
        for name, axis in blocks:
            if axes.setdefault(name, axis) != axis:
                raise PlanError(f"Parameter {name!r} is asked for blocks along axes {axes[name]} and {axis}.")
        self.blocks = tuple(blocks)
        order = list(dict.fromkeys([*plan.param_names, *self.count, *axes]))
        counted = set(self.count)
        shapes = {name: tuple(plan.resolver(name).shape) for name in order}
        for name, axis in axes.items():
            if not 0 <= axis < len(shapes[name]):
                raise PlanError(f"Parameter {name!r} of shape {shapes[name]} has no axis {axis}.")
        keys_of = {plan.param_names[i]: ks for i, ks in plan.keys_by_param.items()}
        members = [Member(name, shapes[name], list(keys_of.get(name, ())), name in counted, axes.get(name))
                   for name in order]
        self.layout = Layout(members, plan.keys, plan.small, plan.scratch_limit)
        where = {name: i for i, name in enumerate(order)}
        count_at = {m: i for i, m in enumerate(self.layout.count_layout)}
        block_at = {m: i for i, m in enumerate(self.layout.block_layout)}
        self._count_order = torch.tensor([count_at[where[n]] for n in self.count], dtype=torch.long)
        self._block_order = torch.tensor([block_at[where[n]] for n, _ in self.blocks], dtype=torch.long)
        # the plan's gather index, moved to this layout's position offsets
        remap = torch.empty(plan.num_positions, dtype=torch.long)
        for k, key in enumerate(plan.keys):
            start = self.layout.key_offset[k]
            remap[key.offset : key.offset + key.length] = torch.arange(start, start + key.length)
        gather = plan.gather_index
        self._gather = (remap[gather] if len(gather) else gather).to(index_dtype(self.layout.num_positions))
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._dense_cache: dict[Any, Any] = {}
        self._batch_cache: dict[Any, Any] = {}  # (pack, batch, device) -> last known results
        self._pattern: list[Any] | None = None

    def __call__(self) -> ScanResult:
        plan, layout, block = self.plan, self.layout, self.block
        tensors = plan.resolver.many(layout.names)
        uniform = plan.is_uniform(layout, tensors)
        device = tensors[0].device if tensors else torch.device("cpu")
        if device not in self._on:
            self._on[device] = (self._gather.to(device), plan.run_lengths.to(device),
                                self._count_order.to(device), self._block_order.to(device))
        gather, lengths, count_order, block_order = self._on[device]
        parts: list[torch.Tensor] = []
        counts: list[torch.Tensor] = []
        hists: list[torch.Tensor] = []
        totals: list[torch.Tensor] = []
        self._pattern: list[Any] | None = []  # every pack's pattern (see _patterns)
        with torch.no_grad():
            for pack in layout.packs:
                first = tensors[pack.batches[0].members[0]]
                if not first.is_floating_point():
                    for batch in pack.batches:
                        self._each(batch, tensors, parts, counts, hists, totals)
                elif pack.flat and uniform and self._try_flat(pack, tensors, parts, counts, hists, totals):
                    pass
                elif pack.flat:
                    for batch in pack.batches:
                        self._each(batch, tensors, parts, counts, hists, totals)
                else:
                    self._large(pack, first, parts, counts, hists, totals)
            total = torch.stack(totals) if totals else torch.zeros(0, device=device)
            pattern = tuple(self._pattern) if self._pattern is not None else None
            known = self._dense_cache.get(("all", device)) if pattern is not None else None
            if known is not None and known[0] == pattern:  # the results of the last such call
                return ScanResult(*known[1:], total)
            if parts and plan.num_units:
                flags = torch.cat(parts).index_select(0, gather).to(torch.float32)
                unit_nonzero = torch.segment_reduce(flags, "max", lengths=lengths, unsafe=True, initial=0.0) > 0
            else:
                unit_nonzero = torch.zeros(plan.num_units, dtype=torch.bool, device=device)
            nonzeros = (torch.cat(counts).index_select(0, count_order).to(torch.float64) if counts
                        else torch.zeros(0, dtype=torch.float64, device=device))
            block_zeros = (torch.cat(hists).index_select(0, block_order) if hists
                           else torch.zeros(0, block + 1, dtype=torch.long, device=device))
            if pattern is not None:  # consumers only read scan results, so they can be shared
                self._dense_cache[("all", device)] = (pattern, unit_nonzero, nonzeros, block_zeros)
        return ScanResult(unit_nonzero, nonzeros, block_zeros, total)

    def check_finite(self, result: ScanResult) -> None:
        """Raise :class:`NonFiniteWeightError` naming a parameter that holds NaN or inf.

        One check of the per-pack sums; the parameters of a non-finite pack are searched
        only then (sums that overflowed from finite weights pass).
        """
        totals = result.totals
        if totals.numel() == 0:
            return
        if totals.numel() == 1 and totals.device.type == "cpu":
            if math.isfinite(totals.item()):
                return
        elif bool(torch.isfinite(totals).all()):
            return
        bad = (~torch.isfinite(totals)).nonzero().flatten().tolist()
        packs = [p for p in self.layout.packs]
        for index in bad:
            for batch in packs[index].batches:
                for m in batch.members:
                    name = self.layout.names[m]
                    error = nonfinite_error(name, self.plan.resolver(name))
                    if error is not None:
                        raise error

    # --------------------------------------------------------------------------- packs

    def _try_flat(self, pack: Any, tensors: Sequence[torch.Tensor], *out: list[torch.Tensor]) -> bool:
        """:meth:`_flat`, or ``False`` (nothing added) when the pack spans several devices."""
        marks = [len(o) for o in out]
        try:
            self._flat(pack, tensors, *out)
        except RuntimeError:
            if not spans_devices(pack, tensors):
                raise
            for o, mark in zip(out, marks):
                del o[mark:]
            return False
        return True

    def _flat(self, pack: Any, tensors: Sequence[torch.Tensor], parts: list[torch.Tensor],
              counts: list[torch.Tensor], hists: list[torch.Tensor], totals: list[torch.Tensor]) -> None:
        """Small parameters: one flat copy, then per batch one count, its keys and its blocks.

        On CPU (where the answer costs no device sync) each member is checked for "no weight
        is zero" and "every weight is zero"; a batch whose members are all one or the other
        repeats the results of the last call with the same pattern (no key or block work).
        """
        resolver = self.plan.resolver
        device = tensors[pack.batches[0].members[0]].device
        flags, views = self._flags(pack, tensors, totals, device)
        patterns = self._patterns(pack, flags, views, device)
        known = self._dense_results(pack, device)
        cache = self._batch_cache
        deterministic = device.type != "cpu" and torch.are_deterministic_algorithms_enabled()

        def scratch(dtype: torch.dtype, numel: int, slot: int) -> torch.Tensor:
            return resolver.scratch(dtype, device, numel, 1 + slot)

        pieces: list[torch.Tensor] = []  # per block batch: its zero histogram
        plain = pack.plain
        if plain < len(pack.batches):  # positions that are elements: one copy for all of them
            elements = flags[pack.batches[plain].start :]
        for i, (batch, values) in enumerate(zip(pack.batches, views)):
            pattern = patterns[i]
            if i == plain:
                parts.append(elements.clone())
            if pattern is not None and 0 not in pattern:  # no zero at all: known without a cache
                key_parts = known[i][0]
                count = known[i][2] if batch.count else None
                hist = known[i][1] if batch.block is not None else None
            else:
                slot = (id(pack), i, device)
                hit = cache.get(slot) if pattern is not None else None
                if hit is not None and hit[0] == pattern:
                    _, key_parts, count, hist = hit
                else:
                    key_parts, count, hist = self._flat_batch(batch, values, i < plain, known[i],
                                                              deterministic, scratch)
                    if pattern is not None:
                        cache[slot] = (pattern, key_parts, count, hist)
            if i < plain:
                parts.extend(key_parts)
            if count is not None:
                counts.append(count)
            if hist is not None:
                pieces.append(hist)  # by zeros, not by non-zeros
        if pieces:
            hists.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])

    def _flags(self, pack: Any, tensors: Sequence[torch.Tensor], totals: list[torch.Tensor],
               device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The pack's flat copy as bytes (1: non-zero), and its per-batch ``[n, numel]`` views."""
        resolver = self.plan.resolver
        flat = flat_copy(pack, tensors, resolver)
        totals.append(flat.sum())
        flags, raw, views = resolver.flag_views(pack, device)
        flags.copy_(flat)
        return raw, views

    def _flat_batch(
        self, batch: Batch, values: torch.Tensor, keyed: bool, known: tuple[Any, ...],
        deterministic: bool, scratch: Callable[[torch.dtype, int, int], torch.Tensor],
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """One batch of a flat pack read afresh: its key parts, non-zeros and zero histogram."""
        n, bins = batch.n, self.block + 1
        key_parts = [key.positions(values, "max", copy=True, n=n) for key, _ in batch.keys] if keyed else []
        count = hist = None
        if batch.block is None:
            if batch.count:
                count = values.sum(1, dtype=torch.int32)
            return key_parts, count, hist
        sums, tail = block_sums(values.view(n, *batch.shape), batch.block, self.block, scratch)
        if batch.count:  # non-zeros from the (4x shorter) block sums, plus the tails
            count = sums.sum(1, dtype=torch.int32)
            if tail is not None:
                count = count + tail
        if deterministic or n == 1:
            hist = block_histogram(sums, self.block)
        else:  # member j of the batch counts into bins 5j..5j+4 of one bincount
            sums += known[3][1]
            hist = torch.bincount(sums.view(-1), minlength=n * bins).view(n, bins).flip(1)
        return key_parts, count, hist

    def _patterns(self, pack: Any, flags: torch.Tensor, views: Sequence[torch.Tensor],
                  device: torch.device) -> list[tuple[int, ...] | None]:
        """Per batch: each member's 1 ("no weight is zero") or 0 ("every weight is zero"), or
        ``None`` when a member is neither (or off the CPU). Appends the pack's pattern to this
        call's (``None`` when a batch has none)."""
        if device.type != "cpu":
            self._pattern = None
            return [None] * len(views)
        batches = pack.batches
        if flags.numel() == 0 or bool(flags.amin()):  # one read: no weight of the pack is zero
            out: list[tuple[int, ...] | None] = [(1,) * b.n for b in batches]
        else:  # the smallest flag of every member, then the largest where that is 0
            low = torch.cat([v.amin(1) for v in views]).tolist()
            out, mixed, at = [], [], 0
            for i, batch in enumerate(batches):
                seg = tuple(low[at : at + batch.n])
                at += batch.n
                out.append(seg)
                if 0 in seg:
                    mixed.append(i)
            if mixed:
                high = torch.cat([views[i].amax(1) for i in mixed]).tolist()
                at = 0
                for i in mixed:
                    n = batches[i].n
                    if out[i] != tuple(high[at : at + n]):  # some member is neither
                        out[i] = None
                    at += n
        if self._pattern is not None:
            if None in out:
                self._pattern = None
            else:
                self._pattern.append(tuple(out))
        return out

    @staticmethod
    def _dense(flags: torch.Tensor, device: torch.device) -> bool:
        """Whether every weight of ``flags`` is non-zero (checked on CPU only, where the
        answer costs no device sync): a dense run's results are known without block work."""
        return device.type == "cpu" and (flags.numel() == 0 or bool(flags.amin()))

    def _dense_results(self, pack: Any, device: torch.device) -> list[tuple[Any, ...]]:
        """Per batch of ``pack`` (cached): key parts, zero histogram and non-zeros when no
        weight is zero; the batch's first block member and its bincount offsets
        (``(block + 1) * member``, ``[n, 1]``); the pack's number of block members."""
        key = (id(pack), device)
        if key not in self._dense_cache:
            out, member, bins = [], 0, self.block + 1
            for batch in pack.batches:
                n = batch.n
                parts = [torch.ones(n * k.length, dtype=torch.uint8, device=device) for k, _ in batch.keys]
                hist, first = None, (member, None)
                if batch.block is not None:
                    shape, axis = batch.shape, batch.block
                    blocks = math.prod(shape[:axis]) * (shape[axis] // self.block) * math.prod(shape[axis + 1 :])
                    hist = torch.zeros(n, bins, dtype=torch.long, device=device)
                    hist[:, 0] = blocks
                    offsets = torch.arange(0, n * bins, bins, dtype=torch.int32, device=device)
                    first = (member, offsets[:, None])
                    member += n
                numel = torch.full((n,), batch.numel, dtype=torch.long, device=device)
                out.append((parts, hist, numel, first, member))
            out = [(*entry[:4], member) for entry in out]  # the last field: all block members
            self._dense_cache[key] = out  # type: ignore[assignment]
        return self._dense_cache[key]  # type: ignore[return-value]

    def _large(self, pack: Any, tensor: torch.Tensor, parts: list[torch.Tensor], counts: list[torch.Tensor],
               hists: list[torch.Tensor], totals: list[torch.Tensor]) -> None:
        """One large parameter: whole, or a chunk of rows at a time."""
        batch = pack.batches[0]
        resolver = self.plan.resolver
        device = tensor.device
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        source = tensor.reshape(-1)
        chunks = batch.chunks
        size = batch.numel if chunks is None else max(c.stop - c.start for c in chunks)
        buffer = resolver.scratch(torch.bool, device, size)
        if chunks is None:
            self._large_whole(pack, source, buffer, parts, counts, hists, totals)
        else:
            self._large_chunked(batch, source, buffer, parts, counts, hists, totals)

    def _large_whole(self, pack: Any, source: torch.Tensor, buffer: torch.Tensor, parts: list[torch.Tensor],
                     counts: list[torch.Tensor], hists: list[torch.Tensor], totals: list[torch.Tensor]) -> None:
        """A large parameter that fits the scratch: read in one go."""
        batch, device = pack.batches[0], source.device
        totals.append(source.sum())
        flags = buffer.copy_(source).view(torch.uint8)
        if self._dense(flags, device):
            self._mark(True)
            dense_parts, dense_hist = self._dense_results(pack, device)[0][:2]
            parts.extend(dense_parts)
            if batch.count:
                counts.append(torch.full((1,), batch.numel, dtype=torch.long, device=device))
            if dense_hist is not None:
                hists.append(dense_hist)
            return
        self._mark(False)
        for key, _ in batch.keys:
            parts.append(key.positions(flags, "max", copy=True, n=1))
        count, hist = self._rows(flags.view(1, *batch.shape), batch)
        if batch.count:
            counts.append(count[None])
        if hist is not None:
            hists.append(hist)

    def _large_chunked(self, batch: Batch, source: torch.Tensor, buffer: torch.Tensor, parts: list[torch.Tensor],
                       counts: list[torch.Tensor], hists: list[torch.Tensor], totals: list[torch.Tensor]) -> None:
        """A large parameter read a run of whole rows at a time; keys accumulate maxima."""
        device, chunks = source.device, batch.chunks
        assert chunks is not None
        accs = [torch.zeros(key.length, dtype=torch.uint8, device=device) for key, _ in batch.keys]
        views = [acc.view([key.shape[d] for d in key.dims]).permute(*[key.dims.index(d) for d in key.keep])
                 for acc, (key, _) in zip(accs, batch.keys)]
        total = torch.zeros((), dtype=source.dtype, device=device)
        count = torch.zeros((), dtype=torch.long, device=device)
        hist = torch.zeros(1, self.block + 1, dtype=torch.long, device=device)
        dense_chunks = 0
        for chunk in chunks:
            part = source[chunk.start : chunk.stop]
            total += part.sum()
            flags = buffer[: chunk.stop - chunk.start].copy_(part).view(torch.uint8)
            if self._dense(flags, device):  # every position of every key here is non-zero
                dense_chunks += 1
                for view, (_, where) in zip(views, chunk.boxes):
                    view[where].fill_(1)
                count += flags.numel()
                if batch.block is not None:
                    hist += self._chunk_dense_hist(chunk, batch, device)
                continue
            for (key, _), view, (extents, where) in zip(batch.keys, views, chunk.boxes):
                result = reduce_keep(flags.view(1, *extents), extents, key.keep, "max")
                target = view[where]
                target.copy_(torch.maximum(target, result.view(target.shape)))
            part_count, part_hist = self._rows(flags.view(1, chunk.rows, *batch.shape[1:]), batch)
            count += part_count
            if part_hist is not None:
                hist += part_hist
        self._mark(dense_chunks == len(chunks))
        parts.extend(accs)
        totals.append(total)
        if batch.count:
            counts.append(count[None])
        if batch.block is not None:
            hists.append(hist)

    def _mark(self, dense: bool) -> None:
        """Add a large parameter's pattern to this call's: known only when it has no zero."""
        if self._pattern is not None:
            if dense:
                self._pattern.append(True)
            else:
                self._pattern = None

    def _chunk_dense_hist(self, chunk: Any, batch: Batch, device: torch.device) -> torch.Tensor:
        """The zero histogram of a run of rows none of whose weights is zero."""
        shape, axis = (chunk.rows, *batch.shape[1:]), batch.block
        blocks = math.prod(shape[:axis]) * (shape[axis] // self.block) * math.prod(shape[axis + 1 :])  # type: ignore[index]
        hist = torch.zeros(1, self.block + 1, dtype=torch.long, device=device)
        hist[0, 0] = blocks
        return hist

    def _rows(self, flags: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Non-zero count and zero histogram of whole rows of one parameter (``[1, ...]``)."""
        if batch.block is None:
            return (count_bytes(flags) if batch.count else torch.zeros((), dtype=torch.long)), None
        device = flags.device

        def scratch(dtype: torch.dtype, numel: int, slot: int) -> torch.Tensor:
            return self.plan.resolver.scratch(dtype, device, numel, 1 + slot)

        sums, tail = block_sums(flags, batch.block, self.block, scratch)
        hist, count = _long_histogram(sums, self.block, scratch)
        if tail is not None:
            count = count + tail[0]
        return count, hist

    def _each(self, batch: Batch, tensors: Sequence[torch.Tensor], parts: list[torch.Tensor],
              counts: list[torch.Tensor], hists: list[torch.Tensor], totals: list[torch.Tensor]) -> None:
        """One parameter at a time without scratch (mixed dtypes or devices, integer dtypes)."""
        self._pattern = None
        per_key: list[list[torch.Tensor]] = [[] for _ in batch.keys]
        total = None
        for m in batch.members:
            tensor = tensors[m]
            flags = (tensor != 0).to(torch.uint8).reshape(1, *batch.shape)
            if tensor.is_floating_point():
                value = tensor.sum().to(torch.float64)
                total = value if total is None else total + value.to(total.device)
            for j, (key, _) in enumerate(batch.keys):
                per_key[j].append(key.positions(flags.view(1, *key.shape), "max", copy=False))
            if batch.count:
                counts.append(flags.sum(dtype=torch.long)[None])
            if batch.block is not None:
                hists.append(block_zero_histogram(flags, batch.block, self.block))
        for group in per_key:
            parts.extend(group)
        totals.append(total if total is not None else torch.zeros((), dtype=torch.float64))
