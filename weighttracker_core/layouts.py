"""Resolving attention layouts: which layers form separate-projection attention, and how.

Sources, strongest first: ``attention_layouts`` passed to the tracker (or filled in by an
integration), attention layout rules of plugins, and the traced graph. ``num_heads``
entries for separate projections (Torch-Pruning's convention ``{q_proj: query heads,
k_proj: kv heads, v_proj: kv heads}``) give or check the head counts of what the graph
shows. Every layout is checked against the layers' shapes before any unit is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import ConfigError, CouplingError
from .heads import AttentionLayout, HeadLayout
from .units import PruneAxis

if TYPE_CHECKING:
    from .graph import DependencyGraphHandle, FoundAttention
    from .registry import TypedRegistry


def _common_parent(names: Sequence[str]) -> str:
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    common = common[: min(len(p) for p in parts) - 1] if common else common
    return ".".join(common)


class LayoutResolver:
    """Turns declared and traced attention into checked :class:`HeadLayout` records.

    Args:
        handle: The traced graph.
        names: ``{module: name}`` of the model.
        num_heads: The tracker's ``num_heads`` (entries for separate projections are read).
        declared: ``AttentionLayout`` objects from the user or integrations.
        rules: Attention layout rules of the plugins.
    """

    def __init__(
        self,
        handle: DependencyGraphHandle,
        names: Mapping[nn.Module, str],
        num_heads: Mapping[nn.Module, int],
        declared: Sequence[AttentionLayout] = (),
        rules: TypedRegistry[Any] | None = None,
    ) -> None:
        self.handle = handle
        self.names = names
        self.num_heads = num_heads
        self.declared = list(declared)
        self.rules = rules
        self.used_num_heads: set[nn.Module] = set()

    def resolve(self) -> list[HeadLayout]:
        """Every separate-projection attention of the model, checked."""
        declared = self.declared + self._from_rules()
        claimed = {id(m) for layout in declared for m in (layout.q_proj, layout.k_proj, layout.v_proj)}
        found = {id(f.q): f for f in self.handle.attention()}
        layouts = []
        for layout in declared:
            layouts.append(self._from_declared(layout, found.get(id(layout.q_proj))))
        for attention in found.values():
            if id(attention.q) in claimed or id(attention.k) in claimed or id(attention.v) in claimed:
                continue
            layouts.append(self._from_graph(attention))
        seen: dict[str, str] = {}
        for layout in layouts:
            for module in (layout.q, layout.k, layout.v):
                if module in seen:
                    raise ConfigError(
                        f"{module} belongs to two attention layouts ({seen[module]} and "
                        f"{layout.name}); each projection can be in one only."
                    )
                seen[module] = layout.name
        return sorted(layouts, key=lambda lay: list(self.names.values()).index(lay.q))

    # -------------------------------------------------------------------------- sources

    def _from_rules(self) -> list[AttentionLayout]:
        if self.rules is None or not len(self.rules):
            return []
        out = []
        for module in self.names:
            rule = self.rules.rule_for(type(module))
            if rule is None:
                continue
            layout = rule.layout(module)
            if layout is None:
                continue
            if not isinstance(layout, AttentionLayout):
                raise ConfigError(
                    f"Attention layout rule {rule.name!r} returned {type(layout).__name__} for "
                    f"{self.names[module]}; it must return an AttentionLayout or None."
                )
            out.append(layout)
        return out

    def _name(self, module: Any, what: str) -> str:
        if not isinstance(module, nn.Module) or module not in self.names:
            raise ConfigError(
                f"AttentionLayout.{what} must be a module of the model, got "
                f"{type(module).__name__}."
            )
        return self.names[module]

    def _from_declared(self, layout: AttentionLayout, found: FoundAttention | None) -> HeadLayout:
        q, k, v, o = (self._name(getattr(layout, f), f) for f in ("q_proj", "k_proj", "v_proj", "o_proj"))
        width = self._channels(layout.q_proj, PruneAxis.OUT_CHANNEL)
        heads = layout.num_heads
        dim = layout.head_dim or (width // heads if width else 0)
        rotary = layout.rotary
        if rotary == "auto":
            rotary = found.rotary if found is not None else None
        repeat = layout.kv_repeat
        if repeat == "auto":
            repeat = found.kv_repeat if found is not None else "block"
        return self._checked(
            HeadLayout(
                name=_common_parent([q, k, v]) or q, q=q, k=k, v=v, o=o,
                num_heads=heads, num_kv_heads=layout.num_kv_heads or heads, head_dim=dim,
                rotary=rotary, kv_repeat=repeat, source="attention_layouts",
            )
        )

    def _from_graph(self, found: FoundAttention) -> HeadLayout:
        counts = list(found.heads)
        source = "graph"
        for i, module in enumerate((found.q, found.k, found.v)):
            given = self.num_heads.get(module)
            if given is None:
                continue
            self.used_num_heads.add(module)
            source = "num_heads"
            if given != counts[i]:
                raise ConfigError(
                    f"num_heads[{self.names[module]}]={given}, but the forward views its output "
                    f"as {counts[i]} heads of {found.head_dim}. Pass the head count the forward "
                    "uses (query heads for q_proj, key/value heads for k_proj and v_proj)."
                )
        q, k, v, o = (self.names[m] for m in (found.q, found.k, found.v, found.o))
        return self._checked(
            HeadLayout(
                name=_common_parent([q, k, v]) or q, q=q, k=k, v=v, o=o,
                num_heads=counts[0], num_kv_heads=counts[1], head_dim=found.head_dim,
                rotary=found.rotary, kv_repeat=found.kv_repeat, source=source,
            )
        )

    # -------------------------------------------------------------------------- checking

    def _channels(self, module: nn.Module, axis: PruneAxis) -> int | None:
        if module not in self.handle.dg.module2node:
            return None
        return self.handle.channels(module, axis)

    def _checked(self, layout: HeadLayout) -> HeadLayout:
        get = self.handle.model.get_submodule
        h, g, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
        if h % g:
            raise ConfigError(
                f"{layout.name}: {h} query heads cannot be shared by {g} key/value heads "
                "(the query heads must be a multiple of the kv heads)."
            )
        expected = (
            (layout.q, PruneAxis.OUT_CHANNEL, h * d),
            (layout.k, PruneAxis.OUT_CHANNEL, g * d),
            (layout.v, PruneAxis.OUT_CHANNEL, g * d),
            (layout.o, PruneAxis.IN_CHANNEL, h * d),
        )
        for name, axis, width in expected:
            actual = self._channels(get(name), axis)
            if actual is None:
                raise ConfigError(
                    f"{layout.name}: {name} is not reached by the traced forward, or its "
                    f"{'input' if axis is PruneAxis.IN_CHANNEL else 'output'} channels are unknown."
                )
            if actual != width:
                side = "input" if axis is PruneAxis.IN_CHANNEL else "output"
                raise ConfigError(
                    f"{layout.name}: {name} has {actual} {side} channels, but {h} query heads, "
                    f"{g} kv heads of width {d} need {width}. Check num_heads / num_kv_heads / "
                    "head_dim."
                )
        if layout.rotary in ("half", "interleaved") and d % 2:
            raise ConfigError(f"{layout.name}: rotary embeddings need an even head_dim, got {d}.")
        if layout.grouped and layout.kv_repeat == "unknown":
            raise CouplingError(
                f"{layout.name}: cannot tell which key/value head each of the {h} query heads "
                f"reads ({g} kv heads; the forward repeats them in a way weighttracker does not "
                "recognise). Declare it: attention_layouts=[AttentionLayout(..., kv_repeat="
                "'block' or 'tile')]."
            )
        return layout
