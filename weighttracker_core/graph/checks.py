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
from typing import Any

import torch_pruning as tp
from torch import nn

from ..errors import CouplingError
from ..names import join_name
from ..units import PruneAxis
from . import reshapes
from .nodes import op_name, output_shape
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
        self._repaired: set[Any] = set()  # shape-operation nodes with a replayed channel map
        self._repairs: list[tuple[Any, list[Any]]] = []  # (dependency, its index mappings)

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
                    f"{self.first_consumer(node)}: {chunks} chunks but consumers read outputs "
                    f"{numbers}. Unused or repeated chunks break Torch-Pruning's index mapping."
                )
                continue
            node.outputs[:] = [out for _, out in sorted(refs, key=lambda r: r[0])]

    def repair_reshapes(self) -> None:
        """Replace Torch-Pruning's map through chains of reshapes where replaying them differs.

        See :mod:`.reshapes`. Torch-Pruning recomputes its maps before every group search
        and prune; :meth:`repaired` puts the repairs back each time.
        """
        for run in reshapes.chains(self.dg.module2node.values(), self._is_layer):
            start = run[0].inputs[0]
            shape = _input_shape(run[0]) or (output_shape(start.grad_fn) if start.grad_fn is not None else None)
            if shape is None or len(shape) < 2:
                continue
            axis = self._start_axis(run[0], shape)
            found = []
            # when the layers above do not say, the layers below must: the one axis of
            # the size of their inputs whose replay lands on them one to one (a channels-
            # last tensor flattened for a Linear, as in MambaOut)
            consumers = None if axis is not None else self._consumer_inputs(run[-1])
            for candidate in [axis] if axis is not None else range(1, len(shape)):
                if axis is None and (not consumers or shape[candidate] != consumers):
                    continue
                replayed = reshapes.replay(run, shape, candidate)
                positions = None if replayed is None else reshapes.separable_positions(replayed, shape[candidate])
                if positions is None:
                    continue
                if axis is None and positions.size != consumers:
                    continue
                found.append((candidate, positions))
            if len(found) != 1:
                continue
            candidate, positions = found[0]
            if reshapes.tp_agrees(run, start, positions):
                continue
            self._repairs.extend(reshapes.install(run, start, positions.tolist()))
            self._repaired.update(run)

    def _consumer_inputs(self, node: Any) -> int | None:
        """The input channels of the layers ``node`` feeds, if they all take as many and
        only operations that keep the shape lie between."""
        shape = output_shape(node.grad_fn)
        counts = set()
        for n in self._walk(node.outputs, upward=False):
            if self._is_layer(n):
                counts.add(self.dg.get_in_channels(n.module))
            elif _reads_parameters(n):
                continue  # a layer's own product (a Linear on a 3-D or 4-D input)
            elif output_shape(n.grad_fn) != shape:
                return None
        return counts.pop() if len(counts) == 1 else None

    def _start_axis(self, node: Any, shape: tuple[int, ...] | None) -> int | None:
        """The channel axis of the tensor entering ``node`` (``None`` when unsure).

        Its channels are those of the nearest layers above, reached through operations
        that do not mix channels with anything else (adds, activations, reshapes; not a
        matrix product or an operation reading parameters, which would be a layer
        Torch-Pruning does not see). The axis of that size is the channel axis; if
        several have it, the layers' own layout decides (channels first for convolutions
        and batch / group norms, last for linear layers and layer norms) while the tensor
        still has their output shape.
        """
        if shape is None or len(shape) < 2:
            return None
        producers = []
        for n in self._walk(node.inputs, upward=True):
            if self._is_layer(n):
                producers.append(n)
                continue
            name = op_name(n)
            if isinstance(n.module, nn.Parameter) or n.grad_fn is None or any(
                word in name for word in ("mm", "attention", "conv", "einsum")
            ) or _reads_parameters(n):
                return None
        counts = {self.dg.get_out_channels(p.module) for p in producers}
        if len(counts) != 1:
            return None
        channels = counts.pop()
        fitting = [a for a in range(1, len(shape)) if shape[a] == channels]
        if len(fitting) == 1:
            return fitting[0]
        if not fitting or any(output_shape(p.grad_fn) != shape for p in producers):
            return None
        first = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                 nn.modules.instancenorm._InstanceNorm)
        last = (nn.Linear, nn.LayerNorm, nn.Embedding)
        if all(isinstance(p.module, first) for p in producers) and 1 in fitting:
            return 1
        if all(isinstance(p.module, last) for p in producers) and len(shape) - 1 in fitting:
            return len(shape) - 1
        return None

    def reapply_repairs(self) -> None:
        for dep, mappings in self._repairs:
            dep.index_mapping[:] = mappings

    @contextlib.contextmanager
    def repaired(self) -> Iterator[None]:
        """Torch-Pruning's index-mapping update followed by the repairs, while inside."""
        if not self._repairs:
            yield
            return
        mapping = tp.dependency.index_mapping
        update = mapping.update_index_mapping

        def update_and_repair(graph: Any) -> None:
            update(graph)
            if graph is self.dg:
                self.reapply_repairs()

        mapping.update_index_mapping = update_and_repair
        try:
            yield
        finally:
            mapping.update_index_mapping = update

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
                        f"({node.grad_fn.name()}) that feeds {self.first_consumer(node)}: it "
                        "infers no channel count on one side of it."
                    )
                if reason:
                    self._refused[node] = reason
            elif node.type == _OPTYPE.CONCAT:
                # without offsets Torch-Pruning passes indices through unchanged (a cat
                # along tokens, as in EVA's rotary embedding): nothing can loop there
                reason = self._concat_problem(node) if node.module.offsets is not None else None
                if reason:
                    self._loops[node] = reason
                elif node in self._unmappable:
                    self._refused[node] = (
                        f"Torch-Pruning cannot map channels through the torch.cat "
                        f"({node.grad_fn.name()}) that feeds {self.first_consumer(node)}: it "
                        "infers no channel count for one of its inputs (the graph above it is "
                        "too deep for its inference)."
                    )
            elif node.type == _OPTYPE.EXPAND:
                reason = self._expand_problem(node)
                if reason:
                    self._refused[node] = reason
        self._find_hidden_layers()

    def _expand_problem(self, node: Any) -> str | None:
        """A 5-D expand Torch-Pruning takes for a key/value head repeat that cannot be one.

        Its map then divides by the repeat it infers (output channels over input
        channels), which is 0 when the expanded tensor is narrower than what it feeds.
        """
        mapping = tp.dependency.index_mapping._GQAIndexMapping
        for dep in [*node.dependencies, *(d for n in node.inputs for d in n.dependencies if d.target is node)]:
            for m in dep.index_mapping:
                if isinstance(m, mapping) and (int(m.repeat) < 1 or int(m.head_dim) < 1):
                    return (
                        f"Torch-Pruning maps the expand ({node.grad_fn.name()}) that feeds "
                        f"{self.first_consumer(node)} as a repeat of key/value heads, but the "
                        "tensor it expands is not narrower than what it feeds by a whole factor."
                    )
        return None

    def _is_layer_type(self, module: nn.Module) -> bool:
        """Whether Torch-Pruning would trace ``module`` as a layer (not as an operation)."""
        return type(module) in self.dg.CUSTOMIZED_PRUNERS or tp.ops.module2type(module) not in (
            _OPTYPE.ELEMENTWISE, _OPTYPE.PARAMETER
        )

    def _find_hidden_layers(self) -> None:
        """Operations that use a layer's weights without calling the layer.

        ``F.linear(x, self.qkv.weight)`` (torchvision's Swin) never runs ``self.qkv``: its
        forward hook does not fire, Torch-Pruning sees no layer and maps channels through
        the product as if it were element-wise. A layer whose parent module was called is
        part of that module (``nn.MultiheadAttention.out_proj``) and fine.
        """
        owners: dict[int, nn.Module] = {}
        for module in self._names:
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), module)
        traced = {self._names[m] for m in self.dg.module2node if isinstance(m, nn.Module) and m in self._names}
        for node in self.dg.module2node.values():
            if self._is_layer(node) or node.grad_fn is None:
                continue
            for fn, _ in getattr(node.grad_fn, "next_functions", ()) or ():
                owner = owners.get(id(getattr(fn, "variable", None)))
                if owner is None or not self._is_layer_type(owner):
                    continue
                name = self._names[owner]
                if any(t == "" or name == t or name.startswith(t + ".") for t in traced):
                    continue
                self._refused.setdefault(node, (
                    f"{name} ({type(owner).__name__}) is not called as a module: the forward "
                    f"uses its parameters directly ({node.grad_fn.name()}, e.g. "
                    f"F.linear(x, {name}.weight)), so Torch-Pruning sees no layer there and "
                    "maps channels through it as if it were element-wise."
                ))

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
                raise CouplingError(reason)

    def check_operations(self, group: Any, roots: Callable[[], Iterable[nn.Module]]) -> None:
        """Refuse a group that passes through an operation Torch-Pruning maps wrongly."""
        self._find_operations()
        if not self._refused:
            return
        for item in group.items:
            reason = self._refused.get(item.dep.target)
            if reason is not None:
                raise CouplingError(reason)

    def refusal(self, refused: list[tuple[nn.Module, CouplingError]]) -> CouplingError:
        """One error for every group refused, whose advice names all their roots.

        Following it (every root in ``ignored_layers``) leaves out exactly the groups that
        were refused, so the rest of the model builds in one go.
        """
        reasons = list(dict.fromkeys(str(err) for _, err in refused))
        names = [self._names[root] for root, _ in refused]
        shown = ", ".join(f"model.{n}" for n in names)
        others = f" (other groups for similar reasons, e.g.: {reasons[1]})" if len(reasons) > 1 else ""
        which = (f"The group of {names[0]} is refused" if len(names) == 1
                 else f"The groups of {len(names)} layers are refused ({', '.join(names)})")
        error = CouplingError(
            f"{reasons[0]}{others} {which}: add {'it' if len(names) == 1 else 'them'} to "
            f"ignored_layers (ignored_layers=[{shown}]) to leave that part of the model out, or "
            "restructure that part of the forward."
        )
        error.ignored_layers = tuple(names)
        return error

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
                    "it cannot follow."
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
        """A ``torch.cat`` whose inputs come from one tensor through two paths, one of them
        through a slice or a flatten.

        Along plain paths (``cat([y, bn(y)])``, DLA's roots) Torch-Pruning maps each channel
        to all of its copies and its search ends. A slice or a flatten on the way makes
        its index sets grow or reorder on every round trip through the cat: the search
        never ends (or is stopped), so such groups are refused before it starts.
        """
        reach = [self._upstream_operations(start) for start in node.inputs]
        if _partitioning_slices(node):
            return None
        for i, first in enumerate(reach):
            for second in reach[i + 1 :]:
                common = first & second
                if not common or not any(
                    n.type in (_OPTYPE.SLICE, _OPTYPE.RESHAPE) for n in (first | second) - common
                ):
                    continue
                layers = sorted(self._label(n) for n in common if n.module in self._names)
                source = layers[0] if layers else sorted(self._label(n) for n in common)[0]
                return (
                    f"The inputs of a torch.cat ({node.grad_fn.name()}) feeding "
                    f"{self.first_consumer(node)} come from one tensor along two paths (both "
                    f"from {source}); Torch-Pruning cannot map its channels."
                )
        return None

    def _shuffle_message(self, node: Any) -> str | None:
        shuffle = _shuffle_transpose(node, self._producer_channels(node))
        if shuffle is None:
            return None
        return (
            f"A channel shuffle (view, {shuffle}, reshape) feeds {self.first_consumer(node)}: "
            "Torch-Pruning treats it as identity and would couple the wrong channels."
        )

    def _reshape_problem(self, node: Any) -> str | None:
        if node in self._repaired:
            return None
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
                consumer = self.first_consumer(node)
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

    def first_consumer(self, node: Any) -> str:
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
            if not stop(n) and any(word in op_name(n) for word in _DATA_MOVEMENT):
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
                full = join_name(item.module_name, item.param_name)
                if full in untrusted:
                    return
        covered, has_consumer = _checked_indices(raw, channels)
        if coverage:
            _check_coverage(raw, covered, has_consumer)

    def check_inputs_owned(self, raws: Iterable[RawGroup]) -> None:
        """Refuse when some input channels of a layer belong to no unit of the groups feeding it.

        Torch-Pruning maps channels one to one through operations it does not know
        (``repeat``, ``repeat_interleave``, ...). When such an operation widens the tensor,
        each root channel reaches one input of the next layer while the copies reach none,
        and the group looks complete. Checked for layers whose inputs come only from
        layers that are members of the groups built here (no model input, no parameter,
        nothing Torch-Pruning does not see on the way).
        """
        owned, root_of = _owned_inputs(raws)
        first = None
        roots: list[str] = []
        for module, positions in owned.items():
            width = self.dg.get_in_channels(module)
            if not width or len(positions) >= width:
                continue
            sources = self._sources(self.dg.module2node[module])
            if sources is None:
                continue
            producers, ops = sources
            if not producers or any(p not in root_of for p in producers):
                continue
            roots.extend(r for r in sorted({root_of[p] for p in producers}) if r not in roots)
            if first is None:
                names = sorted(self._names[p] for p in producers)
                first = _unowned_message(self._names[module], width, positions, names, ops)
        if first is not None:
            shown = ", ".join(f"model.{n}" for n in roots)
            error = CouplingError(
                f"{first} Add {', '.join(roots)} to ignored_layers (ignored_layers=[{shown}]) to "
                "leave these channels out, or restructure that part of the forward."
            )
            error.ignored_layers = tuple(roots)
            raise error

    def _sources(self, node: Any) -> tuple[set[nn.Module], list[str]] | None:
        """Layers feeding ``node`` and the operations between; ``None`` if anything else does.

        Something else is a model input or a parameter (Torch-Pruning does not trace
        inputs; autograd shows them as missing or as leaves), or a reused layer.
        """
        producers: set[nn.Module] = set()
        ops: list[str] = []
        for n in self._walk(node.inputs, upward=True):
            if self._is_layer(n):
                producers.add(n.module)
                continue
            if isinstance(n.module, nn.Parameter) or n.grad_fn is None:
                return None  # a parameter outside layers (a scale, or a layer no rule knows)
            if n.type == _OPTYPE.CONCAT:
                # an input Torch-Pruning does not trace (a model input, a parameter it does
                # not track) adds positions that no layer of the model makes
                nexts = getattr(n.grad_fn, "next_functions", ()) or ()
                if any(fn is None or "accumulategrad" in fn.name().lower() for fn, _ in nexts):
                    return None
            name = n.grad_fn.name()
            if name not in ops and not _uses_parameters_of(n, node.module):
                ops.append(name)
        return producers, ops


