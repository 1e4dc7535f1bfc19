"""The options that decide a tracker's structure, from the user and from integrations.

The user's options are checked once; integrations fill in what the user left out (head
counts, forwards, attention layouts) and are asked again at every rebuild, because a
physical prune changes what they read off the model. After a prune the user's own
``num_heads`` and ``attention_layouts`` are brought to the new head counts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import attrs
from torch import nn

from . import options as opt
from .errors import ConfigError
from .heads import (
    AttentionChange,
    AttentionLayout,
    fused_heads_removed,
    layouts_after_prune,
    num_heads_after_prune,
)
from .manager import PluginManager, default_plugin_manager, derive_plugin_manager
from .registry import Registries
from .specs import IntegrationSpec
from .structure import Structure, StructureOptions


def select_integrations(
    registries: Registries, model: nn.Module, integrations: Any
) -> tuple[IntegrationSpec, ...]:
    """``"auto"`` (every installed integration that applies), a list of names, or ``None``."""
    registry = registries.integrations
    if integrations is None:
        return ()
    if isinstance(integrations, str):
        if integrations != "auto":
            raise ConfigError(
                f"integrations must be 'auto', a list of names or None; got {integrations!r}."
            )
        return tuple(spec for spec in registry.specs() if spec.applies_to(model))
    return tuple(registry.get(name) for name in integrations)


#: ``WeightTracker`` keywords that decide the structure (see ``StructureSettings.create``).
STRUCTURE_KEYWORDS = (
    "num_heads", "prune_num_heads", "prune_head_dims", "attention_layouts", "prune_model_outputs",
    "ignored_layers", "unwrapped_parameters", "root_module_types", "forward_fn", "output_transform",
)


def plugin_manager_for(plugin_manager: PluginManager | None, plugins: Iterable[Any]) -> PluginManager:
    """The given (or process-wide) manager, derived with ``plugins`` for one tracker."""
    base = plugin_manager if plugin_manager is not None else default_plugin_manager()
    extras = tuple(plugins)
    return derive_plugin_manager(base, extras) if extras else base


def _filled(integrations: Sequence[IntegrationSpec], model: nn.Module) -> dict[str, Any]:
    """Tracker options the integrations read off the model as it is now."""
    filled: dict[str, Any] = {}
    for integration in integrations:
        filled.update(integration.tracker_options(model) or {})
    return filled


@attrs.frozen(kw_only=True)
class StructureSettings:
    """The user's structure options, the integrations, and the options they give now."""

    model: nn.Module
    integrations: tuple[IntegrationSpec, ...]
    user_num_heads: dict[nn.Module, int] | None
    user_layouts: tuple[AttentionLayout, ...]
    options: StructureOptions

    @classmethod
    def create(
        cls, model: nn.Module, integrations: tuple[IntegrationSpec, ...], user: Mapping[str, Any]
    ) -> StructureSettings:
        """Check the user's options (``WeightTracker`` keywords) and fill in the rest."""
        user = {k: v for k, v in user.items() if k in STRUCTURE_KEYWORDS}
        num_heads = opt.check_num_heads(user["num_heads"])
        layouts = opt.check_layouts(user["attention_layouts"])
        filled = _filled(integrations, model)
        heads = num_heads if num_heads is not None else filled.get("num_heads")
        options = StructureOptions(
            num_heads=dict(heads or {}),
            prune_num_heads=opt.check_bool(user["prune_num_heads"], "prune_num_heads"),
            prune_head_dims=opt.check_bool(user["prune_head_dims"], "prune_head_dims"),
            ignored_layers=opt.check_modules(model, user["ignored_layers"], "ignored_layers"),
            unwrapped_parameters=user["unwrapped_parameters"],
            root_module_types=opt.check_module_types(user["root_module_types"], "root_module_types"),
            forward_fn=opt.check_callable(
                _first(user["forward_fn"], filled.get("forward_fn")),
                "forward_fn", "(model, example_inputs) -> output",
            ),
            output_transform=opt.check_callable(
                _first(user["output_transform"], filled.get("output_transform")),
                "output_transform", "(output) -> tensors",
            ),
            attention_layouts=layouts or opt.check_layouts(filled.get("attention_layouts")),
            prune_model_outputs=opt.check_bool(user["prune_model_outputs"], "prune_model_outputs"),
        )
        return cls(model=model, integrations=integrations, user_num_heads=num_heads,
                   user_layouts=layouts, options=options)

    def for_build(self, version: int) -> StructureSettings:
        """These settings with what the integrations read off the model now."""
        options = self.options
        if self.integrations and version > 0:
            filled = _filled(self.integrations, self.model)
            if self.user_num_heads is None:
                options = attrs.evolve(options, num_heads=dict(filled.get("num_heads") or {}))
            layouts = self.user_layouts or opt.check_layouts(filled.get("attention_layouts"))
            options = attrs.evolve(options, attention_layouts=layouts)
        ignored = tuple(
            p for integration in self.integrations
            for p in (integration.ignored_parameters(self.model) or ())
        )
        return attrs.evolve(self, options=attrs.evolve(options, ignored_params=ignored))

    def after_prune(
        self, structure: Structure, units: Mapping[int, Collection[int]],
        changes: Mapping[str, AttentionChange],
    ) -> StructureSettings:
        """The user's head counts and layouts after ``units`` of ``structure`` are removed."""
        options, num_heads, layouts = self.options, self.user_num_heads, self.user_layouts
        if num_heads is not None:
            removed = fused_heads_removed(structure.groups, units, structure.layouts)
            num_heads = num_heads_after_prune(num_heads, removed, changes, structure.module)
            options = attrs.evolve(options, num_heads=dict(num_heads))
        if layouts and changes:
            names = {id(m): n for n, m in self.model.named_modules()}
            layouts = layouts_after_prune(layouts, changes, lambda m: names.get(id(m), ""))
            options = attrs.evolve(options, attention_layouts=layouts)
        return attrs.evolve(self, user_num_heads=num_heads, user_layouts=layouts, options=options)


def _first(given: Callable[..., Any] | None, filled: Any) -> Any:
    return given if given is not None else filled
