"""Prune zero units so that every layer keeps the same shape (what HF configs can describe).

After group-lasso training the zero units differ from layer to layer, and a plain
``tracker.prune_zero_units()`` would give layers of different widths, which the
``transformers`` integration refuses for the stock classes. :func:`prune_zero_units_uniformly`
removes, in the groups that repeat across layers (``model.layers.0.mlp.up_proj`` ... ``model.
layers.N.mlp.up_proj``), only as many zero units as the layer with the fewest has; the other
zero units stay in place (still zero, so the outputs do not depend on them). Query heads are
removed as many per kv group, kv heads as many per layer; head dimensions are left alone.
A group whose units are all zero keeps one (physical pruning never empties a group).

Example: MLP zero channels ``{layer 0: [3, 9, 20], layer 1: [5]}`` remove channel 3 of layer 0
and channel 5 of layer 1.
"""

from __future__ import annotations

import re
from typing import Any

_LAYER = re.compile(r"\.(\d+)\.")


def _pattern(name: str) -> tuple[str, int | None]:
    """``("model.layers.{}.mlp.up_proj:prune_out_channels", 3)`` for layer 3's group."""
    matches = list(_LAYER.finditer(name))
    if not matches:
        return name, None
    match = matches[-1]  # the innermost layer index
    return name[: match.start()] + ".{}." + name[match.end():], int(match.group(1))


def uniform_zero_units(tracker: Any, ignore: Any = ()) -> dict[int, list[int]]:
    """``{group id: unit ids}``: the zero units that can go with every layer kept alike."""
    zero = tracker.zero_units(ignore)
    layouts = tracker.structure.layouts
    families: dict[str, list[Any]] = {}
    for group in tracker.groups:
        pattern, _layer = _pattern(group.name)
        families.setdefault(f"{pattern}#{group.n_units}", []).append(group)
    request: dict[int, list[int]] = {}
    for members in families.values():
        kind = members[0].kind
        if kind == "head_dim":
            continue
        if kind in ("head", "kv_head"):
            continue  # below, per attention
        # never every unit of a group (the core refuses that): one zero unit stays
        keep = min(min(len(zero.get(g.id, [])), g.n_units - 1) for g in members)
        for g in members:
            if keep:
                request[g.id] = sorted(zero[g.id])[:keep]
    # attention: kv heads as many per layer, then query heads as many per remaining kv group
    attentions = []
    for layout in layouts.values():
        by_fn = {g.pruning_fn: g for g in tracker.groups if g.root_module == layout.q}
        attentions.append((layout, by_fn.get("prune_num_heads"), by_fn.get("prune_kv_heads")))
    if not attentions or any(heads is None for _, heads, _ in attentions):
        return request
    kv_keep = min((min(len(zero.get(kv.id, [])), kv.n_units - 1) if kv is not None else 0)
                  for _, _, kv in attentions)
    chosen_kv = {}
    for layout, _heads, kv in attentions:
        chosen_kv[layout.name] = sorted(zero.get(kv.id, []))[:kv_keep] if kv is not None else []
    def kv_groups(layout: Any) -> list[int | None]:
        # without GQA every head is its own kv head: one pool of heads per layer
        if not layout.grouped:
            return [None]
        return [g for g in range(layout.num_kv_heads) if g not in chosen_kv[layout.name]]

    def zero_heads(layout: Any, heads: Any, g: int | None) -> list[int]:
        ids = sorted(zero.get(heads.id, []))
        return ids if g is None else [h for h in ids if layout.kv_of(h) == g]

    per_group = min((min(len(zero_heads(layout, heads, g)), layout.group_size - 1 if g is not None
                         else layout.num_heads - 1)
                     for layout, heads, _ in attentions for g in kv_groups(layout)), default=0)
    for layout, heads, kv in attentions:
        if chosen_kv[layout.name] and kv is not None:
            request[kv.id] = chosen_kv[layout.name]
        if per_group:
            request[heads.id] = sorted(h for g in kv_groups(layout)
                                       for h in zero_heads(layout, heads, g)[:per_group])
    return request


def prune_zero_units_uniformly(tracker: Any, ignore: Any = (), dry_run: bool = False) -> Any:
    """Physically remove the zero units :func:`uniform_zero_units` picks; the prune report.

    Args:
        tracker: A ``WeightTracker`` on a Hugging Face model.
        ignore: Layers whose weights are not looked at for zero detection.
        dry_run: Report without changing anything.
    """
    return tracker.prune_units(uniform_zero_units(tracker, ignore), dry_run=dry_run)