def _reads_parameters(node: Any) -> bool:
    """Whether the operation of ``node`` reads a parameter autograd shows as a leaf."""
    return any(
        fn is not None and "accumulategrad" in fn.name().lower()
        for fn, _ in getattr(node.grad_fn, "next_functions", ()) or ()
    )


def _uses_parameters_of(node: Any, module: Any) -> bool:
    """Whether ``node`` is part of ``module``'s own computation (it reads its parameters)."""
    if not isinstance(module, nn.Module):
        return False
    own = {id(p) for p in module.parameters()}
    return any(
        id(getattr(fn, "variable", None)) in own for fn, _ in getattr(node.grad_fn, "next_functions", ()) or ()
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
        while n is not None and "slice" not in op_name(n):
            if "neg" in op_name(n) and len(n.inputs) == 1:
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


def _input_shape(node: Any) -> tuple[int, ...] | None:
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    return tuple(int(s) for s in sizes) if sizes is not None else None


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
    after = output_shape(fn)
    if before is None or after is None:
        return None
    before = tuple(int(s) for s in before)
    split = _split_axis(before, after, _channel_axis(before, channels))
    if split is None:
        return None
    start, stop = split
    for out in node.outputs:
        name = op_name(out)
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


def _checked_indices(
    raw: RawGroup, channels: Callable[[nn.Module, PruneAxis], int | None]
) -> tuple[set[int], bool]:
    """Refuse indices out of range or repeated; the root channels consumers read, and
    whether any member consumes them."""
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
                f"{item.module_name or item.param_name} ({item.axis}, size {size}): "
                "Torch-Pruning followed the channels through an operation it maps wrongly "
                "(a split, reshape or matrix product along another axis)."
            )
        if span is not None and not span[2]:
            raise CouplingError(
                f"Group {raw.root_name}:{raw.pruning_fn} maps two units onto one index "
                f"of {item.module_name} ({item.axis}): Torch-Pruning followed the channels "
                "through an operation it maps wrongly."
            )
        if item.axis is PruneAxis.IN_CHANNEL:
            has_consumer = True
            if id(item.root_idxs) not in added:
                added.add(id(item.root_idxs))
                covered.update(item.root_idxs)
    return covered, has_consumer


