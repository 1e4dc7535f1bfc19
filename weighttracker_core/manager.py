"""Plugin managers: entry-point loading, blocking and the process-wide default.

Plugins are discovered through the ``weighttracker`` entry-point group with our own loop
(not ``pluggy.PluginManager.load_setuptools_entrypoints``) so that a duplicate entry-point
name and a failing import are errors that name the distributions involved, instead of
being skipped silently.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import inspect
import os
import types
import warnings
from collections.abc import Iterable
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import DuplicateNameError, PluginError

ENTRY_POINT_GROUP = "weighttracker"
DISABLE_ENV_VAR = "WEIGHTTRACKER_DISABLE_PLUGINS"


@attrs.frozen(kw_only=True)
class PluginInfo:
    """Where a registered plugin came from.

    ``distribution`` and ``version`` are ``None`` for plugins registered at run time
    (``WeightTracker(plugins=[...])``); ``source`` is the entry point's value or the
    plugin's module name.
    """

    name: str
    distribution: str | None
    version: str | None
    source: str


class PluginManager(pluggy.PluginManager):
    """A ``pluggy.PluginManager`` for project ``weighttracker`` that remembers origins.

    Attributes:
        derived: What is computed from the registered plugins (the registries, under
            ``"registries"``), cached here and dropped whenever a plugin is registered or
            unregistered.
    """

    derived: dict[str, Any]

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self._wt_info: dict[str, PluginInfo] = {}
        self.derived = {}

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        """Register ``plugin``; a hook implementation with arguments raises ``PluginError``."""
        try:
            registered = super().register(plugin, name)
        except pluggy.PluginValidationError as err:
            raise PluginError(_validation_message(name or plugin_name_of(plugin), plugin, err)) from err
        self.derived.clear()
        return registered

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        removed = super().unregister(plugin, name)
        self.derived.clear()
        return removed

    def plugin_info(self, name: str) -> PluginInfo:
        """Origin of the plugin registered as ``name``."""
        if name in self._wt_info:
            return self._wt_info[name]
        plugin = self.get_plugin(name)
        return PluginInfo(name=name, distribution=None, version=None, source=_source_of(plugin))

    def describe(self, name: str) -> str:
        """``"name (distribution version)"``, for error messages."""
        info = self.plugin_info(name)
        if info.distribution is None:
            return f"{name!r} (registered at run time from {info.source})"
        return f"{name!r} (distribution {info.distribution} {info.version})"

    def registered_names(self) -> list[str]:
        """Names of the registered (not blocked) plugins, in registration order."""
        return [name for name, plugin in self.list_name_plugin() if plugin is not None]


def _validation_message(name: str, plugin: Any, err: pluggy.PluginValidationError) -> str:
    """pluggy's complaint about one hook implementation, with the plugin, hook and fix."""
    hooks = ", ".join(f"{h}()" for h in hookspecs.HOOK_NAMES)
    for hook in hookspecs.HOOK_NAMES:
        impl = getattr(plugin, hook, None)
        if impl is None:
            continue
        try:
            args = list(inspect.signature(impl).parameters)
        except (TypeError, ValueError):
            continue
        if args:
            return (
                f"Plugin {name!r} implements {hook}() with argument(s) "
                f"{', '.join(map(repr, args))}, but every weighttracker hook takes none. "
                f"Write `def {hook}():` (a method takes only self) and return a tuple of specs."
            )
    return f"Plugin {name!r} does not match the weighttracker hooks ({hooks}): {err}"


def _source_of(plugin: Any) -> str:
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    return f"{type(plugin).__module__}.{type(plugin).__qualname__}"


def plugin_name_of(plugin: Any) -> str:
    """The name a run-time plugin is registered under: its module or class name."""
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    explicit = getattr(plugin, "wt_plugin_name", None)
    if isinstance(explicit, str):
        return explicit
    return f"{_source_of(plugin)}@{id(plugin):x}"


def blocked_from_env(environ: dict[str, str] | None = None) -> set[str]:
    """Plugin names listed (comma-separated) in ``WEIGHTTRACKER_DISABLE_PLUGINS``."""
    value = (os.environ if environ is None else environ).get(DISABLE_ENV_VAR, "")
    return {part.strip() for part in value.split(",") if part.strip()}


def warn_unknown_blocked(names: Iterable[str], installed: Iterable[str]) -> None:
    """Warn about ``WEIGHTTRACKER_DISABLE_PLUGINS`` names that match no installed entry point.

    A typo (``nvidia_24_sparsity``) would otherwise block nothing, silently. It is a
    warning, not an error: a name left over from a plugin that was uninstalled since does
    what was asked (the plugin is not loaded) and must not break every program.
    """
    installed = sorted(set(installed))
    unknown = sorted(set(names) - set(installed))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, installed, n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    warnings.warn(
        f"{DISABLE_ENV_VAR} names {len(unknown)} plugin(s) that are not installed, so they block "
        f"nothing: {', '.join(hints)}. Installed plugins (entry points of group "
        f"{ENTRY_POINT_GROUP!r}): {', '.join(installed) or 'none'}. Use those names, comma-separated; "
        "`weighttracker plugins` lists them.",
        UserWarning,
        stacklevel=3,
    )


