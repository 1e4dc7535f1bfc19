"""Ranking math of the ``ranked`` pruner: scores per slot, normalization, thresholds, selections.

A *slot* is what one ranking decision removes. Usually a slot is a unit. In a group with
channel grouping (grouped convolutions, GroupNorm) of ``G`` chunks, slot ``s`` is the units
``s, s + n/G, s + 2n/G, ...`` (the same position in every chunk, so every chunk loses as
many channels), and its score is the mean over the chunks.

How many slots a scope loses follows Torch-Pruning's ``BasePruner``: a scope that had
``N0`` slots when first ranked keeps ``int(N0 * (1 - ratio))`` after a step, so a scope
with ``N`` live slots loses ``N - int(N0 * (1 - ratio))``. One group is ranked by its
``k`` smallest scores; several groups share one threshold (the ``k``-th smallest score of
all of them). Example: ``N0 = N = 10`` and ``ratio = 0.3`` remove ``10 - int(7.0) = 3``.

No hook implementations live here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from weighttracker_core.plugin import CanonicalUnitGroup, PruneAxis, Structure

# pruning functions of head groups that only some unit rules can remove physically
HEAD_FUNCTIONS = ("prune_num_heads", "prune_head_dims", "prune_kv_heads")
HEAD_KINDS = ("head", "kv_head")


@attrs.define(kw_only=True, eq=False)
class Candidate:
    """One group's live slots in a ranking scope.

    Attributes:
        group: The group as it is now.
        chunks: Channel-grouping factor ``G`` (1 for most groups).
        live: Live slot ids (long tensor).
        scores: Normalized score of each live slot (``inf`` where unscorable).
        ratio: Target ratio of the scope at this step.
        initial_slots: Slots of the group when the pruner first saw it.
    """

    group: CanonicalUnitGroup
    chunks: int
    live: torch.Tensor
    scores: torch.Tensor
    ratio: float
    initial_slots: int

    @property
    def slots(self) -> int:
        return self.group.n_units // self.chunks

    def units_of(self, slots: Sequence[int]) -> list[int]:
        """Local unit ids of ``slots`` in every chunk."""
        return sorted(s + c * self.slots for s in slots for c in range(self.chunks))


def channel_chunks(structure: Structure, group: CanonicalUnitGroup) -> int:
    """``G`` for grouped convolutions (not depthwise) and GroupNorm members, else 1.

    Query heads under grouped-query attention are chunked by kv head: every kv head must
    lose as many query heads, so a slot is one head of each kv group (for 8 query heads
    in 2 kv groups, slot 1 is heads 1 and 5).
    """
    if group.kind == "head":
        layout = getattr(structure, "layouts", {}).get(group.root_module)
        if layout is not None and layout.grouped and layout.kv_repeat == "block":
            return layout.num_kv_heads
        return 1
    if group.kind in ("head_dim", "kv_head"):
        return 1
    chunks = 1
    for member in group.members:
        if member.module_name not in structure.module_index:
            continue
        module = structure.module(member.module_name)
        if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.out_channels:
            chunks = max(chunks, module.groups)
        elif isinstance(module, nn.GroupNorm):
            chunks = max(chunks, module.num_groups)
    return chunks if group.n_units % chunks == 0 else 1


def slot_scores(unit_scores: torch.Tensor, chunks: int) -> torch.Tensor:
    """Mean over chunks: ``[1, 2, 3, 4, 5, 6]`` with 2 chunks gives ``[2.5, 3.5, 4.5]``."""
    return unit_scores.view(chunks, -1).mean(dim=0) if chunks > 1 else unit_scores


def normalize(scores: torch.Tensor, how: Any) -> torch.Tensor:
    """Scale one group's scores so that groups compare (finite entries only)."""
    if how is None or scores.numel() == 0:
        return scores
    finite = scores[torch.isfinite(scores)]
    if finite.numel() == 0:
        return scores
    if callable(how):
        out = scores.clone()
        out[torch.isfinite(scores)] = how(finite)
        return out
    if how == "standardization":
        low, high = finite.min(), finite.max()
        return (scores - low) / (high - low + 1e-8)
    if how == "gaussian":
        return (scores - finite.mean()) / (finite.std() + 1e-8) if finite.numel() > 1 else scores - finite.mean()
    scale = {"mean": finite.mean, "max": finite.max, "sum": finite.sum}[how]()
    return scores / scale if scale != 0 else scores


def removal_count(num_live: int, initial: int, ratio: float) -> int:
    """Slots to remove so that ``int(initial * (1 - ratio))`` remain (never negative)."""
    return max(0, num_live - int(initial * (1 - ratio)))


