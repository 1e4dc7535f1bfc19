"""Readable views of structures, zero units and bit-widths: ``str()`` and ``to_dict()``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .units import CanonicalUnitGroup


@attrs.frozen
class StructureView:
    """What ``WeightTracker.view_structures()`` returns.

    ``str(view)`` lists every group (id, name, kind, units) with its members and axes;
    ``view.to_dict()`` / ``view.to_json()`` give the same as data.
    """

    groups: tuple[CanonicalUnitGroup, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_groups": len(self.groups),
            "num_units": sum(g.n_units for g in self.groups),
            "groups": [g.to_dict() for g in self.groups],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return structures_text(self.to_dict())


def structures_text(structures: Mapping[str, Any]) -> str:
    """Groups and members from ``view_structures().to_dict()``, one line each.

    A member line reads ``fc1 (Linear) out_channel: weight[dim 0], bias[dim 0]``; a viewed
    slice adds its view: ``weight[dim 1 of view (3, 4, 2, -1)]``.
    """
    lines = [f"{structures['num_groups']} groups, {structures['num_units']} units"]
    for group in structures["groups"]:
        lines.append(f"[{group['id']}] {group['name']}  kind={group['kind']}  "
                     f"units={group['n_units']}")
        for member in group["members"]:
            params = ", ".join(
                f"{s['param']}[dim {','.join(map(str, s['dims']))}"
                + (f" of view {tuple(s['view'])}" if s.get("view") else "") + "]"
                for s in member["slices"]
            )
            lines.append(f"    {member['module'] or '<model>'} ({member['type']}) "
                         f"{member['axis']}: {params}")
    return "\n".join(lines)


def short_list(values: Sequence[int], limit: int = 12) -> str:
    """``[0, 1, 2, ..., 9] (10)`` style: long id lists shortened for printing.

    >>> short_list(list(range(20)), limit=4)
    '[0, 1, ..., 18, 19] (20 ids)'
    """
    values = list(values)
    if len(values) <= limit:
        return str(values)
    half = limit // 2
    head = ", ".join(map(str, values[:half]))
    tail = ", ".join(map(str, values[-half:]))
    return f"[{head}, ..., {tail}] ({len(values)} ids)"


@attrs.frozen
class ZeroUnitsView:
    """Zero units per group, with the Torch-Pruning indices that would remove them.

    What ``tracker.view_zero_units()`` returns. ``to_dict()`` is keyed by group name:
    ``{"group_id", "kind", "n_units", "zero_units", "root_module", "tp_indices"}``, where
    ``tp_indices`` are the indices on ``root_module`` that ``prune_zero_units()`` passes to
    Torch-Pruning (attention positions ``head * head_dim + d`` for head groups).
    """

    groups: tuple[CanonicalUnitGroup, ...]
    zero_units: dict[int, list[int]]

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for gid, units in self.zero_units.items():
            group = self.groups[gid]
            out[group.name] = {
                "group_id": gid,
                "kind": str(group.kind),
                "n_units": group.n_units,
                "zero_units": list(units),
                "root_module": group.root_module,
                "tp_indices": group.root_member.indices_of(set(units)),
            }
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @property
    def num_zero_units(self) -> int:
        return sum(len(v) for v in self.zero_units.values())

    def __str__(self) -> str:
        if not self.zero_units:
            return "No zero units."
        lines = [f"{self.num_zero_units} zero units in {len(self.zero_units)} groups"]
        for name, info in self.to_dict().items():
            lines.append(f"[{info['group_id']}] {name}: {len(info['zero_units'])}/"
                         f"{info['n_units']} zero: units {short_list(info['zero_units'])}; "
                         f"Torch-Pruning indices on {info['root_module'] or '<model>'}: "
                         f"{short_list(info['tp_indices'])}")
        return "\n".join(lines)


@attrs.frozen
class BitwidthView:
    """Per counted layer: weight and activation bit-width and where each came from."""

    rows: Sequence[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {row["layer"]: {k: v for k, v in row.items() if k != "layer"} for row in self.rows}

    def __str__(self) -> str:
        lines = []
        for row in self.rows:
            lines.append(
                f"{row['layer']}: weight {row['weight_bits']} ({row['weight_source']}), "
                f"activation {row['activation_bits']} ({row['activation_source']})"
            )
        return "\n".join(lines) or "No counted layers."
