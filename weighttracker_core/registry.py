"""Registries: name -> (spec, plugin) tables built from the registration hooks.

Each hook implementation is called through pluggy's public ``get_hookimpls()`` so that
every contribution is attributed to the plugin that made it: duplicate names can then
name both plugins and their distributions, and ``weighttracker plugins`` can
say what each plugin registers.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import attrs

from .errors import DuplicateNameError, PluginError, UnknownNameError
from .hookspecs import HOOKS, Hook
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
    #: ``pm.describe(plugin)``: the plugin with its distribution, for error messages.
    origin: str = ""


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

    def build(self, name: Any, ctx: Any) -> Any:
        """``spec.build(ctx)`` of the spec registered as ``name``, its product checked.

        Raises:
            PluginError: The product lacks what its kind needs (a tracker's ``track()``,
                a regularizer's or importance's ``__call__``, a pruner's ``step()``); the
                message names the plugin.
        """
        key = name.value if hasattr(name, "value") else str(name)
        spec = self.get(key)
        product = spec.build(ctx)  # type: ignore[attr-defined]
        needs = _PRODUCT_NEEDS.get(self.kind)
        if needs is not None and not callable(getattr(product, needs, None)):
            entry = self._entries[key]
            raise PluginError(
                f"The {self.kind} {key!r} of plugin {entry.origin or entry.plugin!r} was built by "
                f"{_label(spec.build)}, which returned {type(product).__name__} "  # type: ignore[attr-defined]
                f"without a {needs}() method. {_PRODUCT_FIX[self.kind]}"
            )
        return product

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


_TYPED = ("unit_rules", "attention_layouts")

#: What the product of each kind's ``build(ctx)`` must have, and how to give it one.
_PRODUCT_NEEDS = {"tracker": "track", "regularizer": "__call__", "importance": "__call__",
                  "pruner": "step"}
_PRODUCT_FIX = {
    "tracker": "Give it `def track(self, values) -> dict` returning the metrics.",
    "regularizer": "Give it `def __call__(self, values) -> torch.Tensor` returning a scalar loss.",
    "importance": "Give it `def __call__(self, values) -> torch.Tensor` with one score per unit.",
    "pruner": "Give it `def step(self)` running one step of its schedule.",
}


def _label(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _defines(cls: type, method: str) -> bool:
    """Whether instances of ``cls`` have ``method`` (``type.__call__`` does not count)."""
    return any(method in vars(klass) for klass in cls.__mro__ if klass is not object)


def _contributions_of(pm: PluginManager, impl: Any, hook: str) -> list[Any]:
    try:
        result = impl.function()
    except Exception as err:
        raise PluginError(
            f"Plugin {pm.describe(impl.plugin_name)} failed in {hook}(): "
            f"{type(err).__name__}: {err}"
        ) from err
    if result is None:
        return []
    if attrs.has(type(result)) or isinstance(result, (str, bytes)) or not hasattr(result, "__iter__"):
        raise PluginError(
            f"Plugin {pm.describe(impl.plugin_name)} returned a bare {type(result).__name__} from "
            f"{hook}(); registration hooks return a tuple of specs. Write `return (spec,)`."
        )
    return list(result)


def contributions(pm: PluginManager, hook: str) -> list[tuple[str, Any]]:
    """``(plugin name, spec)`` for every spec every plugin returns from ``hook``."""
    out: list[tuple[str, Any]] = []
    caller = getattr(pm.hook, hook)
    # get_hookimpls() lists last-registered first; reverse for registration order
    for impl in reversed(caller.get_hookimpls()):
        for spec in _contributions_of(pm, impl, hook):
            out.append((impl.plugin_name, spec))
    return out


def check_spec(pm: PluginManager, plugin: str, hook: Hook, spec: Any) -> None:
    """Raise ``PluginError`` naming plugin, hook and fix if ``spec`` breaks the contract.

    Checked: the spec type belongs to ``hook``; options / config classes are attrs classes
    (their fields are the keyword options); a factory that is a class builds objects with
    the method their kind needs.
    """
    where = f"Plugin {pm.describe(plugin)} returned"
    if not isinstance(spec, hook.spec_type):
        right = next((h.name for h in HOOKS if isinstance(spec, h.spec_type)), None)
        fix = (f"Return it from {right}() instead." if right else
               f"Return {hook.spec_type.__name__}(...) instances.")
        raise PluginError(
            f"{where} {type(spec).__name__} from {hook.name}(); that hook expects "
            f"{hook.spec_type.__name__} instances. {fix}"
        )
    name = getattr(spec, hook.key)
    for field in ("options", "config"):
        cls = getattr(spec, field, None)
        if cls is not None and not (isinstance(cls, type) and attrs.has(cls)):
            what = ("a dataclass" if dataclasses.is_dataclass(cls) else
                    f"a {type(cls).__name__}" if not isinstance(cls, type) else "not an attrs class")
            raise PluginError(
                f"{where} the {hook.kind} {name!r} from {hook.name}() with {field}="
                f"{_label(cls)}, which is {what}; weighttracker reads the keyword options from "
                f"the fields of an attrs class. Decorate {_label(cls)} with "
                "@attrs.frozen(kw_only=True) (or @attrs.define) instead."
            )
    factory = getattr(spec, "build", None)
    needs = _PRODUCT_NEEDS.get(hook.kind)
    if factory is not None and not callable(factory):
        raise PluginError(
            f"{where} the {hook.kind} {name!r} from {hook.name}() with build={factory!r}, which "
            "is not callable. Pass a class or function taking the build context."
        )
    if needs is not None and isinstance(factory, type) and not _defines(factory, needs):
        raise PluginError(
            f"{where} the {hook.kind} {name!r} from {hook.name}() with build={factory.__qualname__}, "
            f"which has no {needs}() method. {_PRODUCT_FIX[hook.kind]}"
        )


def build_registries(pm: PluginManager) -> Registries:
    """Collect every registration hook of ``pm`` (cached in ``pm.derived``), checking each spec.

    Raises:
        PluginError: A plugin breaks the contract (see :func:`check_spec`).
        DuplicateNameError: Two plugins register one name (or two rules one type).
    """
    cached = pm.derived.get("registries")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    built: dict[str, Any] = {}
    for hook in HOOKS:
        attr, kind = hook.registry, hook.kind
        entries: dict[str, Entry[Any]] = {}
        by_type: dict[type, str] = {}
        for plugin, spec in contributions(pm, hook.name):
            check_spec(pm, plugin, hook, spec)
            key = getattr(spec, hook.key)
            if key in entries:
                raise DuplicateNameError(
                    f"The {kind} name {key!r} is registered twice: by plugin "
                    f"{pm.describe(entries[key].plugin)} and by plugin {pm.describe(plugin)}. "
                    f"Block one of them: set WEIGHTTRACKER_DISABLE_PLUGINS={plugin} (or "
                    f"={entries[key].plugin}), or rename one {kind}."
                )
            entries[key] = Entry(spec, plugin, pm.describe(plugin))
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
    registries = Registries(**built)
    pm.derived["registries"] = registries
    return registries


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
    for hook in HOOKS:
        registry: Registry[Any] = getattr(registries, hook.registry)
        for key in registry.names():
            plugin = registry.plugin_of(key)
            rows[plugin]["registers"].setdefault(hook.kind, []).append(key)
    return list(rows.values())
