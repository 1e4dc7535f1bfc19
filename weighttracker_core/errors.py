"""Exceptions raised by weighttracker.

Every error subclasses :class:`WeightTrackerError` plus the builtin that fits, so callers
can catch either ``WeightTrackerError`` or the familiar ``ValueError`` / ``LookupError``.
"""

from __future__ import annotations


class WeightTrackerError(Exception):
    """Base class of every error raised by weighttracker."""


class PluginError(WeightTrackerError, RuntimeError):
    """A plugin could not be loaded or breaks the plugin contract."""


class DuplicateNameError(PluginError):
    """Two plugins registered the same name (tracker, rule, calculation, ...)."""


class UnknownNameError(WeightTrackerError, LookupError):
    """A name (tracker, regularizer, pruner, calculation, ...) is not registered."""

    def __str__(self) -> str:  # LookupError would otherwise quote the message like a key
        return str(self.args[0]) if self.args else ""


class ConfigError(WeightTrackerError, ValueError):
    """An option or argument has a value that is not allowed."""


class ArgumentTypeError(ConfigError, TypeError):
    """An argument has the wrong type (a unit id list given as one int, say)."""


class UnitIndexError(WeightTrackerError, IndexError):
    """A group id or unit id is out of range."""


class UnsupportedModuleError(WeightTrackerError, ValueError):
    """A module or graph operation cannot be mapped to canonical units safely."""


class CouplingError(UnsupportedModuleError):
    """Torch-Pruning's coupling of a group could not be verified or repaired.

    ``ignored_layers`` holds the names of the modules the message suggests adding to
    ``ignored_layers`` (empty when it suggests something else).
    """

    ignored_layers: tuple[str, ...] = ()


class StaleConsumerError(WeightTrackerError, RuntimeError):
    """A tracker, regularizer or pruner was created before a physical prune."""


class PruningError(WeightTrackerError, RuntimeError):
    """A physical or fake prune was refused or failed (the model is left unchanged)."""


class PlanError(WeightTrackerError, ValueError):
    """A reduction plan was asked for an unknown operation or no longer fits the model."""


class NonFiniteWeightError(PlanError, ConfigError):
    """A parameter holds NaN or inf: its units are neither zero nor a norm to penalise."""


class CalculationCycleError(WeightTrackerError, RuntimeError):
    """Calculations depend on each other in a cycle."""


class HandleAttributeError(WeightTrackerError, AttributeError):
    """An attribute was assigned on a regularizer or pruner handle, where it would do nothing."""


class MissingDependencyError(WeightTrackerError, ImportError):
    """An optional dependency (TensorBoard, Lightning, scikit-learn, ...) is not installed."""
