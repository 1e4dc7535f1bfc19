"""Torch-Pruning dependency graphs, checked (SPEC §3.1).

The only core module that imports ``torch_pruning``. It traces the model, repairs or
refuses the couplings Torch-Pruning is known to get wrong, and hands out dependency groups
as plain records (:class:`RawGroup`) so that no Torch-Pruning object leaks further.

Known problems handled here:

* ``torch.split`` / ``torch.unbind``: Torch-Pruning gives the i-th *traced consumer* the
  i-th chunk, but consumers are traced in graph order, not chunk order. The consumers are
  re-ordered by the autograd output number they read, and splits whose chunks cannot be
  matched one-to-one to consumers are refused.
* A flatten (``view`` / ``reshape`` that folds spatial positions into features) preceded by
  a ``permute`` / ``transpose``: Torch-Pruning assumes channel-major order. Refused.
* Channel shuffles (``view`` that splits the channel axis, a transpose of the split axes,
  ``reshape`` back): Torch-Pruning treats them as identity. Refused.
* Groups in which only some of the root's channels reach any consumer (e.g. a fused
  ``qkv`` projection without ``num_heads``): refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
import torch_pruning as tp
from torch import nn

from .errors import ConfigError, CouplingError, PruningError
from .specs import LayerPruner
from .units import PruneAxis

_OPTYPE = tp.ops.OPTYPE
_DATA_MOVEMENT = ("permute", "transpose")


@attrs.frozen(kw_only=True)
class RawItem:
    """One module (or unwrapped parameter) of a Torch-Pruning group."""

    module_name: str
    module: Any  # nn.Module, or the owning module of an unwrapped parameter
    param_name: str | None  # set for unwrapped parameters
    pruning_dim: int | None  # set for unwrapped parameters
    axis: PruneAxis
    pruning_fn: str
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]


@attrs.frozen(kw_only=True)
class RawGroup:
    """A Torch-Pruning group: its root and every coupled module with indices."""

    root_name: str
    root_module: nn.Module
    pruning_fn: str
    n_root: int
    items: tuple[RawItem, ...]


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


def call_model(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> Any:
    """Run ``model`` on ``example_inputs`` the way the tracker does everywhere."""
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def describe_inputs(example_inputs: Any) -> str:
    """Shapes of ``example_inputs`` for error messages."""
    if isinstance(example_inputs, torch.Tensor):
        return f"tensor of shape {tuple(example_inputs.shape)}"
    if isinstance(example_inputs, dict):
        return "{" + ", ".join(f"{k!r}: {describe_inputs(v)}" for k, v in example_inputs.items()) + "}"
    if isinstance(example_inputs, (tuple, list)):
        return "(" + ", ".join(describe_inputs(v) for v in example_inputs) + ")"
    return type(example_inputs).__name__


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore ``training`` flags and ``requires_grad`` after tracing."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in grads.items():
            p.requires_grad_(flag)


class DependencyGraphHandle:
    """A traced Torch-Pruning ``DependencyGraph`` with checked groups.

    Args:
        model: The model (left in the training mode it had).
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
        unwrapped = _unwrapped_list(unwrapped_parameters)

        def trace_fn(m: nn.Module, x: Any) -> Any:
            return call_model(m, x, forward_fn)

        with preserved_modes(model), torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            try:
                self.dg = tp.DependencyGraph().build_dependency(
                    model,
                    example_inputs=example_inputs,
                    forward_fn=trace_fn,
                    output_transform=output_transform,
                    unwrapped_parameters=unwrapped,
                    customized_pruners=pruners or None,
                    ignored_params=list(ignored_params),
                    verbose=False,
                )
            except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as err:
                raise ConfigError(
                    f"example_inputs ({describe_inputs(example_inputs)}) do not fit "
                    f"{type(model).__name__}: the trial forward pass failed with "
                    f"{type(err).__name__}: {err}. Pass inputs of the shape the model "
                    "expects (a tensor, a tuple of positional inputs, or a dict of keyword "
                    "inputs; forward_fn= for anything else)."
                ) from err
        self._param_names = {p: n for n, p in model.named_parameters()}
        self._fix_chunk_order()

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

    def groups(
        self, attention_roots: Sequence[nn.Module] = (), untrusted_params: Sequence[str] = ()
    ) -> list[RawGroup]:
        """Every prunable group, checked; raises :class:`CouplingError` when unsure.

        Groups rooted at ``attention_roots`` (fused qkv projections given ``num_heads``) skip
        the coverage check: their query and key rows are regrouped into heads later.
        Groups with a parameter in ``untrusted_params`` (Torch-Pruning guessed its dim) are
        not checked either: the caller leaves them out.
        """
        self._untrusted = set(untrusted_params)
        self._check_reshapes()
        self._check_concat_inputs()
        ignored = [sub for layer in self.ignored_layers for sub in layer.modules()]
        out = []
        with self._bounded_search():
            for group in self.dg.get_all_groups(
                ignored_layers=ignored, root_module_types=self.root_module_types
            ):
                out.append(
                    self._to_raw(group, check=group[0].dep.target.module not in attention_roots)
                )
        return out

    @contextlib.contextmanager
    def _bounded_search(self) -> Iterator[None]:
        """Stop Torch-Pruning's group search if it keeps adding dependencies.

        Some graphs (a tensor reaching one ``cat`` through two paths, say) make its index
        mapping produce ever larger index sets, and the search never ends. A group never
        needs more entries than a small multiple of the graph's nodes.
        """
        limit = 10 * len(self.dg.module2node) + 1000
        original = tp.dependency.group.Group.add_dep

        def add_dep(group: Any, dep: Any, idxs: Any) -> None:
            if len(group._group) >= limit:
                raise CouplingError(
                    f"Torch-Pruning's search for the group of {dep.source.name} did not end "
                    f"(more than {limit} dependencies): its index mapping loops, typically "
                    "because one tensor reaches a torch.cat through two paths. Add the layer "
                    "to ignored_layers, or restructure that part of the forward."
                )
            original(group, dep, idxs)

        tp.dependency.group.Group.add_dep = add_dep  # type: ignore[method-assign]
        try:
            yield
        finally:
            tp.dependency.group.Group.add_dep = original  # type: ignore[method-assign]

    def _check_concat_inputs(self) -> None:
        """Refuse a ``torch.cat`` whose inputs come from one tensor through two paths."""
        for node in self.dg.module2node.values():
            if node.type != _OPTYPE.CONCAT:
                continue
            reach = [self._upstream_operations(start) for start in node.inputs]
            for i, first in enumerate(reach):
                for second in reach[i + 1 :]:
                    common = first & second
                    if not common:
                        continue
                    layers = sorted(self._label(n) for n in common if n.module in self._names)
                    source = layers[0] if layers else sorted(self._label(n) for n in common)[0]
                    consumer = next(iter(self._consumer_modules(node)), "the output")
                    raise CouplingError(
                        f"The inputs of a torch.cat ({node.grad_fn.name()}) feeding {consumer} "
                        f"come from one tensor along two paths (both from {source}); "
                        "Torch-Pruning cannot map its channels. Add the layers before the cat "
                        "to ignored_layers."
                    )

    def _label(self, node: Any) -> str:
        if isinstance(node.module, nn.Module) and node.module in self._names:
            return f"{self._names[node.module]} ({type(node.module).__name__})"
        return node.grad_fn.name() if node.grad_fn is not None else str(node.module)

    def _upstream_operations(self, node: Any) -> set[Any]:
        """``node`` and the nodes above it up to (and including) the nearest layers."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if isinstance(n.module, nn.Module) and n.module in self._names:
                continue
            stack.extend(n.inputs)
        return seen

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
        group = self.dg.get_pruning_group(root, fn, sorted(int(i) for i in idxs))
        group.prune(record_history=False)

    # ------------------------------------------------------------------------- conversion

    def _to_raw(self, group: Any, check: bool = True) -> RawGroup:
        items = []
        root_dep, root_idxs = group[0]
        for item in group.items:
            dep = item.dep
            target = dep.target.module
            if isinstance(target, nn.Parameter):
                full = self._param_names.get(target, "")
                owner_name, _, attr = full.rpartition(".")
                owner = self.model.get_submodule(owner_name) if owner_name else self.model
                items.append(
                    RawItem(
                        module_name=owner_name,
                        module=owner,
                        param_name=attr,
                        pruning_dim=int(dep.target.pruning_dim),
                        axis=PruneAxis.FEATURE,
                        pruning_fn=dep.handler.__name__,
                        idxs=tuple(int(i) for i in item.idxs),
                        root_idxs=tuple(int(i) for i in item.root_idxs),
                    )
                )
                continue
            if not isinstance(target, nn.Module) or target not in self._names:
                continue  # operations (add, cat, reshape, ...) own no weights
            items.append(
                RawItem(
                    module_name=self._names[target],
                    module=target,
                    param_name=None,
                    pruning_dim=None,
                    axis=self.axis_of(dep.handler),
                    pruning_fn=dep.handler.__name__,
                    idxs=tuple(int(i) for i in item.idxs),
                    root_idxs=tuple(int(i) for i in item.root_idxs),
                )
            )
        root_module = root_dep.target.module
        raw = RawGroup(
            root_name=self._names[root_module],
            root_module=root_module,
            pruning_fn=root_dep.handler.__name__,
            n_root=len(root_idxs),
            items=tuple(items),
        )
        self._check_group(raw, coverage=check)
        return raw

    # ----------------------------------------------------------------------------- checks

    def _fix_chunk_order(self) -> None:
        """Give the i-th consumer of a split/unbind the i-th chunk, or refuse."""
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
                consumer = next(iter(self._consumer_modules(node)), "the model output")
                raise CouplingError(
                    f"Cannot verify how the chunks of {node.grad_fn.name()} feed "
                    f"{consumer}: {chunks} chunks but consumers read outputs {numbers}. "
                    "Unused or repeated chunks break Torch-Pruning's index mapping. Add "
                    "the layers before this split to ignored_layers."
                )
            node.outputs[:] = [out for _, out in sorted(refs, key=lambda r: r[0])]

    def _consumer_modules(self, node: Any) -> Iterator[str]:
        seen, stack = set(), list(node.outputs)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if isinstance(n.module, nn.Module) and n.module in self._names:
                yield self._names[n.module]
                continue
            stack.extend(n.outputs)

    def _producer_channels(self, node: Any) -> int | None:
        """Output channels of the nearest layer upstream of ``node``, if any."""
        seen, stack = set(), list(node.inputs)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if isinstance(n.module, nn.Module) and n.module in self._names:
                return self.dg.get_out_channels(n.module)
            stack.extend(n.inputs)
        return None

    def _check_reshapes(self) -> None:
        for node in self.dg.module2node.values():
            if node.type != _OPTYPE.RESHAPE:
                continue
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
                permute = _find_upstream_permute(node)
                if permute is not None:
                    consumer = next(iter(self._consumer_modules(node)), "the output")
                    raise CouplingError(
                        f"A {permute} before the flatten ({node.grad_fn.name()}) that feeds "
                        f"{consumer} reorders channels; Torch-Pruning would map them as "
                        "channel-major and couple the wrong features. Flatten in NCHW order, "
                        f"or add {consumer} to ignored_layers."
                    )
            shuffle = _shuffle_transpose(node, self._producer_channels(node))
            if shuffle is not None:
                consumer = next(iter(self._consumer_modules(node)), "the output")
                raise CouplingError(
                    f"A channel shuffle (view, {shuffle}, reshape) feeds {consumer}: "
                    "Torch-Pruning treats it as identity and would couple the wrong "
                    "channels. Add the layers before the shuffle to ignored_layers."
                )

    def _check_group(self, raw: RawGroup, coverage: bool = True) -> None:
        untrusted = getattr(self, "_untrusted", set())
        for item in raw.items:
            if item.param_name is not None:
                full = f"{item.module_name}.{item.param_name}" if item.module_name else item.param_name
                if full in untrusted:
                    return
        covered: set[int] = set()
        has_consumer = False
        for item in raw.items:
            size = (
                _param_dim_size(item.module, item.param_name, item.pruning_dim)
                if item.param_name is not None
                else self.channels(item.module, item.axis)
            )
            if size is not None and any(not 0 <= i < size for i in item.idxs):
                raise CouplingError(
                    f"Group {raw.root_name}:{raw.pruning_fn} maps indices outside "
                    f"{item.module_name or item.param_name} ({item.axis}, size {size})."
                )
            if len(set(item.idxs)) != len(item.idxs):
                raise CouplingError(
                    f"Group {raw.root_name}:{raw.pruning_fn} maps two units onto one index "
                    f"of {item.module_name} ({item.axis})."
                )
            if item.axis is PruneAxis.IN_CHANNEL:
                has_consumer = True
                covered.update(item.root_idxs)
        if coverage and has_consumer and len(covered) != raw.n_root:
            missing = sorted(set(range(raw.n_root)) - covered)
            span = f"{missing[0]}..{missing[-1]}" if len(missing) > 1 else str(missing[0])
            raise CouplingError(
                f"Only {len(covered)} of the {raw.n_root} output channels of "
                f"{raw.root_name} reach a consumer (channels {span} do not): Torch-Pruning "
                "lost them in an operation it cannot follow (for a fused attention "
                f"projection: unbind into q, k, v). If {raw.root_name} is a fused qkv "
                f"projection pass num_heads={{model.get_submodule({raw.root_name!r}): heads}}; "
                "otherwise add it "
                "to ignored_layers."
            )


def _unwrapped_list(value: Any) -> list[tuple[nn.Parameter, int]] | None:
    if value is None:
        return None
    pairs = value.items() if isinstance(value, dict) else value
    out = []
    for pair in pairs:
        param, dim = pair
        if not isinstance(param, nn.Parameter):
            raise ConfigError(
                f"unwrapped_parameters must map nn.Parameter to a dim; got {type(param).__name__}."
            )
        out.append((param, int(dim)))
    return out


def _param_dim_size(owner: nn.Module, attr: str | None, dim: int | None) -> int | None:
    if attr is None or dim is None:
        return None
    return int(getattr(owner, attr).shape[dim])


def _grad_name(node: Any) -> str:
    fn = node.grad_fn
    return fn.name().lower() if fn is not None and hasattr(fn, "name") else ""


def _find_upstream_permute(node: Any) -> str | None:
    """A permute/transpose between ``node`` and the nearest upstream module, if any."""
    seen, stack = set(), list(node.inputs)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if isinstance(n.module, nn.Module) and n.type not in (
            _OPTYPE.ELEMENTWISE,
            _OPTYPE.RESHAPE,
            _OPTYPE.CONCAT,
            _OPTYPE.SPLIT,
        ):
            continue
        name = _grad_name(n)
        if any(word in name for word in _DATA_MOVEMENT):
            return n.grad_fn.name()
        stack.extend(n.inputs)
    return None


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
