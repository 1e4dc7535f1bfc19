"""Fake pruning: zeroing canonical units in place, shapes unchanged.

Zeros are written to the tensor the layer stores: ``weight_orig`` under
``torch.nn.utils.prune`` (so ``weight_orig * weight_mask`` is zero), the ``original`` of a
parametrization under ``torch.nn.utils.parametrize``, otherwise the parameter itself. A
parametrization that does not map those zeros to zeros (or has several originals, like
``weight_norm``) is set through its ``right_inverse`` instead; if the layer's effective
weight is still not zero there, every write is undone and :class:`PruningError` raised.

Example: ``Linear(3, 2)`` whose output rows are units 0 and 1; zeroing unit 1 writes
``weight[1, :] = 0`` and ``bias[1] = 0`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import PruningError
from .names import owner_of
from .plans import effective_parameter
from .structure import Selection, Structure
from .units import MemberSlice


def _owner(module: nn.Module, attr: str) -> tuple[nn.Module, str]:
    return owner_of(module, attr)  # type: ignore[no-any-return]


def stored_parameter(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The tensor that holds ``module.<attr>``'s values (see module docstring).

    ``None`` when there is none (a ``None`` bias, or a parametrization with several
    originals such as ``weight_norm``).
    """
    module, attr = _owner(module, attr)
    orig = module._parameters.get(f"{attr}_orig")
    if orig is not None:
        return orig
    if parametrize.is_parametrized(module, attr):
        return getattr(module.parametrizations[attr], "original", None)  # type: ignore[index, union-attr]
    return getattr(module, attr, None)


