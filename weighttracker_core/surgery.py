"""Physical pruning through Torch-Pruning and unit-rule head pruners, all or nothing.

Before anything changes, the request is checked: unit ids, never every unit of a group,
no layer under ``torch.nn.utils.prune`` / ``parametrize``, the unit rules' own constraints
(grouped convolutions, GroupNorm, attention). The model is then snapshotted: every module's
class and attributes, its parameter and buffer objects, their data, gradients and
``requires_grad``. If pruning, a post-prune hook or the structure rebuild fails, the
snapshot is put back exactly and the error re-raised.

Channel groups are removed by Torch-Pruning (one call per root and pruning function).
Head and head-dimension groups of layers whose rule has a ``head_pruner`` (``"prune_num_heads"``
/ ``"prune_head_dims"``) are removed by that pruner, one call per layer with every removed
attention position, so heads and head dimensions removed together stay consistent.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import attrs
import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import PruningError, WeightTrackerError
from .heads import AttentionChange, HeadLayout, plan_removal, removed_rows
from .names import join_name, owner_of, split_name
from .specs import HeadPruner
from .structure import Selection, Structure
from .units import CanonicalUnitGroup, PruneAxis
from .summaries import short_list

HEAD_FNS = ("prune_num_heads", "prune_head_dims", "prune_kv_heads")


@attrs.frozen(kw_only=True)
class PruneReport:
    """What a physical prune removed (or, with ``dry_run``, would remove).

    Attributes:
        units: ``{group name: sorted local unit ids}``.
        tp_indices: ``{group name: Torch-Pruning indices on the root module}`` (attention
            positions ``head * head_dim + d`` for head and head-dim groups).
        params_before: Parameter elements in the model before.
        params_after: Parameter elements after (equal to ``params_before`` on a dry run).
        dry_run: Whether the model was left unchanged on purpose.
        left_zero: ``{group name: why}`` for zero units a ``prune_zero_units`` left in place.
    """

    units: dict[str, list[int]]
    tp_indices: dict[str, list[int]]
    params_before: int
    params_after: int
    dry_run: bool
    left_zero: dict[str, str] = attrs.field(factory=dict)

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
            lines.append(f"  {name}: units {short_list(units)}")
        if not self.dry_run:
            lines.append(f"  parameters: {self.params_before} -> {self.params_after}")
        for name, why in self.left_zero.items():
            lines.append(f"  {name}: {why}")
        return "\n".join(lines)


def _copy_container(value: Any) -> Any:
    """Containers (parameter/buffer/module dicts, hook dicts, name sets) one level deep."""
    return copy.copy(value) if isinstance(value, (dict, set, list)) else value


def _layout(t: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(t.shape), t.stride(), t.storage_offset(), t.untyped_storage().data_ptr(),
            t.dtype, t.device)


def _put_back(t: torch.Tensor, saved: torch.Tensor, layout: tuple[Any, ...], version: int) -> None:
    """Give ``t`` its saved values: in place if it still has its storage, else re-point it.

    Values are always copied back: an edit through ``tensor.data`` changes them without
    bumping the tensor's version counter, so the counter cannot tell what changed.
    """
    if _layout(t) == layout:
        t.copy_(saved)
    else:  # resized or re-pointed (``.data = ...``)
        t.data = saved


class _TensorState:
    """One parameter or buffer: its data (cloned), layout, version, gradient, grad flag."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.saved = tensor.detach().clone()
        self.layout = _layout(tensor)
        self.version = tensor._version
        self.requires_grad = tensor.requires_grad
        self.grad = tensor.grad if isinstance(tensor, nn.Parameter) else None
        if self.grad is not None:
            self.grad_saved = self.grad.detach().clone()
            self.grad_layout = _layout(self.grad)
            self.grad_version = self.grad._version

    def restore(self) -> None:
        with torch.no_grad():
            _put_back(self.tensor, self.saved, self.layout, self.version)
            if isinstance(self.tensor, nn.Parameter):
                if self.grad is not None:
                    _put_back(self.grad, self.grad_saved, self.grad_layout, self.grad_version)
                self.tensor.grad = self.grad
        if self.tensor.is_leaf:
            self.tensor.requires_grad_(self.requires_grad)


