"""Hook specifications of the ``weighttracker`` plugin system (SPEC §8).

Every hook is a *registration hook*: it takes no arguments, returns a tuple of specs and
is called once per plugin manager when the registries are built (never in a training
loop). The core owns dispatch, ordering and duplicate detection, so no hook is
``firstresult`` and nothing depends on ``tryfirst`` / ``trylast``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
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


@hookspec
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    """Return the unit rules this plugin provides.

    A rule covers its module types and their subclasses; the nearest registered ancestor
    in a module's MRO wins. Two rules with the same name, or two rules for the same type,
    raise ``DuplicateNameError``. Added in 0.1.
    """


@hookspec
def wt_register_calculations() -> tuple[CalculationSpec, ...]:
    """Return named calculations for the calculation DAG.

    Trackers, regularizers and importances ask for them by name. A name registered twice
    raises ``DuplicateNameError``. Added in 0.1.
    """


@hookspec
def wt_register_trackers() -> tuple[TrackerSpec, ...]:
    """Return metric trackers, created with ``WeightTracker.create_tracker(name)``.

    A name registered twice raises ``DuplicateNameError``. Added in 0.1.
    """


@hookspec
def wt_register_regularizers() -> tuple[RegularizerSpec, ...]:
    """Return regularizers, created with ``WeightTracker.create_regularizer(name)``.

    A name registered twice raises ``DuplicateNameError``. Added in 0.1.
    """


@hookspec
def wt_register_importances() -> tuple[ImportanceSpec, ...]:
    """Return importance criteria that ranked pruners score units with.

    A name registered twice raises ``DuplicateNameError``. Added in 0.1.
    """


@hookspec
def wt_register_pruners() -> tuple[PrunerSpec, ...]:
    """Return pruning algorithms, created with ``WeightTracker.create_pruner(name)``.

    A name registered twice raises ``DuplicateNameError``. Added in 0.1.
    """


@hookspec
def wt_register_integrations() -> tuple[IntegrationSpec, ...]:
    """Return model integrations (fill tracker options from a model, sync after pruning).

    Selected with ``WeightTracker(integrations="auto" | [names] | None)``. A name
    registered twice raises ``DuplicateNameError``. Added in 0.1.
    """


@hookspec
def wt_register_model_sources() -> tuple[ModelSourceSpec, ...]:
    """Return model sources for ``weighttracker inspect PREFIX:NAME``.

    Keyed by prefix; a prefix registered twice raises ``DuplicateNameError``. Added in 0.1.
    """


@hookspec
def wt_register_attention_layouts() -> tuple[AttentionLayoutRule, ...]:
    """Return attention layout rules: how an attention module's projections form heads.

    A rule covers module types (and subclasses, nearest ancestor wins) and maps one such
    module to an ``AttentionLayout`` of its q / k / v / o projections, or ``None``. Needed
    only where the traced forward does not show the heads (the tracker reads them off
    the graph otherwise). Two rules for one type raise ``DuplicateNameError``. Added in 0.2.
    """


HOOK_NAMES = (
    "wt_register_unit_rules",
    "wt_register_calculations",
    "wt_register_trackers",
    "wt_register_regularizers",
    "wt_register_importances",
    "wt_register_pruners",
    "wt_register_integrations",
    "wt_register_model_sources",
    "wt_register_attention_layouts",
)
