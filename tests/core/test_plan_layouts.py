"""Every layout of a reduction plan gives the brute-force values: batched small parameters,
large ones in bounded chunks, mixed dtypes; and the one-pass weight scan equals direct counts."""

from __future__ import annotations

import pytest
import torch
import torchvision
from _oracles import param_of, unit_reference, unit_rows
from models import mha_case, vit_case
from plugin_managers import core_plugin_manager as PM
from torch import nn

import weighttracker_core.plans as plans
from weighttracker_core import PlanError, WeightTracker

#: (batched up to, scratch bound): the defaults, everything chunked in tiny runs, nothing
#: batched, everything batched into one buffer
LAYOUTS = [(None, None), (64, 1000), (0, 300), (10**9, 10**9)]


@pytest.fixture(params=LAYOUTS, ids=["default", "tiny-chunks", "no-batches", "one-buffer"])
def layout(request, monkeypatch):
    small, scratch = request.param
    if small is not None:
        monkeypatch.setattr(plans, "SMALL_ELEMENTS", small)
        monkeypatch.setattr(plans, "SCRATCH_ELEMENTS", scratch)
    return request.param


def _models():
    def resnet():
        return torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), {}

    return [("resnet18", resnet), ("mha", mha_case), ("vit", vit_case)]


MODELS = _models()