class ModelSnapshot:
    """Everything physical pruning may change, kept so it can be put back exactly.

    Per module: its class (layers may be converted in place, e.g. attention) and a copy of
    its ``__dict__`` with the containers (``_parameters``, ``_buffers``, ``_modules``, hook
    dicts, sets of buffer names) copied one level deep. Per parameter and buffer: the
    object, a clone of its values, its layout, gradient and ``requires_grad``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.entries: list[tuple[nn.Module, type, dict[str, Any]]] = []
        tensors: dict[int, torch.Tensor] = {}
        for module in model.modules():
            state = {k: _copy_container(v) for k, v in module.__dict__.items()}
            self.entries.append((module, type(module), state))
            for t in list(module._parameters.values()) + list(module._buffers.values()):
                if t is not None:
                    tensors[id(t)] = t
        self.tensors = [_TensorState(t) for t in tensors.values()]

    def restore(self) -> None:
        for state in self.tensors:
            state.restore()
        for module, cls, saved in self.entries:
            if type(module) is not cls:
                module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update(saved)


def count_params(model: nn.Module) -> int:
    """Parameter elements of ``model``, each shared parameter once."""
    return sum(p.numel() for p in model.parameters())


def resolve_request(
    structure: Structure, units: Mapping[int, Iterable[int]]
) -> dict[int, set[int]]:
    """Checked ``{group id: local unit ids}`` without empty groups.

    Raises:
        PruningError: Every unit of a group would be removed.
    """
    request: dict[int, set[int]] = {}
    for group_id, chosen in structure.unit_request(units).items():
        group = structure.groups[group_id]
        if not chosen:
            continue
        if len(chosen) >= group.n_units:
            raise PruningError(
                f"Refusing to remove all {group.n_units} units of group {group.id} "
                f"({group.name}): the coupled layers would have no channels left. Keep at "
                f"least one unit, or exclude the group with ignore_prune=[model."
                f"{group.root_module or '<root>'}]."
            )
        request[group.id] = chosen
    return request


@attrs.define
class _Operation:
    """One pruning call: Torch-Pruning on ``root`` with ``fn``, a head pruner, or the heads
    of a separate-projection attention (``layout``, with units per kind)."""

    root: str
    fn: str
    groups: list[CanonicalUnitGroup] = attrs.field(factory=list)
    idxs: set[int] = attrs.field(factory=set)
    head_pruner: HeadPruner | None = None
    layout: HeadLayout | None = None
    units: dict[str, set[int]] = attrs.field(factory=dict)
    change: AttentionChange | None = None

    @property
    def late(self) -> bool:
        """Head pruning runs after Torch-Pruning's channel pruning (see ``prune_units``)."""
        return self.head_pruner is not None or self.layout is not None


def _operations(structure: Structure, request: Mapping[int, set[int]]) -> list[_Operation]:
    """The calls to make, all indices in the numbering before the prune.

    Groups that share a root axis (heads and head dimensions of one projection or one
    attention layer) are merged into one call with the union of their indices.
    """
    ops: dict[tuple[str, str], _Operation] = {}
    rules = structure.registries.unit_rules
    for group_id, units in request.items():
        group = structure.groups[group_id]
        root = group.root_member
        layout = structure.layouts.get(group.root_module) if group.pruning_fn in HEAD_FNS else None
        if layout is not None:
            op = ops.setdefault((group.root_module, "layout"),
                                _Operation(group.root_module, "layout", layout=layout))
            op.groups.append(group)
            op.units.setdefault(str(group.kind), set()).update(units)
            continue
        if root.pruning_fn in HEAD_FNS:
            module = structure.module(group.root_module)
            rule = rules.rule_for(type(module))
            pruner = rule.head_pruner if rule is not None else None
            if pruner is None:
                raise PruningError(
                    f"Group {group.id} ({group.name}) cannot be removed physically: the unit "
                    f"rule for {type(module).__name__} has no head_pruner. Fake pruning and "
                    "metrics still work; exclude it with ignore_prune=[...]."
                )
            op = ops.setdefault((group.root_module, "heads"),
                                _Operation(group.root_module, "heads", head_pruner=pruner))
        elif not root.pruning_fn.startswith("prune_"):
            raise PruningError(
                f"Group {group.id} ({group.name}) cannot be removed physically: no layer "
                f"pruner handles {root.pruning_fn!r} on {group.root_module}. Fake pruning "
                "and metrics still work."
            )
        else:
            op = ops.setdefault((group.root_module, root.pruning_fn),
                                _Operation(group.root_module, root.pruning_fn))
        op.groups.append(group)
        op.idxs.update(root.indices_of(units))
    return list(ops.values())


