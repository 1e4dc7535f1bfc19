"""Plugin-facing contracts: what each registration hook returns.

Every spec is an attrs frozen, keyword-only class built from this library's own types
(never Torch-Pruning objects), so a field added later with a default never breaks a plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from .context import (
    Compute,
    CostFunction,
    ImportanceFactory,
    PruneCallback,
    PrunerFactory,
    PruneValidator,
    RegularizerFactory,
    SliceFunction,
    TrackerFactory,
)
from .units import NameEnum, ParamSlice, PruneAxis

if TYPE_CHECKING:
    from torch import nn


class TrackerType(NameEnum):
    """Names of the first-party trackers; plain strings work everywhere too."""

    STRUCTURED_BOPS = "structured_bops"
    UNSTRUCTURED_SPARSITY = "unstructured_sparsity"
    UNSTRUCTURED_BOPS = "unstructured_bops"
    NVIDIA_2_4_SPARSITY = "nvidia_2_4_sparsity"
    GROUP_PRUNING_SUMMARY = "group_pruning_summary"
    L2_NORM_DISTRIBUTION = "l2_norm_distribution"


class RegularizerType(NameEnum):
    """Names of the first-party regularizers; plain strings work everywhere too."""

    GROUP_LASSO = "group_lasso"
    BOPS_GROUP_LASSO = "bops_group_lasso"


class Lifetime(NameEnum):
    """How long a calculation's value is kept.

    * ``static``: until the structure changes (a physical prune).
    * ``per_evaluation``: computed at most once per ``track()`` and shared by every tracker.
    * ``differentiable``: for the regularizer path; computed with autograd, never cached.
    """

    STATIC = "static"
    PER_EVALUATION = "per_evaluation"
    DIFFERENTIABLE = "differentiable"


class LayerCategory(NameEnum):
    """What a layer is, for trackers that count only some kinds (BOPs skip norms).

    ``attention`` entries are the attention products (``q k^T`` and ``softmax(.) v``) of an
    attention with separate projections, counted under the module that holds q, k and v:
    they have MACs but no weights.
    """

    WEIGHTED = "weighted"
    NORMALIZATION = "normalization"
    ATTENTION = "attention"
    OTHER = "other"


@runtime_checkable
class LayerPruner(Protocol):
    """How to remove channels of a custom layer physically.

    Structurally the same as Torch-Pruning's ``BasePruningFunc``: implement the four
    methods below (``prune_*`` change the layer in place and return it). If input and
    output channels are one axis (like a norm layer), let ``prune_in_channels`` be the
    same function as ``prune_out_channels``.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module: ...

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module: ...

    def get_out_channels(self, layer: nn.Module) -> int | None: ...

    def get_in_channels(self, layer: nn.Module) -> int | None: ...