def _sparsify_(model: nn.Module, every: int = 1) -> None:
    """Zero ~40% of every ``every``-th parameter (the others stay dense)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if i % every == 0:
                p.mul_((torch.rand(p.shape, generator=gen) > 0.4).to(p.dtype))


@pytest.mark.parametrize("name,factory", MODELS, ids=[m[0] for m in MODELS])
def test_every_layout_reduces_like_brute_force(name, factory, layout):
    model, x, kwargs = factory()
    tracker = WeightTracker(model, x, plugin_manager=PM(), **kwargs)
    _sparsify_(model)
    tracker.fake_prune_unit(1, 0)
    plan = tracker.structure.plan()
    rows = unit_rows(model, tracker.groups)
    for op in ("sum", "sum_sq", "l1", "max_abs", "zeros"):
        got, want = plan.unit_reduce(op).double(), unit_reference(rows, tracker.num_units, op)
        if op in ("max_abs", "zeros"):
            assert torch.equal(got, want), op  # exact: a max and counts
        else:
            bound = 1e-5 * unit_reference(rows, tracker.num_units, "l1") + 1e-6
            assert ((got - want).abs() <= bound).all(), op

    weights = torch.rand(tracker.num_units, dtype=torch.float64)
    (plan.unit_reduce("l2", grad=True).double() * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    sq = torch.zeros(tracker.num_units, dtype=torch.float64)
    for units, block in unit_rows(model, tracker.groups):
        sq = sq.index_add(0, units, (block.double() ** 2).sum(1))
    norms = torch.where(sq > 0, sq.clamp_min(1e-300).sqrt(), torch.zeros_like(sq))
    (norms * weights).sum().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def _zero_histogram(weight: torch.Tensor, axis: int) -> list[int]:
    """Blocks of 4 along ``axis`` by number of zeros, one block at a time."""
    moved = weight.detach().movedim(axis, -1)
    full = moved.shape[-1] // 4 * 4
    hist = [0] * 5
    for row in moved.reshape(-1, moved.shape[-1]):
        for start in range(0, full, 4):
            hist[int((row[start : start + 4] == 0).sum())] += 1
    return hist


@pytest.mark.parametrize("every", [1, 2, 10**6], ids=["sparse", "half-dense", "dense"])
def test_weight_scan_equals_direct_counts(every, layout):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1),  # 6: a tail of 2
        nn.Flatten(), nn.Linear(6 * 6 * 6, 12), nn.ReLU(), nn.Linear(12, 5),
    )
    tracker = WeightTracker(model, torch.randn(1, 3, 8, 8))
    _sparsify_(model, every)
    tracker.fake_prune_unit(0, 2)
    evaluation = tracker.graph.evaluation()
    scanner, scan = evaluation["weight_scanner"], evaluation["weight_scan"]
    named = dict(model.named_parameters())
    assert scan.nonzeros.tolist() == [float((named[n] != 0).sum()) for n in scanner.count]
    assert scan.block_zeros.tolist() == [_zero_histogram(named[n], a) for n, a in scanner.blocks]
    nonzero = torch.zeros(tracker.num_units, dtype=torch.bool)
    for units, block in unit_rows(model, tracker.groups):
        nonzero[units] |= (block != 0).any(1)
    assert torch.equal(scan.unit_nonzero, nonzero)


def _scan_oracle(model, tracker, scanner):
    named = dict(model.named_parameters())
    nonzero = torch.zeros(tracker.num_units, dtype=torch.bool)
    for units, block in unit_rows(model, tracker.groups):
        nonzero[units] |= (block != 0).any(1)
    return ([float((named[n] != 0).sum()) for n in scanner.count],
            [_zero_histogram(named[n], a) for n, a in scanner.blocks], nonzero)


def test_weight_scan_follows_every_change_of_the_weights(layout):
    """The scan reuses results while every member is all-non-zero or all-zero (the pattern
    repeats); each step below changes the pattern, or keeps it with other values, and the
    scan must equal direct counts after every one of them."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
        nn.ReLU(), nn.Conv2d(8, 6, 1), nn.Flatten(), nn.Linear(6 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 5),
    )
    tracker = WeightTracker(model, torch.randn(1, 3, 8, 8))
    scanner = tracker.graph.evaluation()["weight_scanner"]
    conv, bn = model[3], model[4]

    def zero(t):
        t.zero_()

    def fill(t, value=0.5):
        t.fill_(value)

    steps = [
        lambda: None,  # as initialised: BN biases zero, everything else non-zero
        lambda: None,  # the same pattern again (results reused)
        lambda: fill(bn.bias),  # every member non-zero
        lambda: None,
        lambda: zero(conv.weight),  # one whole member zero
        lambda: None,
        lambda: fill(conv.weight, 2.0),  # back to non-zero, other values
        lambda: zero(bn.weight),  # in a batch with another BN's weight, which stays non-zero
        lambda: zero(model[1].weight),  # now that batch is all zero
        lambda: conv.weight[0, 0, 0, 0].fill_(0.0),  # one zero: neither pattern
        lambda: conv.weight[0, 0, 0, 0].fill_(1.0),
        lambda: _sparsify_(model),
        lambda: None,
        lambda: [fill(p, 0.25) for p in model.parameters()],
        lambda: [zero(p) for p in model.parameters()],
        lambda: None,
    ]
    for i, step in enumerate(steps):
        with torch.no_grad():
            step()
        scan = scanner()
        counts, histograms, nonzero = _scan_oracle(model, tracker, scanner)
        assert scan.nonzeros.tolist() == counts, i
        assert scan.block_zeros.tolist() == histograms, i
        assert torch.equal(scan.unit_nonzero, nonzero), i


def test_mixed_dtypes_fall_back_to_one_parameter_at_a_time():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    tracker = WeightTracker(model, torch.randn(2, 6), plugin_manager=PM(), prune_model_outputs=True)
    model[2].to(torch.float64)
    _sparsify_(model)
    plan = tracker.structure.plan()
    rows = unit_rows(model, tracker.groups)
    assert torch.equal(plan.unit_reduce("max_abs").double(), unit_reference(rows, tracker.num_units, "max_abs"))
    assert torch.equal(plan.unit_reduce("zeros"), unit_reference(rows, tracker.num_units, "zeros"))
    (plan.unit_reduce("sum_sq", grad=True)).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    sum(((block.double() ** 2).sum() for _, block in unit_rows(model, tracker.groups))).backward()
    for n, p in model.named_parameters():
        assert got[n].dtype == p.dtype, n
        torch.testing.assert_close(got[n], p.grad, msg=n)


