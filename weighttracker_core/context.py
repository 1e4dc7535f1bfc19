"""What plugins receive and build, declared: contexts, bit-widths and product protocols.

A tracker, regularizer, importance or pruner plugin is a factory ``build(ctx)``; ``ctx`` is
a :class:`BuildContext`. A calculation is ``compute(evaluation)``; ``evaluation`` is an
:class:`Evaluation`. Both are declared here as ``typing.Protocol`` classes so that a
plugin can be type-checked against them without importing the core's internals; the
objects the core passes satisfy them. Plugin authors import all of this from
``weighttracker_core.plugin``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .errors import ConfigError
from .units import CanonicalUnitGroup, PruneAxis

if TYPE_CHECKING:
    from torch import nn

#: ``(layer name, module) -> bits``, as passed to ``WeightTracker(weight_bitwidth_fn=...)``.
BitwidthFn = Callable[[str, "nn.Module"], Any]

DEFAULT_BITS = 32


def _whole(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (int, integral float, scalar tensor)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def check_bitwidth(value: Any, layer: str, kind: str) -> int:
    """``value`` as an int if it is a whole number >= 1, else ``ConfigError``."""
    number = _whole(value)
    if number is None or number < 1:
        raise ConfigError(
            f"{kind}_bitwidth_fn returned {value!r} for layer {layer!r}; bit-widths must be "
            "whole numbers >= 1 (int, integral float or scalar tensor)."
        )
    return number


class Bitwidths:
    """The bit-width functions the user gave ``WeightTracker``, with their checks.

    ``weight(name, module)`` / ``activation(name, module)`` return the checked bit-width of
    one layer (32 when no function was given); ``has_weight`` / ``has_activation`` say
    whether a function was given, so a plugin can skip per-layer calls when none was.

    Example:
        >>> bits = Bitwidths(weight=lambda name, module: 4)
        >>> bits.weight("fc", None), bits.activation("fc", None), bits.has_activation
        (4, 32, False)
    """

    def __init__(self, weight: BitwidthFn | None = None, activation: BitwidthFn | None = None) -> None:
        self._fns = {"weight": weight, "activation": activation}

    @property
    def has_weight(self) -> bool:
        return self._fns["weight"] is not None

    @property
    def has_activation(self) -> bool:
        return self._fns["activation"] is not None

    def given(self, kind: str) -> bool:
        """Whether a ``kind`` (``"weight"`` / ``"activation"``) function was given."""
        return self._fns[kind] is not None

    def bits(self, kind: str, name: str, module: nn.Module) -> int:
        """Checked ``kind`` bit-width of layer ``name`` (32 without a function)."""
        fn = self._fns[kind]
        return DEFAULT_BITS if fn is None else check_bitwidth(fn(name, module), name, kind)

    def weight(self, name: str, module: nn.Module) -> int:
        return self.bits("weight", name, module)

    def activation(self, name: str, module: nn.Module) -> int:
        return self.bits("activation", name, module)


# --------------------------------------------------------------------------- contexts


class LayerInfo(Protocol):
    """One row of the layer table: a module covered by a unit rule."""

    @property
    def index(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def module_type(self) -> type: ...
    @property
    def category(self) -> str: ...
    @property
    def weight_params(self) -> tuple[str, ...]: ...


class UnitPlan(Protocol):
    """Per-unit reductions over the weights (``structure.plan()``)."""

    def unit_reduce(self, op: str, *, grad: bool = False,
                    tensors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """One value per global unit: ``op`` is ``"l2"``, ``"sum_sq"``, ``"max_abs"``, ..."""
        ...


class LayerSelection(Protocol):
    """The ``include=`` / ``ignore=`` filter a consumer was created with."""

    def selects(self, name: str, module: nn.Module | None = None) -> bool: ...


class StructureQueries(Protocol):
    """What plugins read from the model's structure (rebuilt after every physical prune)."""

    @property
    def model(self) -> nn.Module: ...
    @property
    def example_inputs(self) -> Any: ...
    @property
    def version(self) -> int: ...
    @property
    def groups(self) -> tuple[CanonicalUnitGroup, ...]: ...
    @property
    def num_units(self) -> int: ...
    @property
    def modules(self) -> Sequence[LayerInfo]: ...

    def module(self, name: str) -> nn.Module:
        """The submodule called ``name`` (``""`` is the model)."""
        ...

    def channels(self, name: str, axis: PruneAxis | str) -> int | None:
        """Channels of layer ``name`` on ``axis`` as the dependency graph sees them."""
        ...

    def selected_modules(self, selection: LayerSelection, categories: Sequence[Any] | None = None, *,
                         require_any: bool = True) -> Sequence[LayerInfo]:
        """Covered layers ``selection`` picks (optionally only some categories)."""
        ...

    def plan(self, selection: LayerSelection | None = None) -> UnitPlan:
        """The reduction plan over every member (or only the selected members)."""
        ...


