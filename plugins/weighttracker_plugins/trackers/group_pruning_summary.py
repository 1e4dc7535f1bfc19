"""``group_pruning_summary`` tracker: what pruning the zero units would remove.

A unit counts as pruned when every weight it owns (all slices of all members: weights,
biases, norm scales and shifts) is exactly zero -- the units ``tracker.prune_zero_units()``
removes. For those units the tracker reports, globally and per group:

* ``pruned_units``;
* ``pruned_params``: elements of weight-role slices (conv / linear / attention weights,
  norm scales, embedding tables) that physical pruning deletes;
* ``pruned_bias_params``: elements of bias-role slices (conv / linear biases, norm
  shifts, attention projection biases);
* ``pruned_physical_params``: their sum.

No element is counted twice. An element deleted through several slices (a conv weight
element by its output-channel group and its input-channel group) goes to the group with
the **lowest id** (see ``_removal``), so the global figures are exactly the sums over
``groups[...]`` and equal the parameter elements a physical prune removes.

``include`` / ``ignore`` restrict both what is looked at and what is counted: units are
judged on the selected layers' weights only (as ``prune_zero_units(ignore=...)`` does),
only elements of selected layers are counted, and only groups with a selected member are
listed. Without filters the figures equal ``prune_zero_units()``. A group whose units are
all zero is reported as is, although ``prune_zero_units`` refuses to empty a group.

Worked example: ``Linear(3, 4) -> Linear(4, 2)`` with hidden feature 1 zero in both layers
(row 1 and bias 1 of the first, column 1 of the second): the hidden group reports
``pruned_units = 1``, ``pruned_params = 3 + 2 = 5``, ``pruned_bias_params = 1``.
"""

from __future__ import annotations

from typing import Any

import torch

from weighttracker_core.plugin import BuildContext, Evaluation, TrackerSpec, hookimpl

from ..calculations._memo import LastResult
from ._layers import group_labels
from ._removal import RemovalCounter


class GroupPruningSummary:
    """Pruned units and the parameters their physical removal deletes (module docstring)."""

    def __init__(self, ctx: BuildContext) -> None:
        self.structure = ctx.structure
        selection = ctx.selection
        self.everything = selection.is_everything
        if not self.everything:
            # raises ConfigError when include/ignore select no covered layer
            self.structure.selected_modules(selection, None)
            self.plan = self.structure.plan(selection)
        else:
            self.plan = self.structure.plan()
        self.counter = RemovalCounter(self.structure, None if self.everything else selection)
        numel = self.plan.unit_numel()
        groups = self.structure.groups
        owners = self.structure.group_of_unit
        listed = torch.zeros(len(groups), dtype=torch.bool)
        if len(owners):
            listed.index_fill_(0, owners[numel > 0].unique(), True)
        labels = group_labels(groups)
        self.groups = [(g.id, labels[g.id]) for g in groups if listed[g.id]]
        self._static = (numel > 0, owners)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last = LastResult()

    def _device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(unit has selected weights, group of each unit)`` on ``device``."""
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in self._static)  # type: ignore[assignment]
        return self._on[device]

    def _removed(self, values: Any) -> torch.Tensor:
        if self.everything:
            return ~values["unit_active"]
        with torch.no_grad():
            peak = self.plan.unit_reduce("max_abs")
        return (peak == 0) & self._device(peak.device)[0]

    def track(self, values: Evaluation) -> dict[str, Any]:
        if self.everything:  # a pure function of the shared unit_active
            return self._last.get((values["unit_active"],), lambda: self._track(values))
        return self._track(values)

    def _track(self, values: Any) -> dict[str, Any]:
        removed = self._removed(values)
        num_groups = len(self.structure.groups)
        if not bool(removed.any()):  # nothing would be pruned: every figure is 0
            per_group_units = [0] * num_groups
            counts = {"weight": per_group_units, "bias": per_group_units}
        else:
            owners = self._device(removed.device)[1]
            per_group_units = torch.zeros(num_groups, dtype=torch.int64, device=removed.device)
            per_group_units = per_group_units.index_add(0, owners, removed.to(torch.int64)).tolist()
            counts = self.counter.count(removed)
        groups: dict[str, Any] = {}
        totals = {"pruned_units": 0, "pruned_params": 0, "pruned_bias_params": 0, "pruned_physical_params": 0}
        for gid, label in self.groups:
            row = {
                "pruned_units": per_group_units[gid],
                "pruned_params": counts["weight"][gid],
                "pruned_bias_params": counts["bias"][gid],
            }
            row["pruned_physical_params"] = row["pruned_params"] + row["pruned_bias_params"]
            for key, value in row.items():
                totals[key] += value
            groups[label] = row
        return {**totals, "groups": groups}


@hookimpl
def wt_register_trackers() -> tuple[TrackerSpec, ...]:
    return (
        TrackerSpec(
            name="group_pruning_summary",
            build=GroupPruningSummary,
            requires=("unit_active",),
            summary="Zero units per group and the weights / biases pruning them would remove.",
        ),
    )