def test_chunks_of_a_large_parameter_stay_under_the_scratch_bound(monkeypatch):
    monkeypatch.setattr(plans, "SMALL_ELEMENTS", 16)
    monkeypatch.setattr(plans, "SCRATCH_ELEMENTS", 256)
    model = nn.Sequential(nn.Conv2d(4, 64, 3), nn.ReLU(), nn.Conv2d(64, 32, 3))  # 18432 elements
    tracker = WeightTracker(model, torch.randn(1, 4, 9, 9), plugin_manager=PM())
    plan = tracker.structure.plan()
    _sparsify_(model)
    rows = unit_rows(model, tracker.groups)
    assert torch.equal(plan.unit_reduce("max_abs").double(), unit_reference(rows, tracker.num_units, "max_abs"))
    # the bound is the larger of the limit and one row along dim 0 (576 elements here)
    assert 0 < tracker.structure.resolver.scratch_bytes <= 4 * max(256, 64 * 9)


def test_given_tensors_of_the_wrong_shape_are_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    tracker = WeightTracker(model, torch.randn(1, 3), plugin_manager=PM())
    plan = tracker.structure.plan()
    tensors = [torch.zeros(5, 5) if i == 0 else param_of(model, *n.rsplit(".", 1)) for i, n in
               enumerate(plan.param_names)]
    with pytest.raises(PlanError, match=r"shape \(5, 5\).*built for"):
        plan.unit_reduce("sum", tensors=tensors)


def test_index_tensors_use_int32():
    tracker = WeightTracker(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), plugin_manager=PM())
    plan = tracker.structure.plan()
    assert plan._gather.dtype == torch.int32 and plan.run_lengths.dtype == torch.int32


def test_non_finite_given_tensors_are_named_as_given_values():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    tracker = WeightTracker(model, torch.randn(1, 3), plugin_manager=PM())
    plan = tracker.structure.plan()
    tensors = [torch.ones_like(param_of(model, *n.rsplit(".", 1))) for n in plan.param_names]
    tensors[1].view(-1)[-1] = float("nan")
    with pytest.raises(PlanError, match=rf"values given for parameter '{plan.param_names[1]}' hold 1 NaN"):
        plan.unit_reduce("sum", tensors=tensors)
    assert torch.isfinite(plan.unit_reduce("zeros", tensors=tensors)).all()  # counts: NaN is not a zero


@pytest.mark.parametrize("rows_first", [1, 10**9], ids=["rows-first", "columns-first"])
@pytest.mark.parametrize("shape,keep", [
    ((3, 4, 5, 6), (1,)), ((3, 4, 5, 6), (2,)), ((3, 4, 5, 6), (0,)), ((3, 4, 5, 6), (3,)),
    ((3, 4, 5, 6), (1, 2)), ((3, 4, 5, 6), (0, 2)), ((1, 4, 1, 6), (1,)), ((2, 3, 1), (1,)),
])
@pytest.mark.parametrize("how", ["sum", "max", "isum"])
def test_reduce_keep_stages_equal_a_direct_reduction(monkeypatch, rows_first, shape, keep, how):
    """Both stage orders reduce exactly the dims not kept, like one multi-dim reduction."""
    import weighttracker_core.plan_layout as plan_layout

    monkeypatch.setattr(plan_layout, "ROWS_FIRST", rows_first)
    gen = torch.Generator().manual_seed(0)
    n = 2
    if how == "sum":
        t = torch.randint(-8, 8, (n, *shape), generator=gen).double()  # exact in any order
    else:
        t = torch.randint(0, 2, (n, *shape), generator=gen, dtype=torch.uint8)
    other = tuple(1 + d for d in range(len(shape)) if d not in keep)
    if how == "max":
        expected = t.amax(other) if other else t
    else:
        expected = t.sum(other, dtype=torch.int32 if how == "isum" else None) if other else t
    got = plan_layout.reduce_keep(t, shape, keep, how)
    assert torch.equal(got, expected.reshape(n, -1).to(got.dtype))
    if how == "isum":
        assert got.dtype == torch.int32
