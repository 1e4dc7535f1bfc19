"""Brute-force per-unit element lists for the ranked-pruner tests (no reduction plans)."""

from __future__ import annotations

import torch


def owner_and_attr(model, module_name: str, param: str):
    owner = model.get_submodule(module_name) if module_name else model
    *path, attr = param.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def effective(model, module_name: str, param: str) -> torch.Tensor:
    """``orig * mask`` under torch.nn.utils.prune, else the parameter itself."""
    owner, attr = owner_and_attr(model, module_name, param)
    if f"{attr}_orig" in owner._parameters:
        return owner._parameters[f"{attr}_orig"] * getattr(owner, f"{attr}_mask")
    return getattr(owner, attr)


def stored(model, module_name: str, param: str) -> torch.Tensor:
    owner, attr = owner_and_attr(model, module_name, param)
    return owner._parameters.get(f"{attr}_orig", getattr(owner, attr))


def at_position(tensor: torch.Tensor, piece, position: int) -> torch.Tensor:
    """Every element of one position of a member slice, by explicit integer indexing."""
    shape = piece.viewed_shape(tuple(tensor.shape))
    viewed = tensor.reshape(shape)
    dims = [d % len(shape) for d in piece.dims]
    coords = []
    rest = position
    for d in reversed(dims):  # row-major over piece.dims
        coords.append(rest % shape[d])
        rest //= shape[d]
    coords.reverse()
    index = [slice(None)] * len(shape)
    for d, c in zip(dims, coords):
        index[d] = c
    return viewed[tuple(index)].reshape(-1)


def unit_elements(model, groups, keep=lambda member, piece: True, read=effective):
    """``{global unit id: 1-D tensor}`` of every element the unit owns (kept slices only)."""
    out: dict[int, list[torch.Tensor]] = {}
    for group in groups:
        for u in range(group.n_units):
            out.setdefault(group.offset + u, [])
        for member in group.members:
            for piece in member.slices:
                if not keep(member, piece):
                    continue
                tensor = read(model, member.module_name, piece.param).detach()
                for position, unit in zip(piece.positions, piece.units):
                    out[group.offset + unit].append(at_position(tensor, piece, position))
    return {u: torch.cat(parts) if parts else torch.zeros(0) for u, parts in out.items()}
