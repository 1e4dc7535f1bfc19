"""Registries: name -> (spec, plugin) tables built from the registration hooks.

Each hook implementation is called through pluggy's public ``get_hookimpls()`` so that
every contribution is attributed to the plugin that made it: duplicate names can then
name both plugins and their distributions (SPEC §8), and ``weighttracker plugins`` can
say what each plugin registers.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import attrs

from .errors import DuplicateNameError, PluginError, UnknownNameError
from .manager import PluginManager
from .specs import (
    AttentionLayoutRule,
    CalculationSpec,
    ImportanceSpec,
    IntegrationSpec,
    ModelSourceSpec,
    PrunerSpec,
    RegularizerSpec,
    TrackerSpec,
    UnitRule,
)

SpecT = TypeVar("SpecT")


@attrs.frozen
class Entry(Generic[SpecT]):
    spec: SpecT
    plugin: str


class Registry(Generic[SpecT]):
    """Specs of one kind, keyed by name, each remembering the plugin that registered it."""

    def __init__(self, kind: str, entries: dict[str, Entry[SpecT]]) -> None:
        self.kind = kind
        self._entries = entries

    def __contains__(self, name: object) -> bool:
        return str(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: Any) -> SpecT:
        """The spec registered as ``name`` (a string or a str enum member).

        Raises:
            UnknownNameError: with a "did you mean" hint and every installed name.
        """
        key = name.value if hasattr(name, "value") else str(name)
        try:
            return self._entries[key].spec
        except KeyError:
            close = difflib.get_close_matches(key, self._entries, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            installed = ", ".join(self.names()) or "none"
            raise UnknownNameError(
                f"No {self.kind} named {key!r}.{hint} Installed {self.kind}s: {installed}."
            ) from None

    def plugin_of(self, name: str) -> str:
        return self._entries[name].plugin

    def specs(self) -> list[SpecT]:
        return [self._entries[name].spec for name in self.names()]


class TypedRegistry(Registry[SpecT]):
    """Specs by name, plus lookup by module type through the MRO (unit rules, layouts)."""

    def __init__(self, kind: str, entries: dict[str, Entry[SpecT]], by_type: dict[type, str]) -> None:
        super().__init__(kind, entries)
        self._by_type = by_type

    def rule_for(self, module_type: type) -> SpecT | None:
        """The rule of the nearest registered ancestor of ``module_type``, or ``None``."""
        for klass in module_type.__mro__:
            name = self._by_type.get(klass)
            if name is not None:
                return self._entries[name].spec
        return None

    def covered_types(self) -> tuple[type, ...]:
        return tuple(self._by_type)


class UnitRuleRegistry(TypedRegistry[UnitRule]):
    """Unit rules by name, plus lookup by module type through the MRO."""

    def __init__(self, entries: dict[str, Entry[UnitRule]], by_type: dict[type, str]) -> None:
        super().__init__("unit rule", entries, by_type)


@attrs.frozen
class Registries:
    """Every registry of one plugin manager."""

    unit_rules: UnitRuleRegistry
    calculations: Registry[CalculationSpec]
    trackers: Registry[TrackerSpec]
    regularizers: Registry[RegularizerSpec]
    importances: Registry[ImportanceSpec]
    pruners: Registry[PrunerSpec]
    integrations: Registry[IntegrationSpec]
    model_sources: Registry[ModelSourceSpec]
    attention_layouts: TypedRegistry[AttentionLayoutRule]


_KINDS: tuple[tuple[str, str, type, str], ...] = (
    # (registry attribute, hook, spec type, human-readable kind)
    ("unit_rules", "wt_register_unit_rules", UnitRule, "unit rule"),
    ("calculations", "wt_register_calculations", CalculationSpec, "calculation"),
    ("trackers", "wt_register_trackers", TrackerSpec, "tracker"),
    ("regularizers", "wt_register_regularizers", RegularizerSpec, "regularizer"),
    ("importances", "wt_register_importances", ImportanceSpec, "importance"),
    ("pruners", "wt_register_pruners", PrunerSpec, "pruner"),
    ("integrations", "wt_register_integrations", IntegrationSpec, "integration"),
    ("model_sources", "wt_register_model_sources", ModelSourceSpec, "model source"),
    ("attention_layouts", "wt_register_attention_layouts", AttentionLayoutRule, "attention layout rule"),
)
_TYPED = ("unit_rules", "attention_layouts")


def contributions(pm: PluginManager, hook: str) -> list[tuple[str, Any]]:
    """``(plugin name, spec)`` for every spec every plugin returns from ``hook``."""
    out: list[tuple[str, Any]] = []
    caller = getattr(pm.hook, hook)
    # get_hookimpls() lists last-registered first; reverse for registration order
    for impl in reversed(caller.get_hookimpls()):
        try:
            result = impl.function()
        except Exception as err:
            raise PluginError(
                f"Plugin {pm.describe(impl.plugin_name)} failed in {hook}(): "
                f"{type(err).__name__}: {err}"
            ) from err
        for spec in tuple(result or ()):
            out.append((impl.plugin_name, spec))
    return out


def _key(spec: Any) -> str:
    return spec.prefix if isinstance(spec, ModelSourceSpec) else spec.name


def build_registries(pm: PluginManager) -> Registries:
    """Collect every registration hook of ``pm`` (cached on the manager)."""
    if pm._wt_registries is not None:
        return pm._wt_registries
    built: dict[str, Any] = {}
    for attr, hook, spec_type, kind in _KINDS:
        entries: dict[str, Entry[Any]] = {}
        by_type: dict[type, str] = {}
        for plugin, spec in contributions(pm, hook):
            if not isinstance(spec, spec_type):
                raise PluginError(
                    f"Plugin {pm.describe(plugin)} returned {type(spec).__name__} from "
                    f"{hook}(); expected {spec_type.__name__} instances."
                )
            key = _key(spec)
            if key in entries:
                raise DuplicateNameError(
                    f"The {kind} name {key!r} is registered twice: by plugin "
                    f"{pm.describe(entries[key].plugin)} and by plugin {pm.describe(plugin)}. "
                    f"Block one of them with WEIGHTTRACKER_DISABLE_PLUGINS."
                )
            entries[key] = Entry(spec, plugin)
            if attr in _TYPED:
                for module_type in spec.module_types:
                    if module_type in by_type:
                        other = by_type[module_type]
                        raise DuplicateNameError(
                            f"Two {kind}s cover {module_type.__qualname__}: {other!r} of "
                            f"plugin {pm.describe(entries[other].plugin)} and {key!r} of "
                            f"plugin {pm.describe(plugin)}. Register a rule for a subclass "
                            "instead, or block one plugin."
                        )
                    by_type[module_type] = key
        if attr == "unit_rules":
            built[attr] = UnitRuleRegistry(entries, by_type)
        elif attr in _TYPED:
            built[attr] = TypedRegistry(kind, entries, by_type)
        else:
            built[attr] = Registry(kind, entries)
    pm._wt_registries = Registries(**built)
    return pm._wt_registries


def describe_plugins(pm: PluginManager) -> list[dict[str, Any]]:
    """For each plugin: name, distribution, version, source and what it registers."""
    registries = build_registries(pm)
    rows: dict[str, dict[str, Any]] = {}
    for name in pm.registered_names():
        info = pm.plugin_info(name)
        rows[name] = {
            "name": name,
            "distribution": info.distribution,
            "version": info.version,
            "source": info.source,
            "registers": {},
        }
    for attr, _hook, _type, kind in _KINDS:
        registry: Registry[Any] = getattr(registries, attr)
        for key in registry.names():
            plugin = registry.plugin_of(key)
            rows[plugin]["registers"].setdefault(kind, []).append(key)
    return list(rows.values())