def clamp_removal(
    k: int, live: int, chunks: int, initial_slots: int, round_to: int | None, max_ratio: float
) -> int:
    """Apply ``round_to`` (units kept a multiple of it) and never empty a group.

    A group keeps at least ``max(1, ceil(initial_slots * (1 - max_ratio)))`` slots.
    """
    remaining = live - k
    if round_to:
        while remaining > 0 and (remaining * chunks) % round_to:
            remaining -= 1
    floor = max(1, math.ceil(initial_slots * (1 - max_ratio) - 1e-9))
    if remaining < floor:
        remaining = min(live, floor)
        if round_to:
            while remaining < live and (remaining * chunks) % round_to:
                remaining += 1
    return max(0, live - remaining)


def choose(
    candidates: Sequence[Candidate],
    initial: int,
    ratio: float,
    round_to: int | None,
    max_ratio: float,
) -> list[tuple[Candidate, list[int]]]:
    """Slots to remove from each candidate of one scope.

    One candidate: its ``k`` lowest scores. Several: every slot at or below the ``k``-th
    lowest score of the whole scope.
    """
    scores = torch.cat([c.scores for c in candidates])
    k = min(removal_count(len(scores), initial, ratio), int(torch.isfinite(scores).sum()))
    if k <= 0:
        return []
    lowest = torch.topk(scores, k, largest=False)
    if len(candidates) == 1:
        picked = [lowest.indices]
    else:
        threshold = lowest.values[-1]
        picked = [(c.scores <= threshold).nonzero().flatten() for c in candidates]
    out = []
    for cand, idx in zip(candidates, picked):
        if idx.numel() == 0:
            continue
        n = clamp_removal(int(idx.numel()), int(cand.live.numel()), cand.chunks,
                          cand.initial_slots, round_to, max_ratio)
        if n <= 0:
            continue
        if n != idx.numel():
            idx = torch.argsort(cand.scores, stable=True)[:n]
        out.append((cand, sorted(int(s) for s in cand.live[idx])))
    return out


# ---------------------------------------------------------------------------- layer sizes


def layer_sizes(structure: Structure, removed: Callable[[CanonicalUnitGroup], set[int]]) -> dict[tuple[str, str], int]:
    """Live channels of every covered layer side: ``{(module, "out" | "in"): count}``.

    ``removed(group)`` gives the group's units that are gone but still in the model (masks).
    """
    seen: dict[tuple[str, str], set[int]] = {}
    gone: dict[tuple[str, str], set[int]] = {}
    for group in structure.groups:
        dead = removed(group)
        for member in group.members:
            if member.module_name not in structure.module_index:
                continue
            key = (member.module_name, "in" if member.axis is PruneAxis.IN_CHANNEL else "out")
            seen.setdefault(key, set()).update(member.tp_indices)
            if dead:
                gone.setdefault(key, set()).update(member.indices_of(dead))
    return {key: len(idxs - gone.get(key, set())) for key, idxs in seen.items()}


def isomorphic_key(group: CanonicalUnitGroup, chunks: int) -> str:
    """Groups with the same member layout (types and axes in order) share this key."""
    parts = [f"{m.module_type.__qualname__}/{m.axis}" for m in group.members]
    return f"isomorphic:{group.kind}:{chunks}:" + ",".join(parts)


# ------------------------------------------------------------------------------ selections


@attrs.define(kw_only=True, eq=False)
class UnitSelection:
    """Units of one group that a step chose to remove; ``apply()`` removes them.

    Attributes:
        step: The step that chose them.
        scope: The ranking scope (``"local:<group>"``, ``"global"``, ``"heads"``, ...).
        ratio: The scope's target ratio at that step.
        group_name: Name of the group (stable across physical prunes).
        group_id: Id of the group when chosen (ids change after physical prunes).
        kind: Unit kind (``channel``, ``feature``, ``head``, ``head_dim``).
        n_units: Units the group had when chosen.
        units: Local unit ids to remove.
        scores: Normalized scores of the removed units' slots.
        tp_indices: Torch-Pruning indices on the group's root layer.
        modules: Names of the coupled layers.
        applied: Whether ``apply()`` ran.
    """

    step: int
    scope: str
    ratio: float
    group_name: str
    group_id: int
    kind: str
    n_units: int
    units: tuple[int, ...]
    scores: torch.Tensor = attrs.field(repr=False)
    tp_indices: tuple[int, ...] = attrs.field(repr=False)
    modules: tuple[str, ...] = attrs.field(repr=False)
    applied: bool = False
    _pruner: Any = attrs.field(default=None, repr=False, alias="pruner")

    def apply(self) -> None:
        """Remove (or mask) the units now; a second call does nothing."""
        if not self.applied:
            self._pruner._apply([self])

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "scope": self.scope, "ratio": self.ratio,
                "group": self.group_name, "kind": self.kind, "n_units": self.n_units,
                "units": list(self.units), "applied": self.applied}
