"""Per-unit L2 norms over all groups: reduction plans vs a naive per-member loop.

Times, on resnet50 and ViT-B/16 (random weights, CPU, one torch thread):

* no-grad per-unit L2 of every group (what metrics use), and
* forward + backward of ``sum(per-unit L2)`` (what group lasso uses),

for the compiled reduction plan and for a naive loop over groups, members and slices that
selects each slice with ``index_select`` and reduces it. ``torch._foreach_norm`` (one fused
pass, per tensor, no per-unit result) is shown as a floor. Writes docs/performance.md.

Run: ``python bench/bench_plans.py [--repeats 15] [--models resnet50 vit_b16]``.
"""

from __future__ import annotations

import argparse

import torch

from _common import machine, median_time, models, write_section
from weighttracker_core import WeightTracker


def naive_unit_l2(model, groups, num_units: int) -> torch.Tensor:
    """The loop a user would write: every member slice of every group, one at a time."""
    out = None
    for group in groups:
        for member in group.members:
            owner = model.get_submodule(member.module_name) if member.module_name else model
            for piece in member.slices:
                param = owner
                for part in piece.param.split("."):
                    param = getattr(param, part)
                shape = piece.viewed_shape(tuple(param.shape))
                viewed = param.reshape(shape)
                dims = [d % len(shape) for d in piece.dims]
                others = [d for d in range(len(shape)) if d not in dims]
                rows = viewed.permute(*dims, *others).reshape(-1, max(1, param.numel() // piece.axis_length(tuple(param.shape))))
                picked = rows.index_select(0, torch.tensor(piece.positions, device=param.device))
                sq = (picked * picked).sum(1)
                if out is None:
                    out = torch.zeros(num_units, device=param.device, dtype=sq.dtype)
                units = torch.tensor([group.offset + u for u in piece.units], device=param.device)
                out = out.index_add(0, units, sq)
    return out.clamp_min(0).sqrt()


def run(repeats: int, which: list[str]) -> str:
    torch.set_num_threads(1)
    rows = []
    for name, model, x, kwargs in models(which):
        tracker = WeightTracker(model, x, integrations=None, **kwargs)
        plan = tracker.structure.plan()
        groups, units = tracker.groups, tracker.num_units
        params = list(model.parameters())
        torch.testing.assert_close(
            plan.unit_reduce("l2"), naive_unit_l2(model, groups, units).detach(), rtol=1e-4, atol=1e-5
        )

        def plan_nograd():
            with torch.no_grad():
                plan.unit_reduce("l2")

        def naive_nograd():
            with torch.no_grad():
                naive_unit_l2(model, groups, units)

        def plan_grad():
            model.zero_grad(set_to_none=True)
            plan.unit_reduce("l2", grad=True).sum().backward()

        def naive_grad():
            model.zero_grad(set_to_none=True)
            naive_unit_l2(model, groups, units).sum().backward()

        def foreach():
            with torch.no_grad():
                torch._foreach_norm(params)

        t = {key: median_time(fn, repeats) for key, fn in [
            ("plan", plan_nograd), ("naive", naive_nograd), ("plan_grad", plan_grad),
            ("naive_grad", naive_grad), ("foreach", foreach)]}
        rows.append((name, len(groups), units, len(plan.keys), t))
    lines = [
        "## Per-unit L2 over all groups (issue: core reduction plans)",
        "",
        f"Machine: {machine()}. Median of {repeats} runs; ratios measured in the same run.",
        "Reproduce: `python bench/bench_plans.py`.",
        "",
        "| model | groups | units | slices reduced | no-grad: plan | naive loop | speed-up | "
        "fwd+bwd: plan | naive loop | speed-up | `_foreach_norm` floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, g, u, k, t in rows:
        lines.append(
            f"| {name} | {g} | {u} | {k} | {t['plan'] * 1e3:.1f} ms | {t['naive'] * 1e3:.1f} ms | "
            f"**{t['naive'] / t['plan']:.1f}x** | {t['plan_grad'] * 1e3:.1f} ms | "
            f"{t['naive_grad'] * 1e3:.1f} ms | **{t['naive_grad'] / t['plan_grad']:.1f}x** | "
            f"{t['foreach'] * 1e3:.1f} ms |"
        )
    lines += ["", "Target (issue 2): at least 5x faster than the naive loop on both models."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b16"])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    report = run(args.repeats, args.models)
    print(report)
    if not args.no_write:
        write_section("plans", report)


if __name__ == "__main__":
    main()
