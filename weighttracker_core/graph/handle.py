"""A traced Torch-Pruning dependency graph with checked groups.

This package is the only part of the core that imports ``torch_pruning``. The handle
traces the model (:mod:`.tracing`), enumerates and checks its groups (:mod:`.checks`),
finds attention with separate projections (:mod:`.attention`), and hands out groups as
plain records (:mod:`.records`) so that no Torch-Pruning object leaks further.
"""

from __future__ import annotations

import functools

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch_pruning as tp
from torch import nn

from ..errors import ConfigError, CouplingError, PruningError
from ..specs import LayerPruner
from ..names import split_name
from ..units import PruneAxis
from .attention import AttentionFinder, FoundAttention
from .checks import GraphChecks
from .records import RawGroup, RawItem
from .search import NO_ROOT, GroupSearch, SearchedGroup
from .tracing import guarded_index_mapping, trace


class _AdapterPruner(tp.pruner.BasePruningFunc):
    """Wraps a plugin's :class:`LayerPruner` as a Torch-Pruning pruning function."""

    TARGET_MODULES = None

    def __init__(self, impl: LayerPruner) -> None:
        super().__init__()
        self.impl = impl
        if getattr(impl.prune_in_channels, "__func__", 1) is getattr(
            impl.prune_out_channels, "__func__", 2
        ):
            # one axis (like a norm layer): Torch-Pruning couples in and out through
            # the identity of the two functions
            self.prune_in_channels = self.prune_out_channels  # type: ignore[method-assign]

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return self.impl.prune_out_channels(layer, list(idxs))

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return self.impl.prune_in_channels(layer, list(idxs))

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return self.impl.get_out_channels(layer)

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return self.impl.get_in_channels(layer)


