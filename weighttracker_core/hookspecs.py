"""Hook specifications of the ``weighttracker`` plugin system.

Every hook is a *registration hook*: it takes no arguments, returns a tuple of specs and
is called once per plugin manager when the registries are built (never in a training
loop). The core owns dispatch, ordering and duplicate detection, so no hook is
``firstresult`` and nothing depends on ``tryfirst`` / ``trylast``.

:data:`HOOKS` is the one list of hooks: the registries, the error messages, the CLI and
the documentation tests all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import pluggy

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

PROJECT_NAME = "weighttracker"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@attrs.frozen
class Hook:
    """One registration hook: its name, the spec class it returns and what the specs are.

    ``registry`` is the attribute of the registries holding them (``"trackers"``), ``kind``
    the words error messages use (``"tracker"``), ``key`` the spec field they are keyed by.
    """

    name: str
    spec_type: type
    kind: str
    key: str = "name"

    @property
    def registry(self) -> str:
        return self.name.removeprefix("wt_register_")


_DECLARED: list[Hook] = []
F = TypeVar("F", bound=Callable[..., Any])


def _hook(spec_type: type, kind: str, key: str = "name") -> Callable[[F], F]:
    def mark(fn: F) -> F:
        _DECLARED.append(Hook(fn.__name__, spec_type, kind, key))
        return hookspec(fn)

    return mark


@_hook(UnitRule, "unit rule")
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    """Return the unit rules this plugin provides.

    A rule covers its module types and their subclasses; the nearest registered ancestor
    in a module's MRO wins. Two rules with the same name, or two rules for the same type,
    raise ``DuplicateNameError``. Added in 0.1.
    """
    raise NotImplementedError  # a specification: pluggy never calls it


@_hook(CalculationSpec, "calculation")
def wt_register_calculations() -> tuple[CalculationSpec, ...]:
    """Return named calculations for the calculation DAG.

    Trackers, regularizers and importances ask for them by name. A name registered twice
    raises ``DuplicateNameError``. Added in 0.1.
    """
    raise NotImplementedError  # a specification: pluggy never calls it


@_hook(TrackerSpec, "tracker")
def wt_register_trackers() -> tuple[TrackerSpec, ...]:
    """Return metric trackers, created with ``WeightTracker.create_tracker(name)``.

    A name registered twice raises ``DuplicateNameError``. Added in 0.1.
    """
    raise NotImplementedError  # a specification: pluggy never calls it


@_hook(RegularizerSpec, "regularizer")
def wt_register_regularizers() -> tuple[RegularizerSpec, ...]:
    """Return regularizers, created with ``WeightTracker.create_regularizer(name)``.

    A name registered twice raises ``DuplicateNameError``. Added in 0.1.
    """
    raise NotImplementedError  # a specification: pluggy never calls it


@_hook(ImportanceSpec, "importance")
def wt_register_importances() -> tuple[ImportanceSpec, ...]:
    """Return importance criteria that ranked pruners score units with.

    A name registered twice raises ``DuplicateNameError``. Added in 0.1.
    """
    raise NotImplementedError  # a specification: pluggy never calls it


@_hook(PrunerSpec, "pruner")
def wt_register_pruners() -> tuple[PrunerSpec, ...]:
    """Return pruning algorithms, created with ``WeightTracker.create_pruner(name)``.

    A name registered twice raises ``DuplicateNameError``. Added in 0.1.
    """
    raise NotImplementedError  # a specification: pluggy never calls it


@_hook(IntegrationSpec, "integration")
def wt_register_integrations() -> tuple[IntegrationSpec, ...]:
    """Return model integrations (fill tracker options from a model, sync after pruning).

    Selected with ``WeightTracker(integrations="auto" | [names] | None)``. A name
    registered twice raises ``DuplicateNameError``. Added in 0.1.
    """
    raise NotImplementedError  # a specification: pluggy never calls it


@_hook(ModelSourceSpec, "model source", key="prefix")
def wt_register_model_sources() -> tuple[ModelSourceSpec, ...]:
    """Return model sources for ``weighttracker inspect PREFIX:NAME``.

    Keyed by prefix; a prefix registered twice raises ``DuplicateNameError``. Added in 0.1.
    """
    raise NotImplementedError  # a specification: pluggy never calls it


@_hook(AttentionLayoutRule, "attention layout rule")
def wt_register_attention_layouts() -> tuple[AttentionLayoutRule, ...]:
    """Return attention layout rules: how an attention module's projections form heads.

    A rule covers module types (and subclasses, nearest ancestor wins) and maps one such
    module to an ``AttentionLayout`` of its q / k / v / o projections, or ``None``. Needed
    only where the traced forward does not show the heads (the tracker reads them off
    the graph otherwise). Two rules for one type raise ``DuplicateNameError``. Added in 0.2.
    """
    raise NotImplementedError  # a specification: pluggy never calls it


#: Every registration hook, in declaration order.
HOOKS: tuple[Hook, ...] = tuple(_DECLARED)
#: Names of every hook, in declaration order (derived from :data:`HOOKS`).
HOOK_NAMES: tuple[str, ...] = tuple(hook.name for hook in HOOKS)
