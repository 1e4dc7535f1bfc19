"""Attention written with separate q / k / v / o projections, read off the traced graph.

Torch-Pruning couples the output channels of ``q_proj``, ``k_proj`` and ``v_proj`` one to
one through the attention operation, which is wrong for heads (a head owns ``head_dim``
rows of each) and breaks under grouped-query attention (its index mapping through
``repeat_kv`` / ``expand`` loses the channels). Here every such attention is found from
what the forward does:

* each projection's output is viewed as ``(..., heads, head_dim)`` right after the layer;
* the three projections reach one and the same next layer, the output projection, and
  no other layer (the attention itself has no weights);
* rotary embeddings show up on the query and key paths as slices and a ``cat`` of two
  halves (``rotate_half``), as even/odd slices or a complex view (interleaved pairs).

The result is a plain record per attention (:class:`FoundAttention`); the core turns it
into head, kv-head and head-dim units.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
from torch import nn

from .nodes import grad_name, output_shape

ROTARY_HALF = "half"
ROTARY_INTERLEAVED = "interleaved"
ROTARY_UNKNOWN = "unknown"

_ATTENTION_OPS = ("scaleddotproduct", "flashattention", "efficientattention", "cudnnattention")
_ROTATION_OPS = ("cat", "slice", "stack", "complex", "viewasreal", "roll", "flip", "index", "gather", "select", "split", "chunk")


@attrs.frozen(kw_only=True)
class FoundAttention:
    """One attention with separate projections, as the trace shows it.

    ``heads`` holds the head count each projection's output is viewed with (query heads
    for ``q``, key/value heads for ``k`` and ``v``); ``rotary`` is ``None`` (no rotation
    seen), ``"half"``, ``"interleaved"`` or ``"unknown"``; ``kv_repeat`` says how query
    heads share kv heads: ``"block"`` (head ``h`` reads ``h // (heads / kv heads)``),
    ``"tile"`` (``h % kv heads``) or ``"unknown"``.
    """

    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    heads: tuple[int, int, int]
    head_dim: int
    rotary: str | None
    kv_repeat: str
    op: str


class AttentionFinder:
    """Finds separate-projection attention in a traced Torch-Pruning graph.

    Args:
        dg: The ``DependencyGraph``.
        names: ``{module: qualified name}``.
        out_channels: ``module -> output channels`` (``None`` when unknown).
    """

    def __init__(self, dg: Any, names: dict[Any, str], out_channels: Any) -> None:
        self.dg = dg
        self.names = names
        self.out_channels = out_channels

    def _is_layer(self, node: Any) -> bool:
        return isinstance(node.module, nn.Module) and node.module in self.names

    def _downstream(self, node: Any) -> tuple[set[Any], set[Any]]:
        """Operation nodes below ``node`` up to the next layers, and those layers."""
        ops: set[Any] = set()
        layers: set[Any] = set()
        stack = list(node.outputs)
        while stack:
            n = stack.pop()
            if self._is_layer(n):
                layers.add(n)
                continue
            if n in ops:
                continue
            ops.add(n)
            stack.extend(n.outputs)
        return ops, layers

    def _head_split(self, node: Any) -> tuple[int, int] | None:
        """``(heads, head_dim)`` if the layer's output is viewed as ``(..., heads, head_dim)``.

        The first reshape below the layer must split its last (channel) axis into exactly
        two axes; a fused qkv projection splits it into three and is not matched.
        """
        channels = self.out_channels(node.module)
        if not channels:
            return None
        for n in node.outputs:
            if self._is_layer(n):
                return None
            name = grad_name(n).lower()
            if "view" in name or "reshape" in name or "unflatten" in name:
                before = getattr(n.grad_fn, "_saved_self_sym_sizes", None)
                after = output_shape(n.grad_fn)
                if before is None or after is None:
                    return None
                before = tuple(int(s) for s in before)
                if before[-1] != channels or len(after) != len(before) + 1:
                    return None
                if after[: len(before) - 1] != before[:-1]:
                    return None
                heads, dim = after[-2], after[-1]
                return (heads, dim) if heads * dim == channels else None
            return None
        return None

    def find(self, exclude: Iterable[nn.Module] = ()) -> list[FoundAttention]:
        """Every attention whose q, k and v projections are separate layers."""
        skip = set(exclude)
        by_output: dict[Any, list[tuple[Any, set[Any], tuple[int, int]]]] = {}
        for module, node in self.dg.module2node.items():
            if module in skip or not self._is_layer(node):
                continue
            split = self._head_split(node)
            if split is None:
                continue
            ops, layers = self._downstream(node)
            if len(layers) != 1:
                continue
            by_output.setdefault(next(iter(layers)), []).append((node, ops, split))
        found = []
        for o_node, projections in by_output.items():
            if len(projections) != 3:
                continue
            dims = {split[1] for _, _, split in projections}
            if len(dims) != 1:
                continue
            ordered = self._roles(projections)
            if ordered is None:
                continue
            (q, q_ops, (hq, dim)), (k, k_ops, (hk, _)), (v, v_ops, (hv, _)) = ordered
            if hk != hv or hq % hk:
                continue
            shared = q_ops & k_ops
            op = next((grad_name(n) for n in shared if _is_attention_op(n)), "matmul")
            # the query path only: key paths also hold repeat_kv's index ops under GQA
            rotary = _rotary(q_ops - shared - v_ops, dim)
            repeat = _kv_repeat((k_ops | v_ops) - shared, hq, hk)
            found.append(
                FoundAttention(
                    q=q.module, k=k.module, v=v.module, o=o_node.module,
                    heads=(hq, hk, hv), head_dim=dim, rotary=rotary, kv_repeat=repeat, op=op,
                )
            )
        return found

    def _roles(self, projections: list[tuple[Any, set[Any], tuple[int, int]]]) -> list[Any] | None:
        """Order three projections as q, k, v.

        Where they meet in one ``scaled_dot_product_attention``, its argument order says.
        Otherwise the value projection is the one whose path has no softmax, and the query
        the one with the most heads (for equal head counts the two are interchangeable:
        every unit cuts them alike).
        """
        for node in set.intersection(*(ops for _, ops, _ in projections)):
            if not _is_attention_op(node):
                continue
            position = {}
            for entry in projections:
                for i, arg in enumerate(node.inputs[:3]):
                    if arg is entry[0] or arg in entry[1]:
                        position.setdefault(id(entry), i)
            if len(set(position.values())) == 3:
                return sorted(projections, key=lambda e: position[id(e)])
        softmaxed = [e for e in projections if any("softmax" in grad_name(n).lower() for n in e[1])]
        values = [e for e in projections if e not in softmaxed]
        if len(values) != 1:
            return None
        order = {m: i for i, m in enumerate(self.names)}
        qk = sorted(softmaxed, key=lambda e: (-e[2][0], order.get(e[0].module, 0)))
        return [qk[0], qk[1], values[0]]



def _is_attention_op(node: Any) -> bool:
    name = grad_name(node).lower()
    return any(word in name for word in _ATTENTION_OPS)


def _rotary(private: set[Any], head_dim: int) -> str | None:
    """How the operations on a query / key path before attention rotate dimensions."""
    names = {n: grad_name(n).lower() for n in private}
    suspicious = [n for n, name in names.items() if any(w in name for w in _ROTATION_OPS)]
    if not suspicious:
        return None
    if any("complex" in names[n] for n in suspicious):
        return ROTARY_INTERLEAVED
    slices = [_slice_of(n, head_dim) for n in suspicious if "slice" in names[n]]
    if slices and all(s is not None for s in slices):
        ranges = set(slices)
        if ranges == {(0, head_dim // 2, 1), (head_dim // 2, head_dim, 1)}:
            return ROTARY_HALF
        if ranges == {(0, head_dim, 2), (1, head_dim, 2)}:
            return ROTARY_INTERLEAVED
    return ROTARY_UNKNOWN


def _kv_repeat(private: set[Any], heads: int, kv_heads: int) -> str:
    """How kv heads are repeated for the query heads, from the key / value paths.

    ``expand`` of a singleton axis right after the kv-head axis and ``repeat_interleave``
    repeat each kv head in a block; a singleton before it, or ``Tensor.repeat``, tiles them.
    Nothing seen (SDPA's ``enable_gqa``, broadcasting in a matmul) means blocks.
    """
    if kv_heads == heads:
        return "block"
    rep = heads // kv_heads
    modes = set()
    for node in private:
        name = grad_name(node).lower()
        fn = node.grad_fn
        if "expandbackward" in name:
            before = getattr(fn, "_saved_self_sym_sizes", None)
            after = output_shape(fn)
            if before is None or after is None or len(before) != len(after):
                continue
            before = tuple(int(s) for s in before)
            for axis, (b, a) in enumerate(zip(before, after)):
                if b == 1 and a == rep:
                    if axis > 0 and before[axis - 1] == kv_heads:
                        modes.add("block")
                    elif axis + 1 < len(before) and before[axis + 1] == kv_heads:
                        modes.add("tile")
                    else:
                        modes.add("unknown")
        elif name.startswith("repeatbackward"):
            repeats = tuple(int(r) for r in getattr(fn, "_saved_repeats", ()) or ())
            if rep in repeats:
                modes.add("tile")
    if not modes:
        return "block"
    return modes.pop() if len(modes) == 1 else "unknown"


def _slice_of(node: Any, head_dim: int) -> tuple[int, int, int] | None:
    """``(start, stop, step)`` of a slice over the last (head-dim) axis, else ``None``."""
    fn = node.grad_fn
    sizes = getattr(fn, "_saved_self_sym_sizes", None)
    dim = getattr(fn, "_saved_dim", None)
    if sizes is None or dim is None:
        return None
    ndim = len(sizes)
    dim = int(dim)
    if dim >= 2**63:
        dim -= 2**64
    if dim % ndim != ndim - 1 or int(sizes[-1]) != head_dim:
        return None
    start = int(getattr(fn, "_saved_start", 0) or 0)
    end = getattr(fn, "_saved_end", None)
    step = int(getattr(fn, "_saved_step", 1) or 1)
    stop = head_dim if end is None or int(end) > head_dim else int(end)
    return (start % head_dim if start < 0 else start, stop, step)