class DependencyGraphHandle:
    """A traced Torch-Pruning ``DependencyGraph`` with checked groups.

    Args:
        model: The model (left in the training mode it had, with no hooks added).
        example_inputs: Tensor, tuple of positional inputs, or dict of keyword inputs.
        forward_fn: ``forward_fn(model, example_inputs)`` replaces the default call.
        output_transform: Maps the model output to tensors to trace from.
        unwrapped_parameters: ``{parameter: dim}`` or ``[(parameter, dim)]`` for
            parameters outside standard layers.
        ignored_layers: Modules whose output channels are never pruned.
        root_module_types: Types whose output channels start groups.
        layer_pruners: ``{module type: LayerPruner}`` for custom layers.
        ignored_params: Parameters Torch-Pruning leaves out of every group (an integration
            cuts them itself after a prune).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        unwrapped_parameters: Any = None,
        ignored_layers: Sequence[nn.Module] = (),
        root_module_types: Sequence[type] = (nn.modules.conv._ConvNd, nn.Linear),
        layer_pruners: dict[type, LayerPruner] | None = None,
        ignored_params: Sequence[nn.Parameter] = (),
    ) -> None:
        self.model = model
        self.root_module_types = tuple(root_module_types)
        self.ignored_layers = list(ignored_layers)
        self._names = {m: n for n, m in model.named_modules()}
        pruners = {t: _AdapterPruner(p) for t, p in (layer_pruners or {}).items()}
        self.dg = trace(
            model,
            example_inputs,
            forward_fn=forward_fn,
            output_transform=output_transform,
            unwrapped_parameters=_unwrapped_list(unwrapped_parameters),
            customized_pruners=pruners or None,
            ignored_params=list(ignored_params),
        )
        self._param_names = {p: n for n, p in model.named_parameters()}
        self._coarser: dict[tuple[nn.Module, nn.Module], bool] = {}
        self.checks = GraphChecks(self.dg, self._names, getattr(self.dg, "_wt_unmappable", ()))
        self.checks.fix_chunk_order()
        with guarded_index_mapping(set()):  # the maps after the chunk order fix
            tp.dependency.index_mapping.update_index_mapping(self.dg)
        self.checks.repair_reshapes()

    # ----------------------------------------------------------------------------- queries

    def module_name(self, module: Any) -> str:
        if isinstance(module, nn.Parameter):
            return self._param_names.get(module, "")
        return self._names.get(module, "")

    def traced_modules(self) -> list[nn.Module]:
        """Modules (not operations or parameters) the trace reached."""
        return [m for m in self.dg.module2node if isinstance(m, nn.Module) and m in self._names]

    def unwrapped(self) -> list[tuple[str, int]]:
        """``(parameter name, pruning dim)`` of every unwrapped parameter."""
        out = []
        for p, dim in self.dg.unwrapped_parameters:
            out.append((self._param_names.get(p, ""), int(dim)))
        return out

    def attention(self, exclude: Iterable[nn.Module] = ()) -> list[FoundAttention]:
        """Attention with separate q / k / v projections (see :mod:`.attention`)."""
        return AttentionFinder(self.dg, self._names, self.dg.get_out_channels).find(exclude)

    def groups(
        self,
        *,
        coverage_exempt: Sequence[nn.Module] = (),
        skip_roots: Sequence[nn.Module] = (),
        untrusted_params: Sequence[str] = (),
    ) -> list[RawGroup]:
        """Every prunable group, checked; raises :class:`CouplingError` when unsure.

        Groups rooted at ``coverage_exempt`` (fused qkv projections given ``num_heads``) skip
        the coverage check: their rows are regrouped into heads later. Groups that cut the
        output channels of a module in ``skip_roots`` are not built (attention projections
        whose head units the caller builds itself). Groups with a parameter in
        ``untrusted_params`` (Torch-Pruning guessed its dim) are not checked either: the
        caller leaves them out.
        """
        untrusted = frozenset(untrusted_params)
        exempt = set(coverage_exempt)
        blocked, roots = self._roots(skip_roots)
        visited: set[nn.Module] = set()
        out = []
        refused: list[tuple[nn.Module, CouplingError]] = []

        def remaining() -> list[nn.Module]:
            return [m for m in roots if m not in visited]

        with guarded_index_mapping(set()), self.checks.repaired():
            # the mapping depends on the graph only (and on the chunk order fixed above);
            # the reshape repairs are put back after the update
            tp.dependency.index_mapping.update_index_mapping(self.dg)
        search = GroupSearch(self.dg, self.checks.search_bound())
        for root in roots:
            if root in visited:
                continue
            try:  # every refused group is collected: the advice names them all
                raw = self._checked_group(search, root, remaining, visited, blocked)
                if raw is None:
                    continue
                self.checks.check_group(
                    raw, self.channels, coverage=raw.root_module not in exempt, untrusted=untrusted
                )
            except CouplingError as err:
                refused.append((root, err))
                continue
            out.append(raw)
        if refused:
            raise self.checks.refusal(refused)
        self.checks.check_inputs_owned(out)
        return out

    def _roots(self, skip_roots: Sequence[nn.Module]) -> tuple[set[nn.Module], list[nn.Module]]:
        """Layers no group may cut the outputs of, and the layers that start groups."""
        ignored = {sub for layer in self.ignored_layers for sub in layer.modules()}
        blocked = ignored | set(skip_roots) | set(self.dg.IGNORED_LAYERS_IN_TRACING)
        roots = [
            m for m in self.dg.module2node
            if isinstance(m, self.root_module_types) and m not in blocked and self._prunable(m)
        ]
        return blocked, roots

    def _checked_group(
        self, search: GroupSearch, root: nn.Module, remaining: Callable[[], list[nn.Module]],
        visited: set[nn.Module], blocked: set[nn.Module],
    ) -> RawGroup | None:
        """The group of ``root`` with its operations checked; ``None`` if it cuts a blocked layer.

        Every layer whose output channels the group cuts counts as visited.
        """
        group = self._search(search, root, remaining)
        group = self._coarsest(search, group, remaining)
        prunable = True
        for item in group.items:
            if self.dg.is_out_channel_pruning_fn(item.dep.handler):
                visited.add(item.dep.target.module)
                if item.dep.target.module in blocked:
                    prunable = False
        if not prunable:
            return None
        self.checks.check_operations(group, remaining)
        return self._to_raw(group)

    def _prunable(self, module: nn.Module) -> bool:
        pruner = self.dg.get_pruner_of_module(module)
        return pruner is not None and pruner.get_out_channels(module) is not None

    def _search(
        self, search: GroupSearch, root: nn.Module, remaining: Callable[[], list[nn.Module]]
    ) -> SearchedGroup:
        """Torch-Pruning's group of ``root``'s output channels, after the loop check."""
        pruner = self.dg.get_pruner_of_module(root)
        self.checks.before_group(root, pruner.prune_out_channels, remaining)
        channels = pruner.get_out_channels(root)
        try:
            return search.group(root, pruner.prune_out_channels, int(channels))
        except CouplingError:
            raise
        except (ArithmeticError, LookupError, TypeError, ValueError) as err:
            # Torch-Pruning's index maps fail on operations they misread
            raise CouplingError(
                f"Torch-Pruning's search for the group of {self._names.get(root, '?')} failed in "
                f"its index mapping ({type(err).__name__}: {err}): an operation on the way is "
                "one it maps wrongly."
            ) from err

    def _coarsest(
        self, search: GroupSearch, group: SearchedGroup, remaining: Callable[[], list[nn.Module]],
        depth: int = 0,
    ) -> SearchedGroup:
        """The group re-rooted at its coarsest member when the root is finer.

        When one channel of a member reaches several channels of the root (a conv's
        channels flattened into a linear layer's features; a channel concatenated with a
        per-channel function of itself, as in GhostNet), Torch-Pruning's group of the root
        makes fractions of that member's channels its units, and keeps one of the root
        channels per member channel. Rooted at the member, each of its channels owns all
        the positions it reaches.
        """
        root = group[0].dep.target.module
        units = len(group[0].idxs)
        for item in group.items:
            module = item.dep.target.module
            if (
                depth < 8
                and module is not root
                and isinstance(module, nn.Module)
                and module in self._names
                and self.dg.is_out_channel_pruning_fn(item.dep.handler)
                and _distinct(item.idxs) < units
                and self._prunable(module)
                and self._is_coarser(search, module, root, remaining)
            ):
                return self._coarsest(search, self._search(search, module, remaining), remaining, depth + 1)
        return group

    def _is_coarser(
        self, search: GroupSearch, module: nn.Module, root: nn.Module, remaining: Callable[[], list[nn.Module]]
    ) -> bool:
        """Whether one output channel of ``module`` reaches several of ``root``'s."""
        key = (module, root)
        if key not in self._coarser:
            self._coarser[key] = False
            try:
                group = self._search(search, module, remaining)
            except CouplingError:
                return False
            for item in group.items:
                if item.dep.target.module is root and self.dg.is_out_channel_pruning_fn(item.dep.handler):
                    # coarser for every root channel, not for some of them only
                    self._coarser[key] = (
                        len(item.idxs) > _distinct(item.root_idxs)
                        and _distinct(item.idxs) == self.dg.get_out_channels(root)
                    )
                    break
        return self._coarser[key]

    def axis_of(self, handler: Callable[..., Any]) -> PruneAxis:
        is_out = self.dg.is_out_channel_pruning_fn(handler)
        is_in = self.dg.is_in_channel_pruning_fn(handler)
        if is_out and is_in:
            return PruneAxis.FEATURE
        return PruneAxis.OUT_CHANNEL if is_out else PruneAxis.IN_CHANNEL

    def channels(self, module: nn.Module, axis: PruneAxis) -> int | None:
        if axis is PruneAxis.IN_CHANNEL:
            return self.dg.get_in_channels(module)
        return self.dg.get_out_channels(module)

    # ----------------------------------------------------------------------------- pruning

    def prune(self, root: nn.Module, pruning_fn: str, idxs: Sequence[int]) -> None:
        """Remove ``idxs`` of ``root`` (and everything coupled) through Torch-Pruning."""
        pruner = self.dg.get_pruner_of_module(root)
        if pruner is None:
            raise PruningError(f"Torch-Pruning has no pruner for {type(root).__name__}.")
        fn = getattr(pruner, pruning_fn, None)
        if fn is None:
            # depthwise convolutions report prune_depthwise_conv_* names
            fn = pruner.prune_out_channels if "out" in pruning_fn else pruner.prune_in_channels
        # the update of the maps divides by zero at reshapes no built group passes through
        with guarded_index_mapping(set()), self.checks.repaired():
            group = self.dg.get_pruning_group(root, fn, sorted(int(i) for i in idxs))
        group.prune(record_history=False)

    def prune_layer(self, module: nn.Module, axis: PruneAxis, idxs: Sequence[int]) -> None:
        """Remove ``idxs`` on one side of one layer only (nothing coupled follows).

        Used for attention heads, whose coupling the core knows better than the graph.
        """
        pruner = self.dg.get_pruner_of_module(module)
        if pruner is None:
            raise PruningError(f"Torch-Pruning has no pruner for {type(module).__name__}.")
        fn = pruner.prune_in_channels if axis is PruneAxis.IN_CHANNEL else pruner.prune_out_channels
        fn(module, sorted(int(i) for i in idxs))

    # ------------------------------------------------------------------------- conversion

    def _to_raw(self, group: SearchedGroup) -> RawGroup:
        """A searched group as a plain record: its layers' and parameters' items."""
        root = group[0]
        root_dep = root.dep
        items, producers = [], []
        as_tuple = _TupleCache()
        for item in group.items:
            self._check_mapped(root_dep, item)
            if self.dg.is_out_channel_pruning_fn(item.dep.handler):
                producers.append(item.dep.target)
            raw_item = self._raw_item(item, as_tuple)
            if raw_item is not None:
                items.append(raw_item)
        root_module = root_dep.target.module
        return RawGroup(
            root_name=self._names[root_module],
            root_module=root_module,
            pruning_fn=root_dep.handler.__name__,
            n_root=len(root.idxs),
            items=tuple(items),
            feeds_output=self.checks.feeds_output(*producers) if producers else False,
            consumer=self.checks.first_consumer(root_dep.target),
        )

    def _check_mapped(self, root_dep: Any, item: Any) -> None:
        """Refuse an item whose channels Torch-Pruning mapped to no root channel."""
        if not (len(item.root_idxs) and int(item.root_idxs.min()) == NO_ROOT):
            return
        root_name = self._names.get(root_dep.target.module, "?")
        raise CouplingError(
            f"Torch-Pruning lost the channel mapping between {root_name} "
            f"and {self._names.get(item.dep.target.module, item.dep.target.name)} (its index "
            "mapping through an operation it cannot follow, such as an expand/reshape that "
            "repeats channels, gave no root channel). If this is attention with separate "
            "projections pass num_heads= or attention_layouts=; otherwise add "
            f"model.{root_name} to ignored_layers."
        )

    def _raw_item(self, item: Any, as_tuple: _TupleCache) -> RawItem | None:
        """One member of a group: a layer on an axis, or an unwrapped parameter on a dim."""
        dep = item.dep
        target = dep.target.module
        if isinstance(target, nn.Parameter):
            owner_name, attr = split_name(self._param_names.get(target, ""))
            return RawItem(
                module_name=owner_name,
                module=self.model.get_submodule(owner_name) if owner_name else self.model,
                param_name=attr,
                pruning_dim=int(dep.target.pruning_dim),
                axis=PruneAxis.FEATURE,
                pruning_fn=dep.handler.__name__,
                idxs=as_tuple(item.idxs),
                root_idxs=as_tuple(item.root_idxs),
            )
        if not isinstance(target, nn.Module) or target not in self._names:
            return None  # operations (add, cat, reshape, ...) own no weights
        return RawItem(
            module_name=self._names[target],
            module=target,
            param_name=None,
            pruning_dim=None,
            axis=self.axis_of(dep.handler),
            pruning_fn=dep.handler.__name__,
            idxs=as_tuple(item.idxs),
            root_idxs=as_tuple(item.root_idxs),
        )


