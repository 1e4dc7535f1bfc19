"""Reduction stage order: long trailing dims first vs leading dims first, in one run.

For ViT-B/16 (heads and head dimensions as units) and ResNet-50, times the group lasso
forward (no autograd) with the plans' ``ROWS_FIRST`` order (a key's trailing dims are reduced first when they hold at least 64 elements) and
with it switched off (leading dims always first, the order before), alternating the two
round by round in the same process. Checks that both give the same penalty (to float
rounding) and prints the medians and their ratio.

Run: ``python bench/bench_stage_order.py [--rounds 15] [--no-write]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import weighttracker_core.plan_layout as plan_layout
from _common import machine, write_section
from bench_step_share import LABELS, build
from weighttracker_core import WeightTracker

ORDERS = {"trailing dims first (now)": plan_layout.ROWS_FIRST, "leading dims first (before)": 1 << 62}


def measure(name: str, rounds: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    model, shape, _, kwargs = build(name)
    tracker = WeightTracker(model, torch.randn(1, *shape), **kwargs)
    lasso = tracker.create_regularizer("group_lasso")
    keys = lasso.plan.keys

    def use(order: str) -> None:
        plan_layout.ROWS_FIRST = ORDERS[order]
        for key in keys:  # the stages are cached per key
            key._steps.clear()

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return lasso()

    values = {}
    for order in ORDERS:
        use(order)
        values[order] = float(forward())
    first, second = values.values()
    if abs(first - second) > 1e-5 * abs(first):
        raise SystemExit(f"{name}: the two orders disagree ({first} vs {second})")
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for order in ORDERS:
            use(order)
            forward()
            for _ in range(3):
                start = time.perf_counter()
                forward()
                times.setdefault((order, "lasso forward"), []).append(time.perf_counter() - start)
    use(next(iter(ORDERS)))
    out: dict[str, dict[str, float]] = {}
    for (order, job), samples in times.items():
        out.setdefault(job, {})[order] = statistics.median(samples)
    return out


def report(rows: list[tuple[str, dict[str, dict[str, float]]]], rounds: int) -> str:
    now, before = ORDERS
    lines = [
        "## Reduction stage order (trailing dims first when long)",
        "",
        f"Machine: {machine()}. Median of {rounds} rounds x 3 calls, the two orders alternating "
        "round by round in one process; random dense weights.",
        "Reproduce: `python bench/bench_stage_order.py`.",
        "",
        f"| model | job | {now} | {before} | speed-up |",
        "|---|---|---|---|---|",
    ]
    for name, jobs in rows:
        for job, t in jobs.items():
            lines.append(f"| {LABELS[name]} | {job} | {t[now] * 1e3:.1f} ms | {t[before] * 1e3:.1f} ms "
                         f"| **{t[before] / t[now]:.2f}x** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", nargs="+", default=["vit_b16", "resnet50"], choices=list(LABELS))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [(name, measure(name, args.rounds)) for name in args.models]
    text = report(rows, args.rounds)
    print(text)
    if not args.no_write:
        write_section("stage-order", text)


if __name__ == "__main__":
    main()
