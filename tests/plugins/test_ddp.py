"""DistributedDataParallel: every rank computes the same group lasso, gradient, proximal
step and metrics (2 gloo processes on the CPU).

Each rank builds its model from a different seed; DDP's broadcast at wrapping makes the
weights equal. One tracker is built on the bare model *before* wrapping (it saw other
weights on each rank), one on ``ddp.module`` after. Then a DDP step on different data per
rank, the lasso's value and gradient, every tracker, and the proximal step are compared:
bit for bit across ranks (gathered), and between the two trackers on each rank.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from transformer_models import LlamaLike, token_ids

WORLD = 2


def _gathered(value):
    out = [None] * WORLD
    dist.all_gather_object(out, value)
    return out


def _same_on_every_rank(value, what):
    values = _gathered(value)
    for rank, other in enumerate(values[1:], start=1):
        if isinstance(value, torch.Tensor):
            assert torch.equal(other, values[0]), f"{what}: rank {rank} differs from rank 0"
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            assert all(torch.equal(a, b) for a, b in zip(other, values[0])), f"{what}: rank {rank}"
        else:
            assert other == values[0], f"{what}: rank {rank} differs from rank 0"


def _worker(rank: int, init_file: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from weighttracker_core import WeightTracker

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # different weights per rank until DDP broadcasts rank 0's
        model = LlamaLike(layers=2)
        ids = token_ids()
        bare = WeightTracker(model, ids, prune_num_heads=True)   # before wrapping
        ddp = DDP(model)
        wrapped = WeightTracker(ddp.module, ids, prune_num_heads=True)
        assert bare.groups == wrapped.groups
        trackers = sorted(bare.registries.trackers.names())
        assert {"structured_bops", "unstructured_sparsity", "unstructured_bops",
                "nvidia_2_4_sparsity", "group_pruning_summary", "l2_norm_distribution"} <= set(trackers)
        metrics = {name: t.create_tracker(trackers) for name, t in (("bare", bare), ("wrapped", wrapped))}
        lassos = {name: t.create_regularizer("group_lasso") for name, t in (("bare", bare), ("wrapped", wrapped))}
        params = [p for p in model.parameters()]

        # one DDP training step on this rank's own data, with the lasso in the loss
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        data = token_ids(seed=10 + rank)
        loss = ddp(data).square().mean() + 0.01 * lassos["bare"]()
        loss.backward()
        _same_on_every_rank([p.grad for p in params], "all-reduced gradients")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _same_on_every_rank([p.detach() for p in params], "weights after the step")

        for name, lasso in lassos.items():
            value = lasso()
            grads = torch.autograd.grad(value, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            _same_on_every_rank(value.detach(), f"{name}: group lasso")
            _same_on_every_rank(grads, f"{name}: group lasso gradient")
            assert torch.equal(value, lassos["bare"]()), name
        for name, handle in metrics.items():
            values = handle.track()
            _same_on_every_rank(values, f"{name}: trackers")
            assert values == metrics["bare"].track(), name

        factors = lassos["bare"].proximal_step_(lr=0.5, strength=0.5)
        assert (factors == 0).any() and (factors < 1).all()  # the step did something
        _same_on_every_rank(factors, "proximal factors")
        _same_on_every_rank([p.detach() for p in params], "weights after the proximal step")
        # the other tracker sees exactly what the step left
        _same_on_every_rank(metrics["wrapped"].track(), "trackers after the proximal step")
        assert metrics["wrapped"].track() == metrics["bare"].track()
        assert bare.zero_units() == wrapped.zero_units() != {}
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_ranks_agree(tmp_path):
    # fork: the ranks start in a second instead of importing torch again (spawn elsewhere)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD,
                                 join=False, start_method=method)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # raises with the failing rank's traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP ranks did not finish within 120 s")
