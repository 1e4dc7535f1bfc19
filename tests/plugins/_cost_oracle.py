"""Independent references for the BOPs tests: fvcore on (pruned) copies, brute-force loops.

Nothing here uses weighttracker's cost code: MACs come from a direct fvcore call, zero
counts and unit costs from explicit loops over layers, groups, members and positions.
"""

from __future__ import annotations

import copy
import random

import torch
from fvcore_oracle import fvcore_macs  # noqa: F401 - re-exported for the cost tests
from torch import nn


def own_macs(macs: dict[str, int], model: nn.Module, name: str) -> int:
    """MACs a module's own forward runs (its total minus its direct submodules')."""
    prefix = f"{name}." if name else ""
    return macs.get(name, 0) - sum(macs.get(prefix + child, 0) for child, _ in model.get_submodule(name).named_children())


def fake_prune_randomly(tracker, seed: int = 0, share: float = 0.6) -> dict[int, list[int]]:
    """Zero random units (never all of a group) and a few random single weights."""
    rng = random.Random(seed)
    chosen: dict[int, list[int]] = {}
    for group in tracker.groups:
        if group.n_units > 1 and rng.random() < share:
            chosen[group.id] = rng.sample(range(group.n_units), rng.randint(1, group.n_units - 1))
    tracker.fake_prune_units(chosen)
    with torch.no_grad():
        for param in tracker.model.parameters():
            if param.dim() > 1:
                for _ in range(3):
                    param.view(-1)[rng.randrange(param.numel())] = 0.0
    return chosen


def pruned_copy(model: nn.Module, inputs, tracker_factory):
    """A deep copy of ``model`` with its zero units removed physically.

    ``tracker_factory(copy)`` builds a ``WeightTracker`` for the copy (same options).
    """
    clone = copy.deepcopy(model)
    tracker_factory(clone).prune_zero_units()
    return clone


def weight_zero_counts(module: nn.Module, params) -> tuple[int, int]:
    """(zeros, elements) of the effective weights ``params`` of ``module`` (dotted names)."""
    zeros = numel = 0
    for path in params:
        owner = module
        *parents, attr = path.split(".")
        for part in parents:
            owner = getattr(owner, part)
        orig = owner._parameters.get(f"{attr}_orig")
        tensor = orig * getattr(owner, f"{attr}_mask") if orig is not None else getattr(owner, attr)
        if tensor is None:
            continue
        zeros += int((tensor.detach() == 0).sum())
        numel += tensor.numel()
    return zeros, numel