def _reparametrized(module: nn.Module, param: str) -> str | None:
    """How ``module.<param>`` is re-parametrised, if it is (pruning cannot resize it)."""
    owner, attr = owner_of(module, param)
    if f"{attr}_orig" in owner._parameters:
        return (f"torch.nn.utils.prune re-parametrises it; call torch.nn.utils.prune.remove("
                f"layer, {attr!r}) first")
    if parametrize.is_parametrized(owner, attr):
        return ("it is parametrized; call torch.nn.utils.parametrize.remove_parametrizations("
                f"layer, {attr!r}) first")
    return None


def _cut_places(structure: Structure, group: CanonicalUnitGroup) -> set[tuple[str, str]]:
    """``(owner module, attribute)`` of every parameter the group's members cut.

    Read from the unit rules (not the member slices, from which a tied parameter's second
    place was deduplicated).
    """
    rules = structure.registries.unit_rules
    out = set()
    for member in group.members:
        module = structure.module(member.module_name)
        rule = rules.rule_for(type(module))
        pieces = rule.slices_for(module, member.axis) if rule is not None else ()
        for piece in (*pieces, *member.slices):
            owner, attr = split_name(piece.param)
            out.add((join_name(member.module_name, owner), attr))
    return out


def _check_ties(structure: Structure, group: CanonicalUnitGroup) -> None:
    """Refuse a group that cuts a tied parameter in one of its places but not the others."""
    ties = tied_parameters(structure.model)
    if not ties:
        return
    names = {id(m): n for n, m in structure.model.named_modules()}
    cut = _cut_places(structure, group)
    for places in ties:
        where = [(names.get(id(module), "?"), attr) for module, attr in places]
        touched = [p for p in where if p in cut]
        if touched and len(touched) < len(where):
            (first, attr), (other, other_attr) = touched[0], next(p for p in where if p not in touched)
            raise PruningError(
                f"Cannot remove units of group {group.id} ({group.name}): {first}.{attr} is tied "
                f"to {other}.{other_attr} (one parameter), and this group cuts it only through "
                f"{first}, so the tie could not be kept. Keep this group (ignore_prune, or "
                "prune_model_outputs=False for an output layer), or untie them first: "
                f"model.{first}.{attr} = torch.nn.Parameter(model.{first}.{attr}.detach().clone())."
            )


