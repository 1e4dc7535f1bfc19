"""Turn dependency groups into canonical unit groups.

Unit rules (plugins) say which parameter slices a module loses with an input or output
channel; this module applies them to Torch-Pruning's groups, replaces the groups of fused
attention projections by head / head-dimension groups, and builds the table of layers
that metrics count.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from torch import nn

from .errors import ConfigError, CouplingError, UnsupportedModuleError
from .graph import RawItem
from .heads import HEAD_FN, AttentionLayout, HeadLayout, unit_rows
from .names import join_name
from .layouts import LayoutResolver
from .registry import TypedRegistry, UnitRuleRegistry
from .specs import LayerCategory, UnitRule, UnwrappedParameter
from .units import (
    CanonicalMember,
    CanonicalUnitGroup,
    MemberSlice,
    ParamRole,
    ParamSlice,
    PruneAxis,
    UnitKind,
)

if TYPE_CHECKING:
    from .graph import DependencyGraphHandle, RawGroup


@attrs.frozen(kw_only=True)
class ModuleInfo:
    """A layer that metrics count: a module covered by a unit rule.

    ``weight_params`` are full parameter names (``"layer1.0.conv1.weight"``) of the
    parameters the rule calls weights.
    """

    index: int
    name: str
    module_type: type
    rule: str
    category: LayerCategory
    weight_params: tuple[str, ...]
    param_names: tuple[str, ...]


def get_param(module: Any, path: str) -> Any:
    """``module.<path>`` for a dotted path (``None`` when an attribute is ``None``)."""
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def module_table(
    model: nn.Module, rules: UnitRuleRegistry, unwrapped: Sequence[str] = ()
) -> tuple[tuple[ModuleInfo, ...], list[str]]:
    """Covered layers in ``named_modules`` order, and names of uncovered layers.

    A rule claims its module's whole subtree (``nn.MultiheadAttention`` owns
    ``out_proj``), so submodules of a covered module are not listed again. Parameters
    named in ``unwrapped`` (Torch-Pruning's unwrapped parameters) are covered by the
    unwrapped-parameter rule when one is registered. A parameter shared by two layers
    (tied embeddings) is listed under both: each layer's MACs count, while trackers count
    its elements once (``Structure.canonical_param``).
    """
    claimed: set[int] = set()
    if rules.rule_for(UnwrappedParameter) is not None:
        named = dict(model.named_parameters())
        claimed.update(id(named[n]) for n in unwrapped if n in named)
    inside: set[int] = set()
    infos: list[ModuleInfo] = []
    uncovered: list[str] = []
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        direct = list(module.parameters(recurse=False))
        if direct and all(id(p) in claimed for p in direct):
            continue
        rule = rules.rule_for(type(module))
        if rule is None or isinstance(module, nn.Parameter):
            if any(id(p) not in claimed for p in direct):
                uncovered.append(f"{name or '<model>'} ({type(module).__name__})")
            continue
        own = [(n, p) for n, p in module.named_parameters(remove_duplicate=False) if id(p) not in claimed]
        if not own:
            continue
        inside.update(id(m) for m in module.modules() if m is not module)
        prefix = f"{name}." if name else ""
        weights = tuple(
            prefix + w for w in rule.weight_params if get_param(module, w) is not None
        )
        infos.append(
            ModuleInfo(
                index=len(infos),
                name=name,
                module_type=type(module),
                rule=rule.name,
                category=rule.category,
                weight_params=weights,
                param_names=tuple(dict.fromkeys(prefix + n for n, _ in own)),
            )
        )
    return tuple(infos), uncovered


def attention_entries(model: nn.Module, layouts: Sequence[HeadLayout], start: int) -> tuple[ModuleInfo, ...]:
    """Layer-table entries for the attention products of separate-projection attention.

    One per attention whose q, k and v sit in a common module (``self_attn``): the products
    ``q k^T`` and ``softmax(.) v`` run in that module's forward. They have no weights
    (``weight_params`` is empty) and category ``attention``.
    """
    out = []
    for layout in layouts:
        if layout.name in (layout.q, layout.k, layout.v):
            continue
        module = model.get_submodule(layout.name)
        out.append(
            ModuleInfo(
                index=start + len(out), name=layout.name, module_type=type(module),
                rule="attention_products", category=LayerCategory.ATTENTION,
                weight_params=(), param_names=(),
            )
        )
    return tuple(out)


class GroupBuilder:
    """Build canonical groups from a checked dependency graph.

    Args:
        handle: The traced graph.
        rules: Unit-rule registry.
        num_heads: ``{fused qkv Linear or nn.MultiheadAttention: heads}``, and for separate
            projections ``{q_proj: query heads, k_proj: kv heads, v_proj: kv heads}``.
        prune_num_heads: Build groups whose units are whole heads (and kv heads).
        prune_head_dims: Build groups whose units are one dimension of every head.
        attention_layouts: Declared separate-projection attention.
        layout_rules: Attention layout rules of the plugins.
        prune_model_outputs: Keep groups that change the model's output width.
    """

    def __init__(
        self,
        handle: DependencyGraphHandle,
        rules: UnitRuleRegistry,
        *,
        num_heads: Mapping[nn.Module, int] | None = None,
        prune_num_heads: bool = False,
        prune_head_dims: bool = True,
        untrusted_params: set[str] | frozenset[str] = frozenset(),
        attention_layouts: Sequence[AttentionLayout] = (),
        layout_rules: TypedRegistry[Any] | None = None,
        prune_model_outputs: bool = False,
    ) -> None:
        self.handle = handle
        self.untrusted_params = untrusted_params
        self.rules = rules
        self.model = handle.model
        self.prune_num_heads = prune_num_heads
        self.prune_head_dims = prune_head_dims
        self.prune_model_outputs = prune_model_outputs
        names = {m: n for n, m in self.model.named_modules()}
        self.num_heads = dict(num_heads or {})
        for module, heads in self.num_heads.items():
            if not isinstance(module, nn.Module) or module not in names:
                raise ConfigError(
                    f"num_heads names a {type(module).__name__} that is not part of the "
                    "model; pass {model.<submodule>: heads}."
                )
            if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
                raise ConfigError(
                    f"num_heads[{names[module]}] must be a whole number >= 1, got {heads!r}."
                )
        self._names = names
        self._canonical = _canonical_param_names(self.model)
        self.skipped: list[str] = []
        self.output_groups: list[str] = []
        resolver = LayoutResolver(handle, names, self.num_heads, attention_layouts, layout_rules)
        self.layouts: tuple[HeadLayout, ...] = tuple(resolver.resolve())
        self._layout_used = resolver.used_num_heads
        self._fill_mha_heads()

    def _fill_mha_heads(self) -> None:
        """``num_heads`` of every ``nn.MultiheadAttention`` the user did not list."""
        for module in self.handle.traced_modules():
            if isinstance(module, nn.MultiheadAttention) and module not in self.num_heads:
                if module._qkv_same_embed_dim or self.prune_num_heads:
                    self.num_heads[module] = int(module.num_heads)

    # ------------------------------------------------------------------------------ build

    def build(self) -> tuple[CanonicalUnitGroup, ...]:
        """Every canonical group, numbered in order, with global unit offsets."""
        separate = {self._names[m] for m in self._layout_used}
        projections = [
            self.model.get_submodule(name)
            for layout in self.layouts for name in (layout.q, layout.k, layout.v)
        ]
        fused = [m for m in self.num_heads if not isinstance(m, nn.MultiheadAttention)
                 and self._names[m] not in separate and m not in projections]
        used: set[nn.Module] = set(self._layout_used)
        drafts = self._graph_drafts(fused, projections, used)
        for layout in self.layouts:
            drafts.extend(self._layout_drafts(layout))
        for module, heads in self.num_heads.items():
            if isinstance(module, nn.MultiheadAttention):
                used.add(module)
                drafts.extend(self._mha_head_drafts(module, heads))
        self._check_num_heads_used(used, projections)
        groups = []
        offset = 0
        for gid, (name, kind, root, fn, n_units, members) in enumerate(drafts):
            groups.append(
                CanonicalUnitGroup(
                    id=gid, name=name, kind=kind, n_units=n_units, offset=offset,
                    root_module=root, pruning_fn=fn, members=tuple(self._deduplicated(members)),
                )
            )
            offset += n_units
        return tuple(groups)

    def _graph_drafts(
        self, fused: list[nn.Module], projections: list[nn.Module], used: set[nn.Module]
    ) -> list[Any]:
        """Drafts of the traced groups: channels, and heads of fused qkv projections."""
        drafts: list[Any] = []
        for raw in self.handle.groups(
            coverage_exempt=fused, skip_roots=projections,
            untrusted_params=sorted(self.untrusted_params),
        ):
            if raw.root_module in self.num_heads and not isinstance(raw.root_module, nn.MultiheadAttention):
                used.add(raw.root_module)
                drafts.extend(self._head_drafts(raw))
                continue
            if raw.feeds_output and not self.prune_model_outputs:
                self.output_groups.append(f"{raw.root_name}:{raw.pruning_fn}")
                continue
            members = self._members(raw)
            if members is None:
                continue
            rule = self.rules.rule_for(type(raw.root_module))
            kind = rule.unit_kind if rule is not None else str(UnitKind.FEATURE)
            drafts.append(
                (f"{raw.root_name}:{raw.pruning_fn}", kind, raw.root_name, raw.pruning_fn,
                 raw.n_root, members)
            )
        return drafts

    def _check_num_heads_used(self, used: set[nn.Module], projections: list[nn.Module]) -> None:
        for module in self.num_heads:
            if module not in used and module not in projections:
                raise ConfigError(
                    f"num_heads names {self._names[module]} ({type(module).__name__}), which is not "
                    "a projection of an attention the forward shows: keys must be a fused qkv "
                    "nn.Linear whose output channels start a group, an nn.MultiheadAttention, or "
                    "the q_proj / k_proj / v_proj of an attention with separate projections."
                )

    def _deduplicated(self, members: list[CanonicalMember]) -> list[CanonicalMember]:
        """Members without slices of a tied parameter that an earlier member already owns.

        An embedding tied to an output layer is one parameter reached through two modules:
        its positions must count once (metrics, the group lasso), not once per module.
        """
        claimed: set[tuple[str, tuple[int, ...], Any, tuple[int, ...]]] = set()
        out = []
        for member in members:
            kept = []
            for piece in member.slices:
                full = join_name(member.module_name, piece.param)
                key = (self._canonical.get(full, full), piece.dims, piece.view, piece.positions)
                if key in claimed:
                    continue
                claimed.add(key)
                kept.append(piece)
            out.append(member if len(kept) == len(member.slices) else attrs.evolve(member, slices=tuple(kept)))
        return out

    # ---------------------------------------------------------------------------- members

    def _rule(self, item: RawItem) -> UnitRule | None:
        if item.param_name is not None:
            return self.rules.rule_for(UnwrappedParameter)
        return self.rules.rule_for(type(item.module))

    def _members(self, raw: RawGroup) -> list[CanonicalMember] | None:
        members = []
        for item in raw.items:
            rule = self._rule(item)
            if item.param_name is not None:
                full = join_name(item.module_name, item.param_name)
                if full in self.untrusted_params:
                    rule = None
            if rule is None:
                if item.param_name is None and not any(True for _ in item.module.parameters()):
                    continue  # a weightless layer loses nothing
                where = item.module_name or "<model>"
                what = (
                    f"parameter {where}.{item.param_name}" if item.param_name is not None
                    else f"{where} ({type(item.module).__name__})"
                )
                self.skipped.append(f"{raw.root_name}:{raw.pruning_fn} (cuts {what})")
                return None
            members.append(self._member(item, rule))
        return members

    def _member(self, item: RawItem, rule: UnitRule) -> CanonicalMember:
        if item.param_name is not None:
            target: Any = UnwrappedParameter(
                owner=item.module, name=item.param_name, dim=int(item.pruning_dim or 0)
            )
            module: Any = item.module
        else:
            target = module = item.module
        slices = []
        size = (
            getattr(module, item.param_name).shape[item.pruning_dim or 0]
            if item.param_name is not None
            else self.handle.channels(module, item.axis)
        )
        for spec in rule.slices_for(target, item.axis):
            param = get_param(module, spec.param)
            if param is None:
                continue
            piece = _member_slice(spec, item.idxs, item.root_idxs)
            ndim = len(piece.viewed_shape(tuple(param.shape)))
            if any(not -ndim <= d < ndim for d in piece.dims):
                raise UnsupportedModuleError(
                    f"Unit rule {rule.name!r} slices {item.module_name}.{spec.param} along dims "
                    f"{piece.dims}, but it has {ndim} dims (after view {piece.view})."
                )
            # negative dims (LayerNorm's -1) become absolute so every consumer agrees
            piece = attrs.evolve(piece, dims=tuple(d % ndim for d in piece.dims))
            length = piece.axis_length(tuple(param.shape))
            if size is not None and length != size:
                raise UnsupportedModuleError(
                    f"Unit rule {rule.name!r} slices {item.module_name}.{spec.param} "
                    f"(shape {tuple(param.shape)}) into {length} positions for "
                    f"{item.axis}, but the layer has {size}. Fix the rule's dim/view."
                )
            slices.append(piece)
        return CanonicalMember(
            module_name=item.module_name,
            module_type=type(item.module),
            axis=item.axis,
            pruning_fn=item.pruning_fn,
            slices=tuple(slices),
            tp_indices=item.idxs,
            tp_units=item.root_idxs,
        )

    # ------------------------------------------------------------------------------ heads

    def _head_drafts(self, raw: RawGroup) -> list[Any]:
        """Replace a fused qkv projection's group by head and head-dim groups."""
        heads, dim, consumers = self._fused_geometry(raw)
        if self.rules.rule_for(type(raw.root_module)) is None:
            return []
        drafts = []
        width = heads * dim
        for enabled, kind, fn_label, view_dim, unit_of in (
            (self.prune_num_heads, UnitKind.HEAD, "prune_num_heads", 1, lambda r: (r % width) // dim),
            (self.prune_head_dims, UnitKind.HEAD_DIM, "prune_head_dims", 2, lambda r: r % dim),
        ):
            if not enabled:
                continue
            n_units = heads if kind is UnitKind.HEAD else dim
            members = [self._fused_member(raw, heads, dim, view_dim, n_units, unit_of)]
            for item in consumers:
                units = tuple(unit_of(r % width) for r in item.root_idxs)
                consumer_rule = self._rule(item)
                if consumer_rule is None:
                    return []
                members.append(self._member(attrs.evolve(item, root_idxs=units), consumer_rule))
            drafts.append((f"{raw.root_name}:{fn_label}", str(kind), raw.root_name, raw.pruning_fn,
                           n_units, members))
        return drafts

    def _fused_geometry(self, raw: RawGroup) -> tuple[int, int, list[Any]]:
        """Heads, head width and output projections of a fused qkv group, checked."""
        qkv, name = raw.root_module, raw.root_name
        heads = self.num_heads[qkv]
        if not isinstance(qkv, nn.Linear):
            raise ConfigError(
                f"num_heads[{name}] is set, but {type(qkv).__name__} is neither a fused qkv "
                "nn.Linear nor an nn.MultiheadAttention."
            )
        if qkv.out_features % (3 * heads):
            raise ConfigError(
                f"num_heads[{name}]={heads}: {name} is not a fused qkv projection of that many "
                f"heads ({qkv.out_features} output channels do not split into q, k and v heads; "
                f"need a multiple of {3 * heads}). num_heads keys must be fused qkv projections, "
                "nn.MultiheadAttention modules, or separate q/k/v projections of an attention."
            )
        dim = qkv.out_features // (3 * heads)
        consumers = []
        for item in raw.items:
            if item.module is qkv:
                continue
            if item.axis is not PruneAxis.IN_CHANNEL or not _reads_one_chunk(item, heads * dim):
                raise CouplingError(
                    f"The fused qkv projection {name} is coupled to {item.module_name} "
                    f"({item.axis}) in a way head units cannot describe; only output "
                    "projections reading the concatenated heads are supported."
                )
            consumers.append(item)
        return heads, dim, consumers

    @staticmethod
    def _fused_member(
        raw: RawGroup, heads: int, dim: int, view_dim: int, n_units: int, unit_of: Callable[[int], int]
    ) -> CanonicalMember:
        """The qkv projection's member: its weight (and bias) viewed as ``(3, heads, dim)``."""
        qkv = raw.root_module
        qkv_slices = [
            MemberSlice(param="weight", dims=(view_dim,), view=(3, heads, dim, -1),
                        role=ParamRole.WEIGHT, positions=tuple(range(n_units)),
                        units=tuple(range(n_units))),
        ]
        if qkv.bias is not None:
            qkv_slices.append(
                MemberSlice(param="bias", dims=(view_dim,), view=(3, heads, dim),
                            role=ParamRole.BIAS, positions=tuple(range(n_units)),
                            units=tuple(range(n_units)))
            )
        rows = tuple(range(3 * heads * dim))
        return CanonicalMember(
            module_name=raw.root_name, module_type=type(qkv), axis=PruneAxis.OUT_CHANNEL,
            pruning_fn=raw.pruning_fn, slices=tuple(qkv_slices),
            tp_indices=rows, tp_units=tuple(unit_of(r) for r in rows),
        )

    def _layout_drafts(self, layout: HeadLayout) -> list[Any]:
        """Head, kv-head and head-dim groups of one separate-projection attention."""
        kinds = []
        if self.prune_num_heads:
            kinds.append("head")
            if layout.grouped:
                kinds.append("kv_head")
        if self.prune_head_dims:
            if layout.rotary == "unknown":
                raise CouplingError(
                    f"{layout.name}: the query path of {layout.q} rotates head dimensions in a way "
                    "weighttracker does not recognise (not rotate_half halves or interleaved "
                    "pairs), so head-dimension units cannot be built. Pass prune_head_dims=False "
                    "(whole heads still work), or declare the rotation with attention_layouts="
                    "[AttentionLayout(..., rotary='half' or 'interleaved')]."
                )
            kinds.append("head_dim")
        drafts = []
        for kind in kinds:
            members = []
            for module_name, axis, positions, units in unit_rows(layout, kind):
                module = self.model.get_submodule(module_name)
                rule = self.rules.rule_for(type(module))
                if rule is None:
                    raise UnsupportedModuleError(
                        f"{layout.name}: no unit rule covers {module_name} ({type(module).__name__}); "
                        "register one to get head units."
                    )
                item = _raw_item(module_name, module, axis, HEAD_FN[kind], positions, units)
                members.append(self._member(item, rule))
            fn = HEAD_FN[kind]
            drafts.append((f"{layout.q}:{fn}", kind, layout.q, fn, layout.n_units(kind), members))
        return drafts

    def _mha_head_drafts(self, mha: nn.MultiheadAttention, heads: int) -> list[Any]:
        """Head / head-dim groups inside one ``nn.MultiheadAttention``."""
        name = self._names[mha]
        if heads != mha.num_heads:
            raise ConfigError(
                f"num_heads[{name}]={heads} but the nn.MultiheadAttention has "
                f"num_heads={mha.num_heads}."
            )
        if not mha._qkv_same_embed_dim:
            raise UnsupportedModuleError(
                f"{name}: nn.MultiheadAttention with kdim/vdim different from embed_dim has "
                "separate q/k/v projections; head units support the fused in_proj_weight only."
            )
        dim = mha.head_dim
        drafts = []
        for enabled, kind, fn_label, view_dim in (
            (self.prune_num_heads, UnitKind.HEAD, "prune_num_heads", 1),
            (self.prune_head_dims, UnitKind.HEAD_DIM, "prune_head_dims", 2),
        ):
            if not enabled:
                continue
            n_units = heads if kind is UnitKind.HEAD else dim
            units = tuple(range(n_units))
            slices = [
                MemberSlice(param="in_proj_weight", dims=(view_dim,), view=(3, heads, dim, -1),
                            role=ParamRole.WEIGHT, positions=units, units=units),
                MemberSlice(param="out_proj.weight", dims=(view_dim,), view=(-1, heads, dim),
                            role=ParamRole.WEIGHT, positions=units, units=units),
            ]
            if mha.in_proj_bias is not None:
                slices.append(
                    MemberSlice(param="in_proj_bias", dims=(view_dim,), view=(3, heads, dim),
                                role=ParamRole.BIAS, positions=units, units=units)
                )
            for extra in ("bias_k", "bias_v"):  # add_bias_kv: [1, 1, heads * dim]
                if getattr(mha, extra, None) is not None:
                    slices.append(
                        MemberSlice(param=extra, dims=(view_dim + 1,), view=(1, 1, heads, dim),
                                    role=ParamRole.BIAS, positions=units, units=units)
                    )
            width = heads * dim
            rows = tuple(range(width))
            unit_of = (lambda r: r // dim) if kind is UnitKind.HEAD else (lambda r: r % dim)
            member = CanonicalMember(
                module_name=name, module_type=type(mha), axis=PruneAxis.OUT_CHANNEL,
                pruning_fn=fn_label, slices=tuple(slices),
                tp_indices=rows, tp_units=tuple(unit_of(r) for r in rows),
            )
            drafts.append((f"{name}:{fn_label}", str(kind), name, fn_label, n_units, [member]))
        return drafts


def _reads_one_chunk(item: RawItem, width: int) -> bool:
    """Whether ``item`` is coupled one-to-one to one q/k/v chunk: its channel c <- row c.

    On the explicit attention path (``q * scale @ k.T``, softmax, ``@ v``) Torch-Pruning
    reaches the output projection through the query first and maps it onto the query
    rows instead of the value rows. Head and head-dim units remove the same positions from
    q, k and v, so projection column c belongs to the unit of chunk position c whichever
    chunk was followed; what has to hold is the one-to-one map within a single chunk.
    """
    chunks = {r // width for r in item.root_idxs}
    return (
        len(chunks) == 1
        and len(item.idxs) == width
        and all(r % width == i for i, r in zip(item.idxs, item.root_idxs))
    )


def _raw_item(
    name: str, module: nn.Module, axis: PruneAxis, fn: str, positions: Sequence[int], units: Sequence[int]
) -> Any:
    return RawItem(
        module_name=name, module=module, param_name=None, pruning_dim=None, axis=axis,
        pruning_fn=fn, idxs=tuple(positions), root_idxs=tuple(units),
    )


def _canonical_param_names(model: nn.Module) -> dict[str, str]:
    """Every name a parameter is reachable by -> the name ``named_parameters()`` gives it."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(param), name)
    return out


def _member_slice(spec: ParamSlice, idxs: Sequence[int], units: Sequence[int]) -> MemberSlice:
    return MemberSlice(
        param=spec.param,
        dims=spec.dim,
        view=spec.view,
        role=spec.role,
        positions=tuple(idxs),
        units=tuple(units),
    )


def warn_untraced(names: Sequence[str]) -> None:
    """A warning naming layers with parameters that the traced forward never ran."""
    if not names:
        return
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    warnings.warn(
        f"weighttracker: the traced forward never runs these layers: {shown}. They belong to "
        "no unit and a physical prune does not adapt them: a forward that uses them (often "
        "train mode, e.g. auxiliary heads) would fail on the pruned model. Remove them before "
        "pruning (e.g. aux_logits=False), or trace a forward that runs them: "
        "forward_fn=weighttracker_core.train_mode_forward runs train-mode branches without "
        "changing running statistics.",
        UserWarning,
        stacklevel=3,
    )


def warn_uncovered(uncovered: Sequence[str], skipped: Sequence[str]) -> None:
    """One warning listing layers no rule covers and the groups left out because of them."""
    if not uncovered and not skipped:
        return
    lines = []
    if uncovered:
        lines.append("no unit rule covers these layers: " + ", ".join(uncovered))
    if skipped:
        lines.append("groups left out because they cut such layers: " + "; ".join(skipped))
    warnings.warn(
        "weighttracker: "
        + ". ".join(lines)
        + ". Their parameters belong to no unit: metrics do not count them and pruning "
        "never cuts them. Register a unit-rule plugin for their type to include them.",
        UserWarning,
        stacklevel=3,
    )
