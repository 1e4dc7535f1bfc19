"""``weighttracker demo``: the main job end to end on real data that ships with a package.

A small residual CNN learns scikit-learn's handwritten digits (train/test split; nothing
downloaded). It is trained plainly first, then with the group-lasso proximal step behind a
progress bar until weak units are exactly zero; those units are removed physically.
Parameters, MACs, BOPs, compression, test accuracy and CPU latency are printed for every
stage, and an HTML report with plots is written.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .. import report
from ..errors import ConfigError
from ..specs import LayerCategory
from ..tracker import WeightTracker
from ..surgery import count_params
from .common import collect_metrics, emit, total_macs
from .demo_model import DemoNet, accuracy, latency_ms, load_digits, recalibrate_batch_norm_

DEFAULT_OUTPUT = "weighttracker-demo.html"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "demo",
        help="train, group lasso, prune and report on scikit-learn's handwritten digits",
        description="Train a small CNN on scikit-learn's handwritten digits (shipped with "
        "scikit-learn, nothing downloaded), then with group lasso and its proximal step, "
        "prune the exactly-zero units, print compression, test accuracy and CPU latency, "
        "and write an HTML report.",
    )
    parser.add_argument("--train-steps", type=int, default=300,
                        help="plain training steps before the group lasso (default: 300)")
    parser.add_argument("--steps", type=int, default=400,
                        help="training steps with the group-lasso proximal step (default: 400)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    parser.add_argument("--strength", type=float, default=0.03,
                        help="group-lasso strength of the proximal step (default: 0.03)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--width", type=int, default=16,
                        help="channels of the first stage (default: 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1; the model is tiny)")
    parser.add_argument("-o", "--output", default=DEFAULT_OUTPUT, metavar="PATH",
                        help=f"HTML report path (default: {DEFAULT_OUTPUT}); '' for none")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the report's data as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "width", "threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.train_steps < 0:
        raise ConfigError(f"--train-steps must be >= 0, got {args.train_steps}.")
    for name in ("lr", "strength"):
        value = getattr(args, name)
        if not value >= 0 or value == float("inf"):
            raise ConfigError(f"--{name} must be a finite number >= 0, got {value}.")


def run(args: argparse.Namespace) -> int:
    _check(args)
    torch.set_num_threads(args.threads)
    data = run_demo(train_steps=args.train_steps, steps=args.steps, seed=args.seed, lr=args.lr,
                    strength=args.strength, batch_size=args.batch_size, width=args.width,
                    progress=not args.no_progress)
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
    """Parameters, MACs, BOPs, compression, test accuracy and latency of the model now."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.model, self.images, self.labels = model, images, labels
        self.dense_macs: dict[str, float] | None = None  # per weighted layer, before pruning
        self.unavailable: dict[str, str] = {}
        self.snapshots: list[nn.Module] = []  # a copy per stage, timed together at the end

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
        self.snapshots.append(copy.deepcopy(self.model))
        return {
            "name": name,
            "params": count_params(self.model),
            "macs": None if macs is None else macs["active"],
            "bops": bops.get("bops"),
            "compression": bops.get("compression"),
            "accuracy": accuracy(self.model, self.images, self.labels),
            "zero_units": sum(len(units) for units in tracker.zero_units().values()),
        }

    def time_stages(self, stages: list[dict[str, Any]]) -> None:
        """Fill in ``latency_ms`` of every stage, all measured in one interleaved run."""
        for stage, ms in zip(stages, latency_ms(self.snapshots, self.images)):
            stage["latency_ms"] = ms