def _check(structure: Structure, request: Mapping[int, set[int]], ops: list[_Operation]) -> None:
    """Refuse, before anything changes, what the layers cannot take."""
    rules = structure.registries.unit_rules
    for group_id, units in request.items():
        group = structure.groups[group_id]
        _check_ties(structure, group)
        for member in group.members:
            module = structure.module(member.module_name)
            for piece in member.slices:
                reason = _reparametrized(module, piece.param)
                if reason:
                    raise PruningError(
                        f"Cannot remove units of group {group.id} ({group.name}): "
                        f"{member.module_name}.{piece.param}: {reason}."
                    )
            if member.pruning_fn in HEAD_FNS:
                continue  # checked per layer below, with every head position
            rule = rules.rule_for(member.module_type)
            if rule is None or rule.validate_prune is None:
                continue
            reason = rule.validate_prune(module, member.axis, member.indices_of(units))
            if reason:
                raise PruningError(
                    f"Cannot remove units {sorted(units)} of group {group.id} ({group.name}): "
                    f"{member.module_name} ({rule.name}): {reason}."
                )
    for op in ops:
        if op.layout is not None:
            change = plan_removal(op.layout, op.units.get("head", ()), op.units.get("kv_head", ()),
                                  op.units.get("head_dim", ()))
            if isinstance(change, str):
                names = ", ".join(g.name for g in op.groups)
                raise PruningError(f"Cannot remove heads of {op.layout.name} ({names}): {change}.")
            if change.removed_dims and op.layout.rotary is not None:
                raise PruningError(
                    f"Cannot remove head dimensions of {op.layout.name} physically: it uses rotary "
                    "embeddings, whose frequencies the model computes from head_dim, so the kept "
                    "dimension pairs would rotate at other frequencies than before. Fake pruning "
                    "and metrics work on these units; physically remove whole heads instead."
                )
            op.change = change
            continue
        if op.head_pruner is None:
            continue
        reason = op.head_pruner.check_heads(structure.module(op.root), sorted(op.idxs))
        if reason:
            names = ", ".join(g.name for g in op.groups)
            raise PruningError(f"Cannot remove heads of {op.root} ({names}): {reason}.")


@attrs.frozen(kw_only=True)
class PrunePlan:
    """A physical-prune request, checked once: what goes and the calls that remove it.

    Attributes:
        units: ``{group id: local unit ids}``, only groups that lose units.
        by_name: ``{group name: sorted local unit ids}`` (what hooks and reports show).
        tp_indices: ``{group name: Torch-Pruning indices on the root module}``.
        changes: ``{attention name: AttentionChange}`` for separate-projection attention.
    """

    units: dict[int, set[int]]
    by_name: dict[str, list[int]]
    tp_indices: dict[str, list[int]]
    changes: dict[str, AttentionChange]
    operations: tuple[_Operation, ...]


def plan_prune(structure: Structure, units: Mapping[int, Iterable[int]]) -> PrunePlan:
    """Check ``units`` (``{group id: local unit ids}``) and plan their removal.

    Raises:
        PruningError: The request is refused (nothing has changed).
        UnitIndexError: An id is out of range.
        ArgumentTypeError: ``units`` is not a mapping of id lists.
    """
    request = resolve_request(structure, units)
    ops = _operations(structure, request)
    _check(structure, request, ops)
    groups = structure.groups
    return PrunePlan(
        units=request,
        by_name={groups[g].name: sorted(u) for g, u in request.items()},
        tp_indices={groups[g].name: groups[g].root_member.indices_of(u) for g, u in request.items()},
        changes={op.layout.name: op.change for op in ops
                 if op.layout is not None and op.change is not None},
        operations=tuple(ops),
    )


def _prune_heads(structure: Structure, op: _Operation) -> None:
    """Cut the q / k / v rows and o columns of the heads and dimensions ``op`` removes."""
    layout, change = op.layout, op.change
    assert layout is not None and change is not None
    q_rows, kv_rows = removed_rows(layout, change)
    handle = structure.handle
    if q_rows:
        handle.prune_layer(structure.module(layout.q), PruneAxis.OUT_CHANNEL, q_rows)
        handle.prune_layer(structure.module(layout.o), PruneAxis.IN_CHANNEL, q_rows)
    if kv_rows:
        for name in (layout.k, layout.v):
            handle.prune_layer(structure.module(name), PruneAxis.OUT_CHANNEL, kv_rows)


