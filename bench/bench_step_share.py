"""Trackers and group lasso as a share of one training step, on six models.

For each model (random weights, CPU, one torch thread) this script times, in one process:

* the **training step**: batch 8, forward, cross-entropy, backward, SGD step;
* **first ``track()``**: the five metric trackers, each created by its own
  ``create_tracker`` call (``structured_bops`` with ``log_total_bops=True``,
  ``unstructured_sparsity``, ``unstructured_bops``, ``nvidia_2_4_sparsity``,
  ``group_pruning_summary``), then the first ``tracker.track()`` (fvcore's baseline MACs
  are counted there, once per structure);
* steady-state **``tracker.track()``** of those five trackers;
* **``group_lasso``** forward alone (no autograd), and **``group_lasso``** and
  **``bops_group_lasso``** forward + backward (every ``.grad``
  set to ``None``, then ``penalty.backward()``: the gradients are fresh tensors, as after
  ``zero_grad(set_to_none=True)``);
* the **one-pass floor**: ``torch._foreach_norm`` over every parameter (one fused read of
  all weights, one value per tensor);
* **fresh gradients**: allocating one new gradient-sized tensor per parameter and zeroing
  it (the write any backward producing new ``.grad`` tensors has to do; on Linux it
  includes faulting in fresh pages);
* the **autograd floor**: forward + backward of an autograd function over the group
  lasso's parameters that does no arithmetic (a zero scalar forward; backward hands
  autograd one fresh zeroed tensor per parameter): what any penalty over those parameters
  pays for autograd's per-parameter work and the gradients' memory;
* **fvcore count**: fvcore's MAC count of the model alone, once, after the first
  ``track()`` (so without fvcore's import, which the script times separately, in a fresh
  process with torch already imported).

After a warm-up, the measurements are interleaved round by round (step, track, lasso,
bops lasso, floor, then again), so drifting load on a shared machine hits them alike. In
each round every cheap job runs 5 times in a row and the first call (cold after the
training step) is dropped: steady state. Medians over the rounds; every ratio is of
medians from the same run.

Models: the CIFAR ResNet-20 below (32x32 input, 10 classes), torchvision ResNet-18,
ResNet-50 and MobileNetV2 (224x224), timm ``vit_tiny_patch16_224`` and
``vit_base_patch16_224`` (``pretrained=False``) with ``prune_num_heads=True`` (heads and
head dimensions as units).

With ``--sparsity 0.5`` every weight with 2 or more dims first loses a random half of its
elements and the first unit of every group is zeroed (as in the middle of a pruning run:
2:4 blocks, per-layer counts and the pruning summary all have work to do); the SGD step
uses ``lr=0`` in both modes, so the weights stay as they are.

Run: ``python bench/bench_step_share.py [--rounds 7] [--models resnet20 vit_b16 ...]
[--sparsity 0.5]``; ``--no-write`` prints without touching docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from _common import machine, write_section
from weighttracker_core import WeightTracker
from weighttracker_plugins.calculations.cost import fvcore_macs_by_operator

TRACKERS = (
    ("structured_bops", {"log_total_bops": True}),
    ("unstructured_sparsity", {}),
    ("unstructured_bops", {}),
    ("nvidia_2_4_sparsity", {}),
    ("group_pruning_summary", {}),
)
MODELS = ("resnet20", "resnet18", "resnet50", "vit_ti16", "vit_b16", "mobilenet_v2")
LABELS = {
    "resnet20": "CIFAR ResNet-20 (32x32)",
    "resnet18": "ResNet-18 (224)",
    "resnet50": "ResNet-50 (224)",
    "vit_ti16": "ViT-Ti/16 (224, heads)",
    "vit_b16": "ViT-B/16 (224, heads)",
    "mobilenet_v2": "MobileNetV2 (224)",
}
FLOOR_MODELS = ("resnet50", "vit_b16")  # where the issue asks for "within 4x of the floor"


# ------------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual; a strided 1x1 conv-BN projects the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class CifarResNet20(nn.Module):
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages x 3 basic blocks, 16/32/64 channels."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        cin = 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(3):
                blocks.append(BasicBlock(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(y.mean(dim=(2, 3)))


def build(name: str) -> tuple[nn.Module, tuple[int, ...], int, dict]:
    """``(model, input shape without batch, classes, WeightTracker kwargs)``."""
    if name == "resnet20":
        return CifarResNet20(), (3, 32, 32), 10, {}
    if name in ("resnet18", "resnet50", "mobilenet_v2"):
        import torchvision

        return getattr(torchvision.models, name)(), (3, 224, 224), 1000, {}
    if name in ("vit_ti16", "vit_b16"):
        import timm

        arch = {"vit_ti16": "vit_tiny_patch16_224", "vit_b16": "vit_base_patch16_224"}[name]
        return timm.create_model(arch, pretrained=False), (3, 224, 224), 1000, {"prune_num_heads": True}
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


# ------------------------------------------------------------------------------ timing


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Plumbing(torch.autograd.Function):
    """No arithmetic: a zero scalar forward, and fresh zeroed gradients in backward."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.tensors = tensors
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grads = [torch.empty_like(t) for t in ctx.tensors]
        torch._foreach_zero_(grads)
        return tuple(grads)