def _index(piece: MemberSlice, shape: tuple[int, ...], positions: list[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[torch.Tensor, ...]]:
    """Viewed shape, permutation putting the sliced dims first, and their index tensors."""
    viewed = piece.viewed_shape(shape)
    index = torch.tensor(positions, dtype=torch.long)
    parts = torch.unravel_index(index, [viewed[d] for d in piece.dims])
    others = tuple(d for d in range(len(viewed)) if d not in piece.dims)
    return viewed, (*piece.dims, *others), tuple(parts)


def zero_positions_(tensor: torch.Tensor, piece: MemberSlice, positions: list[int]) -> None:
    """Write zeros at ``positions`` of ``piece`` in ``tensor`` (in place)."""
    if not positions:
        return
    viewed, order, parts = _index(piece, tuple(tensor.shape), positions)
    index = tuple(p.to(tensor.device) for p in parts)
    with torch.no_grad():
        if tensor.is_contiguous():
            tensor.view(viewed).permute(*order)[index] = 0
        else:  # e.g. channels_last weights: zero a contiguous copy, write it back
            work = tensor.contiguous()
            work.view(viewed).permute(*order)[index] = 0
            tensor.copy_(work)


def positions_are_zero(tensor: torch.Tensor, piece: MemberSlice, positions: list[int]) -> bool:
    """Whether every element at ``positions`` of ``piece`` is exactly zero."""
    if not positions:
        return True
    viewed, order, parts = _index(piece, tuple(tensor.shape), positions)
    moved = tensor.detach().reshape(viewed).permute(*order)
    return bool((moved[tuple(p.to(tensor.device) for p in parts)] == 0).all())


def fake_prune_units_(structure: Structure, units: Mapping[int, Iterable[int]]) -> None:
    """Zero every weight of ``units`` (``{group id: local unit ids}``) in every member.

    All ids are checked first; a failure while writing undoes every write.

    Raises:
        UnitIndexError: A group or unit id is out of range or not an int.
        PruningError: A parametrization cannot represent the zeros.
    """
    request = structure.unit_request(units)
    writes: dict[tuple[str, str], list[tuple[MemberSlice, list[int]]]] = {}
    for group_id, chosen in request.items():
        for member, piece in structure.groups[group_id].iter_slices():
            positions = [p for p, u in zip(piece.positions, piece.units) if u in chosen]
            if positions:
                writes.setdefault((member.module_name, piece.param), []).append((piece, positions))
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for (module_name, param), pieces in writes.items():
            _zero_parameter(structure.module(module_name), module_name, param, pieces, saved)
    except BaseException:
        with torch.no_grad():
            for tensor, copy in reversed(saved):
                tensor.copy_(copy)
        raise
    for module_name, param in writes:
        owner, attr = _owner(structure.module(module_name), param)
        orig, mask = owner._parameters.get(f"{attr}_orig"), getattr(owner, f"{attr}_mask", None)
        if orig is not None and isinstance(mask, torch.Tensor):
            # torch.nn.utils.prune recomputes ``weight`` only in the next forward
            setattr(owner, attr, orig * mask)


def _zero_parameter(
    module: nn.Module,
    module_name: str,
    param: str,
    pieces: list[tuple[MemberSlice, list[int]]],
    saved: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    owner, attr = _owner(module, param)
    if not parametrize.is_parametrized(owner, attr):
        stored = stored_parameter(owner, attr)
        if stored is not None:
            saved.append((stored, stored.detach().clone()))
            for piece, positions in pieces:
                zero_positions_(stored, piece, positions)
        return
    originals = list(owner.parametrizations[attr].parameters())  # type: ignore[index, union-attr]
    shape = tuple(effective_parameter(owner, attr).shape)
    for piece, positions in pieces:
        if not _zero_through_originals(owner, attr, piece, positions, originals, shape, saved):
            _zero_through_right_inverse(owner, attr, module_name, param, piece, positions, saved)


def _fits(piece: MemberSlice, tensor: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Whether ``piece`` can index ``tensor`` as it indexes a parameter of ``shape``."""
    if tensor.shape == shape:
        return True
    if piece.view is not None or tensor.dim() != len(shape):
        return False
    return all(tensor.shape[d] == shape[d] for d in piece.dims)


def _zero_through_originals(
    owner: nn.Module,
    attr: str,
    piece: MemberSlice,
    positions: list[int],
    originals: list[torch.Tensor],
    shape: tuple[int, ...],
    saved: list[tuple[torch.Tensor, torch.Tensor]],
) -> bool:
    """Zero the positions in one original whose parametrization then gives zeros there.

    ``weight_norm`` (``g * v / ||v||``): output rows are zeroed through ``g``, input
    columns through ``v``; zeroing both would give ``0 / 0``.
    """
    for original in originals:
        if not _fits(piece, original, shape):
            continue
        before = original.detach().clone()
        zero_positions_(original, piece, positions)
        if _effective_zero(owner, attr, [(piece, positions)]):
            saved.append((original, before))
            return True
        with torch.no_grad():
            original.copy_(before)
    return False


def _zero_through_right_inverse(
    owner: nn.Module,
    attr: str,
    module_name: str,
    param: str,
    piece: MemberSlice,
    positions: list[int],
    saved: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    originals = list(owner.parametrizations[attr].parameters())  # type: ignore[index, union-attr]
    saved.extend((t, t.detach().clone()) for t in originals)
    with torch.no_grad():
        weight = effective_parameter(owner, attr).detach().clone()
        zero_positions_(weight, piece, positions)
        try:
            setattr(owner, attr, weight)
        except (RuntimeError, NotImplementedError, ValueError) as err:
            raise _not_representable(module_name, param, err) from err
    if not _effective_zero(owner, attr, [(piece, positions)]):
        raise _not_representable(module_name, param, None)


def _effective_zero(owner: nn.Module, attr: str, pieces: list[tuple[MemberSlice, list[int]]]) -> bool:
    """The layer's weight is zero at the positions and finite everywhere."""
    with torch.no_grad():
        value = effective_parameter(owner, attr)
    if not bool(torch.isfinite(value).all()):
        return False
    return all(positions_are_zero(value, piece, positions) for piece, positions in pieces)


def _not_representable(module_name: str, param: str, err: BaseException | None) -> PruningError:
    why = f" ({type(err).__name__}: {err})" if err is not None else ""
    return PruningError(
        f"Cannot fake-prune {module_name}.{param}: its parametrization does not give zero "
        f"weights for zeroed units{why}. Remove the parametrization "
        "(torch.nn.utils.parametrize.remove_parametrizations) or use one that keeps zeros; "
        "nothing was changed."
    )


def zero_units(structure: Structure, selection: Selection) -> dict[int, list[int]]:
    """``{group id: local ids of units whose weights are all zero}`` over ``selection``.

    A unit that owns no weight of the selected layers is never zero.
    """
    plan = structure.plan(selection)
    with torch.no_grad():
        peak = plan.unit_reduce("max_abs")
    has_weights = plan.unit_numel().to(peak.device) > 0
    zero = ((peak == 0) & has_weights).nonzero().flatten().tolist()
    out: dict[int, list[int]] = {}
    owners = structure.group_of_unit
    for unit in zero:
        group = structure.groups[int(owners[unit])]
        out.setdefault(group.id, []).append(unit - group.offset)
    return out
