"""The structured cost model: index tensors for cost axes and cost terms (no hooks here).

Built once per structure by the ``cost_model`` calculation (``calculations/cost.py``) and
then evaluated with a handful of tensor kernels per ``track()``.

* A **cost axis** is one side of a counted layer that groups cut: ``out_channel``,
  ``in_channel``, or ``feature`` when input and output channel are one axis (norms,
  depthwise convolutions, the embedding of ``nn.MultiheadAttention``). Its positions are
  the layer's channels; the Torch-Pruning indices of each member (``tp_indices`` /
  ``tp_units``) say which unit covers which channel. A position is active while every
  unit covering it is active (a fused ``qkv`` row is covered by a head unit and a
  head-dim unit); positions no group covers (the RGB input of a stem conv) are always
  active.
* A **cost term** is a share of a layer's baseline MACs that scales with the active
  fraction of some of its axes. Most layers have one term over all their axes. An
  ``nn.MultiheadAttention`` has two: its projections (fvcore ``linear`` MACs) scale with
  the embedding and the attention width, its attention products (``bmm``, counted when the
  layer returns attention weights) with the attention width only.

Worked example: a ``Conv2d(4, 6, 3)`` with 600 baseline MACs whose output channels 0 and 5
and input channel 1 belong to inactive units keeps ``600 * (4 / 6) * (3 / 4) == 300``
active MACs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from weighttracker_core.plugin import LayerCategory, PruneAxis

#: fvcore operators that are a layer's own weight products (projections), as opposed to
#: products of two activations (attention scores).
PROJECTION_OPS = frozenset({"linear", "addmm", "mm"})
_HEAD_KINDS = ("head", "head_dim")


def counts_for_cost(rule: Any, axis: PruneAxis, kind: str) -> bool:
    """Whether a member on ``axis`` of a group of ``kind`` scales its layer's MACs.

    ``rule.cost_axes`` (``None``: every axis) lists axis names and/or unit kinds;
    ``"head"`` stands for the attention width, which head and head-dim units both cut.
    """
    if rule is None or rule.cost_axes is None:
        return True
    wanted = set(rule.cost_axes)
    if "head" in wanted:
        wanted.update(_HEAD_KINDS)
    return str(axis) in wanted or str(kind) in wanted


class CostModel:
    """Static index tensors of every counted layer's cost axes and terms.

    Args:
        structure: The model's structure.
        macs_by_operator: For each layer of ``structure.modules`` (same order), fvcore's
            MACs under that module split by operator (``{"conv": 1.2e6}``).

    Attributes:
        axis_names: ``(layer name, axis)`` of each axis ``j``.
        axis_layer: ``[J]`` layer-table index of each axis.
        axis_size: ``[J]`` float64 positions (channels) of each axis.
        slot_axis: ``[S]`` axis of each covered position ("slot").
        cov_slot, cov_unit: ``[K]`` pairs: slot ``cov_slot[k]`` is covered by global unit
            ``cov_unit[k]``.
        single_cover: Whether every slot has exactly one unit (no head/head-dim overlap);
            then a dead pair is a dead slot and one kernel is saved.
        term_layer, term_macs: ``[T]`` layer and baseline MACs of each cost term.
        pair_term, pair_axis: ``[P]`` the axes each term scales with.
        baseline: ``[L]`` float64 baseline MACs per layer (sum of its terms).
        custom: ``(layer index, cost_fn, {axis name: axis id})`` of layers whose rule has a
            ``cost_fn``.
    """

    def __init__(self, structure: Any, macs_by_operator: Sequence[Mapping[str, float]]) -> None:
        rules = structure.registries.unit_rules
        self.num_layers = len(structure.modules)
        self.num_units = structure.num_units
        axis_of: dict[tuple[int, str], int] = {}
        slot_of: dict[tuple[int, int], int] = {}
        names: list[tuple[str, str]] = []
        layer: list[int] = []
        reported: list[float] = []
        widest: list[int] = []
        from_heads: list[bool] = []
        slot_axis: list[int] = []
        pairs: dict[tuple[int, int], None] = {}
        for group in structure.groups:
            for member in group.members:
                info = structure.module_index.get(member.module_name)
                if info is None or not counts_for_cost(rules.rule_for(info.module_type), member.axis, group.kind):
                    continue
                key = (info.index, str(member.axis))
                if key not in axis_of:
                    side = PruneAxis.IN_CHANNEL if member.axis is PruneAxis.IN_CHANNEL else PruneAxis.OUT_CHANNEL
                    axis_of[key] = len(names)
                    names.append((info.name, str(member.axis)))
                    layer.append(info.index)
                    reported.append(float(structure.channels(info.name, side) or 0))
                    widest.append(0)
                    from_heads.append(False)
                j = axis_of[key]
                from_heads[j] = from_heads[j] or str(group.kind) in _HEAD_KINDS
                for position, unit in zip(member.tp_indices, member.tp_units):
                    slot_key = (j, int(position))
                    if slot_key not in slot_of:
                        slot_of[slot_key] = len(slot_axis)
                        slot_axis.append(j)
                        widest[j] = max(widest[j], int(position) + 1)
                    pairs[(slot_of[slot_key], group.offset + int(unit))] = None
        # head groups cover the whole attention width, whatever the layer reports as channels
        size = [float(w) if heads else max(r, float(w)) for r, w, heads in zip(reported, widest, from_heads)]
        self.axis_names = tuple(names)
        self.axis_layer = torch.tensor(layer, dtype=torch.long)
        self.axis_size = torch.tensor(size, dtype=torch.float64)
        self.slot_axis = torch.tensor(slot_axis, dtype=torch.long)
        self.cov_slot = torch.tensor([s for s, _ in pairs], dtype=torch.long)
        self.cov_unit = torch.tensor([u for _, u in pairs], dtype=torch.long)
        self.single_cover = len(pairs) == len(slot_axis)  # no channel has two units
        self.pair_axis_of_cover = self.slot_axis.index_select(0, self.cov_slot)
        self._build_terms(structure, macs_by_operator, axis_of)
        self.custom = tuple(
            (info.index, rule.cost_fn, {label: j for (i, label), j in axis_of.items() if i == info.index})
            for info in structure.modules
            if (rule := rules.rule_for(info.module_type)) is not None and rule.cost_fn is not None
        )
        # index tensors in int32 where the kernels take it (scatter_reduce needs int64)
        for name in ("axis_layer", "slot_axis", "cov_slot", "cov_unit", "pair_axis_of_cover",
                     "term_layer", "pair_axis"):
            setattr(self, name, getattr(self, name).to(torch.int32))
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._shares: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _build_terms(
        self, structure: Any, macs_by_operator: Sequence[Mapping[str, float]], axis_of: Mapping[tuple[int, str], int]
    ) -> None:
        axes_of_layer: dict[int, dict[str, int]] = {}
        for (index, label), j in axis_of.items():
            axes_of_layer.setdefault(index, {})[label] = j
        term_layer: list[int] = []
        term_macs: list[float] = []
        pair_term: list[int] = []
        pair_axis: list[int] = []

        def add(index: int, macs: float, axes: Sequence[int]) -> None:
            for j in axes:
                pair_term.append(len(term_layer))
                pair_axis.append(j)
            term_layer.append(index)
            term_macs.append(macs)

        for info in structure.modules:
            ops = macs_by_operator[info.index]
            total = float(sum(ops.values()))
            axes = axes_of_layer.get(info.index, {})
            if info.category is LayerCategory.ATTENTION:
                # the products q k^T and softmax(.) v scale with the active q rows
                # (query heads x head dimensions)
                add(info.index, total, self._query_axis(structure, info.name, axis_of))
            elif isinstance(structure.module(info.name), nn.MultiheadAttention):
                projections = float(sum(v for op, v in ops.items() if op in PROJECTION_OPS))
                add(info.index, projections, list(axes.values()))
                width = [j for label, j in axes.items() if label == str(PruneAxis.OUT_CHANNEL)]
                add(info.index, total - projections, width)
            else:
                add(info.index, total, list(axes.values()))
        self.term_layer = torch.tensor(term_layer, dtype=torch.long)
        self.term_macs = torch.tensor(term_macs, dtype=torch.float64)
        self.pair_term = torch.tensor(pair_term, dtype=torch.long)
        self.pair_axis = torch.tensor(pair_axis, dtype=torch.long)
        self.baseline = torch.zeros(self.num_layers, dtype=torch.float64).index_add_(
            0, self.term_layer, self.term_macs
        )

    @staticmethod
    def _query_axis(structure: Any, name: str, axis_of: Mapping[tuple[int, str], int]) -> list[int]:
        for layout in getattr(structure, "layouts", {}).values():
            if layout.name == name and layout.q in structure.module_index:
                j = axis_of.get((structure.module_index[layout.q].index, str(PruneAxis.OUT_CHANNEL)))
                return [] if j is None else [j]
        return []

    # ---------------------------------------------------------------------------- per call

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The index tensors on ``device`` (copied once per device)."""
        if device not in self._on:
            names = ("axis_layer", "axis_size", "slot_axis", "cov_slot", "cov_unit", "pair_axis_of_cover",
                     "term_layer", "term_macs", "pair_term", "pair_axis", "baseline")
            self._on[device] = {n: getattr(self, n).to(device) for n in names}
        return self._on[device]

    def axis_active(self, unit_active: torch.Tensor) -> torch.Tensor:
        """Active positions of every axis (float64 ``[J]``) for boolean ``[num_units]``."""
        t = self.on(unit_active.device)
        dead_pairs = (~unit_active).to(torch.float64).index_select(0, t["cov_unit"])
        dead = torch.zeros_like(t["axis_size"])
        if self.single_cover:  # one unit per channel: a dead pair is a dead channel
            return t["axis_size"] - dead.index_add_(0, t["pair_axis_of_cover"], dead_pairs)
        dead_slots = torch.zeros(len(self.slot_axis), dtype=torch.float64, device=unit_active.device)
        dead_slots.index_add_(0, t["cov_slot"], dead_pairs)
        return t["axis_size"] - dead.index_add_(0, t["slot_axis"], (dead_slots > 0).to(torch.float64))

    def axis_ratio(self, axis_active: torch.Tensor) -> torch.Tensor:
        """``active / size`` per axis (1 for an empty axis)."""
        size = self.on(axis_active.device)["axis_size"]
        return torch.where(size > 0, axis_active / size.clamp(min=1.0), torch.ones_like(size))

    def layer_macs(self, axis_active: torch.Tensor) -> torch.Tensor:
        """Active MACs per layer (float64 ``[L]``): each term times its axes' ratios."""
        t = self.on(axis_active.device)
        ratio = self.axis_ratio(axis_active)
        factor = torch.ones(len(self.term_layer), dtype=torch.float64, device=ratio.device)
        factor = factor.scatter_reduce(0, t["pair_term"], ratio.index_select(0, t["pair_axis"]),
                                       reduce="prod", include_self=True)
        macs = torch.zeros(self.num_layers, dtype=torch.float64, device=ratio.device)
        return macs.index_add_(0, t["term_layer"], t["term_macs"] * factor)

    # ------------------------------------------------------------------------ unit shares

    def unit_term_shares(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static ``(unit, term, share)`` triples for per-unit costs.

        ``share`` is the fraction of the term's MACs one unit's positions stand for:
        ``positions of axis j the unit covers / size_j``, summed over the term's axes.
        So a term's BOPs times ``share`` is what removing that unit alone from the dense
        layer saves to first order.
        """
        slot_axis = self.slot_axis.index_select(0, self.cov_slot)
        size = self.axis_size.index_select(0, slot_axis)
        terms_of_axis: dict[int, list[int]] = {}
        for term, axis in zip(self.pair_term.tolist(), self.pair_axis.tolist()):
            terms_of_axis.setdefault(axis, []).append(term)
        shares: dict[tuple[int, int], float] = {}
        for unit, axis, n in zip(self.cov_unit.tolist(), slot_axis.tolist(), size.tolist()):
            for term in terms_of_axis.get(axis, ()):
                shares[(unit, term)] = shares.get((unit, term), 0.0) + 1.0 / n
        units = torch.tensor([u for u, _ in shares], dtype=torch.long)
        terms = torch.tensor([t for _, t in shares], dtype=torch.long)
        values = torch.tensor(list(shares.values()), dtype=torch.float64)
        self._shares = (units, terms, values)
        return self._shares
