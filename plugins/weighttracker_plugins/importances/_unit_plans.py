"""Reduction plans over chosen slices of every group, shared by the importance plugins.

The structure's own plan reduces *every* slice of a unit (weights and biases). Importance
criteria often want less: magnitude and Taylor scores skip biases by default, the BN-scale
score reads only the scales of normalization layers. A plan is built from copies of the
groups that keep only the wanted slices, so the reductions still run in a handful of
kernels and units keep their global ids.

No hook implementations live here (plugin modules import it).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch

from weighttracker_core.plugin import (
    CanonicalMember,
    CanonicalUnitGroup,
    MemberSlice,
    ParamRole,
    ReductionPlan,
    Structure,
)

SliceFilter = Callable[[CanonicalUnitGroup, CanonicalMember, MemberSlice], bool]


def filtered_plan(structure: Structure, keep: SliceFilter) -> ReductionPlan:
    """A plan over the slices ``keep(group, member, slice)`` accepts (unit ids unchanged)."""
    groups = []
    for group in structure.groups:
        members = tuple(
            attrs.evolve(member, slices=tuple(s for s in member.slices if keep(group, member, s)))
            for member in group.members
        )
        groups.append(attrs.evolve(group, members=members))
    return ReductionPlan(groups, structure.resolver)


def role_plan(structure: Structure, include_bias: bool) -> ReductionPlan:
    """Weights only (``include_bias=False``) or weights and biases of every member."""
    if include_bias:
        return structure.plan()
    return filtered_plan(structure, lambda group, member, piece: piece.role is ParamRole.WEIGHT)


def mark_unscored(scores: torch.Tensor, plan: ReductionPlan) -> torch.Tensor:
    """NaN for units that own no element in ``plan`` (the criterion cannot rank them)."""
    empty = plan.unit_numel().to(scores.device) == 0
    if bool(empty.any()):
        scores = scores.clone()
        scores[empty] = float("nan")
    return scores
