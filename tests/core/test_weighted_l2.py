"""``plan.weighted_l2`` (one autograd node) equals the autograd expression bit for bit.

The oracle is ``(plan.unit_reduce("l2", grad=True) * c).sum()`` differentiated by autograd;
models cover batched small parameters, large ones, overlapping slices (heads and head
dimensions of one fused projection) and all-zero units (the zero-safe square root).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from models import mha_case, vit_case
from torch import nn

from weighttracker_core import WeightTracker


def _cases():
    def resnet():
        return torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), {}

    def mlp():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(1, 6), {}

    return [("resnet18", resnet), ("mha", mha_case), ("vit", vit_case), ("mlp", mlp)]


@pytest.mark.parametrize("name,factory", _cases(), ids=[c[0] for c in _cases()])
def test_fused_penalty_equals_autograd_bit_for_bit(name, factory):
    model, x, kwargs = factory()
    tracker = WeightTracker(model, x, **kwargs)
    tracker.fake_prune_unit(0, 0)  # an all-zero unit: the square root's zero gradient
    plan = tracker.structure.plan()
    coefficients = torch.rand(tracker.num_units) + 0.5
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(value: torch.Tensor) -> list[torch.Tensor | None]:
        for p in params:
            p.grad = None
        (value * 3.0).backward()  # an upstream gradient other than 1
        return [None if p.grad is None else p.grad.clone() for p in params]

    fused = plan.weighted_l2(lambda norms: coefficients.to(norms))
    norms = plan.unit_reduce("l2", grad=True)
    plain = (norms * coefficients.to(norms)).sum()
    assert torch.equal(fused.detach(), plain.detach())
    got, want = grads(fused), grads((plan.unit_reduce("l2", grad=True) * coefficients).sum())
    assert any(g is not None for g in want)
    for p, a, b in zip(params, got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b), tuple(p.shape)


def test_without_autograd_it_is_the_plain_sum():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    tracker = WeightTracker(model, torch.randn(1, 6))
    plan = tracker.structure.plan()
    c = torch.rand(tracker.num_units)
    with torch.no_grad():
        value = plan.weighted_l2(lambda norms: c.to(norms))
    assert not value.requires_grad
    assert torch.equal(value, (plan.unit_reduce("l2") * c).sum())
