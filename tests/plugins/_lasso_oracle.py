"""Brute-force group-lasso references: explicit loops over groups, members, slices, positions.

Written from the data model's definition (a position is the row-major index over ``dims``
of the parameter viewed as ``view``), independently of the reduction plans.
"""

from __future__ import annotations

import math

import torch


def tensor_of(model, module_name: str, param: str) -> torch.Tensor:
    """The effective parameter (``orig * mask`` under torch.nn.utils.prune)."""
    obj = model.get_submodule(module_name) if module_name else model
    *owners, attr = param.split(".")
    for part in owners:
        obj = getattr(obj, part)
    orig = obj._parameters.get(f"{attr}_orig")
    if orig is not None:
        return orig * getattr(obj, f"{attr}_mask")
    return getattr(obj, attr)


def index_of(shape, dims, position):
    """The indexing tuple selecting one position (row-major over ``dims``)."""
    index = [slice(None)] * len(shape)
    rest = position
    for dim in reversed(dims):
        index[dim] = rest % shape[dim]
        rest //= shape[dim]
    return tuple(index)


def unit_elements(model, groups, selected=lambda name: True):
    """``{global unit: [element tensors]}``; keeps autograd (slices of the parameters)."""
    out: dict[int, list[torch.Tensor]] = {}
    for group in groups:
        for member in group.members:
            if not selected(member.module_name):
                continue
            for piece in member.slices:
                tensor = tensor_of(model, member.module_name, piece.param)
                shape = piece.viewed_shape(tuple(tensor.shape))
                viewed = tensor.reshape(shape)
                for position, unit in zip(piece.positions, piece.units):
                    part = viewed[index_of(shape, piece.dims, position)]
                    out.setdefault(group.offset + unit, []).append(part.reshape(-1))
    return out


def brute_penalty(model, groups, selected=lambda name: True, weighting="sqrt_numel"):
    """``sum_u c_u * ||w_u||`` in float64, one unit at a time."""
    total = torch.zeros((), dtype=torch.float64)
    for parts in unit_elements(model, groups, selected).values():
        flat = torch.cat(parts).double()
        count = flat.numel()
        coefficient = math.sqrt(count) if weighting == "sqrt_numel" else 1.0
        total = total + coefficient * torch.sqrt((flat * flat).sum())
    return total


def brute_norms_and_counts(model, groups, num_units, selected=lambda name: True):
    norms = torch.zeros(num_units, dtype=torch.float64)
    counts = torch.zeros(num_units, dtype=torch.float64)
    with torch.no_grad():
        for unit, parts in unit_elements(model, groups, selected).items():
            flat = torch.cat(parts).double()
            norms[unit] = flat.norm()
            counts[unit] = flat.numel()
    return norms, counts
