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


def unit_reference(rows, num_units: int, op: str) -> torch.Tensor:
    """Per-unit reduction by looping over member slices and their positions."""
    out = [0.0] * num_units
    for units, block in rows:
        block = block.detach().double()
        per_row = {
            "sum": block.sum(1),
            "sum_sq": (block * block).sum(1),
            "l1": block.abs().sum(1),
            "l2": (block * block).sum(1),
            "max_abs": block.abs().amax(1),
            "zeros": (block == 0).sum(1).double(),
            "nonzeros": (block != 0).sum(1).double(),
            "numel": torch.full((block.shape[0],), float(block.shape[1]), dtype=torch.float64),
        }[op].tolist()
        for unit, value in zip(units.tolist(), per_row):
            out[unit] = max(out[unit], value) if op == "max_abs" else out[unit] + value
    result = torch.tensor(out, dtype=torch.float64)
    return result.sqrt() if op == "l2" else result
