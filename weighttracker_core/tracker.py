"""``WeightTracker``: the public façade (SPEC §4). Orchestration only; work is delegated."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from . import masking, options as opt, surgery
from .consumers import (
    ConsumerContext,
    PrunerHandle,
    RegularizerHandle,
    TrackerHandle,
    accepted_options,
    build_options,
)
from .context import Bitwidths, check_bitwidth
from .dag import CalculationGraph
from .errors import ConfigError, StaleConsumerError
from .heads import AttentionChange, AttentionLayout
from .manager import PluginManager, default_plugin_manager, derive_plugin_manager
from .records import PruningHistory
from .registry import Registries, build_registries
from .specs import IntegrationSpec, LayerCategory
from .structure import Structure, StructureOptions, model_version, set_model_version
from .units import CanonicalUnitGroup, PruneAxis
from .views import BitwidthView, StructureView, ZeroUnitsView

BitwidthFn = Callable[[str, nn.Module], Any]


class WeightTracker:
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
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        num_heads: Mapping[nn.Module, int] | None = None,
        prune_num_heads: bool = False,
        prune_head_dims: bool = True,
        attention_layouts: Sequence[AttentionLayout] | None = None,
        prune_model_outputs: bool = False,
        ignored_layers: Sequence[nn.Module] | None = None,
        unwrapped_parameters: Any = None,
        root_module_types: Sequence[type] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        output_transform: Callable[[Any], Any] | None = None,
        post_prune_hooks: Iterable[Callable[[WeightTracker], None]] = (),
        weight_bitwidth_fn: BitwidthFn | None = None,
        activation_bitwidth_fn: BitwidthFn | None = None,
        plugins: Iterable[Any] = (),
        plugin_manager: PluginManager | None = None,
        integrations: str | Sequence[str] | None = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}.")
        base = plugin_manager if plugin_manager is not None else default_plugin_manager()
        extras = tuple(plugins)
        self.plugin_manager = derive_plugin_manager(base, extras) if extras else base
        self.registries: Registries = build_registries(self.plugin_manager)
        self.model = model
        self.example_inputs = example_inputs
        self.post_prune_hooks = opt.check_hooks(post_prune_hooks)
        signature = "(name, module) -> int"
        self.weight_bitwidth_fn = opt.check_callable(weight_bitwidth_fn, "weight_bitwidth_fn", signature)
        self.activation_bitwidth_fn = opt.check_callable(
            activation_bitwidth_fn, "activation_bitwidth_fn", signature
        )
        self.integrations = self._select_integrations(integrations)
        self._user_num_heads = opt.check_num_heads(num_heads)
        self._user_layouts = opt.check_layouts(attention_layouts)
        filled = self._integration_options()
        heads = self._user_num_heads if self._user_num_heads is not None else filled.get("num_heads")
        self._options = StructureOptions(
            num_heads=dict(heads or {}),
            prune_num_heads=opt.check_bool(prune_num_heads, "prune_num_heads"),
            prune_head_dims=opt.check_bool(prune_head_dims, "prune_head_dims"),
            ignored_layers=opt.check_modules(model, ignored_layers, "ignored_layers"),
            unwrapped_parameters=unwrapped_parameters,
            root_module_types=opt.check_module_types(root_module_types, "root_module_types"),
            forward_fn=opt.check_callable(
                forward_fn if forward_fn is not None else filled.get("forward_fn"),
                "forward_fn", "(model, example_inputs) -> output",
            ),
            output_transform=opt.check_callable(
                output_transform if output_transform is not None else filled.get("output_transform"),
                "output_transform", "(output) -> tensors",
            ),
            attention_layouts=self._layouts(filled),
            prune_model_outputs=opt.check_bool(prune_model_outputs, "prune_model_outputs"),
        )
        self._trackers: dict[str, TrackerHandle] = {}
        self.pruned_units: dict[str, list[int]] | None = None
        self.pruned_attention: dict[str, AttentionChange] | None = None
        self._build(version=0)
        self._pruning_history = PruningHistory(self.structure)

    # ------------------------------------------------------------------------- structure

    def _select_integrations(self, integrations: Any) -> tuple[IntegrationSpec, ...]:
        registry = self.registries.integrations
        if integrations is None:
            return ()
        if isinstance(integrations, str):
            if integrations != "auto":
                raise ConfigError(
                    f"integrations must be 'auto', a list of names or None; got {integrations!r}."
                )
            return tuple(spec for spec in registry.specs() if spec.applies_to(self.model))
        return tuple(registry.get(name) for name in integrations)

    def _integration_options(self) -> dict[str, Any]:
        """Tracker options the selected integrations read off the model as it is now."""
        filled: dict[str, Any] = {}
        for integration in self.integrations:
            filled.update(integration.tracker_options(self.model) or {})
        return filled

    def _layouts(self, filled: Mapping[str, Any]) -> tuple[AttentionLayout, ...]:
        """The user's attention layouts, else those the integrations declare."""
        if self._user_layouts:
            return self._user_layouts
        return opt.check_layouts(filled.get("attention_layouts"))

    def _build(self, version: int) -> None:
        if self.integrations and version > 0:
            filled = self._integration_options()
            if self._user_num_heads is None:
                self._options = _evolve(self._options, num_heads=dict(filled.get("num_heads") or {}))
            self._options = _evolve(self._options, attention_layouts=self._layouts(filled))
        ignored = tuple(
            p for integration in self.integrations
            for p in (integration.ignored_parameters(self.model) or ())
        )
        self._options = _evolve(self._options, ignored_params=ignored)
        self.structure = Structure(
            self.model, self.example_inputs, self.registries, self._options, version=version
        )
        self.graph = CalculationGraph(self.registries.calculations, self.structure, Bitwidths(
            weight=self.weight_bitwidth_fn, activation=self.activation_bitwidth_fn))

    def _selection(self, include: Any, ignore: Any) -> Any:
        """The layers ``include`` / ``ignore`` pick, each checked where it enters."""
        return self.structure.selection(
            opt.check_selection(self.model, include, "include"),
            opt.check_selection(self.model, ignore, "ignore"),
        )

    def check_current(self) -> None:
        """Raise if another tracker pruned this model physically since this one was built."""
        if not self.structure.current:
            raise StaleConsumerError(
                "This WeightTracker was built before another WeightTracker on the same model "
                "pruned it physically: its groups describe layers that no longer have those "
                "shapes. Build a new WeightTracker(model, example_inputs, ...) for the pruned "
                "model."
            )

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

    # -------------------------------------------------------------------------- trackers

    def _context(self, name: str, options: Any, include: Any, ignore: Any) -> ConsumerContext:
        return ConsumerContext(
            name=name, tracker=self, structure=self.structure, graph=self.graph,
            options=options, selection=self._selection(include, ignore),
        )

    def create_tracker(
        self,
        kind_or_kinds: Any,
        *,
        include: Sequence[Any] = (),
        ignore: Sequence[Any] = (),
        convert_tensors: bool = True,
        wandb_format: bool = False,
        **options: Any,
    ) -> TrackerHandle:
        """Create one tracker, or several from a list; ``tracker.track()`` includes them.

        Options such as ``log_total_bops``, ``log_layerwise_stats`` and
        ``normalization_macs_pr_module`` go to every listed tracker that accepts them; an
        option none of them accepts is an error.
        """
        self.check_current()
        self.structure.require_values("create_tracker")
        kinds = list(kind_or_kinds) if isinstance(kind_or_kinds, (list, tuple)) else [kind_or_kinds]
        if not kinds:
            raise ConfigError("create_tracker needs at least one tracker name.")
        specs = [self.registries.trackers.get(k) for k in kinds]
        for option in options:
            if not any(option in accepted_options(s.options) for s in specs):
                names = ", ".join(s.name for s in specs)
                raise ConfigError(
                    f"Option {option!r} is not accepted by tracker(s) {names}. Accepted: "
                    + "; ".join(f"{s.name}: {sorted(accepted_options(s.options)) or 'none'}" for s in specs)
                )
        built = []
        for spec in specs:
            mine = {k: v for k, v in options.items() if k in accepted_options(spec.options)}
            opts = build_options("tracker", spec.name, spec.options, mine)
            self.graph.validate(spec.requires, consumer=f"tracker {spec.name}")
            impl = self.registries.trackers.build(spec.name, self._context(spec.name, opts, include, ignore))
            built.append((spec.name, impl))
        handle = TrackerHandle(self, self.structure.version, built,
                               convert_tensors=convert_tensors, wandb_format=wandb_format)
        for name, _ in built:
            self._trackers[name] = handle
        return handle

    def track(self) -> dict[str, Any]:
        """Metrics of every tracker created since the last physical prune, merged.

        One evaluation is shared, so a calculation several trackers need runs once.
        """
        self.check_current()
        self.structure.require_values("track()")
        evaluation = self.graph.evaluation()
        out: dict[str, Any] = {}
        for handle in dict.fromkeys(self._trackers.values()):
            result = handle.compute(evaluation)
            for name in handle.names:
                if self._trackers.get(name) is not handle:
                    continue
                if handle.wandb_format:
                    out.update({k: v for k, v in result.items() if k.split("/")[0] == name})
                else:
                    out[name] = result[name]
        return out

    def create_regularizer(
        self, kind: Any, *, include: Sequence[Any] = (), ignore: Sequence[Any] = (), **options: Any
    ) -> RegularizerHandle:
        """A callable returning a differentiable scalar (SPEC §6)."""
        self.check_current()
        self.structure.require_values("create_regularizer")
        spec = self.registries.regularizers.get(kind)
        opts = build_options("regularizer", spec.name, spec.options, options)
        self.graph.validate(spec.requires, consumer=f"regularizer {spec.name}")
        impl = self.registries.regularizers.build(spec.name, self._context(spec.name, opts, include, ignore))
        return RegularizerHandle(self, self.structure.version, spec.name, impl)

    def create_pruner(self, name: Any, *, config: Any = None, **options: Any) -> PrunerHandle:
        """A pruning algorithm (SPEC §10); ``config`` is a dict or the pruner's config object."""
        self.check_current()
        self.structure.require_values("create_pruner")
        spec = self.registries.pruners.get(name)
        if config is not None and options:
            raise ConfigError("Pass either config= or keyword options to create_pruner, not both.")
        if config is None:
            opts = build_options("pruner", spec.name, spec.config, options)
        elif isinstance(config, Mapping):
            from_dict = getattr(spec.config, "from_dict", None)
            try:
                opts = from_dict(dict(config)) if from_dict else spec.config(**config)  # type: ignore[misc]
            except (TypeError, ValueError, KeyError) as err:
                raise ConfigError(f"Invalid config for pruner {spec.name!r}: {err}") from err
        else:
            if spec.config is not None and not isinstance(config, spec.config):
                raise ConfigError(
                    f"config for pruner {spec.name!r} must be a dict or {spec.config.__name__}, "
                    f"got {type(config).__name__}."
                )
            opts = config
        impl = self.registries.pruners.build(spec.name, self._context(spec.name, opts, (), ()))
        return PrunerHandle(self, self.structure.version, spec.name, impl)

    # ---------------------------------------------------------------------------- pruning

    def fake_prune_unit(self, group_id: int, unit_id: int) -> None:
        """Zero every weight of one unit in every coupled layer (shapes unchanged)."""
        self.check_current()
        self.structure.require_values("fake_prune_unit")
        masking.fake_prune_units_(self.structure, {group_id: [unit_id]})

    def fake_prune_units(self, units: Mapping[int, Iterable[int]]) -> None:
        """Zero several units: ``{group id: [unit ids]}``."""
        self.check_current()
        self.structure.require_values("fake_prune_units")
        masking.fake_prune_units_(self.structure, units)

    def zero_units(self, ignore: Sequence[Any] = ()) -> dict[int, list[int]]:
        """``{group id: zero unit ids}``; a unit is zero when all its weights are.

        Weights of layers selected by ``ignore`` are not looked at.
        """
        self.check_current()
        self.structure.require_values("zero_units")
        selection = self._selection((), ignore)
        plan = self.structure.plan(selection)
        with torch.no_grad():
            peak = plan.unit_reduce("max_abs")
        has_weights = plan.unit_numel().to(peak.device) > 0
        zero = ((peak == 0) & has_weights).nonzero().flatten().tolist()
        out: dict[int, list[int]] = {}
        owners = self.structure.group_of_unit
        for unit in zero:
            group = self.structure.groups[int(owners[unit])]
            out.setdefault(group.id, []).append(unit - group.offset)
        return out

    def view_zero_units(self, ignore: Sequence[Any] = ()) -> ZeroUnitsView:
        """Zero units per group with the Torch-Pruning indices that would remove them."""
        return ZeroUnitsView(self.structure.groups, self.zero_units(ignore))

    view_zero_structures = view_zero_units

    def prune_unit(self, group_id: int, unit_id: int) -> surgery.PruneReport:
        """Physically remove one unit (and its coupled slices) from the model."""
        return self._prune({group_id: [unit_id]}, dry_run=False)

    def prune_units(
        self, units: Mapping[int, Iterable[int]], dry_run: bool = False
    ) -> surgery.PruneReport:
        """Physically remove several units: ``{group id: [unit ids]}`` (atomic).

        Groups sharing a layer (heads and head dimensions) are removed together, every id
        numbered as in the current ``tracker.groups``.
        """
        return self._prune(units, dry_run=dry_run)

    def prune_zero_units(
        self, ignore: Sequence[Any] = (), ignore_prune: Sequence[Any] = (), dry_run: bool = False
    ) -> surgery.PruneReport:
        """Physically remove every zero unit.

        ``ignore`` only changes zero detection. ``ignore_prune`` keeps the listed modules'
        output widths: groups that cut their output channels (or features) are left as they
        are, while groups that only cut their inputs are still pruned. ``dry_run`` reports
        without changing anything. The report's ``left_zero`` names zero units left in place
        and why.
        """
        self.check_current()
        self.structure.require_values("prune_zero_units")
        if not isinstance(dry_run, bool):
            raise ConfigError(f"dry_run must be True or False, got {dry_run!r}.")
        ignore = opt.check_selection(self.model, ignore, "ignore")
        blocked_by = opt.check_selection(self.model, ignore_prune, "ignore_prune")
        zero = self.zero_units(ignore)
        left: dict[str, str] = {}
        if blocked_by:
            blocked = self.structure.selection(blocked_by, ())
            for gid in list(zero):
                group = self.groups[gid]
                cut = [m.module_name for m in group.members
                       if m.axis is not PruneAxis.IN_CHANNEL and blocked.selects(m.module_name)]
                if cut:
                    left[group.name] = (
                        f"{len(zero.pop(gid))} zero units left in place: ignore_prune keeps the "
                        f"output width of {cut[0]}"
                    )
        report = self._prune(zero, dry_run=dry_run)
        return attrs.evolve(report, left_zero={**report.left_zero, **left})

    prune_zero_structures = prune_zero_units

    def _prune(self, units: Mapping[int, Iterable[int]], dry_run: bool) -> surgery.PruneReport:
        self.check_current()
        self.structure.require_values("prune_units")
        if not isinstance(dry_run, bool):
            raise ConfigError(f"dry_run must be True or False, got {dry_run!r}.")
        units = {gid: sorted(ids) for gid, ids in masking.check_units(self.structure, units).items()}
        removed_heads = self._removed_heads(units)
        changes = surgery.attention_changes(self.structure, units)
        version = model_version(self.model)
        request = {
            self.structure.group(gid).name: sorted({int(u) for u in local})
            for gid, local in units.items() if local
        }
        checks = [i.before_prune for i in self.integrations if i.before_prune is not None]
        if request and checks:
            surgery.resolve_request(self.structure, units)  # the core's refusals come first
            # integrations refuse what their models cannot express, before anything changes
            self.pruned_units, self.pruned_attention = request, dict(changes)
            try:
                for check in checks:
                    check(self)
            finally:
                self.pruned_units = None
                self.pruned_attention = None

        def after() -> None:
            # hooks see what is being removed, numbered as in self.structure (still the
            # structure from before the prune: it is rebuilt after the hooks)
            self.pruned_units = dict(request)
            self.pruned_attention = dict(changes)
            try:
                for integration in self.integrations:
                    if integration.after_prune is not None:
                        integration.after_prune(self)
                for hook in self.post_prune_hooks:
                    hook(self)
            finally:
                self.pruned_units = None
                self.pruned_attention = None

        old = (self.structure, self.graph, self._options, dict(self._trackers),
               self._user_num_heads, self._user_layouts)

        def rebuild() -> None:
            self._count_removed_heads(removed_heads, changes)
            set_model_version(self.model, version + 1)
            self._build(version=self.structure.version + 1)
            self._trackers.clear()

        def on_failure() -> None:  # the model is already restored
            set_model_version(self.model, version)
            (self.structure, self.graph, self._options, self._trackers,
             self._user_num_heads, self._user_layouts) = old
            try:
                # Torch-Pruning's graph bookkeeping may be half-updated: trace afresh
                self._build(version=self.structure.version)
            except Exception:  # noqa: BLE001 - keep the old structure, raise the real error
                self.structure, self.graph, self._options = old[0], old[1], old[2]

        report = surgery.prune_units(self.structure, units, dry_run=dry_run, after_prune=after,
                                     rebuild=rebuild, on_failure=on_failure)
        self._pruning_history.add(report)
        return report

    def pruning_record(self) -> dict[str, Any]:
        """Every physical prune so far and a fingerprint of the dense model (JSON-able).

        Save it next to the pruned ``state_dict``: ``apply_pruning_record(model,
        example_inputs, record)`` rebuilds the pruned architecture from a fresh dense model.
        """
        return self._pruning_history.record()

    def _removed_heads(self, units: Mapping[int, Iterable[int]]) -> dict[nn.Module, int]:
        """Heads removed from fused qkv projections and ``nn.MultiheadAttention``."""
        out: dict[nn.Module, int] = {}
        for gid, local in units.items():
            group = self.structure.group(gid)
            if group.kind == "head" and group.root_module not in self.structure.layouts:
                module = self.structure.module(group.root_module)
                out[module] = out.get(module, 0) + len(set(local))
        return out

    def _count_removed_heads(
        self, removed: Mapping[nn.Module, int], changes: Mapping[str, AttentionChange]
    ) -> None:
        """Bring the user's ``num_heads`` and ``attention_layouts`` to the pruned counts."""
        if self._user_num_heads is not None:
            heads = dict(self._user_num_heads)
            for module, n in removed.items():
                if module in heads:
                    heads[module] -= n
            for change in changes.values():
                for name, count in ((change.q_proj, change.num_heads), (change.k_proj, change.num_kv_heads),
                                    (change.v_proj, change.num_kv_heads)):
                    module = self.structure.module(name)
                    if module in heads:
                        heads[module] = count
            self._user_num_heads = heads
            self._options = _evolve(self._options, num_heads=dict(heads))
        if self._user_layouts and changes:
            by_q = {change.q_proj: change for change in changes.values()}
            names = {id(m): n for n, m in self.model.named_modules()}
            updated = []
            for layout in self._user_layouts:
                change = by_q.get(names.get(id(layout.q_proj), ""))
                if change is not None:
                    layout = attrs.evolve(layout, num_heads=change.num_heads, num_kv_heads=change.num_kv_heads,
                                          head_dim=change.head_dim)
                updated.append(layout)
            self._user_layouts = tuple(updated)
            self._options = _evolve(self._options, attention_layouts=self._user_layouts)

    # ------------------------------------------------------------------------- bit-widths

    def bitwidths(self, include: Sequence[Any] = (), ignore: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Weight and activation bit-widths of every counted (weighted) layer."""
        self.check_current()
        selection = self._selection(include, ignore)
        rows = []
        for info in self.structure.selected_modules(selection, (LayerCategory.WEIGHTED,)):
            module = self.structure.module(info.name)
            row: dict[str, Any] = {"layer": info.name}
            for kind, fn in (("weight", self.weight_bitwidth_fn), ("activation", self.activation_bitwidth_fn)):
                if fn is None:
                    row[f"{kind}_bits"], row[f"{kind}_source"] = 32, "default"
                else:
                    row[f"{kind}_bits"] = check_bitwidth(fn(info.name, module), info.name, kind)
                    row[f"{kind}_source"] = f"{kind}_bitwidth_fn"
            rows.append(row)
        return rows

    def view_bitwidths(self, include: Sequence[Any] = (), ignore: Sequence[Any] = ()) -> BitwidthView:
        """Per counted layer: both bit-widths and their source."""
        return BitwidthView(self.bitwidths(include, ignore))


def _evolve(options: StructureOptions, **changes: Any) -> StructureOptions:
    return attrs.evolve(options, **changes)
