"""Torch-Pruning's group search, with indices held as arrays instead of Python objects.

``DependencyGraph.get_pruning_group`` wraps every channel in a ``_HybridIndex`` named tuple
(its index on the layer and its index on the root), compares and merges those lists in
Python, and converts them back at the end. For a LLaMA-70B-shaped model that is tens of
millions of objects and most of the time spent building the structure. :class:`GroupSearch`
walks the same graph in the same order with the same rules, but keeps a group item's
indices as two ``int64`` arrays:

* the walk: from the root, every dependency triggered by the current handler is followed,
  its index mappings applied in order; a dependency that maps no index is skipped, and one
  whose target was already visited is skipped when the group already holds that operation
  with exactly these indices;
* the merge: items with the same target and handler are merged, keeping the first
  occurrence of every index; items on ignored parameters are dropped;
* the root of a depthwise convolution is searched with Torch-Pruning's depthwise function.

Index mappings of the kinds transformers and CNNs use (concatenation, split, slice, the
forward flatten) are applied as array operations; any other mapping (a reverse flatten,
whose output order Torch-Pruning leaves to a ``set``, the grouped-query ``expand``, or
anything new) is applied by calling Torch-Pruning's own mapping on ``_HybridIndex`` lists,
so the result is always the one Torch-Pruning gives. A root index Torch-Pruning sets to
``None`` is ``-1`` here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch_pruning as tp
from torch import nn

_mappings = tp.dependency.index_mapping
_Hybrid = tp._helpers._HybridIndex
NO_ROOT = -1


class SearchedItem:
    """One dependency of a searched group with its indices (``idxs[i]`` <- ``root_idxs[i]``)."""

    __slots__ = ("dep", "idxs", "root_idxs")

    def __init__(self, dep: Any, idxs: np.ndarray, root_idxs: np.ndarray) -> None:
        self.dep = dep
        self.idxs = idxs
        self.root_idxs = root_idxs

    def __iter__(self) -> Iterator[Any]:
        yield self.dep
        yield self.idxs


class SearchedGroup:
    """A searched group: ``items[0]`` is the root, like Torch-Pruning's ``Group``."""

    __slots__ = ("items",)

    def __init__(self, items: list[SearchedItem]) -> None:
        self.items = items

    def __getitem__(self, k: int) -> SearchedItem:
        return self.items[k]

    def __iter__(self) -> Iterator[SearchedItem]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


Bound = Callable[[Any, Any, int, int], None]