def _distribution(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def discover_entry_points(
    group: str = ENTRY_POINT_GROUP,
) -> list[importlib.metadata.EntryPoint]:
    """Entry points of ``group``, one per name; a name claimed twice raises.

    The same distribution seen twice on ``sys.path`` (an editable install next to a
    regular one, say) is not a conflict; two different distributions or targets are.
    """
    by_name: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=group):
        previous = by_name.get(ep.name)
        if previous is None:
            by_name[ep.name] = ep
            continue
        if (_distribution(previous)[0], previous.value) == (_distribution(ep)[0], ep.value):
            continue
        first, second = _distribution(previous), _distribution(ep)
        raise DuplicateNameError(
            f"Two plugins claim the entry-point name {ep.name!r} in group {group!r}: "
            f"{previous.value!r} from distribution {first[0]} {first[1]} and "
            f"{ep.value!r} from distribution {second[0]} {second[1]}. "
            "Uninstall one of them, or rename one entry point."
        )
    return sorted(by_name.values(), key=lambda ep: ep.name)


def create_plugin_manager(
    *plugins: Any,
    entry_points: bool = True,
    blocked: Iterable[str] = (),
    builtins_only: bool = False,
    use_env: bool = True,
) -> PluginManager:
    """Build a plugin manager.

    Args:
        *plugins: Extra plugin objects or modules, registered after the entry points.
        entry_points: Load every entry point of group ``weighttracker``.
        blocked: Plugin names not to load (added to ``WEIGHTTRACKER_DISABLE_PLUGINS``).
        builtins_only: Load only entry points of the ``weighttracker`` distribution itself.
        use_env: Honour ``WEIGHTTRACKER_DISABLE_PLUGINS``; a name there that is no installed
            entry point gives a ``UserWarning`` listing the installed names.

    Raises:
        DuplicateNameError: Two distributions declare the same entry-point name.
        PluginError: An entry point fails to import, or a plugin implements an unknown hook.
    """
    pm = PluginManager()
    from_env = blocked_from_env() if use_env else set()
    for name in sorted(set(blocked) | from_env):
        pm.set_blocked(name)
    if entry_points:
        _load_entry_points(pm, from_env, builtins_only)
    for plugin in plugins:
        add_plugin(pm, plugin)
    check(pm)
    return pm


def _load_entry_points(pm: PluginManager, from_env: set[str], builtins_only: bool) -> None:
    """Register every entry point of group ``weighttracker`` that is not blocked."""
    found = discover_entry_points()
    warn_unknown_blocked(from_env, [ep.name for ep in found])
    for ep in found:
        dist_name, version = _distribution(ep)
        if (builtins_only and dist_name != "weighttracker") or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as err:
            raise PluginError(
                f"Plugin entry point {ep.name!r} = {ep.value!r} of distribution "
                f"{dist_name} {version} failed to import: {type(err).__name__}: {err}. "
                f"Fix or reinstall that distribution, or set {DISABLE_ENV_VAR}={ep.name} "
                "to skip it."
            ) from err
        pm.register(plugin, name=ep.name)
        pm._wt_info[ep.name] = PluginInfo(
            name=ep.name, distribution=dist_name, version=version, source=ep.value
        )


def add_plugin(pm: PluginManager, plugin: Any, name: str | None = None) -> str:
    """Register ``plugin`` on ``pm`` unless that very object is already registered."""
    if pm.is_registered(plugin):
        return pm.get_name(plugin) or ""
    name = name or plugin_name_of(plugin)
    if pm.is_blocked(name):
        return name
    if pm.has_plugin(name):
        raise DuplicateNameError(
            f"A different plugin is already registered as {name!r}: "
            f"{pm.describe(name)}. Give the new plugin a distinct name."
        )
    pm.register(plugin, name=name)
    return name


def derive_plugin_manager(base: PluginManager, extras: Iterable[Any]) -> PluginManager:
    """A new manager holding ``base``'s plugins plus ``extras`` (``base`` is untouched)."""
    pm = PluginManager()
    for name, plugin in base.list_name_plugin():
        if plugin is None:
            pm.set_blocked(name)
            continue
        pm.register(plugin, name=name)
        pm._wt_info[name] = base.plugin_info(name)
    for plugin in extras:
        add_plugin(pm, plugin)
    check(pm)
    return pm


def check(pm: PluginManager) -> None:
    """Raise ``PluginError`` if a plugin implements a hook that does not exist."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        name = pm.get_name(err.plugin) if err.plugin is not None else None
        where = pm.describe(name) if name else repr(err.plugin)
        bad = str(err).split("hook ", 1)[-1].split()[0].strip("'\"") if "hook" in str(err) else ""
        close = difflib.get_close_matches(bad, hookspecs.HOOK_NAMES, n=1) if bad else []
        hint = f" Did you mean {close[0]}()? Rename the function." if close else ""
        raise PluginError(
            f"Plugin {where} implements an unknown hook: {err}.{hint} "
            f"Known hooks: {', '.join(hookspecs.HOOK_NAMES)}."
        ) from err


@functools.cache
def default_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, built on first call from the entry points.

    Call ``default_plugin_manager.cache_clear()`` to rebuild it (tests do).
    """
    return create_plugin_manager()
