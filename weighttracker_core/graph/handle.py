"""A traced Torch-Pruning dependency graph with checked groups (SPEC §3.1).

This package is the only part of the core that imports ``torch_pruning``. The handle
traces the model, runs :mod:`.checks`, and hands out dependency groups as plain records
(:class:`RawGroup`) so that no Torch-Pruning object leaks further.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
import torch_pruning as tp
from torch import nn

from ..errors import ConfigError, PruningError
from ..specs import LayerPruner
from ..units import PruneAxis
from .checks import GraphChecks


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
        self.checks = GraphChecks(self.dg, self._names)
        self.checks.fix_chunk_order()

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
        untrusted = frozenset(untrusted_params)
        self.checks.before_groups()
        ignored = [sub for layer in self.ignored_layers for sub in layer.modules()]
        out = []
        with self.checks.bounded_search():
            for group in self.dg.get_all_groups(
                ignored_layers=ignored, root_module_types=self.root_module_types
            ):
                raw = self._to_raw(group)
                self.checks.check_group(
                    raw, self.channels, coverage=raw.root_module not in attention_roots,
                    untrusted=untrusted,
                )
                out.append(raw)
        return out

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

    def _to_raw(self, group: Any) -> RawGroup:
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
        return raw


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