@runtime_checkable
class HeadPruner(Protocol):
    """How to remove attention heads and head dimensions of a layer physically.

    Used for head / head-dim groups whose pruning function is not a Torch-Pruning one
    (``"prune_num_heads"``, ``"prune_head_dims"``, as built for ``nn.MultiheadAttention``).
    ``idxs`` are positions on the layer's attention width, ``head * head_dim + d``, in the
    numbering before the prune; one call receives every position removed from the layer
    (whole heads and head dimensions together).
    """

    def check_heads(self, layer: nn.Module, idxs: Sequence[int]) -> str | None:
        """A reason to refuse removing ``idxs`` (nothing changed yet), or ``None``."""
        ...

    def prune_heads(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Remove ``idxs`` in place and return the layer."""
        ...


SliceSource = tuple[ParamSlice, ...] | SliceFunction


def _optional_slices(value: Any) -> Any:
    return None if value is None else _slices(value)


def _optional_axes(value: Iterable[Any] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(axis) for axis in value)


def _types(value: Iterable[type]) -> tuple[type, ...]:
    return tuple(value)


def _names(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _slices(value: Any) -> Any:
    return value if callable(value) else tuple(value)


@attrs.frozen(kw_only=True)
class UnitRule:
    """How one module type maps to units.

    A rule covers ``module_types`` and their subclasses; when several rules match a module
    the nearest registered ancestor in its MRO wins.

    Args:
        name: Unique rule name.
        module_types: Types this rule covers.
        out_slices: Parameter slices removed with an output channel (tuple, or a callable
            ``module -> slices`` when they depend on the instance, e.g. grouped convs).
        in_slices: Parameter slices removed with an input channel.
        feature_slices: Slices for layers whose input and output channel are one axis
            (norms, depthwise convs); defaults to ``out_slices``.
        category: ``weighted`` layers count for BOPs; ``normalization`` layers are skipped
            by BOPs trackers unless included explicitly.
        weight_params: Parameters (dotted, relative to the module) whose elements count as
            weights for unstructured metrics; they must be 2-D or more for 2:4 metrics.
        cost_axes: Axes whose active fraction scales the module's MACs; ``None`` means
            every axis the module is coupled on.
        unit_kind: Kind of the units of groups rooted at this module type.
        layer_pruner: Physical pruning for a custom type (see :class:`LayerPruner`).
        validate_prune: Optional ``(module, axis, indices) -> reason | None``; a reason
            refuses a physical prune before anything changes.
        cost_fn: Optional ``(module, baseline_macs, ratios) -> active_macs`` for layers
            whose cost is not a product of per-axis ratios (``ratios`` maps axis name to
            the active fraction).
        head_pruner: Physical removal of heads / head dimensions for groups whose pruning
            function is ``"prune_num_heads"`` or ``"prune_head_dims"`` (see
            :class:`HeadPruner`); without one such groups can only be fake-pruned.
    """

    name: str
    module_types: tuple[type, ...] = attrs.field(converter=_types)
    out_slices: SliceSource = attrs.field(default=(), converter=_slices)
    in_slices: SliceSource = attrs.field(default=(), converter=_slices)
    feature_slices: SliceSource | None = attrs.field(default=None, converter=_optional_slices)
    category: LayerCategory = attrs.field(default=LayerCategory.WEIGHTED, converter=LayerCategory)
    weight_params: tuple[str, ...] = attrs.field(default=("weight",), converter=_names)
    cost_axes: tuple[str, ...] | None = attrs.field(default=None, converter=_optional_axes)
    unit_kind: str = "feature"
    layer_pruner: LayerPruner | None = None
    validate_prune: PruneValidator | None = None
    cost_fn: CostFunction | None = None
    head_pruner: HeadPruner | None = None

    def slices_for(self, module: nn.Module, axis: PruneAxis) -> tuple[ParamSlice, ...]:
        """The concrete slices of ``module`` cut on ``axis``."""
        if axis is PruneAxis.OUT_CHANNEL:
            source = self.out_slices
        elif axis is PruneAxis.IN_CHANNEL:
            source = self.in_slices
        else:
            source = self.out_slices if self.feature_slices is None else self.feature_slices
        return tuple(source(module)) if callable(source) else tuple(source)


@attrs.frozen(kw_only=True)
class CalculationSpec:
    """A named calculation of the DAG.

    Args:
        name: Unique name trackers and regularizers ask for.
        compute: ``compute(evaluation) -> value``; ``evaluation[name]`` returns a
            required value, ``evaluation.structure`` the model's structure and
            ``evaluation.bitwidths`` the user's bit-widths (see ``Evaluation``).
        requires: Names of calculations ``compute`` reads.
        lifetime: ``static``, ``per_evaluation`` or ``differentiable``.
        summary: One line for ``weighttracker plugins``.
    """

    name: str
    compute: Compute
    requires: tuple[str, ...] = attrs.field(default=(), converter=_names)
    lifetime: Lifetime = attrs.field(default=Lifetime.PER_EVALUATION, converter=Lifetime)
    summary: str = ""


@attrs.frozen(kw_only=True)
class TrackerSpec:
    """A metric tracker.

    ``build(ctx)`` returns an object whose ``track(values) -> dict`` computes the
    tracker's metrics; ``values[name]`` gives each calculation for the current
    evaluation. ``ctx.options`` is an instance of ``options`` (an attrs class whose fields
    are the tracker's keyword options, validated on creation).
    """

    name: str
    build: TrackerFactory
    options: type | None = None
    requires: tuple[str, ...] = attrs.field(default=(), converter=_names)
    summary: str = ""


@attrs.frozen(kw_only=True)
class RegularizerSpec:
    """A regularizer: ``build(ctx)`` returns a callable giving a scalar tensor."""

    name: str
    build: RegularizerFactory
    options: type | None = None
    requires: tuple[str, ...] = attrs.field(default=(), converter=_names)
    summary: str = ""


@attrs.frozen(kw_only=True)
class ImportanceSpec:
    """An importance criterion for ranked pruning.

    ``build(ctx)`` returns a callable ``score(values) -> tensor[num_units]`` giving one
    score per global unit (higher means more important); ``values`` resolves
    calculations like a tracker's, and ``ctx.options`` is an instance of ``options``. A
    NaN score means the criterion cannot rank that unit: it is never pruned, and a group
    with no scorable unit is skipped. The scorer is built again after every physical
    prune.
    """

    name: str
    build: ImportanceFactory
    options: type | None = None
    requires: tuple[str, ...] = attrs.field(default=(), converter=_names)
    summary: str = ""


@attrs.frozen(kw_only=True)
class PrunerSpec:
    """A pruning algorithm: ``build(ctx)`` returns the pruner object.

    ``config`` is the attrs config class (with ``from_dict`` / ``from_yaml`` /
    ``as_dict``) that ``create_pruner(name, config=..., **options)`` fills.
    """

    name: str
    build: PrunerFactory
    config: type | None = None
    summary: str = ""


@attrs.frozen(kw_only=True)
class IntegrationSpec:
    """A model integration.

    Args:
        name: Unique name; ``WeightTracker(integrations=[name])`` selects it.
        applies_to: ``model -> bool``; with ``integrations="auto"`` every integration that
            applies is used.
        tracker_options: ``model -> dict`` of ``WeightTracker`` options to fill in
            (``num_heads``, ``attention_layouts``, ``forward_fn``, ``output_transform``);
            options the user passed explicitly win.
        before_prune: ``tracker -> None``, run before a physical prune (and a dry run)
            changes anything, after the core's own checks; ``tracker.pruned_units`` and
            ``tracker.pruned_attention`` describe the request, as for ``after_prune``.
            Raise ``PruningError`` (or ``ConfigError``) to refuse it: the model is untouched.
        after_prune: ``tracker -> None``, run after every physical prune, before the user's
            ``post_prune_hooks``.
        ignored_parameters: ``model -> parameters`` that Torch-Pruning must leave out of
            every group because it cannot map them (a per-head table read through an
            index op, say); ``after_prune`` then cuts them itself. Re-read at every build.
        summary: One line for ``weighttracker plugins``.
    """

    name: str
    applies_to: Callable[[nn.Module], bool]
    tracker_options: Callable[[nn.Module], dict[str, Any]] = lambda model: {}
    after_prune: PruneCallback | None = None
    ignored_parameters: Callable[[nn.Module], Iterable[nn.Parameter]] = lambda model: ()
    summary: str = ""
    before_prune: PruneCallback | None = None


@attrs.frozen(kw_only=True)
class ModelSourceSpec:
    """Models for ``weighttracker inspect PREFIX:NAME``.

    ``load(name)`` returns the model with random weights (nothing downloaded);
    ``default_input_shape`` is used when the user gives no ``--input-shape``.

    Args:
        accepts_config: ``load`` also takes ``config={key: value}``, the strings the user
            gave as ``--config key=value,...`` (a source that builds models from a config
            converts and checks them); without it ``--config`` is refused.
        example_input: ``(model, shape) -> input`` for models that do not take a float
            tensor (token ids for a language model); ``shape`` is the ``--input-shape``,
            or ``None`` for the source's default. The input must be a tensor.
    """

    prefix: str
    load: Callable[..., nn.Module]
    default_input_shape: tuple[int, ...] = (1, 3, 224, 224)
    summary: str = ""
    accepts_config: bool = False
    example_input: Callable[[nn.Module, tuple[int, ...] | None], Any] | None = None


@attrs.frozen(kw_only=True)
class AttentionLayoutRule:
    """How modules of some types hold an attention with separate projections.

    ``layout(module)`` returns an :class:`~weighttracker_core.heads.AttentionLayout` built
    from the module's own submodules and attributes (``module.q_proj``, ``module.num_heads``,
    ...), or ``None`` when that instance is not one.
    """

    name: str
    module_types: tuple[type, ...] = attrs.field(converter=_types)
    layout: Callable[[nn.Module], Any]
    summary: str = ""


@attrs.frozen(kw_only=True)
class UnwrappedParameter:
    """A parameter outside any covered layer (``cls_token``, ``pos_embed``, ...).

    Torch-Pruning prunes such parameters along ``dim``; the unit rule registered for this
    type receives one of these in place of a module.
    """

    owner: Any  # the module holding the parameter
    name: str  # attribute name on ``owner``
    dim: int
