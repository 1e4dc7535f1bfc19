"""Channel maps through chains of reshapes and permutes, found by replaying the chain.

Torch-Pruning maps channels through a ``view`` / ``reshape`` only for 2-D and 4-D tensors
laid out as ``(N, C, ...)``, and through a permute or transpose not at all. A
channels-last tensor (``(B, H, W, C)``: Swin's patch merging, window partitions, MaxViT,
MambaOut) then gets a wrong map, or none where channel ``c`` reaches several positions.

Here every chain of shape operations between two other nodes (each with one input and one
output) is replayed on a tensor holding its channel number at every position: what comes
out shows, for each position of the consumer's channel axis, the one channel it holds.
The map is used when it is *separable* (the channel axis stays whole: channel ``c`` owns
positions ``offsets + c * stride`` for one set of offsets), which is what a physical prune
keeps: the pruned tensor goes through the same chain with fewer channels and lands on the
remaining positions in order. A chain that splits the channel axis (a channel shuffle) is
not separable and left to the checks that refuse it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp

from .search import apply_mapping
from .nodes import op_name, output_shape

_OPTYPE = tp.ops.OPTYPE
_HybridIndex = tp._helpers._HybridIndex
_RESHAPES = ("view", "reshape", "unsafeview", "squeeze", "unsqueeze", "alias", "expandas")
_MOVES = ("permute", "transpose", "constantpadnd", "roll", "flip", "slice", "repeatbackward")
#: Torch-Pruning's own maps for reshapes and slices, replaced on a repaired chain
_TP_SHAPE_MAPS = (
    tp.dependency.index_mapping._FlattenIndexMapping,
    tp.dependency.index_mapping._SliceIndexMapping,
)


class ChannelMap:
    """A Torch-Pruning index mapping: channel -> its positions (or back, ``reverse``)."""

    def __init__(self, positions: Sequence[Sequence[int]], reverse: bool = False) -> None:
        self.positions = [tuple(p) for p in positions]
        self.reverse = reverse
        self.owner = {p: c for c, ps in enumerate(self.positions) for p in ps}

    def __call__(self, idxs: Iterable[Any]) -> list[Any]:
        out = []
        if not self.reverse:
            for i in idxs:
                if 0 <= i.idx < len(self.positions):
                    out.extend(_HybridIndex(idx=p, root_idx=i.root_idx) for p in self.positions[i.idx])
            return out
        seen = set()
        for i in idxs:
            channel = self.owner.get(i.idx)
            if channel is not None and (channel, i.root_idx) not in seen:
                seen.add((channel, i.root_idx))
                out.append(_HybridIndex(idx=channel, root_idx=i.root_idx))
        return out

    def __repr__(self) -> str:
        return f"ChannelMap({len(self.positions)} channels{', reverse' if self.reverse else ''})"


class Composed:
    """Several Torch-Pruning index mappings applied in order."""

    def __init__(self, mappings: Sequence[Any]) -> None:
        self.mappings = list(mappings)

    def __call__(self, idxs: Any) -> Any:
        for mapping in self.mappings:
            idxs = mapping(idxs)
        return idxs


def _signed(value: Any) -> int:
    value = int(value)
    return value - 2**64 if value >= 2**63 else value


def is_shape_op(node: Any) -> bool:
    """Whether ``node`` only moves values around (or maps them one to one, same shape)."""
    if isinstance(node.module, torch.nn.Module) and node.type not in (
        _OPTYPE.RESHAPE, _OPTYPE.ELEMENTWISE, _OPTYPE.SLICE
    ):
        return False
    if node.type not in (_OPTYPE.RESHAPE, _OPTYPE.ELEMENTWISE, _OPTYPE.SLICE) or node.grad_fn is None:
        return False
    if len(node.inputs) != 1:
        return False
    name = op_name(node)
    if any(word in name for word in _RESHAPES + _MOVES):
        return True
    before = output_shape(node.inputs[0].grad_fn) if node.inputs[0].grad_fn is not None else None
    return before is not None and before == output_shape(node.grad_fn)


def chains(nodes: Iterable[Any], is_layer: Any) -> list[list[Any]]:
    """Maximal runs of shape operations with at least one reshape or permute in them.

    Inside a run every node has one input and one output; the last may feed several.
    """
    found = []
    for node in nodes:
        if is_layer(node) or not is_shape_op(node):
            continue
        up = node.inputs[0]
        if not is_layer(up) and is_shape_op(up) and len(up.outputs) == 1:
            continue  # not the first of its run
        run = [node]
        while len(run[-1].outputs) == 1:
            nxt = run[-1].outputs[0]
            if is_layer(nxt) or not is_shape_op(nxt):
                break
            run.append(nxt)
        if any(any(w in op_name(n) for w in _RESHAPES + _MOVES) for n in run):
            found.append(run)
    return found


def replay(run: Sequence[Any], shape: tuple[int, ...], axis: int) -> torch.Tensor | None:
    """The chain applied to a tensor of ``shape`` holding channel numbers along ``axis``.

    Positions a pad adds hold -1. ``None`` when an operation cannot be replayed.
    """
    channels = shape[axis]
    view = [1] * len(shape)
    view[axis] = channels
    t = torch.arange(channels, dtype=torch.int32).view(view).expand(shape)
    for node in run:
        fn = node.grad_fn
        name = op_name(node)
        after = output_shape(fn)
        if after is None:
            return None
        try:
            if "permute" in name:
                t = t.permute(*[_signed(d) for d in fn._saved_dims])
            elif "transpose" in name:
                t = t.transpose(_signed(fn._saved_dim0), _signed(fn._saved_dim1))
            elif "constantpadnd" in name:
                t = F.pad(t.contiguous(), tuple(int(p) for p in fn._saved_pad), value=-1)
            elif "roll" in name:
                t = torch.roll(t, tuple(int(s) for s in fn._saved_shifts), tuple(_signed(d) for d in fn._saved_dims))
            elif "repeatbackward" in name:
                t = t.repeat(*[int(r) for r in fn._saved_repeats])
            elif "flip" in name:
                t = torch.flip(t, tuple(_signed(d) for d in fn._saved_dims))
            elif "slice" in name:
                dim = _signed(fn._saved_dim) % t.dim()
                size = t.shape[dim]
                start = _signed(fn._saved_start or 0)
                end = _signed(fn._saved_end) if fn._saved_end is not None else size
                index = [slice(None)] * t.dim()
                index[dim] = slice(start, min(end, size), int(fn._saved_step or 1))
                t = t[tuple(index)]
            elif any(word in name for word in _RESHAPES):
                t = t.reshape(after)
            # anything else in a run keeps the shape and maps positions one to one
        except (RuntimeError, ValueError, TypeError, AttributeError, IndexError):
            return None
        if tuple(t.shape) != after:
            return None
    return t


def separable_positions(t: torch.Tensor, channels: int) -> np.ndarray | None:
    """``channel -> positions`` on the one axis of ``t`` that holds single channels.

    Row ``c`` of the ``[channels, k]`` result holds channel ``c``'s positions in order.

    ``None`` unless exactly one axis holds one channel per position (every channel at
    least once, no padding there) and the map is separable (see the module docstring).
    """
    candidates = []
    for axis in range(t.dim()):
        length = t.shape[axis]
        if length < 2 and channels > 1:
            continue
        columns = t.movedim(axis, -1).reshape(-1, length)
        high = columns.max(0).values
        low = columns.min(0).values
        if bool((high == low).all()):
            candidates.append((axis, high))
    if len(candidates) != 1:
        return None
    values = candidates[0][1].to(torch.long)
    if channels < 1 or int(values.min()) < 0 or int(values.max()) >= channels:
        return None
    counts = torch.bincount(values, minlength=channels)
    if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        return None  # a channel without positions, or channels of different sizes
    # positions of channel c, in increasing order: row c (a stable sort keeps the order)
    positions = torch.sort(values, stable=True).indices.view(channels, int(counts[0]))
    stride = int(positions[1, 0] - positions[0, 0]) if channels > 1 else 1
    expected = positions[0] + torch.arange(channels).unsqueeze(1) * stride
    if not torch.equal(positions, expected):
        return None
    return positions.numpy()


def tp_agrees(run: Sequence[Any], start: Any, positions: np.ndarray) -> bool:
    """Whether Torch-Pruning's own reshape / slice maps along the chain send each channel
    to exactly its row of ``positions`` (``[channels, k]``).

    The maps are applied to index arrays (:func:`.search.apply_mapping`, which gives
    Torch-Pruning's result), and compared as arrays: a 4096-channel chain costs a few
    array operations.
    """
    channels = positions.shape[0]
    idxs = np.arange(channels, dtype=np.int64)
    roots = idxs.copy()
    edges = list(zip([start, *run], run)) + [(run[-1], out) for out in run[-1].outputs[:1]]
    for a, b in edges:
        for dep in a.dependencies:
            if dep.target is b:
                for mapping in dep.index_mapping:
                    if isinstance(mapping, _TP_SHAPE_MAPS):
                        idxs, roots = apply_mapping(mapping, idxs, roots)
                break
    keep = (roots >= 0) & (roots < channels)
    pairs = np.unique(np.stack([roots[keep], idxs[keep]]), axis=1)  # by channel, then position
    want_channels = np.repeat(np.arange(channels, dtype=np.int64), positions.shape[1])
    return pairs.shape[1] == positions.size and bool(
        np.array_equal(pairs[0], want_channels) and np.array_equal(pairs[1], positions.reshape(-1))
    )


def install(run: Sequence[Any], start: Any, positions: Sequence[Sequence[int]]) -> list[tuple[Any, list[Any]]]:
    """Put the replayed map on the chain's first edge; drop Torch-Pruning's shape maps.

    Returns ``(dependency, index mapping list)`` for every changed dependency, so the
    repair can be put back after Torch-Pruning recomputes its maps.
    """
    edges = list(zip([start, *run], run))
    if run[-1].outputs:
        edges += [(run[-1], out) for out in run[-1].outputs]
    changed = []
    for a, b in edges:
        for src, dst, first in ((a, b, True), (b, a, False)):
            for dep in src.dependencies:
                if dep.target is not dst:
                    continue
                kept = [m for m in dep.index_mapping if m is not None and not isinstance(m, _TP_SHAPE_MAPS)]
                if a is start and b is run[0]:
                    mine = ChannelMap(positions, reverse=not first)
                    kept = [*kept, mine] if first else [mine, *kept]
                new = [Composed(kept) if len(kept) > 1 else (kept[0] if kept else None), None]
                dep.index_mapping[:] = new
                changed.append((dep, list(new)))
    return changed
