"""Fake pruning: zeroing canonical units in place, shapes unchanged (SPEC §7).

Zeros are written to the tensor the layer stores: ``weight_orig`` under
``torch.nn.utils.prune``, ``parametrizations.weight.original`` under
``torch.nn.utils.parametrize``, otherwise the parameter itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .structure import Structure
from .units import CanonicalUnitGroup, MemberSlice


def stored_parameter(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The tensor that holds ``module.<attr>``'s values (see module docstring)."""
    if "." in attr:
        head, _, attr = attr.rpartition(".")
        module = module.get_submodule(head)
    orig = module._parameters.get(f"{attr}_orig")
    if orig is not None:
        return orig
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original  # type: ignore[index, union-attr]
    return getattr(module, attr, None)


def zero_positions_(tensor: torch.Tensor, piece: MemberSlice, positions: list[int]) -> None:
    """Write zeros at ``positions`` of ``piece`` in ``tensor`` (in place)."""
    if not positions:
        return
    shape = piece.viewed_shape(tuple(tensor.shape))
    with torch.no_grad():
        viewed = tensor.view(shape)
        index = torch.tensor(positions, dtype=torch.long, device=tensor.device)
        if len(piece.dims) == 1:
            viewed.index_fill_(piece.dims[0], index, 0)
            return
        sizes = [shape[d] for d in piece.dims]
        parts = torch.unravel_index(index, sizes)
        others = [d for d in range(len(shape)) if d not in piece.dims]
        moved = viewed.permute(*piece.dims, *others)
        moved[parts] = 0


def fake_prune_units_(structure: Structure, units: Mapping[int, Iterable[int]]) -> None:
    """Zero every weight of ``units`` (``{group id: local unit ids}``) in every member."""
    for group_id, local in units.items():
        group = structure.group(group_id)
        chosen = {structure.check_unit(group, u) for u in local}
        _zero_group_units(structure, group, chosen)


def _zero_group_units(structure: Structure, group: CanonicalUnitGroup, units: set[int]) -> None:
    for member, piece in group.iter_slices():
        positions = [p for p, u in zip(piece.positions, piece.units) if u in units]
        if not positions:
            continue
        module = structure.module(member.module_name)
        tensor = stored_parameter(module, piece.param)
        if tensor is None:
            continue
        zero_positions_(tensor, piece, positions)
