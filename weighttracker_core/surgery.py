"""Physical pruning through Torch-Pruning, all or nothing (SPEC §7).

Before anything changes, the request is checked (unit ids, never every unit of a group,
the unit rules' own constraints). The model is then snapshotted: every module's attributes,
parameter and buffer objects and their data. If pruning, a post-prune hook or the structure
rebuild fails, the snapshot is put back exactly and the error re-raised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from .errors import PruningError
from .structure import Structure
from .units import CanonicalUnitGroup


@attrs.frozen(kw_only=True)
class PruneReport:
    """What a physical prune removed (or, with ``dry_run``, would remove).

    Attributes:
        units: ``{group name: sorted local unit ids}``.
        tp_indices: ``{group name: Torch-Pruning indices on the root module}``.
        params_before: Parameter elements in the model before.
        params_after: Parameter elements after (equal to ``params_before`` on a dry run).
        dry_run: Whether the model was left unchanged on purpose.
    """

    units: dict[str, list[int]]
    tp_indices: dict[str, list[int]]
    params_before: int
    params_after: int
    dry_run: bool

    @property
    def num_units(self) -> int:
        return sum(len(v) for v in self.units.values())

    @property
    def removed_params(self) -> int:
        return self.params_before - self.params_after

    def __str__(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"Physical prune {verb} {self.num_units} units in {len(self.units)} groups"]
        for name, units in self.units.items():
            lines.append(f"  {name}: units {units}")
        if not self.dry_run:
            lines.append(f"  parameters: {self.params_before} -> {self.params_after}")
        return "\n".join(lines)


class ModelSnapshot:
    """Everything physical pruning may change, kept so it can be put back exactly."""

    def __init__(self, model: nn.Module) -> None:
        self.entries: list[tuple[nn.Module, dict[str, Any]]] = []
        tensors: dict[int, torch.Tensor] = {}
        for module in model.modules():
            state = dict(module.__dict__)
            for key in ("_parameters", "_buffers", "_modules"):
                state[key] = dict(state[key])
            self.entries.append((module, state))
            for t in list(module._parameters.values()) + list(module._buffers.values()):
                if t is not None:
                    tensors[id(t)] = t
        with torch.no_grad():
            self.data = [(t, t.detach().clone(), t._version) for t in tensors.values()]

    def restore(self) -> None:
        for module, state in self.entries:
            module.__dict__.clear()
            module.__dict__.update(state)
        with torch.no_grad():
            for tensor, saved, version in self.data:
                if tensor._version != version:
                    tensor.copy_(saved)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_request(
    structure: Structure, units: Mapping[int, Iterable[int]]
) -> dict[int, set[int]]:
    """Validated ``{group id: local unit ids}``; refuses removing every unit of a group."""
    request: dict[int, set[int]] = {}
    for group_id, local in units.items():
        group = structure.group(group_id)
        chosen = {structure.check_unit(group, int(u)) for u in local}
        if not chosen:
            continue
        if len(chosen) >= group.n_units:
            raise PruningError(
                f"Refusing to remove all {group.n_units} units of group {group.id} "
                f"({group.name}): the coupled layers would have no channels left. Keep at "
                "least one unit, or exclude the group with ignore_prune=[...]."
            )
        request[group.id] = chosen
    return request


def _operations(
    structure: Structure, request: Mapping[int, set[int]]
) -> dict[tuple[str, str], tuple[list[CanonicalUnitGroup], set[int]]]:
    """Torch-Pruning calls to make: ``(root, fn) -> (groups, root indices)``.

    Groups that share a root axis (heads and head dimensions of one projection) are merged
    into one call with the union of their indices, all in the original numbering.
    """
    ops: dict[tuple[str, str], tuple[list[CanonicalUnitGroup], set[int]]] = {}
    for group_id, units in request.items():
        group = structure.groups[group_id]
        root = group.root_member
        key = (group.root_module, root.pruning_fn)
        groups, idxs = ops.setdefault(key, ([], set()))
        groups.append(group)
        idxs.update(root.indices_of(units))
    return ops


def _check_rules(structure: Structure, request: Mapping[int, set[int]]) -> None:
    rules = structure.registries.unit_rules
    for group_id, units in request.items():
        group = structure.groups[group_id]
        for member in group.members:
            rule = rules.rule_for(member.module_type)
            if rule is None or rule.validate_prune is None:
                continue
            module = structure.module(member.module_name)
            reason = rule.validate_prune(module, member.axis, member.indices_of(units))
            if reason:
                raise PruningError(
                    f"Cannot remove units {sorted(units)} of group {group.id} ({group.name}): "
                    f"{member.module_name} ({rule.name}): {reason}"
                )


def prune_units(
    structure: Structure,
    units: Mapping[int, Iterable[int]],
    *,
    dry_run: bool = False,
    after_prune: Callable[[], None] = lambda: None,
    rebuild: Callable[[], None] = lambda: None,
) -> PruneReport:
    """Remove ``units`` physically; atomic.

    Args:
        structure: The current structure (its Torch-Pruning graph does the pruning).
        units: ``{group id: local unit ids}``.
        dry_run: Only check and report.
        after_prune: Integration and user hooks, run after the shapes changed.
        rebuild: Rebuilds the structure for the pruned model.

    Raises:
        PruningError: The request is refused; nothing changed.
        UnitIndexError: An id is out of range; nothing changed.
    """
    request = resolve_request(structure, units)
    _check_rules(structure, request)
    ops = _operations(structure, request)
    for (root, fn), (groups, _idxs) in ops.items():
        if not fn.startswith("prune_") or fn in ("prune_num_heads", "prune_head_dims"):
            names = ", ".join(g.name for g in groups)
            raise PruningError(
                f"Group(s) {names} cannot be removed physically: no layer pruner handles "
                f"{fn!r} on {root}. Fake pruning and metrics still work."
            )
    report_units = {structure.groups[g].name: sorted(u) for g, u in request.items()}
    report_idxs = {
        structure.groups[g].name: structure.groups[g].root_member.indices_of(u)
        for g, u in request.items()
    }
    before = count_params(structure.model)
    if dry_run or not request:
        return PruneReport(units=report_units, tp_indices=report_idxs, params_before=before,
                           params_after=before, dry_run=dry_run)
    snapshot = ModelSnapshot(structure.model)
    try:
        for (root, fn), (_groups, idxs) in ops.items():
            structure.handle.prune(structure.module(root), fn, sorted(idxs))
        after_prune()
        rebuild()
    except BaseException:
        snapshot.restore()
        raise
    return PruneReport(units=report_units, tp_indices=report_idxs, params_before=before,
                       params_after=count_params(structure.model), dry_run=False)
