"""Reduction plans equal brute-force loops over parameter slices (SPEC §3.4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
import torchvision

from _oracles import unit_reference, unit_rows
from models import mha_case, vit_case
from plugin_managers import core_plugin_manager as PM
from weighttracker_core import PlanError, WeightTracker


def _sparsify_(model, fraction=0.3):
    """Zero a random share of every parameter so zero counts and max-abs are non-trivial."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_((torch.rand_like(p) > fraction).to(p.dtype))


def _cases():
    cases = [
        ("resnet18", lambda: (torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), {})),
        # resnet50 adds bottleneck blocks (1x1 convs) that mobilenet_v2 and resnet18 also cover
        pytest.param("resnet50", lambda: (torchvision.models.resnet50(), torch.randn(1, 3, 32, 32), {}),
                     marks=pytest.mark.slow),
        ("mobilenet_v2", lambda: (torchvision.models.mobilenet_v2(), torch.randn(1, 3, 32, 32), {})),
    ]

    cases += [("mha", mha_case), ("vit", vit_case)]
    return cases


CASES = _cases()
CASE_IDS = [c.values[0] if hasattr(c, "values") else c[0] for c in CASES]


@pytest.mark.parametrize("name,factory", CASES, ids=CASE_IDS)
def test_unit_reductions_equal_brute_force(name, factory):
    model, x, kwargs = factory()
    tracker = WeightTracker(model, x, plugin_manager=PM(), **kwargs)
    _sparsify_(model)
    tracker.fake_prune_unit(1, 0)
    plan = tracker.structure.plan()
    slices = unit_rows(model, tracker.groups)
    for op in ("sum", "sum_sq", "l1", "l2", "max_abs", "zeros", "nonzeros", "numel"):
        got = plan.unit_reduce(op).double()
        want = unit_reference(slices, tracker.num_units, op)
        if op == "sum":  # signed sums cancel: float32 error scales with the sum of |w|
            bound = 1e-5 * unit_reference(slices, tracker.num_units, "l1") + 1e-6
            assert ((got - want).abs() <= bound).all(), f"{name} {op}"
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} {op}")


@pytest.mark.parametrize("name,factory", CASES, ids=CASE_IDS)
def test_autograd_path_values_and_gradients_equal_brute_force(name, factory):
    model, x, kwargs = factory()
    tracker = WeightTracker(model, x, plugin_manager=PM(), **kwargs)
    tracker.fake_prune_unit(1, 0)  # an exactly-zero unit: its gradient must be 0, not NaN
    weights = torch.rand(tracker.num_units, dtype=torch.float64)

    l2 = tracker.structure.plan().unit_reduce("l2", grad=True)
    (l2.double() * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    sq = [torch.zeros((), dtype=torch.float64) for _ in range(tracker.num_units)]
    for units, block in unit_rows(model, tracker.groups):
        per_row = (block.double() ** 2).sum(1)
        for i, unit in enumerate(units.tolist()):
            sq[unit] = sq[unit] + per_row[i]
    total = torch.zeros((), dtype=torch.float64)
    for unit, value in enumerate(sq):
        if value > 0:  # d||w||/dw = w/||w||; a zero unit contributes no gradient
            total = total + weights[unit] * value.sqrt()
    want_l2 = torch.stack([v.detach() for v in sq]).sqrt()
    torch.testing.assert_close(l2.detach().double(), want_l2, rtol=1e-5, atol=1e-7)
    total.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for n in want:
        assert torch.isfinite(got[n]).all(), n
        torch.testing.assert_close(got[n], want[n].to(got[n].dtype), rtol=1e-5, atol=1e-6, msg=n)


def test_hand_worked_linear_rows():
    # rows [[3, 4], [0, 0]] of a Linear with no bias: unit norms 5 and 0, sums 7 and 0
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        model[1].weight.copy_(torch.tensor([[0.0, 0.0]]))
    tracker = WeightTracker(model, torch.zeros(1, 2), plugin_manager=PM())
    (group,) = [g for g in tracker.groups if g.root_module == "0"]
    plan = tracker.structure.plan()
    units = slice(group.offset, group.offset + 2)
    # unit 0 owns row 0 of layer 0 and column 0 of layer 1 (zero): l2 5, sum 7, zeros 1
    assert plan.unit_reduce("l2")[units].tolist() == [5.0, 0.0]
    assert plan.unit_reduce("sum")[units].tolist() == [7.0, 0.0]
    assert plan.unit_reduce("zeros")[units].tolist() == [1.0, 3.0]
    assert plan.unit_reduce("numel")[units].tolist() == [3.0, 3.0]


def test_grouped_conv_slices_cover_blocks():
    # groups=2, 4 in / 4 out channels: input channel c belongs to group c // 2 and owns
    # weight[g*2:(g+1)*2, c % 2]; brute force against explicit block sums
    conv = torch.nn.Conv2d(4, 4, 1, groups=2, bias=False)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), conv, torch.nn.Conv2d(4, 2, 1))
    tracker = WeightTracker(model, torch.randn(1, 3, 4, 4), plugin_manager=PM())
    (group,) = [g for g in tracker.groups if g.root_module == "0"]
    sq = tracker.structure.plan().unit_reduce("sum_sq")[group.offset : group.offset + 4]
    w0, w1, w2 = model[0], conv.weight.detach(), model[2].weight.detach()
    for c in range(4):
        g, j = divmod(c, 2)
        expected = (w0.weight[c] ** 2).sum() + w0.bias[c] ** 2 + (w1[g * 2 : g * 2 + 2, j] ** 2).sum()
        torch.testing.assert_close(sq[c], expected.detach())
    del w2


def test_unknown_operation_is_refused():
    tracker = WeightTracker(torch.nn.Linear(2, 2), torch.zeros(1, 2), plugin_manager=PM())
    with pytest.raises(PlanError, match="median"):
        tracker.structure.plan().unit_reduce("median")


def test_plans_read_pruning_masks():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    tracker = WeightTracker(model, torch.zeros(1, 3), plugin_manager=PM())
    prune.custom_from_mask(model[0], "weight", torch.zeros(4, 3))
    prune.custom_from_mask(model[0], "bias", torch.zeros(4))
    prune.custom_from_mask(model[1], "weight", torch.zeros(2, 4))
    (group,) = [g for g in tracker.groups if g.root_module == "0"]
    # every weight of the four units is masked out: effective max-abs is 0
    peak = tracker.structure.plan().unit_reduce("max_abs")[group.offset : group.offset + 4]
    assert peak.tolist() == [0.0, 0.0, 0.0, 0.0]
