"""``weighttracker demo``: the main job end to end on an embedded model (SPEC §11).

Build a :class:`WeightTracker` for a small CNN with random weights, train it on a
synthetic task with the group-lasso proximal step behind a progress bar, prune the units
that became exactly zero, print parameters, MACs, BOPs, compression and accuracy before
and after, and write an HTML report with plots. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .. import report
from ..errors import ConfigError
from ..specs import LayerCategory
from ..tracker import WeightTracker
from .common import collect_metrics, count_parameters, emit, total_macs
from .demo_model import DemoNet, accuracy, recalibrate_batch_norm_, synthetic_images

DEFAULT_OUTPUT = "weighttracker-demo.html"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "demo",
        help="group-lasso training, pruning and an HTML report on a built-in model",
        description="Train a small CNN (random init, synthetic data, nothing downloaded) with "
        "group lasso and its proximal step, prune the exactly-zero units, print the "
        "compression and write an HTML report.",
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    parser.add_argument("--strength", type=float, default=0.02,
                        help="group-lasso strength of the proximal step (default: 0.02)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--width", type=int, default=16,
                        help="channels of the first stage (default: 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1; the model is tiny)")
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, metavar="PATH",
                        help=f"HTML report path (default: {DEFAULT_OUTPUT}); '' for none")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the report's data as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "width", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    for name in ("lr", "strength"):
        value = getattr(args, name)
        if not value >= 0 or value == float("inf"):
            raise ConfigError(f"--{name} must be a finite number >= 0, got {value}.")


def run(args: argparse.Namespace) -> int:
    _check(args)
    torch.set_num_threads(args.threads)
    data = run_demo(steps=args.steps, seed=args.seed, lr=args.lr, strength=args.strength,
                    batch_size=args.batch_size, width=args.width, progress=not args.no_progress)
    if args.output:
        emit(report.demo_html(data), args.output)
        data["notes"].append(f"HTML report written to {args.output}")
    if args.json:
        emit(report.to_json(data), args.json)
    emit(report.demo_text(data))
    return 0


def _out_channels(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


class _Meter:
    """Parameters, MACs, BOPs, compression and accuracy of the model as it is now."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.model, self.images, self.labels = model, images, labels
        self.dense_macs: dict[str, float] | None = None  # per weighted layer, before pruning
        self.unavailable: dict[str, str] = {}

    def layer_macs(self, tracker: WeightTracker) -> dict[str, float] | None:
        if "layer_baseline_macs" not in tracker.registries.calculations:
            return None
        baseline = tracker.graph.evaluation()["layer_baseline_macs"]
        return {info.name: float(baseline[info.index]) for info in tracker.structure.modules
                if info.category is LayerCategory.WEIGHTED}

    def __call__(self, tracker: WeightTracker, name: str) -> dict[str, Any]:
        options: dict[str, Any] = {"log_total_bops": True}
        if self.dense_macs is not None:
            # compare with the model before pruning, not with the pruned model's own size
            options["normalization_macs_pr_module"] = self.dense_macs
        metrics, unavailable = collect_metrics(tracker, [("structured_bops", options)])
        self.unavailable.update(unavailable)
        bops = metrics.get("structured_bops", {})
        macs = total_macs(tracker)
        return {
            "name": name,
            "params": count_parameters(self.model),
            "macs": None if macs is None else macs["active"],
            "bops": bops.get("bops"),
            "compression": bops.get("compression"),
            "accuracy": accuracy(self.model, self.images, self.labels),
            "zero_units": sum(len(units) for units in tracker.zero_units().values()),
        }