def _distinct(values: Any) -> int:
    """How many different indices an index array holds."""
    return int(np.unique(np.asarray(values)).size)


@functools.lru_cache(maxsize=64)
def _range_tuple(n: int) -> tuple[int, ...]:
    return tuple(range(n))


class _TupleCache:
    """Index arrays as tuples of ints, one tuple per array and one per ``range(n)``.

    Most items of a group share their root's index array (element-wise operations map
    indices unchanged), and most groups index whole layers: sharing the tuples keeps a
    70B-shaped model's groups to one copy of ``range(n)`` per width.
    """

    def __init__(self) -> None:
        self._by_array: dict[int, tuple[Any, tuple[int, ...]]] = {}

    def __call__(self, values: Any) -> tuple[int, ...]:
        hit = self._by_array.get(id(values))
        if hit is not None and hit[0] is values:
            return hit[1]
        n = len(values)
        if n and int(values[0]) == 0 and int(values[-1]) == n - 1 and bool((values[1:] - values[:-1] == 1).all()):
            out = _range_tuple(n)
        else:
            out = tuple(values.tolist())
        self._by_array[id(values)] = (values, out)
        return out


def _unwrapped_list(value: Any) -> list[tuple[nn.Parameter, int]] | None:
    if value is None:
        return None
    pairs = value.items() if isinstance(value, dict) else value
    out = []
    for pair in pairs:
        try:
            param, dim = pair
        except (TypeError, ValueError):
            raise ConfigError(
                f"unwrapped_parameters must map nn.Parameter to a dim ({{param: dim}} or "
                f"[(param, dim)]); got the entry {pair!r}."
            ) from None
        if not isinstance(param, nn.Parameter):
            raise ConfigError(
                f"unwrapped_parameters must map nn.Parameter to a dim; got {type(param).__name__}."
            )
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ConfigError(f"unwrapped_parameters dims must be ints; got {dim!r}.")
        out.append((param, int(dim)))
    return out
