"""Cost of the non-finite check in ``group_lasso.proximal_step_``.

Times one proximal step on resnet50 (random weights, CPU, one torch thread) with the check
(one ``sum`` per scaled parameter before anything is written) and with the check patched
out, in the same run, and prints the medians and their ratio. Prints only; writes no docs.

Run: ``python bench/bench_proximal_checks.py [--repeats 15]``.
"""

from __future__ import annotations

import argparse

import torch

from _common import machine, median_time, models
from weighttracker_core import WeightTracker
from weighttracker_plugins.regularizers import proximal


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    (name, model, x, kwargs), = models(["resnet50"])
    tracker = WeightTracker(model, x, ignored_layers=[model.fc], **kwargs)
    lasso = tracker.create_regularizer("group_lasso")

    def step() -> None:
        lasso.proximal_step_(lr=1e-6, strength=1e-6)  # tiny factors: nothing becomes zero

    checked = median_time(step, args.repeats)
    original = proximal.UnitScaler.non_finite
    proximal.UnitScaler.non_finite = lambda self: {}
    try:
        unchecked = median_time(step, args.repeats)
    finally:
        proximal.UnitScaler.non_finite = original
    print(machine())
    print(f"{name}: proximal_step_ median {checked * 1e3:.1f} ms with the non-finite check, "
          f"{unchecked * 1e3:.1f} ms without (ratio {checked / unchecked:.2f}, {args.repeats} repeats)")


if __name__ == "__main__":
    main()
