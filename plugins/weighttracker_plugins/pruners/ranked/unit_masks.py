"""Persistent structured masks for canonical units through ``torch.nn.utils.prune``.

``UnitMasks.apply_`` re-parametrises every parameter a unit owns with
``prune.custom_from_mask``: the parameter becomes ``<name>_orig`` (the same ``Parameter``
object, so optimizers keep updating it), a ``<name>_mask`` buffer is added, and a forward
pre-hook recomputes ``<name> = <name>_orig * <name>_mask`` before every forward. A masked
unit therefore stays *exactly* zero through any number of optimizer steps (momentum and
weight decay move ``_orig``, never the product). Masks applied on top of other
``torch.nn.utils.prune`` methods compose through ``PruningContainer``.

weighttracker reads effective weights (``orig * mask``), so trackers and zero-unit
detection see the masked units as zero at once. ``finalize()`` calls ``prune.remove`` on
every parameter it masked: the zeros are baked into plain parameters and the
re-parametrisation disappears, ready for ``tracker.prune_zero_units()``.

Example: masking output channel 1 of ``Linear(2, 3)`` sets
``weight_mask = [[1, 1], [0, 0], [1, 1]]`` and ``bias_mask = [1, 0, 1]``.

No hook implementations live here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from weighttracker_core.plugin import MemberSlice, PruningError, Structure


def slice_keep_mask(shape: tuple[int, ...], piece: MemberSlice, positions: Iterable[int]) -> torch.Tensor:
    """A boolean tensor of ``shape``: False on every element of ``positions`` of ``piece``.

    Positions index the sliced dims of the parameter viewed as ``piece.view``, row-major
    over ``piece.dims`` (see :class:`MemberSlice`).
    """
    viewed = piece.viewed_shape(tuple(shape))
    dims = [d % len(viewed) for d in piece.dims]
    sizes = [viewed[d] for d in dims]
    keep = torch.ones(math.prod(sizes), dtype=torch.bool)
    index = torch.tensor(sorted(set(positions)), dtype=torch.long)
    if index.numel():
        keep[index] = False
    keep = keep.view(sizes).permute(*sorted(range(len(dims)), key=lambda i: dims[i]))
    broadcast = [viewed[d] if d in dims else 1 for d in range(len(viewed))]
    return keep.reshape(broadcast).expand(viewed).reshape(shape)


def _split(module: nn.Module, param: str) -> tuple[nn.Module, str]:
    head, _, attr = param.rpartition(".")
    return (module.get_submodule(head) if head else module), attr


class UnitMasks:
    """The structured masks one pruner put on a model, and how to make them permanent."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._masked: dict[tuple[int, str], tuple[nn.Module, str]] = {}
        self._refresh: dict[tuple[int, int, str], Any] = {}

    @property
    def num_masked_parameters(self) -> int:
        """How many parameters carry a mask from this object."""
        return len(self._masked)

    def masks_for(
        self, structure: Structure, units: Mapping[int, Iterable[int]]
    ) -> dict[tuple[int, str], tuple[nn.Module, str, nn.Module, torch.Tensor]]:
        """``{(id(owner), attr): (owner, attr, member module, keep mask)}`` for ``units``.

        Nothing is changed; parameters that cannot carry a prune mask raise first.
        """
        out: dict[tuple[int, str], tuple[nn.Module, str, nn.Module, torch.Tensor]] = {}
        for group_id, local in units.items():
            group = structure.group(group_id)
            chosen = {structure.check_unit(group, int(u)) for u in local}
            for member, piece in group.iter_slices():
                positions = [p for p, u in zip(piece.positions, piece.units) if u in chosen]
                if not positions:
                    continue
                module = structure.module(member.module_name)
                owner, attr = _split(module, piece.param)
                if parametrize.is_parametrized(owner, attr):
                    raise PruningError(
                        f"Cannot mask {member.module_name}.{piece.param}: it is parametrized "
                        "with torch.nn.utils.parametrize, which torch.nn.utils.prune masks "
                        "do not compose with. Remove the parametrization or use apply='physical'."
                    )
                current = getattr(owner, attr, None)
                if not isinstance(current, torch.Tensor):
                    continue
                key = (id(owner), attr)
                keep = slice_keep_mask(tuple(current.shape), piece, positions).to(current.device)
                if key in out:
                    keep = keep & out[key][3]
                out[key] = (owner, attr, module, keep)
        return out

    def apply_(self, structure: Structure, units: Mapping[int, Iterable[int]]) -> int:
        """Mask ``units`` (``{group id: local unit ids}``); returns the parameters touched."""
        masks = self.masks_for(structure, units)
        for key, (owner, attr, module, keep) in masks.items():
            reference = getattr(owner, attr)
            prune.custom_from_mask(owner, attr, keep.to(reference.dtype))
            self._masked[key] = (owner, attr)
            if owner is not module:
                self._keep_fresh(module, owner, attr)
        return len(masks)

    def _keep_fresh(self, module: nn.Module, owner: nn.Module, attr: str) -> None:
        """Recompute ``owner.attr`` before ``module`` runs.

        A parent such as ``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling
        ``out_proj``, so the prune hook of ``out_proj`` would never refresh it.
        """
        key = (id(module), id(owner), attr)
        if key in self._refresh:
            return

        def refresh(_module: nn.Module, _inputs: Any) -> None:
            setattr(owner, attr, getattr(owner, f"{attr}_orig") * getattr(owner, f"{attr}_mask"))

        self._refresh[key] = module.register_forward_pre_hook(refresh)

    def finalize(self) -> int:
        """Bake every mask in (``prune.remove``) and drop the hooks; returns the parameters."""
        for handle in self._refresh.values():
            handle.remove()
        self._refresh.clear()
        done = 0
        for owner, attr in self._masked.values():
            if f"{attr}_orig" in owner._parameters:
                prune.remove(owner, attr)
                done += 1
        self._masked.clear()
        return done


def has_prune_masks(model: nn.Module) -> list[str]:
    """Names of ``torch.nn.utils.prune``-masked parameters in ``model`` (``conv.weight``)."""
    names = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                names.append(f"{name}.{hook._tensor_name}" if name else hook._tensor_name)
    return names
