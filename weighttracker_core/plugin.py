"""The plugin author's API, in one import: ``from weighttracker_core.plugin import ...``.

Everything a plugin returns from a hook, receives in ``build(ctx)`` / ``compute(evaluation)``
and raises is here: the ``hookimpl`` marker, the spec classes, the enums, the unit-rule and
layer-pruner contracts, typed protocols for the contexts and for what factories build, and
the errors. The concrete classes behind the protocols (``Structure``, ``ReductionPlan``,
``ConsumerContext``, ``CalculationGraph``) and a few helpers for first-party-style plugins
(``effective_parameter``, ``stored_parameter``, ``safe_sqrt``) are here too. A plugin that imports only this module is checked by ``mypy --strict`` against
these types (see ``docs/writing-plugins.md``).

Example:
    >>> from weighttracker_core.plugin import TrackerSpec, hookimpl
    >>> class Count:
    ...     def __init__(self, ctx):
    ...         self.n = ctx.structure.num_units
    ...     def track(self, values):
    ...         return {"units": self.n}
    >>> @hookimpl
    ... def wt_register_trackers():
    ...     return (TrackerSpec(name="count_units", build=Count),)
"""

from __future__ import annotations

from .context import (
    DEFAULT_BITS,
    BitwidthFn,
    Bitwidths,
    BuildContext,
    CalculationDAG,
    Compute,
    CostFunction,
    Evaluation,
    Importance,
    ImportanceFactory,
    Integration,
    LayerInfo,
    LayerSelection,
    ModelFunction,
    PruneCallback,
    Pruner,
    PrunerFactory,
    PruneValidator,
    Regularizer,
    RegularizerFactory,
    SliceFunction,
    StructureQueries,
    Tracker,
    TrackerAccess,
    TrackerFactory,
    UnitPlan,
    check_bitwidth,
)
from .consumers import ConsumerContext
from .dag import CalculationGraph
from .errors import (
    ConfigError,
    DuplicateNameError,
    NonFiniteWeightError,
    PluginError,
    PruningError,
    UnknownNameError,
    UnsupportedModuleError,
    WeightTrackerError,
)
from .heads import AttentionChange, AttentionLayout
from .hookspecs import HOOK_NAMES, HOOKS, Hook, hookimpl, hookspec
from .masking import stored_parameter
from .plan_layout import common_factorisation
from .plans import ReductionPlan, effective_parameter, safe_sqrt
from .metric_format import finite_scalars, flatten_metrics, to_python
from .specs import (
    AttentionLayoutRule,
    CalculationSpec,
    HeadPruner,
    ImportanceSpec,
    IntegrationSpec,
    LayerCategory,
    LayerPruner,
    Lifetime,
    ModelSourceSpec,
    PrunerSpec,
    RegularizerSpec,
    RegularizerType,
    TrackerSpec,
    TrackerType,
    UnitRule,
    UnwrappedParameter,
)
from .structure import Selection, Structure
from .units import (
    CanonicalMember,
    CanonicalUnitGroup,
    MemberSlice,
    ParamRole,
    ParamSlice,
    PruneAxis,
    UnitKind,
)

__all__ = [
    "DEFAULT_BITS",
    "HOOKS",
    "HOOK_NAMES",
    "AttentionChange",
    "AttentionLayout",
    "AttentionLayoutRule",
    "BitwidthFn",
    "Bitwidths",
    "BuildContext",
    "CalculationDAG",
    "CalculationGraph",
    "CalculationSpec",
    "CanonicalMember",
    "CanonicalUnitGroup",
    "Compute",
    "ConfigError",
    "ConsumerContext",
    "CostFunction",
    "DuplicateNameError",
    "Evaluation",
    "HeadPruner",
    "Hook",
    "Importance",
    "ImportanceFactory",
    "ImportanceSpec",
    "Integration",
    "IntegrationSpec",
    "LayerCategory",
    "LayerInfo",
    "LayerPruner",
    "LayerSelection",
    "Lifetime",
    "MemberSlice",
    "ModelFunction",
    "ModelSourceSpec",
    "NonFiniteWeightError",
    "ParamRole",
    "ParamSlice",
    "PluginError",
    "PruneAxis",
    "PruneCallback",
    "PruneValidator",
    "Pruner",
    "PrunerFactory",
    "PrunerSpec",
    "PruningError",
    "ReductionPlan",
    "Regularizer",
    "RegularizerFactory",
    "RegularizerSpec",
    "RegularizerType",
    "Selection",
    "SliceFunction",
    "Structure",
    "StructureQueries",
    "Tracker",
    "TrackerFactory",
    "TrackerSpec",
    "TrackerAccess",
    "TrackerType",
    "UnitKind",
    "UnitPlan",
    "UnitRule",
    "UnknownNameError",
    "UnsupportedModuleError",
    "UnwrappedParameter",
    "WeightTrackerError",
    "check_bitwidth",
    "common_factorisation",
    "effective_parameter",
    "finite_scalars",
    "flatten_metrics",
    "hookimpl",
    "hookspec",
    "safe_sqrt",
    "stored_parameter",
    "to_python",
]
