"""The ``magnitude`` pruner: scheduled mask pruning with coremltools MagnitudePruner semantics.

The package: ``pruner.py`` (the algorithm), ``config.py`` (global / per-module configs),
``schedulers.py`` (sparsity schedules), ``modes.py`` (block, n:m and channel masks),
``report.py`` (``pruner.report()`` rows).

``tracker.create_pruner("magnitude", config={...})``. Masks live in
``torch.nn.utils.prune``'s re-parametrisation (``weight_orig`` x ``weight_mask``), so pruned
weights stay exactly zero through any optimizer, compose with torch's own pruning methods
on the same parameter (the effective mask is the product), and ``finalize()`` bakes them
in with ``prune.remove``.

The configs and schedulers are importable from here::

    from weighttracker_plugins.pruners.magnitude import (
        MagnitudePrunerConfig, ModuleMagnitudePrunerConfig, PolynomialDecayScheduler)
"""

from __future__ import annotations

from weighttracker_core.plugin import PrunerSpec, hookimpl

from .pruner import (
    ConstantSparsityScheduler,
    MagnitudeMask,
    MagnitudePruner,
    MagnitudePrunerConfig,
    ModuleMagnitudePrunerConfig,
    PolynomialDecayScheduler,
    build_magnitude_pruner,
)

__all__ = [
    "ConstantSparsityScheduler",
    "MagnitudeMask",
    "MagnitudePruner",
    "MagnitudePrunerConfig",
    "ModuleMagnitudePrunerConfig",
    "PolynomialDecayScheduler",
    "build_magnitude_pruner",
    "wt_register_pruners",
]


@hookimpl
def wt_register_pruners() -> tuple[PrunerSpec, ...]:
    return (
        PrunerSpec(
            name="magnitude",
            build=build_magnitude_pruner,
            config=MagnitudePrunerConfig,
            summary="Scheduled magnitude mask pruning: unstructured, block, n:m, per-channel, per-kernel.",
        ),
    )