class GroupSearch:
    """Searches groups of one traced ``DependencyGraph``.

    Args:
        dg: The graph (its index mappings already updated).
        bound: ``bound(root_dep, dep, n_deps, n_idxs)`` is called before ``dep`` is added
            to a group already holding ``n_deps`` dependencies, with its ``n_idxs`` indices;
            it may raise to stop a search that does not end.
    """

    def __init__(self, dg: Any, bound: Bound | None = None) -> None:
        self.dg = dg
        self.bound = bound
        self._ignored = {id(p) for p in dg.ignored_params}

    def group(self, module: nn.Module, pruning_fn: Callable[..., Any], n: int) -> SearchedGroup:
        """The group of channels ``0..n-1`` of ``module`` cut by ``pruning_fn``."""
        dg = self.dg
        if module not in dg.module2node:
            raise ValueError(f"Module {module} is not in the dependency graph.")
        if isinstance(module, tp.ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
            pruning_fn = tp.pruner.function.prune_depthwise_conv_out_channels
        root = dg.module2node[module]
        start = np.arange(n, dtype=np.int64)
        root_dep = tp.dependency.Dependency(pruning_fn, pruning_fn, source=root, target=root)
        found: list[list[Any]] = []  # [dep, idxs, roots]
        by_op: dict[tuple[Any, Any], list[int]] = {}

        def add(dep: Any, idxs: np.ndarray, roots: np.ndarray) -> None:
            if self.bound is not None:
                self.bound(root_dep, dep, len(found), len(idxs))
            by_op.setdefault((dep.target, dep.handler), []).append(len(found))
            found.append([dep, idxs, roots])

        add(root_dep, start, start)
        visited: set[Any] = set()
        stack = [(root_dep, start, start)]
        while stack:
            dep, idxs, roots = stack.pop()
            node, fn = dep.target, dep.handler
            visited.add(node)
            for new in node.dependencies:
                if new.trigger != fn:
                    continue
                new_idxs, new_roots = idxs, roots
                for mapping in new.index_mapping:
                    if mapping is not None:
                        new_idxs, new_roots = apply_mapping(mapping, new_idxs, new_roots)
                if len(new_idxs) == 0:
                    continue
                if new.target in visited and self._holds(found, by_op, new, new_idxs, new_roots):
                    continue
                add(new, new_idxs, new_roots)
                stack.append((new, new_idxs, new_roots))
        return SearchedGroup(self._merged(found))

    @staticmethod
    def _holds(found: list[list[Any]], by_op: dict[tuple[Any, Any], list[int]], dep: Any,
               idxs: np.ndarray, roots: np.ndarray) -> bool:
        for i in by_op.get((dep.target, dep.handler), ()):
            _, have, have_roots = found[i]
            if (have is idxs or np.array_equal(have, idxs)) and (
                have_roots is roots or np.array_equal(have_roots, roots)
            ):
                return True
        return False

    def _merged(self, found: list[list[Any]]) -> list[SearchedItem]:
        merged: list[list[Any]] = []
        where: dict[tuple[Any, Any], int] = {}
        for dep, idxs, roots in found:
            if isinstance(dep.target.module, nn.Parameter) and id(dep.target.module) in self._ignored:
                continue
            key = (dep.target, dep.handler)
            if key not in where:
                where[key] = len(merged)
                merged.append([dep, idxs, roots])
                continue
            entry = merged[where[key]]
            both = np.concatenate((entry[1], idxs))
            both_roots = np.concatenate((entry[2], roots))
            _, first = np.unique(both, return_index=True)
            first.sort()
            entry[1], entry[2] = both[first], both_roots[first]
        return [SearchedItem(dep, idxs, roots) for dep, idxs, roots in merged]


def apply_mapping(mapping: Any, idxs: np.ndarray, roots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One of Torch-Pruning's index mappings, applied to ``(idxs, roots)`` arrays."""
    kind = type(mapping)
    reverse = bool(getattr(mapping, "reverse", False))
    if kind is _mappings._ConcatIndexMapping or kind is _mappings._SplitIndexMapping:
        low, high = int(mapping.offset[0]), int(mapping.offset[1])
        shift_up = (kind is _mappings._ConcatIndexMapping) != reverse
        if shift_up:
            return idxs + low, roots
        keep = (idxs >= low) & (idxs < high)
        return idxs[keep] - low, roots[keep]
    if kind is _mappings._SliceIndexMapping and all(
        isinstance(v, int) for v in (mapping.start, mapping.step, mapping.end)
    ):
        start, step, end = mapping.start, mapping.step, mapping.end
        if reverse:
            return idxs * step + start, roots
        keep = (idxs >= start) & (idxs < end) & ((idxs - start) % step == 0)
        return (idxs[keep] - start) // step, roots[keep]
    if kind is _mappings._FlattenIndexMapping and not reverse:
        stride = int(mapping._stride)
        expanded = (idxs[:, None] * stride + np.arange(stride, dtype=np.int64)).reshape(-1)
        return expanded, np.repeat(roots, stride)
    return _apply_generic(mapping, idxs, roots)


def _apply_generic(mapping: Any, idxs: np.ndarray, roots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Torch-Pruning's own mapping on ``_HybridIndex`` lists (any mapping, exact order)."""
    hybrid = [
        _Hybrid(idx=i, root_idx=None if r == NO_ROOT else r)
        for i, r in zip(idxs.tolist(), roots.tolist())
    ]
    out = mapping(hybrid)
    new_idxs = np.fromiter((int(h.idx) for h in out), dtype=np.int64, count=len(out))
    new_roots = np.fromiter(
        (NO_ROOT if h.root_idx is None else int(h.root_idx) for h in out), dtype=np.int64, count=len(out)
    )
    return new_idxs, new_roots
