"""weighttracker: canonical units, metrics, regularizers and pruning for PyTorch models.

``from weighttracker_core import WeightTracker`` is the entry point; everything listed in
``__all__`` is the user API (the tracker, what it returns, the errors to catch, plugin
managers). Plugin authors import from ``weighttracker_core.plugin``; the rest is internal.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Any

from .consumers import RegularizerHandle, TrackerHandle
from .metric_format import flatten_metrics
from .errors import (
    ArgumentTypeError,
    CalculationCycleError,
    ConfigError,
    CouplingError,
    DuplicateNameError,
    HandleAttributeError,
    MissingDependencyError,
    NonFiniteWeightError,
    PlanError,
    PluginError,
    PruningError,
    StaleConsumerError,
    UnitIndexError,
    UnknownNameError,
    UnsupportedModuleError,
    WeightTrackerError,
)
from .forwards import train_mode_forward
from .heads import AttentionChange, AttentionLayout
from .manager import PluginInfo, PluginManager, create_plugin_manager, default_plugin_manager
from .persistence import apply_pruning_record
from .registry import describe_plugins
from .specs import RegularizerType, TrackerType
from .surgery import PruneReport
from .tracker import WeightTracker
from .units import CanonicalMember, CanonicalUnitGroup, MemberSlice, PruneAxis, UnitKind

__all__ = [
    "ArgumentTypeError",
    "AttentionChange",
    "AttentionLayout",
    "CalculationCycleError",
    "CanonicalMember",
    "CanonicalUnitGroup",
    "ConfigError",
    "CouplingError",
    "DuplicateNameError",
    "HandleAttributeError",
    "MemberSlice",
    "MissingDependencyError",
    "NonFiniteWeightError",
    "PlanError",
    "PluginError",
    "PluginInfo",
    "PluginManager",
    "PruneAxis",
    "PruneReport",
    "PruningError",
    "RegularizerHandle",
    "RegularizerType",
    "StaleConsumerError",
    "TrackerHandle",
    "TrackerType",
    "UnitIndexError",
    "UnitKind",
    "UnknownNameError",
    "UnsupportedModuleError",
    "WeightTracker",
    "WeightTrackerError",
    "apply_pruning_record",
    "create_plugin_manager",
    "default_plugin_manager",
    "describe_plugins",
    "flatten_metrics",
    "train_mode_forward",
]

#: Plugin-author names that used to be importable from here; they live in ``.plugin`` now.
_MOVED = frozenset({
    "AttentionLayoutRule", "CalculationGraph", "CalculationSpec", "ConsumerContext", "Evaluation",
    "HeadPruner", "ImportanceSpec", "IntegrationSpec", "LayerCategory", "LayerPruner", "Lifetime",
    "ModelSourceSpec", "ParamRole", "ParamSlice", "PrunerSpec", "ReductionPlan", "RegularizerSpec",
    "Selection", "Structure", "TrackerSpec", "UnitRule", "UnwrappedParameter", "check_bitwidth",
    "effective_parameter", "hookimpl", "hookspec", "safe_sqrt", "stored_parameter", "to_python",
})


def __getattr__(name: str) -> Any:
    """Old imports of plugin-author names keep working, with a ``DeprecationWarning``."""
    if name not in _MOVED:
        raise AttributeError(f"module 'weighttracker_core' has no attribute {name!r}")
    warnings.warn(
        f"weighttracker_core.{name} moved to weighttracker_core.plugin; import it with "
        f"`from weighttracker_core.plugin import {name}`.",
        DeprecationWarning,
        stacklevel=2,
    )
    from . import plugin

    if name == "Evaluation":  # the protocol took the name; the class stays in dag
        from .dag import Evaluation

        return Evaluation
    return getattr(plugin, name)


__version__ = importlib.metadata.version("weighttracker")