def run_demo(
    *,
    steps: int = 300,
    seed: int = 0,
    lr: float = 0.05,
    strength: float = 0.02,
    batch_size: int = 32,
    width: int = 16,
    warmup: float = 0.3,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, prune and measure; returns the report's data (plain Python values).

    The proximal step's strength ramps up linearly over the first ``warmup`` fraction of
    the steps, so the network learns the task before the pressure is on.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = synthetic_images(2048, generator)
    test_x, test_y = synthetic_images(512, generator)
    model = DemoNet(width=width)
    # the classifier's outputs are the classes: never units
    tracker = WeightTracker(model, train_x[:1], ignored_layers=[model.head])
    meter = _Meter(model, test_x, test_y)
    stages = [meter(tracker, "dense (random init)")]
    meter.dense_macs = meter.layer_macs(tracker)
    channels_before = _out_channels(model)

    lasso = tracker.create_regularizer("group_lasso")
    bops = None
    if "structured_bops" in tracker.registries.trackers:
        bops = tracker.create_tracker("structured_bops")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history: dict[str, list[Any]] = {k: [] for k in
                                     ("step", "loss", "accuracy", "penalty", "zero_units", "compression")}
    log_every = max(1, steps // 100)
    bar = tqdm(range(1, steps + 1), desc="group lasso", unit="step", disable=None if progress else True)
    model.train()
    for step in bar:
        # cosine learning-rate decay; the proximal step uses the rate of the step just taken
        current_lr = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        for group in optimizer.param_groups:
            group["lr"] = current_lr
        batch = torch.randint(len(train_x), (batch_size,), generator=generator)
        logits = model(train_x[batch])
        loss = nn.functional.cross_entropy(logits, train_y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ramp = min(1.0, step / max(1.0, warmup * steps))
        factors = lasso.proximal_step_(lr=current_lr, strength=strength * ramp)
        if step % log_every == 0 or step == steps:
            zero = int((factors == 0).sum())
            history["step"].append(step)
            history["loss"].append(loss.item())
            history["accuracy"].append((logits.argmax(1) == train_y[batch]).float().mean().item())
            with torch.no_grad():
                history["penalty"].append(lasso().item())
            history["zero_units"].append(zero)
            history["compression"].append(bops.track()["structured_bops"]["compression"] if bops else None)
            bar.set_postfix(loss=f"{loss.item():.3f}", zero_units=zero)
    bar.close()
    recalibrate_batch_norm_(model, train_x)
    model.eval()
    stages.append(meter(tracker, "trained (zero units still in place)"))

    # a group whose units are all zero cannot be removed (its layers would vanish): the
    # strength was too high for this run; keep such groups and say so
    collapsed = [tracker.groups[gid] for gid, units in tracker.zero_units().items()
                 if len(units) == tracker.groups[gid].n_units]
    pruned = tracker.prune_zero_units(
        ignore_prune=[tracker.structure.module(g.root_module) for g in collapsed])
    stages.append(meter(tracker, "pruned"))
    channels_after = _out_channels(model)
    notes = [
        "Compression is 1 - BOPs / BOPs of the dense model at 32-bit weights and activations; "
        "the pruned model is compared with the model before pruning.",
        f"Finished in {time.perf_counter() - started:.1f} s on {platform.machine()} with "
        f"{torch.get_num_threads()} torch thread(s).",
    ]
    notes += [f"{name}: unavailable ({why})" for name, why in meter.unavailable.items()]
    notes += [f"Every unit of group {g.name} became zero, so it was not pruned; the network "
              "has collapsed. Use a lower --strength." for g in collapsed]
    return {
        "title": "weighttracker demo",
        "description": (
            "A small residual CNN with random initial weights learns a synthetic 4-class task "
            "(which quadrant holds the coloured blob). Each SGD step is followed by the "
            "group-lasso proximal step, which shrinks every canonical unit (a channel with all "
            "its coupled weights) and sets weak ones exactly to zero; the zero units are then "
            "removed physically."
        ),
        "config": {"model": f"DemoNet(width={width})", "input": "1x3x16x16", "steps": steps,
                   "batch_size": batch_size, "optimizer": "SGD(momentum=0.9)", "lr": lr,
                   "group_lasso_strength": strength, "seed": seed,
                   "train_images": len(train_x), "test_images": len(test_x)},
        "stages": stages,
        "history": history,
        "layers": {"names": list(channels_before),
                   "before": list(channels_before.values()),
                   "after": [channels_after[n] for n in channels_before]},
        "pruned": {"num_units": pruned.num_units,
                   "groups": {name: len(units) for name, units in pruned.units.items()}},
        "notes": notes,
    }