def _train(
    model: nn.Module,
    data: Any,
    steps: int,
    *,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    desc: str,
    progress: bool,
    after_step: Callable[[int, float], dict[str, Any]] | None = None,
    log: Callable[[int, torch.Tensor, torch.Tensor, dict[str, Any]], None] | None = None,
) -> None:
    """SGD with momentum and cosine decay; ``after_step(step, lr)`` runs after each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    log_every = max(1, steps // 100)
    bar = tqdm(range(1, steps + 1), desc=desc, unit="step", disable=None if progress else True)
    model.train()
    for step in bar:
        current_lr = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        for group in optimizer.param_groups:
            group["lr"] = current_lr
        batch = torch.randint(len(data.train_x), (batch_size,), generator=generator)
        logits = model(data.train_x[batch])
        loss = nn.functional.cross_entropy(logits, data.train_y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        extra = after_step(step, current_lr) if after_step is not None else {}
        if log is not None and (step % log_every == 0 or step == steps):
            log(step, loss, (logits.argmax(1) == data.train_y[batch]).float().mean(), extra)
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: v for k, v in extra.items() if k == "zero_units"})
    bar.close()


def run_demo(
    *, train_steps: int = 300, steps: int = 400, seed: int = 0, lr: float = 0.05,
    strength: float = 0.03, batch_size: int = 64, width: int = 16, warmup: float = 0.3,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, sparsify, prune and measure; returns the report's data (plain Python values).

    The proximal step's strength ramps up linearly over the first ``warmup`` fraction of
    the group-lasso steps, so the network is not hit at full strength at once.

    Raises:
        MissingDependencyError: scikit-learn is not installed.
    """
    started = time.perf_counter()
    data = load_digits(seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DemoNet(width=width)
    # the classifier's outputs are the classes: never units
    tracker = WeightTracker(model, data.train_x[:1], ignored_layers=[model.head])
    meter = _Meter(model, data.test_x, data.test_y)
    stages = [meter(tracker, "before training (random init)")]
    meter.dense_macs = meter.layer_macs(tracker)
    channels_before = _out_channels(model)

    lasso = tracker.create_regularizer("group_lasso")
    history = _History(tracker, model, data, lasso)
    _train(model, data, train_steps, lr=lr, batch_size=batch_size, generator=generator,
           desc="training", progress=progress, log=history.logger("training", 0))
    model.eval()
    stages.append(meter(tracker, "trained"))

    _train(model, data, steps, lr=lr, batch_size=batch_size, generator=generator,
           desc="group lasso", progress=progress,
           after_step=_ramped_proximal_step(lasso, strength, warmup * steps),
           log=history.logger("group lasso", train_steps))
    recalibrate_batch_norm_(model, data.train_x)
    model.eval()
    stages.append(meter(tracker, "group lasso (zero units in place)"))
    pruned, collapsed = _prune_zero_units(tracker)
    stages.append(meter(tracker, "pruned"))
    meter.time_stages(stages)
    config = {"model": f"DemoNet(width={width})", "data": "sklearn.datasets.load_digits",
              "input": f"1x1x{data.train_x.shape[-2]}x{data.train_x.shape[-1]}",
              "train_steps": train_steps, "group_lasso_steps": steps,
              "batch_size": batch_size, "optimizer": "SGD(momentum=0.9, weight_decay=1e-4)",
              "lr": lr, "group_lasso_strength": strength, "seed": seed,
              "train_images": len(data.train_x), "test_images": len(data.test_x)}
    return _report(config, stages, history.values, (channels_before, _out_channels(model)), pruned,
                   _notes(stages, len(data.test_x), meter, collapsed, started))


def _report(config: dict[str, Any], stages: list[dict[str, Any]], history: dict[str, list[Any]],
            channels: tuple[dict[str, int], dict[str, int]], pruned: Any, notes: list[str]) -> dict[str, Any]:
    before, after = channels
    return {
        "title": "weighttracker demo",
        "description": DESCRIPTION,
        "config": config,
        "stages": stages,
        "history": history,
        "layers": {"names": list(before), "before": list(before.values()),
                   "after": [after[n] for n in before]},
        "pruned": {"num_units": pruned.num_units,
                   "groups": {name: len(units) for name, units in pruned.units.items()}},
        "notes": notes,
    }


def _ramped_proximal_step(lasso: Any, strength: float, ramp_steps: float) -> Callable[[int, float], dict[str, Any]]:
    """The group lasso's proximal step, its strength ramping up over ``ramp_steps`` steps."""
    def proximal(step: int, current_lr: float) -> dict[str, Any]:
        ramp = min(1.0, step / max(1.0, ramp_steps))
        factors = lasso.proximal_step_(lr=current_lr, strength=strength * ramp)
        return {"zero_units": int((factors == 0).sum())}
    return proximal


def _prune_zero_units(tracker: WeightTracker) -> tuple[Any, list[Any]]:
    """Remove the zero units, keeping groups whose every unit became zero (and naming them).

    Such a group cannot be removed (its layers would vanish): the strength was too high.
    """
    collapsed = [tracker.groups[gid] for gid, units in tracker.zero_units().items()
                 if len(units) == tracker.groups[gid].n_units]
    pruned = tracker.prune_zero_units(
        ignore_prune=[tracker.structure.module(g.root_module) for g in collapsed])
    return pruned, collapsed


DESCRIPTION = (
    "A small residual CNN with random initial weights learns scikit-learn's handwritten "
    "digits (8x8 grey-scale images, 10 classes; 75% for training, 25% held out for "
    "testing). After plain training, each SGD step is followed by the group-lasso "
    "proximal step, which shrinks every canonical unit (a channel with all its coupled "
    "weights) and sets weak ones exactly to zero; the zero units are then removed "
    "physically."
)


class _History:
    """The curves of the report: loss, accuracies, penalty, zero units, compression."""

    def __init__(self, tracker: WeightTracker, model: nn.Module, data: Any, lasso: Any) -> None:
        self.tracker, self.model, self.data, self.lasso = tracker, model, data, lasso
        has_bops = "structured_bops" in tracker.registries.trackers
        self.bops = tracker.create_tracker("structured_bops") if has_bops else None
        self.values: dict[str, list[Any]] = {k: [] for k in (
            "step", "phase", "loss", "accuracy", "test_accuracy", "penalty", "zero_units", "compression")}

    def logger(self, phase: str, offset: int) -> Callable[[int, torch.Tensor, torch.Tensor, dict[str, Any]], None]:
        def log(step: int, loss: torch.Tensor, batch_accuracy: torch.Tensor, extra: dict[str, Any]) -> None:
            values, data = self.values, self.data
            values["step"].append(offset + step)
            values["phase"].append(phase)
            values["loss"].append(loss.item())
            values["accuracy"].append(batch_accuracy.item())
            values["test_accuracy"].append(accuracy(self.model, data.test_x, data.test_y))
            with torch.no_grad():
                values["penalty"].append(self.lasso().item())
            values["zero_units"].append(sum(len(u) for u in self.tracker.zero_units().values()))
            bops = self.bops
            values["compression"].append(bops.track()["structured_bops"]["compression"] if bops else None)
        return log


def _notes(stages: list[dict[str, Any]], num_test: int, meter: Any, collapsed: list[Any],
           started: float) -> list[str]:
    trained, final = stages[1], stages[-1]
    notes = [
        f"Test accuracy: {100 * trained['accuracy']:.1f}% trained, {100 * final['accuracy']:.1f}% "
        f"pruned ({100 * (final['accuracy'] - trained['accuracy']):+.1f} points) on "
        f"{num_test} held-out digits.",
        "Compression is 1 - BOPs / BOPs of the dense model at 32-bit weights and activations; "
        "the pruned model is compared with the model before pruning.",
        f"CPU latency: median of 40 eval-mode forward passes over the {num_test} test "
        "images, every stage's model timed in turn in one run; pruned vs trained: "
        f"{trained['latency_ms'] / final['latency_ms']:.2f}x faster ({torch.get_num_threads()} "
        f"torch thread(s), torch {torch.__version__}, {platform.machine()}).",
        f"Finished in {time.perf_counter() - started:.1f} s.",
    ]
    notes += [f"{name}: unavailable ({why})" for name, why in meter.unavailable.items()]
    notes += [f"Every unit of group {g.name} became zero, so it was not pruned; the network "
              "has collapsed. Use a lower --strength." for g in collapsed]
    return notes
