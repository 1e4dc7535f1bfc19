"""The old import path of the ``magnitude`` pruner's configs and schedulers.

Import them from ``weighttracker_plugins.pruners.magnitude``; this module only re-exports
them. It re-exports the hook too, so that an installation whose metadata still names this
module as the ``magnitude_pruner`` entry point keeps registering the pruner (once: the
entry point names one module or the other).
"""

from __future__ import annotations

from .magnitude import (
    ConstantSparsityScheduler,
    MagnitudeMask,
    MagnitudePruner,
    MagnitudePrunerConfig,
    ModuleMagnitudePrunerConfig,
    PolynomialDecayScheduler,
    wt_register_pruners,
)

__all__ = [
    "ConstantSparsityScheduler",
    "MagnitudeMask",
    "MagnitudePruner",
    "MagnitudePrunerConfig",
    "ModuleMagnitudePrunerConfig",
    "PolynomialDecayScheduler",
    "wt_register_pruners",
]
