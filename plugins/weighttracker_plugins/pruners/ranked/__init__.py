"""The ``ranked`` pruner: importance-ranked structural pruning over canonical units.

The package: ``pruner.py`` (the algorithm), ``config.py`` (its config and schedulers),
``scopes.py`` (how units are ranked together), ``unit_masks.py`` (``apply="mask"``).

Torch-Pruning's ``BasePruner`` semantics over this library's groups. At every ``step()``:

1. every group gets one score per unit from an importance plugin (``l1``, ``l2``,
   ``bn_scale``, ``taylor``, or a third party's), normalized per group;
2. groups go into ranking scopes: one per group (``local``), one for all
   (``global``), one per member layout (``isomorphic``), or the scopes that
   ``pruning_ratio_dict`` defines; attention-head groups rank in their own scopes with
   ``head_pruning_ratio``;
3. each scope removes its lowest-ranked slots until ``int(N0 * (1 - ratio))`` remain
   (``N0``: its size at the first step; the ratio follows the scheduler);
4. the chosen units are removed physically (one atomic prune per step, the structure is
   rebuilt and the pruner keeps going) or masked with ``torch.nn.utils.prune`` masks.

``step(interactive=True)`` returns an iterator of :class:`UnitSelection` objects to inspect
and ``apply()`` one by one.

Where this differs from Torch-Pruning: a step never empties a group (it keeps the best
slot, or ``round_to`` of them) where Torch-Pruning would skip the group;
``max_pruning_ratio`` also caps each group; head counts follow the channel formula so
iterative head pruning lands on the target exactly. Under grouped-query attention the
query heads of a layer are ranked in slots of one head per kv group (every kv group loses
as many, as the model needs), and ``kv_head`` units (a kv head with its query heads) rank
with ``head_pruning_ratio`` too.
"""

from __future__ import annotations

from weighttracker_core.plugin import PrunerSpec, hookimpl

from .pruner import (
    RankedPruner,
    RankedPrunerConfig,
    UnitSelection,
    geometric_scheduler,
    linear_scheduler,
)

__all__ = [
    "RankedPruner",
    "RankedPrunerConfig",
    "UnitSelection",
    "geometric_scheduler",
    "linear_scheduler",
    "wt_register_pruners",
]


@hookimpl
def wt_register_pruners() -> tuple[PrunerSpec, ...]:
    return (PrunerSpec(name="ranked", build=RankedPruner, config=RankedPrunerConfig,
                       summary="Importance-ranked structural pruning (Torch-Pruning BasePruner semantics)."),)
