"""The ``ranked`` pruner itself: ranking, scheduling, selection and removal of units."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from weighttracker_core.plugin import (
    CanonicalUnitGroup,
    ConfigError,
    ConsumerContext,
    ImportanceSpec,
    PluginError,
    PruneAxis,
    PruningError,
    Structure,
)

from .config import RankedPrunerConfig, check_schedule, geometric_scheduler, linear_scheduler
from .scopes import (
    UnitSelection,
    HEAD_FUNCTIONS,
    HEAD_KINDS,
    Candidate,
    channel_chunks,
    choose,
    isomorphic_key,
    layer_sizes,
    normalize,
    slot_scores,
)
from .unit_masks import UnitMasks, has_prune_masks

__all__ = ["RankedPruner", "RankedPrunerConfig", "UnitSelection", "geometric_scheduler", "linear_scheduler"]


class RankedPruner:
    """Built by ``tracker.create_pruner("ranked", ...)``; see the module docstring."""

    def __init__(self, ctx: ConsumerContext) -> None:
        self.tracker = ctx.tracker
        cfg = ctx.options if ctx.options is not None else RankedPrunerConfig()
        self.config: RankedPrunerConfig = cfg
        self.ranking = cfg.ranking
        steps = cfg.iterative_steps
        scheduler = cfg.iterative_pruning_ratio_scheduler
        try:
            self._channel_schedule = check_schedule(scheduler, cfg.pruning_ratio, steps)
            self._head_schedule = check_schedule(scheduler, cfg.head_pruning_ratio, steps)
            self._kv_head_schedule = check_schedule(scheduler, cfg.kv_head_pruning_ratio, steps)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        structure = ctx.structure
        if cfg.ignored_layers:
            structure.selection(cfg.ignored_layers, ())  # modules outside the model: error now
        self._build_scorer = self._importance_factory(cfg.importance, cfg.importance_options)
        self._scorer: Any = None
        self._scorer_for: Structure | None = None
        self._user_scopes = self._ratio_dict(structure, cfg.pruning_ratio_dict, "pruning_ratio_dict")
        self._head_ratios = self._ratio_dict(structure, cfg.head_pruning_ratio_dict, "head_pruning_ratio_dict")
        self._masks = UnitMasks(structure.model) if cfg.apply == "mask" else None
        self._removed: dict[str, set[int]] = {}
        self._scope_initial: dict[str, int] = {}
        self._group_initial: dict[str, int] = {}
        self._layer_initial = layer_sizes(structure, self._removed_units)
        if max(self._head_schedule) > 0 and not any(g.kind == "head" for g in structure.groups):
            warnings.warn(
                f"head_pruning_ratio={cfg.head_pruning_ratio} has no effect: the model has no "
                "head groups. Create the WeightTracker with num_heads={qkv: heads} and "
                "prune_num_heads=True.", UserWarning, stacklevel=3)
        self._warned = False
        self.current_step = 0
        self.history: list[UnitSelection] = []

    # ---------------------------------------------------------------------------- public

    @property
    def survives_physical_prune(self) -> bool:
        """Physical pruners re-read the structure every step; mask pruners hold unit ids."""
        return self.config.apply == "physical"

    def step(self, interactive: bool = False) -> Any:
        """Run the next step of the schedule.

        Returns the applied selections, or with ``interactive=True`` an iterator of
        selections that are applied only when you call ``selection.apply()``.
        """
        self.current_step += 1
        try:
            selections = self._select()
            if not interactive:
                self._apply(selections)
        except BaseException:
            self.current_step -= 1  # nothing changed: the step can be taken again
            raise
        return iter(selections) if interactive else selections

    def finalize(self) -> int:
        """Bake masks into plain parameters (``apply="mask"``); returns how many."""
        return self._masks.finalize() if self._masks is not None else 0

    def reset(self) -> None:
        """Start the schedule again from step 0 (ratios stay relative to the first sizes)."""
        self.current_step = 0

    # ------------------------------------------------------------------ save and resume

    def state_dict(self) -> dict[str, Any]:
        """Where the schedule stands, as plain data (``json.dumps`` works on it).

        Holds the step, the sizes the ratios are relative to (scopes, groups and layers
        when first seen), the units removed so far and the applied selections. Save it
        with the pruned model; :meth:`load_state_dict` on a new pruner resumes from it.
        """
        return {
            "pruner": "ranked",
            "version": _STATE_VERSION,
            "config": self._schedule_config(),
            "current_step": self.current_step,
            "group_units": {g.name: g.n_units for g in self.tracker.groups},
            "removed": {name: sorted(units) for name, units in self._removed.items()},
            "scope_initial": dict(self._scope_initial),
            "group_initial": dict(self._group_initial),
            "layer_initial": [[name, side, count] for (name, side), count in self._layer_initial.items()],
            "history": [_selection_state(sel) for sel in self.history],
            "warned": self._warned,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the schedule saved by :meth:`state_dict` (on a pruner that has not stepped).

        Create the pruner with the same options as the saved one, on the model as it was
        when the state was saved: the pruned model (rebuilt with ``apply_pruning_record``)
        for ``apply="physical"``; the dense model for ``apply="mask"``, whose masks this
        call puts back (load the model's ``state_dict`` after it).

        Raises:
            ConfigError: The state is not a ranked pruner's, was made with other options,
                or does not fit the model (nothing is changed).
            PruningError: This pruner has already taken a step.
        """
        _check_state(state, "ranked")
        if self.current_step or self.history or self._removed:
            raise PruningError(
                f"load_state_dict needs a pruner that has not taken a step; this one is at step "
                f"{self.current_step}. Create a new one with tracker.create_pruner('ranked', ...)."
            )
        mine = self._schedule_config()
        for key, value in state["config"].items():
            if mine.get(key) != value:
                raise ConfigError(
                    f"The saved ranked pruner had {key}={value!r}, this one has {key}="
                    f"{mine.get(key)!r}; create the pruner with the options of the saved one."
                )
        groups = {g.name: g for g in self.tracker.groups}
        saved_units = dict(state["group_units"])
        for name in groups:
            saved_units.setdefault(name, None)
        for name, n_units in saved_units.items():
            now = groups[name].n_units if name in groups else None
            if now != n_units:
                how = ("the pruned model: rebuild it with weighttracker_core.apply_pruning_record "
                       "before creating the pruner" if self.config.apply == "physical" else
                       "the dense model the masks were made on")
                raise ConfigError(
                    f"The saved pruner state does not fit this model: group {name!r} has "
                    f"{now if now is not None else 'no'} units here, "
                    f"{n_units if n_units is not None else 'none'} in the state. "
                    f"Create the pruner on {how}."
                )
        removed = {name: set(units) for name, units in state["removed"].items()}
        if self._masks is not None and removed:
            self._masks.apply_(self.tracker.structure,
                               {groups[name].id: sorted(units) for name, units in removed.items()})
        self._removed = removed
        self._scope_initial = dict(state["scope_initial"])
        self._group_initial = dict(state["group_initial"])
        self._layer_initial = {(name, side): count for name, side, count in state["layer_initial"]}
        self.history = [_selection_from_state(item, self) for item in state["history"]]
        self._warned = bool(state["warned"])
        self.current_step = int(state["current_step"])

    def _schedule_config(self) -> dict[str, Any]:
        """The options a saved schedule must agree with, as plain values."""
        cfg = self.config
        scheduler = cfg.iterative_pruning_ratio_scheduler
        return {"apply": cfg.apply, "ranking": self.ranking, "importance": self.importance_name,
                "pruning_ratio": cfg.pruning_ratio, "head_pruning_ratio": cfg.head_pruning_ratio,
                "iterative_steps": cfg.iterative_steps, "max_pruning_ratio": cfg.max_pruning_ratio,
                "round_to": cfg.round_to,
                "scheduler": getattr(scheduler, "__name__", type(scheduler).__name__)}

    def report(self) -> dict[str, Any]:
        """Steps taken and what every applied selection removed."""
        removed: dict[str, int] = {}
        for sel in self.history:
            removed[sel.group_name] = removed.get(sel.group_name, 0) + len(sel.units)
        return {"step": self.current_step, "iterative_steps": self.config.iterative_steps,
                "apply": self.config.apply, "ranking": self.ranking,
                "importance": self.importance_name, "removed_units": removed,
                "selections": [s.as_dict() for s in self.history]}

    # ------------------------------------------------------------------------ importance

    def _importance_factory(self, importance: Any, options: Mapping[str, Any]) -> Any:
        tracker = self.tracker
        if isinstance(importance, ImportanceSpec):
            spec = importance
        elif isinstance(importance, str):
            spec = tracker.registries.importances.get(importance)
        else:
            if options:
                raise ConfigError("importance_options only apply to registered importances; "
                                  f"got {sorted(options)} with a callable importance.")
            self.importance_name = getattr(importance, "__name__", type(importance).__name__)
            return lambda structure: importance
        self.importance_name = spec.name
        if spec.options is None:
            if options:
                raise ConfigError(f"The importance {spec.name!r} takes no options; got {sorted(options)}.")
            opts = None
        else:
            try:
                opts = spec.options(**options)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"Invalid importance_options for importance {spec.name!r}: {err}") from err
        tracker.graph.validate(spec.requires, consumer=f"importance {spec.name}")

        def build(structure: Structure) -> Any:
            return tracker.registries.importances.build(spec.name, ConsumerContext(
                name=spec.name, tracker=tracker, structure=structure, graph=tracker.graph,
                options=opts, selection=structure.selection()))

        return build

    def _scores(self, structure: Structure) -> torch.Tensor:
        if self._scorer_for is not structure:
            self._scorer = self._build_scorer(structure)
            self._scorer_for = structure
        scores = self._scorer(self.tracker.graph.evaluation())
        if not isinstance(scores, torch.Tensor) or scores.numel() != structure.num_units:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise PluginError(
                f"The importance {self.importance_name!r} returned {got}; it must return one "
                f"score per unit, a tensor of {structure.num_units} values."
            )
        return scores.detach().flatten().to("cpu", torch.float64)

    # ---------------------------------------------------------------------------- scopes

    def _ratio_dict(self, structure: Structure, mapping: Any, label: str) -> dict[str, tuple[str, list[float]]]:
        """``{covered layer name: (scope name, schedule)}`` from a ``{module(s): ratio}`` dict."""
        out: dict[str, tuple[str, list[float]]] = {}
        if not mapping:
            return out
        names = {id(m): n for n, m in structure.model.named_modules()}
        shared = self.ranking != "local"
        for index, (key, ratio) in enumerate(mapping.items()):
            try:
                schedule = check_schedule(self.config.iterative_pruning_ratio_scheduler, ratio,
                                          self.config.iterative_steps)
            except ValueError as err:
                raise ConfigError(f"{label}: {err}") from err
            position = 0
            for module in key if isinstance(key, tuple) else (key,):
                if id(module) not in names:
                    raise ConfigError(f"{label} names a {type(module).__name__} that is not part of the model.")
                prefix = names[id(module)]
                for info in structure.modules:
                    if prefix and info.name != prefix and not info.name.startswith(prefix + "."):
                        continue
                    scope = f"user:{index}" if shared else f"user:{index}:{position}"
                    out.setdefault(info.name, (scope, schedule))
                    position += 1
        return out

    def _removed_units(self, group: CanonicalUnitGroup) -> set[int]:
        return self._removed.get(group.name, set())

    def _eligible(self, group: CanonicalUnitGroup, structure: Structure, ignored: Any,
                  sizes: Mapping[tuple[str, str], int], blocked: list[str]) -> bool:
        if self.config.apply == "physical" and not self._removable(group):
            blocked.append(group.name)
            return False
        limit = 1 - self.config.max_pruning_ratio
        for member in group.members:
            if member.module_name not in structure.module_index:
                continue
            out_side = member.axis is not PruneAxis.IN_CHANNEL
            if out_side and ignored is not None and ignored.selects(member.module_name):
                return False
            key = (member.module_name, "out" if out_side else "in")
            now, first = sizes.get(key), self._layer_initial.get(key)
            if now is not None and first is not None and (now < first * limit or now == 1):
                return False
        return True

    def _removable(self, group: CanonicalUnitGroup) -> bool:
        """Whether physical pruning can remove units of ``group`` (asks the core, dry run)."""
        fn = group.root_member.pruning_fn
        if fn.startswith("prune_") and fn not in HEAD_FUNCTIONS:
            return True
        chunks = channel_chunks(self.tracker.structure, group)
        if group.n_units < 2 * chunks:
            return False
        try:  # one slot: one head of each kv group under grouped-query attention
            self._physical_prune({group.id: list(range(0, group.n_units, group.n_units // chunks))},
                                 dry_run=True)
        except PruningError:
            return False
        return True

    def _physical_prune(self, request: Mapping[int, list[int]], dry_run: bool = False) -> Any:
        prune_units = getattr(self.tracker, "prune_units", None)
        if prune_units is not None:
            return prune_units(request, dry_run=dry_run)
        return self.tracker._prune(request, dry_run=dry_run)  # cores without prune_units

    def _scope_of(self, group: CanonicalUnitGroup, chunks: int) -> tuple[str, float] | None:
        step = self.current_step
        if group.kind == "kv_head":
            ratio = min(self._kv_head_schedule[step], self.config.max_pruning_ratio)
            if max(self._kv_head_schedule) <= 0:
                return None
            return ("kv_heads" if self.ranking != "local" else f"kv_heads:{group.name}"), ratio
        if group.kind in HEAD_KINDS:
            schedule = self._head_schedule
            for name, (_scope, sched) in self._head_ratios.items():
                if name == group.root_module:
                    schedule = sched
            ratio = min(schedule[step], self.config.max_pruning_ratio)
            if max(schedule) <= 0:
                return None
            return ("heads" if self.ranking != "local" else f"heads:{group.name}"), ratio
        for member in group.members:
            if member.axis is not PruneAxis.IN_CHANNEL and member.module_name in self._user_scopes:
                scope, schedule = self._user_scopes[member.module_name]
                return scope, min(schedule[step], self.config.max_pruning_ratio)
        ratio = min(self._channel_schedule[step], self.config.max_pruning_ratio)
        if self.ranking == "isomorphic":
            return isomorphic_key(group, chunks), ratio
        if self.ranking == "global":
            return "global", ratio
        return f"local:{group.name}", ratio

    def _select(self) -> list[UnitSelection]:
        cfg = self.config
        if self.current_step > cfg.iterative_steps:
            warnings.warn(f"The ranked pruner already took all {cfg.iterative_steps} steps; "
                          "this step prunes nothing (call reset() to start over).", stacklevel=3)
            return []
        structure = self.tracker.structure
        if cfg.apply == "physical":
            masked = has_prune_masks(structure.model)
            if masked:
                raise PruningError(
                    f"Physical pruning needs plain parameters, but {masked[:3]} carry "
                    "torch.nn.utils.prune masks. Call finalize() on the mask pruner (or "
                    "prune.remove) first."
                )
        scores = self._scores(structure)
        ignored = structure.selection(cfg.ignored_layers, ()) if cfg.ignored_layers else None
        sizes = layer_sizes(structure, self._removed_units)
        scopes: dict[str, list[Candidate]] = {}
        blocked: list[str] = []
        for group in structure.groups:
            if not self._eligible(group, structure, ignored, sizes, blocked):
                continue
            chunks = channel_chunks(structure, group)
            placed = self._scope_of(group, chunks)
            if placed is None:
                continue
            scope, ratio = placed
            per_slot = slot_scores(scores[group.offset : group.offset + group.n_units], chunks)
            removed = self._removed_units(group)
            live = torch.tensor([s for s in range(len(per_slot)) if s not in removed], dtype=torch.long)
            values = per_slot[live]
            if live.numel() == 0 or bool(torch.isnan(values).all()):
                continue
            values = normalize(values, cfg.normalizer)
            values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
            initial = self._group_initial.setdefault(group.name, len(per_slot))
            scopes.setdefault(scope, []).append(Candidate(
                group=group, chunks=chunks, live=live, scores=values, ratio=ratio, initial_slots=initial))
        if blocked and not self._warned:
            self._warned = True
            warnings.warn("apply='physical' cannot remove these groups (no layer pruner); they "
                          f"are left out: {', '.join(blocked)}. Use apply='mask' for them.", stacklevel=3)
        out = []
        for scope, cands in scopes.items():
            initial = self._scope_initial.setdefault(scope, sum(int(c.live.numel()) for c in cands))
            for cand, slots in choose(cands, initial, cands[0].ratio, cfg.round_to, cfg.max_pruning_ratio):
                units = cand.units_of(slots)
                group = cand.group
                position = {int(s): i for i, s in enumerate(cand.live)}
                out.append(UnitSelection(
                    step=self.current_step, scope=scope, ratio=cand.ratio, group_name=group.name,
                    group_id=group.id, kind=str(group.kind), n_units=group.n_units, units=tuple(units),
                    scores=cand.scores[[position[s] for s in slots]],
                    tp_indices=tuple(group.root_member.indices_of(set(units))),
                    modules=group.module_names(), pruner=self))
        return out

    # ----------------------------------------------------------------------------- apply

    def _apply(self, selections: list[UnitSelection]) -> None:
        todo = [s for s in selections if not s.applied]
        if not todo:
            return
        groups = {g.name: g for g in self.tracker.groups}
        request: dict[int, list[int]] = {}
        for sel in todo:
            group = groups.get(sel.group_name)
            if group is None or group.n_units != sel.n_units:
                raise PruningError(
                    f"Group {sel.group_name} changed after step {sel.step} chose its units "
                    f"({sel.n_units} units then, {group.n_units if group else 'none'} now). "
                    "Apply the selections of a step before changing the model again."
                )
            request.setdefault(group.id, []).extend(sel.units)
        if self._masks is not None:
            self._masks.apply_(self.tracker.structure, request)
            for sel in todo:
                self._removed.setdefault(sel.group_name, set()).update(sel.units)
        else:
            self._physical_prune(request)
        for sel in todo:
            sel.applied = True
            self.history.append(sel)


_STATE_VERSION = 1
_STATE_KEYS = ("config", "current_step", "group_units", "removed", "scope_initial",
               "group_initial", "layer_initial", "history", "warned")


def _check_state(state: Any, name: str) -> None:
    if not isinstance(state, Mapping) or state.get("pruner") != name:
        got = state.get("pruner") if isinstance(state, Mapping) else type(state).__name__
        raise ConfigError(
            f"This is not the state of a {name!r} pruner (its 'pruner' entry is {got!r}); pass "
            f"what pruner.state_dict() of a {name!r} pruner returned."
        )
    if state.get("version") != _STATE_VERSION:
        raise ConfigError(f"{name!r} pruner state version {state.get('version')!r} cannot be read "
                          f"here (this version reads {_STATE_VERSION}).")
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise ConfigError(f"The {name!r} pruner state lacks {missing}; it is damaged.")


def _selection_state(sel: UnitSelection) -> dict[str, Any]:
    return {**sel.as_dict(), "group_id": sel.group_id, "scores": [float(s) for s in sel.scores],
            "tp_indices": list(sel.tp_indices), "modules": list(sel.modules)}


def _selection_from_state(item: Mapping[str, Any], pruner: RankedPruner) -> UnitSelection:
    return UnitSelection(
        step=int(item["step"]), scope=str(item["scope"]), ratio=float(item["ratio"]),
        group_name=str(item["group"]), group_id=int(item["group_id"]), kind=str(item["kind"]),
        n_units=int(item["n_units"]), units=tuple(int(u) for u in item["units"]),
        scores=torch.tensor(item["scores"], dtype=torch.float64),
        tp_indices=tuple(int(i) for i in item["tp_indices"]),
        modules=tuple(str(m) for m in item["modules"]), applied=bool(item["applied"]),
        pruner=pruner)