def fvcore_import_ms() -> float:
    """``import fvcore.nn`` in a fresh process with torch already imported (ms)."""
    code = ("import time, torch; t = time.perf_counter(); import fvcore.nn; "
            "print((time.perf_counter() - t) * 1e3)")
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split()[-1])


def sparsify_(model: nn.Module, tracker: WeightTracker, fraction: float) -> None:
    """Zero ``fraction`` of every weight with 2+ dims (at random) and unit 0 of every group."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_((torch.rand(p.shape, generator=gen) >= fraction).to(p.dtype))
    tracker.fake_prune_units({g.id: [0] for g in tracker.groups if g.n_units > 1})


def measure(name: str, rounds: int, batch: int, warmup: int, sparsity: float = 0.0) -> dict[str, float]:
    torch.manual_seed(0)
    model, shape, classes, kwargs = build(name)
    example = torch.randn(1, *shape)
    t0 = time.perf_counter()
    tracker = WeightTracker(model, example, **kwargs)
    t_build = time.perf_counter() - t0
    if sparsity:
        sparsify_(model, tracker, sparsity)

    t0 = time.perf_counter()
    for kind, options in TRACKERS:
        tracker.create_tracker(kind, **options)
    t_create = time.perf_counter() - t0
    t_first = _time(tracker.track)
    t_fvcore = _time(lambda: fvcore_macs_by_operator(model, example))
    lasso = tracker.create_regularizer("group_lasso")
    penalised = [model.get_parameter(name) for name in lasso.plan.param_names]
    bops_lasso = tracker.create_regularizer("bops_group_lasso")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # full work, weights unchanged
    inputs = torch.randn(batch, *shape)
    targets = torch.randint(0, classes, (batch,))
    params = [p for p in model.parameters()]
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()

    def penalty(reg: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for p in params:  # what zero_grad(set_to_none=True) does, without the module walk
                p.grad = None
            reg().backward()

        return run

    def floor() -> None:
        with torch.no_grad():
            torch._foreach_norm(params)

    held: list[torch.Tensor] = []

    def fresh_grads() -> None:  # what any backward writing new .grad tensors must do
        held.clear()
        held.extend(torch.empty_like(p) for p in params)
        torch._foreach_zero_(held)

    def lasso_forward() -> None:
        with torch.no_grad():
            lasso()

    def plumbing() -> None:
        for p in params:
            p.grad = None
        Plumbing.apply(*penalised).backward()

    jobs = {"step": step, "track": tracker.track, "lasso": penalty(lasso), "lasso_fwd": lasso_forward,
            "bops_lasso": penalty(bops_lasso), "floor": floor, "fresh_grads": fresh_grads,
            "plumbing": plumbing}
    for _ in range(warmup):
        for fn in jobs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(rounds):
        for key, fn in jobs.items():
            if key == "step":
                times[key].append(_time(fn))
                continue
            # steady state: a block of consecutive calls, the first (cold after the step) dropped
            fn()
            times[key].extend(_time(fn) for _ in range(4))
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update(build=t_build, create=t_create, first=t_first, fvcore=t_fvcore,
               params=sum(p.numel() for p in params), units=tracker.num_units,
               groups=len(tracker.groups))
    return out


# ----------------------------------------------------------------------------- report


def report(rows: list[tuple[str, dict[str, float]]], rounds: int, batch: int, sparsity: float,
           import_ms: float) -> str:
    weights = (f"{sparsity:.0%} of every weight with 2+ dims zeroed at random and unit 0 of "
               "every group zeroed" if sparsity else "random dense weights (as initialised)")
    lines = [
        "## Trackers and group lasso vs one training step (issue 13)"
        + (f": {sparsity:.0%} sparse weights" if sparsity else ""),
        "",
        f"Weights: {weights}.",
        "",
        f"Machine: {machine()}. Training step: batch {batch}, forward + cross-entropy + backward "
        f"+ SGD. Median over {rounds} interleaved rounds; ratios of medians from the same run.",
        "Reproduce: `python bench/bench_step_share.py" + (f" --sparsity {sparsity}" if sparsity else "") + "`.",
        "",
        "| model | training step | `track()` (5 trackers) | share | `group_lasso` fwd+bwd | share "
        "| `bops_group_lasso` fwd+bwd | share | floor (`_foreach_norm`) | track / floor | lasso / floor "
        "| lasso fwd only | fresh gradients | autograd floor | first `track()` | first / step "
        "| fvcore count | create 5 + first |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in rows:
        step = t["step"]
        lines.append(
            f"| {LABELS[name]} | {step * 1e3:.0f} ms | {t['track'] * 1e3:.1f} ms | **{t['track'] / step:.1%}** "
            f"| {t['lasso'] * 1e3:.1f} ms | **{t['lasso'] / step:.1%}** | {t['bops_lasso'] * 1e3:.1f} ms "
            f"| **{t['bops_lasso'] / step:.1%}** | {t['floor'] * 1e3:.2f} ms | {t['track'] / t['floor']:.1f}x "
            f"| {t['lasso'] / t['floor']:.1f}x | {t['lasso_fwd'] * 1e3:.1f} ms | {t['fresh_grads'] * 1e3:.1f} ms "
            f"| {t['plumbing'] * 1e3:.2f} ms | {t['first'] * 1e3:.0f} ms "
            f"| {t['first'] / step:.2f} | {t['fvcore'] * 1e3:.0f} ms | {(t['create'] + t['first']) * 1e3:.0f} ms |"
        )
    lines += [
        "",
        f"`import fvcore.nn` (a fresh process, torch already imported): {import_ms:.0f} ms; "
        f"the first `track()` of the first model ({LABELS[rows[0][0]]}) includes it.",
        "",
        "Targets: `track()` at most 2 % and group lasso fwd+bwd at most 3 % of the training "
        "step on every model; on ResNet-50 and ViT-B/16 each within 4x of the floor; the "
        "first `track()` (fvcore baseline MACs) under one training step.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--sparsity", type=float, default=0.0, help="zero this share of the weights first")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        t = measure(name, args.rounds, args.batch, args.warmup, args.sparsity)
        print(f"{name}: step {t['step'] * 1e3:.0f} ms, track {t['track'] * 1e3:.1f} ms "
              f"({t['track'] / t['step']:.2%}), lasso {t['lasso'] * 1e3:.1f} ms "
              f"({t['lasso'] / t['step']:.2%}, forward {t['lasso_fwd'] * 1e3:.1f} ms), "
              f"bops lasso {t['bops_lasso'] * 1e3:.1f} ms, "
              f"floor {t['floor'] * 1e3:.2f} ms, fresh grads {t['fresh_grads'] * 1e3:.1f} ms, "
              f"autograd floor {t['plumbing'] * 1e3:.2f} ms, "
              f"first track {t['first'] * 1e3:.0f} ms, fvcore count {t['fvcore'] * 1e3:.0f} ms",
              flush=True)
        rows.append((name, t))
    import_ms = statistics.median(fvcore_import_ms() for _ in range(3))
    text = report(rows, args.rounds, args.batch, args.sparsity, import_ms)
    print(text)
    if not args.no_write:
        write_section("trackers-sparse" if args.sparsity else "trackers", text)


if __name__ == "__main__":
    main()