def _check_coverage(raw: RawGroup, covered: set[int], has_consumer: bool) -> None:
    """Refuse a group some of whose root channels reach no consumer."""
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


def _owned_inputs(raws: Iterable[RawGroup]) -> tuple[dict[nn.Module, set[int]], dict[nn.Module, str]]:
    """Per layer, the input channels some group's unit owns; per root layer, its group."""
    owned: dict[nn.Module, set[int]] = {}
    root_of: dict[nn.Module, str] = {}
    for raw in raws:
        for item in raw.items:
            if item.param_name is not None:
                continue
            if item.axis is PruneAxis.IN_CHANNEL:
                owned.setdefault(item.module, set()).update(item.idxs)
            else:
                root_of.setdefault(item.module, raw.root_name)
    return owned, root_of


def _unowned_message(name: str, width: int, positions: set[int], producers: list[str], ops: list[str]) -> str:
    through = ", ".join(ops) if ops else "no operation"
    missing = sorted(set(range(width)) - positions)
    span = f"{missing[0]}..{missing[-1]}" if len(missing) > 1 else str(missing[0])
    return (
        f"Only {len(positions)} of the {width} input channels of {name} "
        f"belong to a unit of the groups that feed it (from {', '.join(producers)}; inputs "
        f"{span} belong to none): Torch-Pruning mapped channels one to one through an "
        f"operation that changes their number ({through}), so removing a unit would "
        "leave its copies behind."
    )
