"""Heads of attention written with separate q / k / v / o projections.

Geometry, for ``H`` query heads, ``G`` key/value heads and head width ``D``:

* ``q_proj`` rows ``h * D + d`` belong to query head ``h``; ``k_proj`` / ``v_proj`` rows
  ``g * D + d`` to kv head ``g``; ``o_proj`` input columns ``h * D + d`` to query head ``h``.
* Under grouped-query attention (``G < H``) query head ``h`` reads kv head ``h // (H / G)``
  (``repeat_kv``, ``repeat_interleave``, SDPA's ``enable_gqa``), or ``h % G`` when the
  key/value heads are tiled (``k.repeat(1, H // G, 1, 1)``).

Units (what :func:`unit_rows` returns for each kind):

* ``head``: one query head, its ``q_proj`` rows and ``o_proj`` columns; with ``G == H`` also
  its ``k_proj`` and ``v_proj`` rows.
* ``kv_head`` (only when ``G < H``): one kv head, its ``k_proj`` and ``v_proj`` rows and every
  query head that reads it (their ``q_proj`` rows and ``o_proj`` columns).
* ``head_dim``: one dimension of every head in q, k, v and the matching ``o_proj`` columns;
  under rotary embeddings one *pair* of dimensions that are rotated together (``d`` and
  ``d + D/2`` for ``rotate_half``, ``2i`` and ``2i + 1`` for interleaved rotations).

Worked example: ``H = 4``, ``G = 2``, ``D = 2``. Head unit 3 owns ``q_proj`` rows 6, 7 and
``o_proj`` columns 6, 7; kv-head unit 1 owns ``k_proj`` / ``v_proj`` rows 2, 3 and ``q_proj``
rows 4..7 (query heads 2 and 3).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Container, Iterable, Mapping, Sequence
from typing import Any

import attrs

from .errors import ConfigError
from .units import PruneAxis

ROTARY_STYLES = (None, "half", "interleaved")
KV_REPEATS = ("block", "tile")
HEAD_KINDS = ("head", "kv_head", "head_dim")
#: Pruning-function labels of the three kinds (group names are ``"<q_proj>:<label>"``).
HEAD_FN = {"head": "prune_num_heads", "kv_head": "prune_kv_heads", "head_dim": "prune_head_dims"}


def _positive(instance: Any, attribute: Any, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"AttentionLayout.{attribute.name} must be an int >= 1, got {value!r}.")


def _choice(choices: Sequence[Any]) -> Any:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value not in choices:
            raise ConfigError(
                f"AttentionLayout.{attribute.name} must be one of {list(choices)}, got {value!r}."
            )

    return check


@attrs.frozen(kw_only=True, eq=False)
class AttentionLayout:
    """One attention with separate projections, declared where the graph cannot tell.

    Pass a list of these as ``WeightTracker(attention_layouts=[...])`` (integrations and
    unit-rule plugins can declare them too). Usually nothing needs declaring: the tracker
    reads the projections, head counts and rotary embeddings off the traced forward.

    Args:
        q_proj, k_proj, v_proj, o_proj: The four projection layers (modules of the model).
        num_heads: Query heads.
        num_kv_heads: Key/value heads (default ``num_heads``; fewer means grouped-query
            attention).
        head_dim: Width of one head (default ``q_proj`` output channels / ``num_heads``).
        rotary: ``None`` (no rotary embedding), ``"half"`` (``rotate_half``: dimension ``d``
            rotates with ``d + head_dim / 2``), ``"interleaved"`` (``2i`` with ``2i + 1``), or
            ``"auto"`` to read it off the graph.
        kv_repeat: ``"block"`` (query head ``h`` reads kv head ``h // (num_heads /
            num_kv_heads)``), ``"tile"`` (``h % num_kv_heads``) or ``"auto"``.
    """

    q_proj: Any
    k_proj: Any
    v_proj: Any
    o_proj: Any
    num_heads: int = attrs.field(validator=_positive)
    num_kv_heads: int | None = attrs.field(default=None, validator=_positive)
    head_dim: int | None = attrs.field(default=None, validator=_positive)
    rotary: str | None = attrs.field(default="auto", validator=_choice((*ROTARY_STYLES, "auto")))
    kv_repeat: str = attrs.field(default="auto", validator=_choice((*KV_REPEATS, "auto")))


@attrs.frozen(kw_only=True)
class HeadLayout:
    """A resolved attention layout, by module name (what the structure keeps).

    ``rotary`` may also be ``"unknown"``: the query path rotates dimensions in a way that
    was not recognised, so head-dimension units cannot be built.
    """

    name: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary: str | None = None
    kv_repeat: str = "block"
    source: str = "graph"

    @property
    def grouped(self) -> bool:
        """Whether this is grouped-query attention (fewer kv heads than query heads)."""
        return self.num_kv_heads < self.num_heads

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_of(self, head: int) -> int:
        """The kv head query head ``head`` reads."""
        if self.kv_repeat == "tile":
            return head % self.num_kv_heads
        return head // self.group_size

    def dim_unit(self, d: int) -> int:
        """The head-dim unit of dimension ``d`` (pairs under rotary embeddings)."""
        if self.rotary == "half":
            return d % (self.head_dim // 2)
        if self.rotary == "interleaved":
            return d // 2
        return d

    @property
    def num_dim_units(self) -> int:
        return self.head_dim // 2 if self.rotary in ("half", "interleaved") else self.head_dim

    def n_units(self, kind: str) -> int:
        if kind == "head":
            return self.num_heads
        if kind == "kv_head":
            return self.num_kv_heads
        return self.num_dim_units


def unit_rows(layout: HeadLayout, kind: str) -> list[tuple[str, PruneAxis, tuple[int, ...], tuple[int, ...]]]:
    """``(module, axis, positions, units)`` of every member of a ``kind`` group.

    The position and unit tuples depend only on the geometry (head counts, width, rotary
    style, kv repeat), so attention layers of one shape share them.
    """
    q_rows, q_units, kv_rows, kv_units = _geometry_rows(_geometry(layout), kind)
    if kind == "head":
        rows = [(layout.q, PruneAxis.OUT_CHANNEL, q_rows, q_units)]
        if not layout.grouped:
            rows += [(m, PruneAxis.OUT_CHANNEL, q_rows, q_units) for m in (layout.k, layout.v)]
        return rows + [(layout.o, PruneAxis.IN_CHANNEL, q_rows, q_units)]
    return [
        (layout.q, PruneAxis.OUT_CHANNEL, q_rows, q_units),
        (layout.k, PruneAxis.OUT_CHANNEL, kv_rows, kv_units),
        (layout.v, PruneAxis.OUT_CHANNEL, kv_rows, kv_units),
        (layout.o, PruneAxis.IN_CHANNEL, q_rows, q_units),
    ]


def _geometry(layout: HeadLayout) -> HeadLayout:
    """``layout`` without its names: the key of everything that depends on shape only."""
    return attrs.evolve(layout, name="", q="", k="", v="", o="", source="")


@functools.lru_cache(maxsize=64)
def _geometry_rows(
    layout: HeadLayout, kind: str
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(q / o rows, their units, k / v rows, their units)`` of one geometry and kind."""
    d_ = layout.head_dim
    q_rows = tuple(range(layout.num_heads * d_))
    kv_rows = tuple(range(layout.num_kv_heads * d_))
    if kind == "head":
        return q_rows, tuple(r // d_ for r in q_rows), kv_rows, tuple(r // d_ for r in kv_rows)
    if kind == "kv_head":
        kv_of = [layout.kv_of(h) for h in range(layout.num_heads)]
        return q_rows, tuple(kv_of[r // d_] for r in q_rows), kv_rows, tuple(r // d_ for r in kv_rows)
    dims = [layout.dim_unit(d) for d in range(d_)]
    return q_rows, tuple(dims[r % d_] for r in q_rows), kv_rows, tuple(dims[r % d_] for r in kv_rows)


@attrs.frozen(kw_only=True)
class AttentionChange:
    """What a physical prune removes from one attention (given to post-prune hooks).

    Head and dimension ids are those before the prune. ``num_heads``, ``num_kv_heads`` and
    ``head_dim`` are the new values a model's own attributes should take.

    Attributes:
        name: The attention (the module holding the four projections, if any).
        q_proj, k_proj, v_proj, o_proj: Names of the projection layers.
        removed_heads / removed_kv_heads / removed_dims: What goes.
        kept_heads / kept_kv_heads / kept_dims: What stays, in order.
        num_heads / num_kv_heads / head_dim: The new geometry.
    """

    name: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    removed_heads: tuple[int, ...]
    removed_kv_heads: tuple[int, ...]
    removed_dims: tuple[int, ...]
    kept_heads: tuple[int, ...]
    kept_kv_heads: tuple[int, ...]
    kept_dims: tuple[int, ...]

    @property
    def num_heads(self) -> int:
        return len(self.kept_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kept_kv_heads)

    @property
    def head_dim(self) -> int:
        return len(self.kept_dims)


def plan_removal(
    layout: HeadLayout, heads: Iterable[int], kv_heads: Iterable[int], dim_units: Iterable[int]
) -> AttentionChange | str:
    """What removing the given units of one attention removes, or why it is refused.

    Removing a kv head removes the query heads that read it. Under grouped-query attention
    every remaining kv head must lose as many query heads (the model keeps one
    ``num_heads / num_kv_heads`` ratio), and the remaining query heads must still read the
    kv heads they read before.
    """
    h_, g_, d_ = layout.num_heads, layout.num_kv_heads, layout.head_dim
    removed_kv = set(kv_heads) if layout.grouped else set()
    removed = set(heads) | {h for h in range(h_) if layout.kv_of(h) in removed_kv}
    if not layout.grouped:
        removed_kv = set(removed)
    dims = {d for d in range(d_) if layout.dim_unit(d) in set(dim_units)}
    kept = [h for h in range(h_) if h not in removed]
    kept_kv = [g for g in range(g_) if g not in removed_kv]
    kept_dims = [d for d in range(d_) if d not in dims]
    if not kept or not kept_kv:
        return "every head would be removed"
    if not kept_dims:
        return "every head dimension would be removed"
    if layout.grouped:
        lost = {g: sum(1 for h in removed if layout.kv_of(h) == g) for g in kept_kv}
        if len(set(lost.values())) > 1:
            per_group = ", ".join(f"kv head {g}: {n}" for g, n in lost.items())
            return (
                f"under grouped-query attention ({h_} query heads in {g_} kv groups of "
                f"{layout.group_size}) every kept kv group must lose the same number of query "
                f"heads, but the request removes {per_group}; remove as many heads from each "
                "kv group, or remove whole kv heads (kv_head units)"
            )
        new_size = len(kept) // len(kept_kv)
        for i, h in enumerate(kept):
            reads = i % len(kept_kv) if layout.kv_repeat == "tile" else i // new_size
            if kept_kv[reads] != layout.kv_of(h):
                return (
                    "the remaining query heads would read different kv heads than before "
                    f"(query head {h} reads kv head {layout.kv_of(h)}); with tiled kv heads remove "
                    "heads so that the remaining ones still alternate"
                )
    return AttentionChange(
        name=layout.name, q_proj=layout.q, k_proj=layout.k, v_proj=layout.v, o_proj=layout.o,
        removed_heads=tuple(sorted(removed)), removed_kv_heads=tuple(sorted(removed_kv)),
        removed_dims=tuple(sorted(dims)), kept_heads=tuple(kept), kept_kv_heads=tuple(kept_kv),
        kept_dims=tuple(kept_dims),
    )


def removed_rows(layout: HeadLayout, change: AttentionChange) -> tuple[list[int], list[int]]:
    """``(q / o rows, k / v rows)`` to remove for ``change``, in the numbering before it."""
    d_ = layout.head_dim
    gone_dims = set(change.removed_dims)
    q = [h * d_ + d for h in range(layout.num_heads) for d in range(d_)
         if h in change.removed_heads or d in gone_dims]
    kv = [g * d_ + d for g in range(layout.num_kv_heads) for d in range(d_)
          if g in change.removed_kv_heads or d in gone_dims]
    return q, kv


# ------------------------------------------------------------ head counts across a prune


def fused_heads_removed(
    groups: Sequence[Any], units: Mapping[int, Collection[int]], separate: Container[str]
) -> dict[str, int]:
    """Heads a request removes per fused ``qkv`` projection or ``nn.MultiheadAttention``.

    ``units`` is ``{group id: local unit ids}``; head groups rooted at separate-projection
    attention (``separate``: their ``q_proj`` names) are counted by :class:`AttentionChange`
    instead. Removing heads 0 and 2 of ``attn.qkv`` gives ``{"attn.qkv": 2}``.
    """
    out: dict[str, int] = {}
    for group_id, local in units.items():
        group = groups[group_id]
        if group.kind == "head" and group.root_module not in separate:
            out[group.root_module] = out.get(group.root_module, 0) + len(set(local))
    return out


def num_heads_after_prune(
    num_heads: Mapping[Any, int],
    removed: Mapping[str, int],
    changes: Mapping[str, AttentionChange],
    module_of: Callable[[str], Any],
) -> dict[Any, int]:
    """The user's ``{module: heads}`` brought to the head counts after a prune."""
    heads = dict(num_heads)
    for name, count in removed.items():
        module = module_of(name)
        if module in heads:
            heads[module] -= count
    for change in changes.values():
        for name, count in ((change.q_proj, change.num_heads), (change.k_proj, change.num_kv_heads),
                            (change.v_proj, change.num_kv_heads)):
            module = module_of(name)
            if module in heads:
                heads[module] = count
    return heads


def layouts_after_prune(
    layouts: Sequence[AttentionLayout],
    changes: Mapping[str, AttentionChange],
    name_of: Callable[[Any], str],
) -> tuple[AttentionLayout, ...]:
    """Declared layouts with the geometry their attention has after a prune."""
    by_q = {change.q_proj: change for change in changes.values()}
    updated = []
    for layout in layouts:
        change = by_q.get(name_of(layout.q_proj))
        if change is not None:
            layout = attrs.evolve(layout, num_heads=change.num_heads,
                                  num_kv_heads=change.num_kv_heads, head_dim=change.head_dim)
        updated.append(layout)
    return tuple(updated)
