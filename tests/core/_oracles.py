"""Brute-force references written independently of the library's reduction plans."""

from __future__ import annotations

import torch


def param_of(model, module_name: str, param: str) -> torch.Tensor:
    obj = model.get_submodule(module_name) if module_name else model
    for part in param.split("."):
        obj = getattr(obj, part)
    return obj


def slice_rows(tensor: torch.Tensor, piece) -> torch.Tensor:
    """``[positions, elements]``: every position of a member slice as one row.

    Dims are moved to the front with an explicit permute (the plans reduce in place
    instead), so rows follow the row-major order over ``piece.dims``.
    """
    shape = piece.viewed_shape(tuple(tensor.shape))
    viewed = tensor.reshape(shape)
    dims = [d % len(shape) for d in piece.dims]
    others = [d for d in range(len(shape)) if d not in dims]
    length = 1
    for d in dims:
        length *= shape[d]
    return viewed.permute(*dims, *others).reshape(length, -1)


def unit_rows(model, groups):
    """``[(global unit ids, rows)]`` for every member slice (rows as in ``slice_rows``)."""
    out = []
    for group in groups:
        for member in group.members:
            for piece in member.slices:
                rows = slice_rows(param_of(model, member.module_name, piece.param), piece)
                index = torch.tensor(piece.positions, dtype=torch.long)
                units = torch.tensor([group.offset + u for u in piece.units], dtype=torch.long)
                out.append((units, rows.index_select(0, index)))
    return out