def tied_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """``(module, attribute)`` places of every parameter reachable from more than one."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                places.setdefault(id(param), []).append((module, attr))
    return [p for p in places.values() if len(p) > 1]


def retie_(ties: list[list[tuple[nn.Module, str]]]) -> None:
    """Point every place of a tie at the first place's (pruned) parameter again.

    Torch-Pruning replaces the parameter of each layer it cuts; a tied embedding and output
    layer then hold two copies with equal values. The tie is restored when the copies agree.
    """
    for places in ties:
        first_module, first_attr = places[0]
        param = first_module._parameters[first_attr]
        for module, attr in places[1:]:
            other = module._parameters[attr]
            if other is param or other is None or param is None:
                continue
            if other.shape != param.shape or not torch.equal(other.detach(), param.detach()):
                raise PruningError(
                    f"A tied parameter ({type(first_module).__name__}.{first_attr} and "
                    f"{type(module).__name__}.{attr}) was cut differently in its two places; the tie "
                    "cannot be kept."
                )
            module._parameters[attr] = param


def keep_output_widths(
    structure: Structure, zero: Mapping[int, list[int]], blocked: Selection
) -> tuple[dict[int, list[int]], dict[str, str]]:
    """``zero`` without groups that cut an output width ``blocked`` keeps, and why.

    Groups that only cut the inputs of blocked layers stay in the request.
    """
    kept, left = dict(zero), {}
    for group_id in list(kept):
        group = structure.groups[group_id]
        cut = [m.module_name for m in group.members
               if m.axis is not PruneAxis.IN_CHANNEL and blocked.selects(m.module_name)]
        if cut:
            left[group.name] = (
                f"{len(kept.pop(group_id))} zero units left in place: ignore_prune keeps the "
                f"output width of {cut[0]}"
            )
    return kept, left


class PruneSteps(Protocol):
    """What the caller does around the cut, inside the all-or-nothing snapshot."""

    def after_prune(self) -> None:
        """Integration and user hooks, run after the shapes changed."""

    def rebuild(self) -> None:
        """Rebuild the structure for the pruned model."""

    def roll_back(self) -> None:
        """Put back the caller's own state; the model is already restored."""


def prune_units(structure: Structure, plan: PrunePlan, steps: PruneSteps, *, dry_run: bool = False) -> PruneReport:
    """Remove what ``plan`` (from :func:`plan_prune` on ``structure``) removes; atomic.

    If the cut, ``steps.after_prune()`` or ``steps.rebuild()`` fails, the model is restored
    exactly, ``steps.roll_back()`` runs and the error is re-raised.

    Raises:
        PruningError: The pruned model could not be traced again (nothing changed).
    """
    before = count_params(structure.model)
    if dry_run or not plan.units:
        return PruneReport(units=plan.by_name, tp_indices=plan.tp_indices, params_before=before,
                           params_after=before, dry_run=dry_run)
    # under torch.inference_mode() the pruned parameters (and the snapshot) would be
    # inference tensors, which autograd cannot use: the next trace would fail
    with torch.inference_mode(False):
        snapshot = ModelSnapshot(structure.model)
        try:
            _cut(structure, plan.operations)
            steps.after_prune()
            _rebuild(steps)
        except BaseException:
            snapshot.restore()
            steps.roll_back()
            raise
    return PruneReport(units=plan.by_name, tp_indices=plan.tp_indices, params_before=before,
                       params_after=count_params(structure.model), dry_run=False)


def _cut(structure: Structure, ops: Iterable[_Operation]) -> None:
    """Make every pruning call, then tie tied parameters again."""
    ties = tied_parameters(structure.model)
    # Torch-Pruning first: it maps indices through the traced graph, whose shapes the
    # head pruners would otherwise have changed under it.
    for op in sorted(ops, key=lambda o: o.late):
        module = structure.module(op.root)
        if op.layout is not None:
            _prune_heads(structure, op)
        elif op.head_pruner is not None:
            op.head_pruner.prune_heads(module, sorted(op.idxs))
        else:
            structure.handle.prune(module, op.fn, sorted(op.idxs))
    retie_(ties)


def _rebuild(steps: PruneSteps) -> None:
    try:
        steps.rebuild()
    except (WeightTrackerError, RuntimeError, ValueError, TypeError) as err:
        raise PruningError(
            "The pruned model could not be traced again with the example inputs, so the "
            f"prune was undone and the model restored unchanged. Cause: {err} (a forward "
            "that hard-codes a channel count, or an attention layer whose metadata a "
            "post_prune_hook must update, does this)."
        ) from err
