"""The structure of one model state: graph, canonical groups, layer table and plans.

A :class:`Structure` is what calculations, trackers and regularizers read (``ctx.structure``).
It is rebuilt after every physical prune; consumers remember the ``version`` they were
built for and refuse to run on a newer one.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from .group_builder import (
    GroupBuilder,
    ModuleInfo,
    attention_entries,
    module_table,
    warn_uncovered,
    warn_untraced,
)
from .errors import ArgumentTypeError, ConfigError, StaleConsumerError, UnitIndexError
from .graph import DependencyGraphHandle
from .heads import HeadLayout
from .names import join_name, split_name
from .plans import ParamResolver, ReductionPlan
from .registry import Registries
from .specs import LayerCategory
from .units import CanonicalUnitGroup, PruneAxis


_MODEL_VERSIONS: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def model_version(model: nn.Module) -> int:
    """How many physical prunes through any tracker this model has been through."""
    return _MODEL_VERSIONS.get(model, 0)


def set_model_version(model: nn.Module, version: int) -> None:
    """Record a physical prune (``version + 1``), or undo one that was rolled back."""
    _MODEL_VERSIONS[model] = version


@attrs.frozen(kw_only=True)
class StructureOptions:
    """The ``WeightTracker`` options that decide the structure."""

    num_heads: Mapping[nn.Module, int] = attrs.field(factory=dict)
    prune_num_heads: bool = False
    prune_head_dims: bool = True
    ignored_layers: tuple[nn.Module, ...] = ()
    unwrapped_parameters: Any = None
    root_module_types: tuple[type, ...] | None = None
    forward_fn: Callable[[nn.Module, Any], Any] | None = None
    output_transform: Callable[[Any], Any] | None = None
    ignored_params: tuple[nn.Parameter, ...] = ()  # from integrations, re-read every build
    attention_layouts: tuple[Any, ...] = ()
    prune_model_outputs: bool = False


class Selection:
    """Which layers an ``include`` / ``ignore`` pair selects.

    Module instances select their whole subtree; module types select every instance.
    """

    def __init__(self, model: nn.Module, include: Sequence[Any] = (), ignore: Sequence[Any] = ()):
        self.model = model
        self.include = tuple(include or ())
        self.ignore = tuple(ignore or ())
        names = {id(m): n for n, m in model.named_modules()}
        self._include_prefixes, self._include_types = self._split(self.include, names, "include")
        self._ignore_prefixes, self._ignore_types = self._split(self.ignore, names, "ignore")

    @staticmethod
    def _split(items: Sequence[Any], names: dict[int, str], label: str) -> tuple[list[str], tuple[type, ...]]:
        prefixes: list[str] = []
        types: list[type] = []
        for item in items:
            if isinstance(item, type) and issubclass(item, nn.Module):
                types.append(item)
            elif isinstance(item, nn.Module):
                if id(item) not in names:
                    raise ConfigError(
                        f"{label} lists a {type(item).__name__} that is not part of the model."
                    )
                prefixes.append(names[id(item)])
            else:
                raise ConfigError(
                    f"{label} accepts module instances and nn.Module subclasses; got {item!r}."
                )
        return prefixes, tuple(types)

    @staticmethod
    def _under(name: str, prefixes: Sequence[str]) -> bool:
        return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)

    def selects(self, name: str, module: nn.Module | None = None) -> bool:
        """Whether the layer ``name`` (optionally with its module) is selected."""
        if module is None:
            module = self.model.get_submodule(name) if name else self.model
        if self.include and not (
            self._under(name, self._include_prefixes) or isinstance(module, self._include_types)
        ):
            return False
        if self._under(name, self._ignore_prefixes) or isinstance(module, self._ignore_types):
            return False
        return True

    @property
    def include_types(self) -> tuple[type, ...]:
        return self._include_types

    @property
    def is_everything(self) -> bool:
        return not self.include and not self.ignore


class Structure:
    """Groups, layer table and reduction plans of the model as it is now."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        registries: Registries,
        options: StructureOptions,
        version: int = 0,
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.registries = registries
        self.options = options
        self.version = version
        #: The model's prune count when this structure was built (see ``model_version``).
        self.model_version = model_version(model)
        #: Whether some parameter was on the meta device (shapes only) when this was built.
        self.built_on_meta = any(p.is_meta for p in model.parameters())
        #: ``(name, owner's parameter dict, key)`` of every parameter: reading a slot sees a
        #: parameter replaced later (``to_empty``) without walking the module tree again
        self._parameter_slots = _parameter_slots(model)
        self.handle = self._trace()
        trusted, untrusted = self._split_unwrapped()
        self.modules, uncovered = module_table(model, registries.unit_rules, trusted)
        builder = self._group_builder(untrusted)
        self.groups: tuple[CanonicalUnitGroup, ...] = builder.build()
        self.modules = self.modules + attention_entries(model, builder.layouts, len(self.modules))
        self.module_index = {m.name: m for m in self.modules}
        #: Separate-projection attention, by the name of its ``q_proj`` (head groups' root).
        self.layouts: dict[str, HeadLayout] = {layout.q: layout for layout in builder.layouts}
        #: Groups left out because they would change the model's outputs.
        self.output_groups = tuple(builder.output_groups)
        self.uncovered = tuple(uncovered)
        self.skipped_groups = tuple(builder.skipped)
        self.canonical_param = _canonical_names(model)
        warn_uncovered(self.uncovered, self.skipped_groups)
        warn_untraced(self.untraced_modules())
        self.num_units = sum(g.n_units for g in self.groups)
        self.resolver = ParamResolver(model)
        self._plans: dict[Any, ReductionPlan] = {}
        self.group_of_unit = torch.repeat_interleave(
            torch.arange(len(self.groups)), torch.tensor([g.n_units for g in self.groups], dtype=torch.long)
        ) if self.groups else torch.zeros(0, dtype=torch.long)

    def _trace(self) -> DependencyGraphHandle:
        """Torch-Pruning's graph of the model, with the unit rules' layer pruners."""
        rules, options = self.registries.unit_rules, self.options
        roots = options.root_module_types
        if roots is None:
            roots = (nn.modules.conv._ConvNd, nn.Linear) + tuple(
                t for t in rules.covered_types()
                if rules.rule_for(t).layer_pruner is not None  # type: ignore[union-attr]
            )
        pruners = {}
        for module in self.model.modules():
            rule = rules.rule_for(type(module))
            if rule is not None and rule.layer_pruner is not None:
                pruners[type(module)] = rule.layer_pruner
        return DependencyGraphHandle(
            self.model,
            self.example_inputs,
            forward_fn=options.forward_fn,
            output_transform=options.output_transform,
            unwrapped_parameters=options.unwrapped_parameters,
            ignored_layers=options.ignored_layers,
            root_module_types=roots,
            layer_pruners=pruners,
            ignored_params=options.ignored_params,
        )

    def _group_builder(self, untrusted: set[str]) -> GroupBuilder:
        options = self.options
        return GroupBuilder(
            self.handle,
            self.registries.unit_rules,
            num_heads=options.num_heads,
            prune_num_heads=options.prune_num_heads,
            prune_head_dims=options.prune_head_dims,
            untrusted_params=untrusted,
            attention_layouts=options.attention_layouts,
            layout_rules=self.registries.attention_layouts,
            prune_model_outputs=options.prune_model_outputs,
        )

    def _split_unwrapped(self) -> tuple[list[str], set[str]]:
        """Unwrapped parameters we accept, and those Torch-Pruning only guessed for a layer.

        Parameters the user listed, and parameters of containers (``cls_token`` on a
        ViT), are accepted. A parameter Torch-Pruning found on its own inside a leaf module
        (a custom layer using ``F.linear`` on its own weight, say) is a layer no rule covers:
        Torch-Pruning would guess its pruning dim, so it is left out instead.
        """
        listed = {id(p) for p, _ in (_pairs(self.options.unwrapped_parameters))}
        named = dict(self.model.named_parameters())
        trusted, untrusted = [], set()
        for name, _dim in self.handle.unwrapped():
            owner = self.module(split_name(name)[0])
            leaf = owner is not self.model and not any(True for _ in owner.children())
            if leaf and id(named.get(name)) not in listed:
                untrusted.add(name)
            else:
                trusted.append(name)
        return trusted, untrusted

    def meta_parameters(self) -> list[str]:
        """Names of the model's parameters on the meta device (shapes without values)."""
        return [name for name, params, key in self._parameter_slots
                if (param := params.get(key)) is not None and param.is_meta]

    def require_values(self, action: str) -> None:
        """Refuse ``action`` (something that reads or changes weight values) on meta tensors.

        A structure built on the meta device has every group and unit count, but nothing
        that reads weights can run on it; a structure built before the weights were
        materialised is refused too, because ``to_empty`` replaces the parameters it saw.

        Raises:
            ConfigError: Parameters are on the meta device, or were when this was built.
        """
        meta = self.meta_parameters()
        if not meta and not self.built_on_meta:
            return
        if meta:
            shown = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
            where = (f"the model's parameters are on the meta device ({shown}): they have "
                     "shapes but no values")
        else:
            where = ("this WeightTracker was built while the model's parameters were on the "
                     "meta device, and materialising them replaced the parameters it saw")
        raise ConfigError(
            f"{action} needs real weight values, but {where}. The structure (groups, num_units, "
            "view_structures()) works on meta tensors; for trackers, regularizers and pruning, "
            "materialise the weights first (model.to_empty(device='cpu'), then "
            "model.load_state_dict(state_dict); or build the model on a real device) and "
            "create a new WeightTracker(model, example_inputs) with example_inputs on that "
            "device."
        )

    @property
    def current(self) -> bool:
        """Whether no tracker has pruned the model physically since this was built."""
        return self.model_version == model_version(self.model)

    def require_current(self) -> None:
        """Raise if another tracker pruned the model physically since this was built.

        Raises:
            StaleConsumerError: The model's shapes are no longer those of this structure.
        """
        if not self.current:
            raise StaleConsumerError(
                "This WeightTracker was built before another WeightTracker on the same model "
                "pruned it physically: its groups describe layers that no longer have those "
                "shapes. Build a new WeightTracker(model, example_inputs, ...) for the pruned "
                "model."
            )

    def untraced_modules(self) -> list[str]:
        """Layers with parameters that the traced forward never ran (aux heads, say)."""
        traced = set(self.handle.traced_modules())
        covered = {id(m) for m in traced for m in m.modules()}
        out = []
        for name, module in self.model.named_modules():
            if id(module) in covered or module is self.model:
                continue
            if any(True for _ in module.parameters(recurse=False)) and self.registries.unit_rules.rule_for(type(module)):
                out.append(name)
        unwrapped = {n for n, _ in self.handle.unwrapped()}
        return [n for n in out if not any(p.startswith(n + ".") for p in unwrapped)]

    # ---------------------------------------------------------------------------- lookups

    def group(self, group_id: int) -> CanonicalUnitGroup:
        if isinstance(group_id, bool) or not isinstance(group_id, int):
            raise UnitIndexError(f"group_id must be an int, got {group_id!r}.")
        if not 0 <= group_id < len(self.groups):
            raise UnitIndexError(
                f"group_id {group_id} is out of range: this model has {len(self.groups)} "
                f"groups (ids 0..{len(self.groups) - 1}); see view_structures()."
            )
        return self.groups[group_id]

    def check_unit(self, group: CanonicalUnitGroup, unit_id: int) -> int:
        if isinstance(unit_id, bool) or not isinstance(unit_id, int):
            raise UnitIndexError(f"unit_id must be an int, got {unit_id!r}.")
        if not 0 <= unit_id < group.n_units:
            raise UnitIndexError(
                f"unit_id {unit_id} is out of range for group {group.id} ({group.name}), "
                f"which has {group.n_units} units (ids 0..{group.n_units - 1})."
            )
        return unit_id

    def unit_request(self, units: Mapping[int, Iterable[int]]) -> dict[int, set[int]]:
        """``{group id: local unit ids}`` with every id checked, before anything changes.

        Integer-like ids (``numpy.int64``, 0-d integer tensors) are accepted as ints.

        Raises:
            ArgumentTypeError: ``units`` is not a mapping of id lists.
            UnitIndexError: A group or unit id is not an int or out of range.
        """
        if not isinstance(units, Mapping):
            raise ArgumentTypeError(
                f"units must be a mapping {{group id: [unit ids]}}, got {type(units).__name__}."
            )
        out: dict[int, set[int]] = {}
        for group_id, local in units.items():
            group = self.group(_as_int(group_id))  # type: ignore[arg-type]
            if isinstance(local, (int, str, bytes)) or not isinstance(local, Iterable):
                raise ArgumentTypeError(
                    f"units[{group_id}] must be a list of unit ids, got {local!r}; write "
                    f"{{{group_id}: [{local!r}]}} for one unit."
                )
            chosen = {self.check_unit(group, _as_int(u)) for u in local}  # type: ignore[arg-type]
            out.setdefault(group.id, set()).update(chosen)
        return out

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name) if name else self.model

    def channels(self, name: str, axis: PruneAxis | str) -> int | None:
        """Channels of layer ``name`` on ``axis``, as the dependency graph reports them.

        The input side for ``IN_CHANNEL``, the output side otherwise; ``None`` when the
        graph cannot tell.
        """
        return self.handle.channels(self.module(name), PruneAxis(axis))

    def selection(self, include: Sequence[Any] = (), ignore: Sequence[Any] = ()) -> Selection:
        return Selection(self.model, include, ignore)

    def selected_modules(
        self,
        selection: Selection,
        categories: Sequence[LayerCategory] | None = None,
        *,
        require_any: bool = True,
    ) -> tuple[ModuleInfo, ...]:
        """Covered layers the selection picks (optionally only some categories).

        Raises:
            ConfigError: ``include`` selects no layer (with ``require_any``).
        """
        def wanted(info: ModuleInfo) -> bool:
            if not selection.selects(info.name):
                return False
            if categories is None or info.category in categories:
                return True
            # naming a type in include= counts it even if the tracker skips its category
            return any(issubclass(info.module_type, t) for t in selection.include_types)

        chosen = tuple(m for m in self.modules if wanted(m))
        if require_any and not chosen and (selection.include or selection.ignore):
            raise ConfigError(
                f"include={list(map(_label, selection.include))} / ignore="
                f"{list(map(_label, selection.ignore))} selects no layer this tracker counts. "
                "Pass modules of the model (their subtrees count) or nn.Module subclasses."
            )
        return chosen

    # ------------------------------------------------------------------------------ plans

    def plan(self, selection: Selection | None = None) -> ReductionPlan:
        """The reduction plan over every member (or only the selected members), cached."""
        if selection is None or selection.is_everything:
            key: Any = None
        else:
            key = tuple(
                tuple(id(x) if isinstance(x, nn.Module) else x for x in items)
                for items in (selection.include, selection.ignore)
            )
        if key not in self._plans:
            chosen = selection if key is not None else None
            keep = (lambda group, name: chosen.selects(name)) if chosen is not None else None
            self._plans[key] = ReductionPlan(self.groups, self.resolver, keep)
        return self._plans[key]


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name a parameter is reachable by -> its ``named_parameters()`` name."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(p), n) for n, p in model.named_parameters(remove_duplicate=False)}


def _pairs(value: Any) -> list[tuple[Any, Any]]:
    if value is None:
        return []
    return list(value.items()) if isinstance(value, Mapping) else [tuple(v) for v in value]


def _label(item: Any) -> str:
    if isinstance(item, type):
        return item.__name__
    return type(item).__name__


def _as_int(value: object) -> object:
    """Integer-like ids (``numpy.int64``, 0-d integer tensors) as ``int``; others unchanged.

    Floats, strings and bools stay as they are, so that the id check refuses them.
    """
    if isinstance(value, (bool, int, float, str)) or not hasattr(value, "__index__"):
        return value
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return value


def _parameter_slots(model: nn.Module) -> list[tuple[str, dict[str, Any], str]]:
    """Where each parameter of ``model`` lives (a shared parameter once, at its first name)."""
    slots, seen = [], set()
    for prefix, module in model.named_modules():
        for key, param in module._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                slots.append((join_name(prefix, key), module._parameters, key))
    return slots
