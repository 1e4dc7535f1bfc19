"""``WeightTracker``: the public façade. Orchestration only; work is delegated."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from . import options as opt
from .bitwidths import bitwidth_rows
from .context import BitwidthFn, Bitwidths
from .consumer_options import build_options, pruner_config, route_options, tracker_names
from .consumers import ConsumerContext, PrunerHandle, RegularizerHandle, TrackerHandle, merged_metrics
from .dag import CalculationGraph
from .heads import AttentionLayout
from .manager import PluginManager
from .records import PruningHistory
from .registry import Registries, build_registries
from .settings import StructureSettings, plugin_manager_for, select_integrations
from .specs import LayerCategory
from .structure import Structure
from .tracker_prune import PruningMethods
from .units import CanonicalUnitGroup
from .summaries import BitwidthView, StructureView


class WeightTracker(PruningMethods):
    """Canonical units of a model, and everything that measures or prunes them.

    Args:
        model: The model; it is traced once with ``example_inputs``.
        example_inputs: A tensor, a tuple of positional inputs or a dict of keyword inputs.
        num_heads: ``{fused qkv nn.Linear or nn.MultiheadAttention: heads}``, and for
            attention with separate projections ``{q_proj: query heads, k_proj: kv heads,
            v_proj: kv heads}``. Usually not needed: ``nn.MultiheadAttention`` and separate
            projections show their heads in the traced forward, and integrations fill in
            the rest.
        prune_num_heads: Add groups whose units are whole attention heads (and, under
            grouped-query attention, whole key/value heads).
        prune_head_dims: Add groups whose units are one dimension of every head (pairs of
            dimensions under rotary embeddings).
        attention_layouts: ``AttentionLayout`` objects for attention whose heads the traced
            forward does not show.
        prune_model_outputs: Also make units of channels that are model outputs (a
            classifier's classes, an ``lm_head``'s vocabulary); off by default, since
            pruning them changes the model's interface.
        ignored_layers: Modules whose output channels are never units.
        unwrapped_parameters: ``{parameter: dim}`` for parameters outside standard layers.
        root_module_types: Layer types whose output channels start groups.
        forward_fn: ``forward_fn(model, example_inputs)`` replaces ``model(example_inputs)``
            (integrations may fill it in, as they do for Hugging Face models).
        output_transform: Maps model outputs to the tensors to trace from (integrations
            may fill it in).
        post_prune_hooks: ``hook(tracker)`` callables run after every physical prune.
            While they run, ``tracker.pruned_units`` is ``{group name: local unit ids}``
            of the units just removed, ``tracker.pruned_attention`` is ``{attention name:
            AttentionChange}`` for attention with separate projections (new head counts and
            the kept heads), and ``tracker.structure`` is still the structure from before
            the prune (it is rebuilt after the hooks).
        weight_bitwidth_fn: ``(name, module) -> bits`` for counted layers (default 32).
        activation_bitwidth_fn: ``(name, module) -> bits`` (default 32).
        plugins: Extra plugin modules or objects for this tracker only.
        plugin_manager: An explicit plugin manager (default: the process-wide one).
        integrations: ``"auto"`` (every installed integration that applies), a list of
            integration names, or ``None``.
    """

    def __init__(
        self, model: nn.Module, example_inputs: Any, *,
        num_heads: Mapping[nn.Module, int] | None = None, prune_num_heads: bool = False,
        prune_head_dims: bool = True, attention_layouts: Sequence[AttentionLayout] | None = None,
        prune_model_outputs: bool = False, ignored_layers: Sequence[nn.Module] | None = None,
        unwrapped_parameters: Any = None, root_module_types: Sequence[type] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        post_prune_hooks: Iterable[Callable[[WeightTracker], None]] = (),
        weight_bitwidth_fn: BitwidthFn | None = None, activation_bitwidth_fn: BitwidthFn | None = None,
        plugins: Iterable[Any] = (), plugin_manager: PluginManager | None = None,
        integrations: str | Sequence[str] | None = "auto",
    ) -> None:
        opt.check_model(model)
        self.plugin_manager = plugin_manager_for(plugin_manager, plugins)
        self.registries: Registries = build_registries(self.plugin_manager)
        self.model, self.example_inputs = model, example_inputs
        self.post_prune_hooks = opt.check_hooks(post_prune_hooks)
        self.weight_bitwidth_fn = opt.check_bitwidth_fn(weight_bitwidth_fn, "weight_bitwidth_fn")
        self.activation_bitwidth_fn = opt.check_bitwidth_fn(activation_bitwidth_fn, "activation_bitwidth_fn")
        self.integrations = select_integrations(self.registries, model, integrations)
        self._settings = StructureSettings.create(model, self.integrations, dict(
            num_heads=num_heads, prune_num_heads=prune_num_heads, prune_head_dims=prune_head_dims,
            attention_layouts=attention_layouts, prune_model_outputs=prune_model_outputs,
            ignored_layers=ignored_layers, unwrapped_parameters=unwrapped_parameters,
            root_module_types=root_module_types, forward_fn=forward_fn, output_transform=output_transform))
        self._trackers: dict[str, TrackerHandle] = {}
        self._build(version=0)
        self._pruning_history = PruningHistory(self.structure)

    def _build(self, version: int) -> None:
        self._settings = self._settings.for_build(version)
        self.structure = Structure(
            self.model, self.example_inputs, self.registries, self._settings.options, version=version
        )
        self.graph = CalculationGraph(self.registries.calculations, self.structure, Bitwidths(
            weight=self.weight_bitwidth_fn, activation=self.activation_bitwidth_fn))

    def _selection(self, include: Any, ignore: Any) -> Any:
        """The layers ``include`` / ``ignore`` pick, each checked where it enters."""
        check = opt.check_selection
        return self.structure.selection(check(self.model, include, "include"), check(self.model, ignore, "ignore"))

    def _ready(self, action: str) -> None:
        self.check_current()
        self.structure.require_values(action)

    def check_current(self) -> None:
        """Raise if another tracker pruned this model physically since this one was built."""
        self.structure.require_current()

    @property
    def groups(self) -> tuple[CanonicalUnitGroup, ...]:
        """The canonical unit groups of the model as it is now."""
        return self.structure.groups

    @property
    def num_units(self) -> int:
        return self.structure.num_units

    def view_structures(self) -> StructureView:
        """Every group with its members and axes; ``str()`` it, or ``.to_dict()``."""
        return StructureView(self.structure.groups)

    def _context(self, name: str, options: Any, include: Any, ignore: Any) -> ConsumerContext:
        return ConsumerContext(
            name=name, tracker=self, structure=self.structure, graph=self.graph,
            options=options, selection=self._selection(include, ignore),
        )

    def _built(self, kind: str, spec: Any, opts: Any, include: Any = (), ignore: Any = ()) -> Any:
        if kind != "pruner":
            self.graph.validate(spec.requires, consumer=f"{kind} {spec.name}")
        registry = getattr(self.registries, f"{kind}s")  # checks the product, names the plugin
        return registry.build(spec.name, self._context(spec.name, opts, include, ignore))

    def create_tracker(
        self, kind_or_kinds: Any, *, include: Sequence[Any] = (), ignore: Sequence[Any] = (),
        convert_tensors: bool = True, wandb_format: bool = False, **options: Any,
    ) -> TrackerHandle:
        """Create one tracker, or several from a list; ``tracker.track()`` includes them.

        Options such as ``log_total_bops``, ``log_layerwise_stats`` and
        ``normalization_macs_pr_module`` go to every listed tracker that accepts them; an
        option none of them accepts is an error.
        """
        self._ready("create_tracker")
        specs = [self.registries.trackers.get(k) for k in tracker_names(kind_or_kinds)]
        built = [(spec.name, self._built("tracker", spec, opts, include, ignore))
                 for spec, opts in zip(specs, route_options(specs, options))]
        handle = TrackerHandle(self, self.structure.version, built,
                               convert_tensors=convert_tensors, wandb_format=wandb_format)
        self._trackers.update((name, handle) for name, _ in built)
        return handle

    def track(self) -> dict[str, Any]:
        """Metrics of every tracker created since the last physical prune, merged.

        One evaluation is shared, so a calculation several trackers need runs once.
        """
        self._ready("track()")
        return merged_metrics(self._trackers, self.graph.evaluation())

    def create_regularizer(
        self, kind: Any, *, include: Sequence[Any] = (), ignore: Sequence[Any] = (), **options: Any
    ) -> RegularizerHandle:
        """A callable returning a differentiable scalar (the regularization loss)."""
        self._ready("create_regularizer")
        spec = self.registries.regularizers.get(kind)
        opts = build_options("regularizer", spec.name, spec.options, options)
        return RegularizerHandle(self, self.structure.version, spec.name,
                                 self._built("regularizer", spec, opts, include, ignore))

    def create_pruner(self, name: Any, *, config: Any = None, **options: Any) -> PrunerHandle:
        """A pruning algorithm; ``config`` is a dict or the pruner's config object."""
        self._ready("create_pruner")
        spec = self.registries.pruners.get(name)
        impl = self._built("pruner", spec, pruner_config(spec, config, options))
        return PrunerHandle(self, self.structure.version, spec.name, impl)

    def bitwidths(self, include: Sequence[Any] = (), ignore: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Weight and activation bit-widths of every counted (weighted) layer."""
        self.check_current()
        infos = self.structure.selected_modules(self._selection(include, ignore), (LayerCategory.WEIGHTED,))
        layers = [(info.name, self.structure.module(info.name)) for info in infos]
        return bitwidth_rows(layers, self.weight_bitwidth_fn, self.activation_bitwidth_fn)

    def view_bitwidths(self, include: Sequence[Any] = (), ignore: Sequence[Any] = ()) -> BitwidthView:
        """Per counted layer: both bit-widths and their source."""
        return BitwidthView(self.bitwidths(include, ignore))