class Evaluation(Protocol):
    """What a calculation's ``compute(evaluation)`` and a product's ``track(values)`` get.

    ``evaluation[name]`` computes (once per evaluation) and returns a calculation;
    ``name in evaluation`` says whether that calculation exists, without computing it.
    """

    @property
    def structure(self) -> StructureQueries: ...
    @property
    def differentiable(self) -> bool: ...
    @property
    def bitwidths(self) -> Bitwidths: ...

    def __getitem__(self, name: str) -> Any: ...
    def __contains__(self, name: object) -> bool: ...
    def __iter__(self) -> Iterator[str]: ...


class CalculationDAG(Protocol):
    """The calculation graph of a tracker (``ctx.graph``)."""

    def evaluation(self, *, differentiable: bool = False) -> Evaluation:
        """A fresh evaluation: values computed in it are shared within it."""
        ...


class TrackerAccess(Protocol):
    """What a pruner uses of the ``WeightTracker`` it was created from (``ctx.tracker``)."""

    @property
    def groups(self) -> tuple[CanonicalUnitGroup, ...]: ...
    @property
    def structure(self) -> StructureQueries: ...

    def fake_prune_unit(self, group_id: int, unit_id: int) -> None: ...
    def fake_prune_units(self, units: Mapping[int, Iterable[int]]) -> None: ...
    def zero_units(self, ignore: Sequence[Any] = ()) -> dict[int, list[int]]: ...
    def prune_units(self, units: Mapping[int, Iterable[int]], dry_run: bool = False) -> Any: ...


class BuildContext(Protocol):
    """What ``build(ctx)`` of a tracker, regularizer, importance or pruner spec receives.

    Attributes:
        name: The registered name being built.
        options: An instance of the spec's ``options`` (or pruner ``config``) class, or
            ``None`` when the spec declares none.
        structure: Groups, layer table, reduction plans and structure queries.
        selection: The ``include=`` / ``ignore=`` filter, for ``structure.selected_modules``.
        bitwidths: The user's weight / activation bit-widths.
        example_inputs: The inputs the model was traced with.
        tracker: The ``WeightTracker`` (pruners prune through it).
        graph: The calculation DAG; ``ctx.graph.evaluation()`` is a fresh evaluation.
    """

    @property
    def name(self) -> str: ...
    @property
    def options(self) -> Any: ...
    @property
    def structure(self) -> StructureQueries: ...
    @property
    def selection(self) -> LayerSelection: ...
    @property
    def bitwidths(self) -> Bitwidths: ...
    @property
    def example_inputs(self) -> Any: ...
    @property
    def tracker(self) -> TrackerAccess: ...
    @property
    def graph(self) -> CalculationDAG: ...


# --------------------------------------------------------------------------- products


@runtime_checkable
class Tracker(Protocol):
    """What a tracker factory builds: ``track(values)`` returns a dict of metrics."""

    def track(self, values: Evaluation) -> Mapping[str, Any]: ...


@runtime_checkable
class Regularizer(Protocol):
    """What a regularizer factory builds: called with a differentiable evaluation."""

    def __call__(self, values: Evaluation) -> torch.Tensor: ...


@runtime_checkable
class Importance(Protocol):
    """What an importance factory builds: one score per global unit (NaN: cannot rank)."""

    def __call__(self, values: Evaluation) -> torch.Tensor: ...


@runtime_checkable
class Pruner(Protocol):
    """What a pruner factory builds: ``step()`` runs one step of its schedule."""

    def step(self, *args: Any, **kwargs: Any) -> Any: ...


class Compute(Protocol):
    """A calculation: ``compute(evaluation) -> value``."""

    def __call__(self, evaluation: Evaluation, /) -> Any: ...


class TrackerFactory(Protocol):
    def __call__(self, ctx: BuildContext, /) -> Tracker: ...


class RegularizerFactory(Protocol):
    def __call__(self, ctx: BuildContext, /) -> Regularizer: ...


class ImportanceFactory(Protocol):
    def __call__(self, ctx: BuildContext, /) -> Importance: ...


class PrunerFactory(Protocol):
    def __call__(self, ctx: BuildContext, /) -> Pruner: ...


class ModelFunction(Protocol):
    """``fn(model)``, as the integration callbacks take it."""

    def __call__(self, model: nn.Module, /) -> Any: ...


class PruneCallback(Protocol):
    """``before_prune(tracker)`` / ``after_prune(tracker)`` of an integration."""

    def __call__(self, tracker: Any, /) -> None: ...


@runtime_checkable
class Integration(Protocol):
    """The callables an integration spec bundles (``IntegrationSpec`` satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def applies_to(self) -> Callable[[nn.Module], bool]: ...
    @property
    def tracker_options(self) -> Callable[[nn.Module], dict[str, Any]]: ...


class SliceFunction(Protocol):
    """``module -> slices``: a unit rule's slices when they depend on the instance."""

    def __call__(self, module: nn.Module, /) -> Sequence[Any]: ...


class PruneValidator(Protocol):
    """``(module, axis, indices) -> reason | None``: a reason refuses a physical prune."""

    def __call__(self, module: nn.Module, axis: PruneAxis, indices: Sequence[int], /) -> str | None: ...


class CostFunction(Protocol):
    """``(module, baseline_macs, ratios) -> active_macs`` of a unit rule."""

    def __call__(self, module: nn.Module, baseline_macs: float, ratios: Mapping[str, float], /) -> float: ...
