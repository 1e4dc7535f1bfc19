"""weighttracker: canonical units, metrics, regularizers and pruning for PyTorch models.

``from weighttracker_core import WeightTracker`` is the entry point; everything listed in
``__all__`` is public API, the rest is internal.
"""

from __future__ import annotations

import importlib.metadata

from .consumers import ConsumerContext, RegularizerHandle, TrackerHandle
from .metric_format import flatten_metrics, to_python
from .dag import CalculationGraph, Evaluation
from .forwards import train_mode_forward
from .errors import (
    ArgumentTypeError,
    CalculationCycleError,
    ConfigError,
    CouplingError,
    DuplicateNameError,
    NonFiniteWeightError,
    HandleAttributeError,
    MissingDependencyError,
    PlanError,
    PluginError,
    PruningError,
    StaleConsumerError,
    UnitIndexError,
    UnknownNameError,
    UnsupportedModuleError,
    WeightTrackerError,
)
from .heads import AttentionChange, AttentionLayout
from .hookspecs import hookimpl, hookspec
from .manager import PluginInfo, PluginManager, create_plugin_manager, default_plugin_manager
from .masking import stored_parameter
from .persistence import apply_pruning_record
from .plans import ReductionPlan, effective_parameter, safe_sqrt
from .registry import describe_plugins
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
from .surgery import PruneReport
from .bitwidths import check_bitwidth
from .tracker import WeightTracker
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
    "ArgumentTypeError",
    "AttentionChange",
    "AttentionLayout",
    "AttentionLayoutRule",
    "CalculationCycleError",
    "CalculationGraph",
    "CalculationSpec",
    "CanonicalMember",
    "CanonicalUnitGroup",
    "ConfigError",
    "ConsumerContext",
    "CouplingError",
    "DuplicateNameError",
    "Evaluation",
    "HandleAttributeError",
    "HeadPruner",
    "ImportanceSpec",
    "IntegrationSpec",
    "LayerCategory",
    "LayerPruner",
    "Lifetime",
    "MemberSlice",
    "MissingDependencyError",
    "ModelSourceSpec",
    "NonFiniteWeightError",
    "ParamRole",
    "ParamSlice",
    "PlanError",
    "PluginError",
    "PluginInfo",
    "PluginManager",
    "PruneAxis",
    "PruneReport",
    "PrunerSpec",
    "PruningError",
    "ReductionPlan",
    "RegularizerHandle",
    "RegularizerSpec",
    "RegularizerType",
    "Selection",
    "StaleConsumerError",
    "Structure",
    "TrackerHandle",
    "TrackerSpec",
    "TrackerType",
    "UnitIndexError",
    "UnitKind",
    "UnitRule",
    "UnknownNameError",
    "UnsupportedModuleError",
    "UnwrappedParameter",
    "WeightTracker",
    "WeightTrackerError",
    "apply_pruning_record",
    "check_bitwidth",
    "create_plugin_manager",
    "default_plugin_manager",
    "describe_plugins",
    "effective_parameter",
    "flatten_metrics",
    "hookimpl",
    "hookspec",
    "safe_sqrt",
    "stored_parameter",
    "to_python",
    "train_mode_forward",
]

__version__ = importlib.metadata.version("weighttracker")
