"""Trackers and group lasso as a share of one training step (issue: trackers and pruning).

On resnet50 and ViT-B/16 (random weights, CPU, one torch thread), times

* one training step of the model (batch 8: forward, cross-entropy, backward, SGD step),
* ``track()`` of the five metric trackers created together (``structured_bops``,
  ``unstructured_sparsity``, ``unstructured_bops``, ``nvidia_2_4_sparsity``,
  ``group_pruning_summary``), and
* forward + backward of ``group_lasso`` and of ``bops_group_lasso``,

and reports each as a ratio to the training step, measured in the same run. Writes
docs/performance.md. Targets: ``track()`` under 5 %, group lasso under 10 % of a step.

Run: ``python bench/bench_trackers.py [--repeats 5] [--models resnet50 vit_b16]``.
"""

from __future__ import annotations

import argparse

import torch

from _common import machine, median_time, models, write_section
from weighttracker_core import WeightTracker

TRACKERS = [
    "structured_bops",
    "unstructured_sparsity",
    "unstructured_bops",
    "nvidia_2_4_sparsity",
    "group_pruning_summary",
]


def run(repeats: int, which: list[str], batch: int) -> str:
    torch.set_num_threads(1)
    rows = []
    for name, model, x, kwargs in models(which):
        tracker = WeightTracker(model, x, **kwargs)
        metrics = tracker.create_tracker(TRACKERS)
        lasso = tracker.create_regularizer("group_lasso")
        bops_lasso = tracker.create_regularizer("bops_group_lasso")
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        inputs = torch.randn(batch, *x.shape[1:])
        targets = torch.randint(0, 1000, (batch,))
        model.train()

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()

        def regularize(reg):
            def run_once():
                model.zero_grad(set_to_none=True)
                reg().backward()

            return run_once

        metrics.track()  # static values (fvcore baseline MACs) are computed once, up front
        t_step = median_time(step, repeats, warmup=1)
        t_track = median_time(metrics.track, repeats)
        t_lasso = median_time(regularize(lasso), repeats)
        t_bops = median_time(regularize(bops_lasso), repeats)
        rows.append((name, t_step, t_track, t_lasso, t_bops))
    lines = [
        "## Trackers and group lasso vs one training step (issue: trackers, group lasso, pruning)",
        "",
        f"Machine: {machine()}. Training step: batch {batch}, 224x224, forward + cross-entropy + "
        f"backward + SGD. Median of {repeats} runs; ratios measured in the same run.",
        "Reproduce: `python bench/bench_trackers.py`.",
        "",
        "| model | training step | `track()` of 5 trackers | share | `group_lasso` fwd+bwd | share "
        "| `bops_group_lasso` fwd+bwd | share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, step, track, lasso, bops in rows:
        lines.append(
            f"| {name} | {step:.2f} s | {track * 1e3:.0f} ms | **{track / step:.1%}** | "
            f"{lasso * 1e3:.0f} ms | **{lasso / step:.1%}** | {bops * 1e3:.0f} ms | **{bops / step:.1%}** |"
        )
    lines += ["", "Targets: `track()` under 5 % and group lasso under 10 % of a training step."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b16"])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    report = run(args.repeats, args.models, args.batch)
    print(report)
    if not args.no_write:
        write_section("trackers", report)


if __name__ == "__main__":
    main()
