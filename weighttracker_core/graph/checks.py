"""Couplings Torch-Pruning is known to get wrong: repaired or refused, group by group.

Every refusal names the operation, the layer it feeds and the root layers whose groups
pass through it; adding those roots to ``ignored_layers`` leaves the operation out of
every group, so the rest of the model still gets units.

* ``torch.split`` / ``torch.unbind``: Torch-Pruning gives the i-th *traced consumer* the
  i-th chunk, but consumers are traced in graph order, not chunk order. The consumers are
  re-ordered by the autograd output number they read; a split whose chunks cannot be
  matched one-to-one to consumers is refused for the groups passing through it.
* A flatten (``view`` / ``reshape`` that folds spatial positions into features) preceded by
  a ``permute`` / ``transpose``: Torch-Pruning assumes channel-major order. Refused.
* Channel shuffles (``view`` that splits the channel axis, a transpose of the split axes,
  ``reshape`` back): Torch-Pruning treats them as identity. Refused.
* A ``torch.cat`` fed by one tensor along two paths: the index mapping loops. Refused
  before Torch-Pruning searches such a group, and the search is bounded anyway. Slices of
  one tensor that partition the concatenated axis (``rotate_half`` of rotary embeddings)
  are fine and not refused.
* Groups in which only some of the root's channels reach any consumer, or none does while
  the root does not feed the model's output, indices out of range or repeated: refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch_pruning as tp
from torch import nn

from ..errors import CouplingError
from ..units import PruneAxis

if TYPE_CHECKING:
    from .records import RawGroup

_OPTYPE = tp.ops.OPTYPE
_DATA_MOVEMENT = ("permute", "transpose")
_PASS_THROUGH = (_OPTYPE.ELEMENTWISE, _OPTYPE.RESHAPE, _OPTYPE.CONCAT, _OPTYPE.SPLIT)


class GraphChecks:
    """Checks over one traced ``DependencyGraph``.

    Args:
        dg: The Torch-Pruning graph.
        names: ``{module: qualified name}`` of the model's modules.
    """

    def __init__(self, dg: Any, names: dict[nn.Module, str], unmappable: Iterable[Any] = ()) -> None:
        self.dg = dg
        self._names = names
        self._refused: dict[Any, str] = {}  # operation node -> why groups through it are refused
        self._unmappable = set(unmappable)
        self._loops: dict[Any, str] = {}  # cat nodes whose index mapping would loop
        self._reshapes_checked = False

    # ------------------------------------------------------------------------ graph-wide

    def fix_chunk_order(self) -> None:
        """Give the i-th consumer of a split/unbind the i-th chunk; remember what cannot be."""
        for node in list(self.dg.module2node.values()):
            if node.type not in (_OPTYPE.SPLIT, _OPTYPE.UNBIND) or not node.outputs:
                continue
            refs: list[tuple[int, Any]] = []
            for out in dict.fromkeys(node.outputs):
                fns = getattr(out.grad_fn, "next_functions", ()) or ()
                refs.extend((nr, out) for fn, nr in fns if fn is node.grad_fn)
            chunks = len(node.module.offsets) - 1 if node.module.offsets else None
            numbers = sorted(nr for nr, _ in refs)
            if chunks is None or numbers != list(range(chunks)) or len(refs) != len(node.outputs):
                if node.module.offsets is None:
                    continue  # Torch-Pruning does not map indices through it
                self._refused[node] = (
                    f"Cannot verify how the chunks of {node.grad_fn.name()} feed "
                    f"{self._first_consumer(node)}: {chunks} chunks but consumers read outputs "
                    f"{numbers}. Unused or repeated chunks break Torch-Pruning's index mapping."
                )
                continue
            node.outputs[:] = [out for _, out in sorted(refs, key=lambda r: r[0])]

    def _find_operations(self) -> None:
        """Reshapes and cats that no group may pass through (found once, lazily)."""
        if self._reshapes_checked:
            return
        self._reshapes_checked = True
        for node in self.dg.module2node.values():
            if node.type == _OPTYPE.RESHAPE:
                reason = self._reshape_problem(node)
                if reason is None and node in self._unmappable:
                    reason = (
                        f"Torch-Pruning cannot map channels through the reshape "
                        f"({node.grad_fn.name()}) that feeds {self._first_consumer(node)}: it "
                        "infers no channel count on one side of it."
                    )
                if reason:
                    self._refused[node] = reason
            elif node.type == _OPTYPE.CONCAT:
                reason = self._concat_problem(node)
                if reason:
                    self._loops[node] = reason

    # ------------------------------------------------------------------------- per group

    def reachable(self, node: Any, fn: Callable[..., Any], blocked: set[Any] = frozenset()) -> set[Any]:  # type: ignore[assignment]
        """Nodes a group rooted at ``node`` / ``fn`` can reach (no index mapping: cheap)."""
        seen: set[tuple[Any, Any]] = set()
        nodes: set[Any] = set()
        stack = [(node, fn)]
        while stack:
            current, handler = stack.pop()
            if (current, handler) in seen:
                continue
            seen.add((current, handler))
            nodes.add(current)
            for dep in current.dependencies:
                if dep.is_triggered_by(handler):
                    stack.append((dep.target, dep.handler))
        return nodes

    def before_group(
        self, root: nn.Module, fn: Callable[..., Any], roots: Callable[[], Iterable[nn.Module]]
    ) -> None:
        """Refuse, before Torch-Pruning searches it, a group through a problem operation.

        Torch-Pruning's search itself fails on some of them (a looping cat never ends, a
        channel shuffle can divide by zero), so the cheap reachability walk runs first.
        ``roots`` gives every root that would still be searched (for the advice).
        """
        self._find_operations()
        if not self._loops and not self._refused:
            return
        reached = self.reachable(self.dg.module2node[root], fn)
        # a shuffle or unmappable reshape first: the splits after it are its consequence
        problems = sorted(
            [*self._loops.items(), *self._refused.items()],
            key=lambda entry: entry[0].type != _OPTYPE.RESHAPE,
        )
        for node, reason in problems:
            if node in reached:
                raise CouplingError(reason + self._advice(node, roots()))

    def check_operations(self, group: Any, roots: Callable[[], Iterable[nn.Module]]) -> None:
        """Refuse a group that passes through an operation Torch-Pruning maps wrongly."""
        self._find_operations()
        if not self._refused:
            return
        for item in group.items:
            reason = self._refused.get(item.dep.target)
            if reason is not None:
                raise CouplingError(reason + self._advice(item.dep.target, roots()))

    def _advice(self, node: Any, roots: Iterable[nn.Module]) -> str:
        """Which roots to ignore so that no group passes through ``node``."""
        through = []
        for root in roots:
            pruner = self.dg.get_pruner_of_module(root)
            if pruner is None:
                continue
            if node in self.reachable(self.dg.module2node[root], pruner.prune_out_channels):
                through.append(self._names[root])
        if not through:
            return ""
        shown = ", ".join(f"model.{n}" for n in through[:8]) + (", ..." if len(through) > 8 else "")
        return (
            f" The groups of {', '.join(through[:8])}{' ...' if len(through) > 8 else ''} pass "
            f"through it: add them to ignored_layers (ignored_layers=[{shown}]) to leave "
            "this part of the model out, or restructure that part of the forward."
        )

    def search_bound(self) -> Callable[[Any, Any, int, int], None]:
        """``bound(root_dep, dep, n_deps, n_idxs)``: raises when a group search does not end.

        Some graphs make Torch-Pruning's index mapping produce ever larger index sets, and
        the search never ends. A group never needs more entries than a small multiple of
        the graph's nodes, nor more indices on one layer than its widest input or output.
        """
        # [shared] (scale): the limits moved here from bounded_search, for the array search
        limit = 10 * len(self.dg.module2node) + 1000
        widths = [
            c for m in self._names if m in self.dg.module2node
            for c in (self.dg.get_out_channels(m), self.dg.get_in_channels(m)) if c
        ]
        index_limit = 4 * max([4096, *widths])

        def bound(root_dep: Any, dep: Any, n_deps: int, n_idxs: int) -> None:
            if n_deps >= limit or n_idxs > index_limit:
                why = (f"more than {limit} dependencies" if n_deps >= limit
                       else f"{n_idxs} indices on {dep.target.name}, more than any layer has")
                raise CouplingError(
                    f"Torch-Pruning's search for the group of {root_dep.target.name} "
                    f"did not end ({why}): its index mapping loops or multiplies, typically "
                    "because one tensor reaches a torch.cat through two paths, or reshapes "
                    "it cannot follow. Add that layer to ignored_layers, or restructure that "
                    "part of the forward."
                )

        return bound

    @contextlib.contextmanager
    def bounded_search(self) -> Iterator[None]:
        """Stop Torch-Pruning's own group search if it keeps adding dependencies (see
        :meth:`search_bound`)."""
        bound = self.search_bound()
        original = tp.dependency.group.Group.add_dep

        def add_dep(group: Any, dep: Any, idxs: Any) -> None:
            bound(group._group[0].dep if group._group else dep, dep, len(group._group), len(idxs))
            original(group, dep, idxs)

        tp.dependency.group.Group.add_dep = add_dep  # type: ignore[method-assign]
        try:
            yield
        finally:
            tp.dependency.group.Group.add_dep = original  # type: ignore[method-assign]

    # ---------------------------------------------------------------- problem operations

    def _concat_problem(self, node: Any) -> str | None:
        """A ``torch.cat`` whose inputs come from one tensor through two paths."""
        reach = [self._upstream_operations(start) for start in node.inputs]
        if _partitioning_slices(node):
            return None
        for i, first in enumerate(reach):
            for second in reach[i + 1 :]:
                common = first & second
                if not common:
                    continue
                layers = sorted(self._label(n) for n in common if n.module in self._names)
                source = layers[0] if layers else sorted(self._label(n) for n in common)[0]
                return (
                    f"The inputs of a torch.cat ({node.grad_fn.name()}) feeding "
                    f"{self._first_consumer(node)} come from one tensor along two paths (both "
                    f"from {source}); Torch-Pruning cannot map its channels."
                )
        return None

    def _shuffle_message(self, node: Any) -> str | None:
        shuffle = _shuffle_transpose(node, self._producer_channels(node))
        if shuffle is None:
            return None
        return (
            f"A channel shuffle (view, {shuffle}, reshape) feeds {self._first_consumer(node)}: "
            "Torch-Pruning treats it as identity and would couple the wrong channels."
        )

    def _reshape_problem(self, node: Any) -> str | None:
        own = self._shuffle_message(node)
        if own is not None:
            return own
        # the reshape that merges the axes back after a shuffle's transpose
        for up in self._walk(node.inputs, upward=True):
            if up.type == _OPTYPE.RESHAPE and up is not node:
                shuffle = self._shuffle_message(up)
                if shuffle is not None:
                    return shuffle
        flattening = any(
            type(m).__name__ == "_FlattenIndexMapping"
            for dep in node.dependencies
            for m in dep.index_mapping
        ) or any(
            type(m).__name__ == "_FlattenIndexMapping"
            for n in node.inputs
            for dep in n.dependencies
            if dep.target is node
            for m in dep.index_mapping
        )
        if flattening:
            permute = self._upstream_permute(node)
            if permute is not None:
                consumer = self._first_consumer(node)
                return (
                    f"A {permute} before the flatten ({node.grad_fn.name()}) that feeds "
                    f"{consumer} reorders channels; Torch-Pruning would map them as "
                    "channel-major and couple the wrong features. Flatten in NCHW order."
                )
        return None

    # --------------------------------------------------------------------------- walking

    def _label(self, node: Any) -> str:
        if isinstance(node.module, nn.Module) and node.module in self._names:
            return f"{self._names[node.module]} ({type(node.module).__name__})"
        return node.grad_fn.name() if node.grad_fn is not None else str(node.module)

    def _is_layer(self, node: Any) -> bool:
        return isinstance(node.module, nn.Module) and node.module in self._names

    def _walk(
        self, starts: Iterable[Any], *, upward: bool, stop: Callable[[Any], bool] | None = None
    ) -> Iterator[Any]:
        """Nodes reachable from ``starts``, each once; a node where ``stop`` holds (default:
        a layer) is yielded but not walked past."""
        stop = stop or self._is_layer
        seen: set[Any] = set()
        stack = list(starts)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            yield node
            if not stop(node):
                stack.extend(node.inputs if upward else node.outputs)

    def _upstream_operations(self, node: Any) -> set[Any]:
        """``node`` and the nodes above it up to (and including) the nearest layers."""
        return set(self._walk([node], upward=True))

    def consumer_modules(self, node: Any) -> Iterator[str]:
        """Names of the nearest layers downstream of ``node``."""
        return (self._names[n.module] for n in self._walk(node.outputs, upward=False) if self._is_layer(n))

    def _first_consumer(self, node: Any) -> str:
        """The nearest layer fed by ``node``, for error messages."""
        return next(iter(self.consumer_modules(node)), "the model output")

    def feeds_output(self, *nodes: Any) -> bool:
        """Whether some ``node``'s output reaches a model output without passing another layer.

        [shared] (scale): several nodes share one walk (a residual stream's members would
        each walk the whole chain of adds otherwise).
        """
        if any(not node.outputs for node in nodes):
            return True
        for n in self._walk([out for node in nodes for out in node.outputs], upward=False):
            if self._is_layer(n):
                continue
            if not n.outputs or isinstance(n.module, tp.ops._OutputOp):
                return True
        return False

    def _producer_channels(self, node: Any) -> int | None:
        """Output channels of the nearest layer upstream of ``node``, if any."""
        layers = (n for n in self._walk(node.inputs, upward=True) if self._is_layer(n))
        return next((self.dg.get_out_channels(n.module) for n in layers), None)

    def _upstream_permute(self, node: Any) -> str | None:
        """A permute/transpose between ``node`` and the nearest upstream layer, if any."""
        def stop(n: Any) -> bool:
            return isinstance(n.module, nn.Module) and n.type not in _PASS_THROUGH

        for n in self._walk(node.inputs, upward=True, stop=stop):
            if not stop(n) and any(word in _grad_name(n) for word in _DATA_MOVEMENT):
                return n.grad_fn.name()
        return None

    # ------------------------------------------------------------------------ the records

    def check_group(
        self,
        raw: RawGroup,
        channels: Callable[[nn.Module, PruneAxis], int | None],
        *,
        coverage: bool = True,
        untrusted: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        """Indices in range and unique; with ``coverage``, every root channel consumed.

        Groups holding a parameter in ``untrusted`` are skipped: the caller drops them.
        """
        for item in raw.items:
            if item.param_name is not None:
                full = f"{item.module_name}.{item.param_name}" if item.module_name else item.param_name
                if full in untrusted:
                    return
        covered: set[int] = set()
        has_consumer = False
        # [shared] (scale): items mostly share one index tuple; each tuple is read once
        spans: dict[int, tuple[int, int, bool]] = {}
        added: set[int] = set()
        for item in raw.items:
            size = (
                _param_dim_size(item.module, item.param_name, item.pruning_dim)
                if item.param_name is not None
                else channels(item.module, item.axis)
            )
            span = spans.get(id(item.idxs))
            if span is None and item.idxs:
                span = spans[id(item.idxs)] = (
                    min(item.idxs), max(item.idxs), len(set(item.idxs)) == len(item.idxs)
                )
            if size is not None and span is not None and (span[0] < 0 or span[1] >= size):
                raise CouplingError(
                    f"Group {raw.root_name}:{raw.pruning_fn} maps indices outside "
                    f"{item.module_name or item.param_name} ({item.axis}, size {size})."
                )
            if span is not None and not span[2]:
                raise CouplingError(
                    f"Group {raw.root_name}:{raw.pruning_fn} maps two units onto one index "
                    f"of {item.module_name} ({item.axis})."
                )
            if item.axis is PruneAxis.IN_CHANNEL:
                has_consumer = True
                if id(item.root_idxs) not in added:
                    added.add(id(item.root_idxs))
                    covered.update(item.root_idxs)
        if not coverage:
            return
        advice = (
            f"If {raw.root_name} is an attention projection pass num_heads="
            f"{{model.get_submodule({raw.root_name!r}): heads}} (separate q/k/v projections: "
            "one entry each, or attention_layouts=[AttentionLayout(...)]); otherwise add "
            f"model.{raw.root_name} to ignored_layers."
        )
        if has_consumer and len(covered) != raw.n_root:
            missing = sorted(set(range(raw.n_root)) - covered)
            span = f"{missing[0]}..{missing[-1]}" if len(missing) > 1 else str(missing[0])
            raise CouplingError(
                f"Only {len(covered)} of the {raw.n_root} output channels of "
                f"{raw.root_name} reach a consumer (channels {span} do not): Torch-Pruning "
                "lost them in an operation it cannot follow (for a fused attention "
                "projection: unbind into q, k, v). " + advice
            )
        if not has_consumer and not raw.feeds_output:
            raise CouplingError(
                f"The output channels of {raw.root_name} reach {raw.consumer} but Torch-Pruning "
                "coupled them to no layer that consumes them (it lost them in an operation it "
                "cannot follow, such as an attention's repeat of key/value heads); removing "
                "them would leave that layer's input too wide. " + advice
            )


def _partitioning_slices(node: Any) -> bool:
    """Whether a cat's inputs are disjoint slices of one tensor along the cat axis.

    ``rotate_half`` (``cat((-x[..., d/2:], x[..., :d/2]), -1)``) is one: every position of
    the source appears once in the result, so channels map one to one.
    """
    ranges = []
    sources = set()
    for start in node.inputs:
        n = start
        while n is not None and "slice" not in _grad_name(n):
            if "neg" in _grad_name(n) and len(n.inputs) == 1:
                n = n.inputs[0]
                continue
            n = None
        if n is None or len(n.inputs) != 1:
            return False
        fn = n.grad_fn
        step = int(getattr(fn, "_saved_step", 1) or 1)
        sizes = getattr(fn, "_saved_self_sym_sizes", None)
        if step != 1 or sizes is None:
            return False
        length = int(sizes[int(getattr(fn, "_saved_dim", 0)) % len(sizes)])
        begin = int(getattr(fn, "_saved_start", 0) or 0)
        end = getattr(fn, "_saved_end", None)
        stop = length if end is None or int(end) > length else int(end)
        ranges.append((begin % length if begin < 0 else begin, stop))
        sources.add(n.inputs[0])
    if len(sources) != 1 or len(ranges) < 2:
        return False
    covered = sorted(ranges)
    return all(a[1] <= b[0] for a, b in zip(covered, covered[1:]))


def _param_dim_size(owner: nn.Module, attr: str | None, dim: int | None) -> int | None:
    if attr is None or dim is None:
        return None
    return int(getattr(owner, attr).shape[dim])


def _grad_name(node: Any) -> str:
    fn = node.grad_fn
    return fn.name().lower() if fn is not None and hasattr(fn, "name") else ""


def _output_shape(grad_fn: Any) -> tuple[int, ...] | None:
    meta = getattr(grad_fn, "_input_metadata", None)
    if not meta:
        return None
    try:
        return tuple(int(s) for s in meta[0].shape)
    except (AttributeError, TypeError):
        return None


def _channel_axis(before: tuple[int, ...], channels: int | None) -> int:
    """The channel axis of a tensor of shape ``before`` made by a layer with ``channels``.

    Dim 1 of 4-D and larger tensors (NCHW) and the last dim otherwise; a channels-last
    tensor (``(B, H, W, C)``, as in Swin's window partition) has its channels last.
    """
    default = 1 if len(before) >= 4 else len(before) - 1
    if channels is not None and before[default] != channels and before[-1] == channels:
        return len(before) - 1
    return default


def _split_axis(
    before: tuple[int, ...], after: tuple[int, ...], channel: int | None = None
) -> tuple[int, int] | None:
    """If ``after`` only splits the channel axis of ``before``: the ``after`` axes it became.

    ``channel`` is the channel axis of ``before`` (default: see :func:`_channel_axis`).
    """
    if len(after) <= len(before):
        return None
    i = 0
    while i < len(before) and before[i] == after[i]:
        i += 1
    j = 0
    while j < len(before) - i - 1 and before[-1 - j] == after[-1 - j]:
        j += 1
    if i + j != len(before) - 1:
        return None
    if channel is None:
        channel = _channel_axis(before, None)
    if i != channel:
        return None
    start, stop = i, len(after) - j
    if math.prod(after[start:stop]) != before[i] or stop - start < 2:
        return None
    return start, stop


def _shuffle_transpose(node: Any, channels: int | None = None) -> str | None:
    """For a reshape node that splits one axis: a following transpose of the split axes.

    ``channels`` is the channel count of the layer producing the reshaped tensor, if known.
    """
    fn = node.grad_fn
    before = getattr(fn, "_saved_self_sym_sizes", None)
    after = _output_shape(fn)
    if before is None or after is None:
        return None
    before = tuple(int(s) for s in before)
    split = _split_axis(before, after, _channel_axis(before, channels))
    if split is None:
        return None
    start, stop = split
    for out in node.outputs:
        name = _grad_name(out)
        # moving a singleton axis reorders nothing
        split = {d for d in range(start, stop) if after[d] > 1}
        if "transpose" in name:
            dims = {int(out.grad_fn._saved_dim0) % len(after), int(out.grad_fn._saved_dim1) % len(after)}
            if dims <= split:
                return out.grad_fn.name()
        elif "permute" in name:
            order = [int(d) % len(after) for d in out.grad_fn._saved_dims]
            kept = [d for d in order if d in split]
            if kept != sorted(kept):
                return out.grad_fn.name()
    return None
