"""``weighttracker inspect MODEL``: canonical structures and metrics of one model."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from typing import Any

from .. import report
from ..errors import ConfigError
from ..tracker import WeightTracker
from ..surgery import count_params
from .common import collect_metrics, emit, registries, total_macs
from .models import (
    example_input,
    load_model,
    model_source,
    parse_config,
    parse_shape,
    source_example_input,
)

#: Trackers ``inspect`` shows when they are installed, with the options it passes.
INSPECT_TRACKERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("structured_bops", {"log_total_bops": True, "log_layerwise_stats": True}),
    ("unstructured_bops", {"log_total_bops": True, "log_layerwise_stats": True}),
    ("unstructured_sparsity", {}),
    ("nvidia_2_4_sparsity", {}),
    ("group_pruning_summary", {}),
    ("l2_norm_distribution", {}),
)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "inspect",
        help="show the canonical structures and metrics of a model",
        description="Build MODEL with random weights, find its canonical unit groups and report "
        "them with every installed metric.",
        epilog="MODEL is PREFIX:NAME for an installed model source (torchvision:resnet18, "
        "timm:vit_tiny_patch16_224) or package.module:factory (a callable that builds the "
        "model without arguments).",
    )
    parser.add_argument("model", metavar="MODEL", help="e.g. torchvision:resnet18")
    parser.add_argument("--input-shape", default=None, metavar="SHAPE",
                        help="example input shape, e.g. 1,3,224,224 (default: the source's)")
    parser.add_argument("--format", choices=("text", "json", "html"), default="text",
                        help="output format (default: text)")
    parser.add_argument("-o", "--output", default=None, metavar="PATH",
                        help="write to PATH instead of stdout")
    parser.add_argument("--ignore", action="append", default=[], metavar="LAYER",
                        help="module name whose output channels are never units (repeatable), "
                        "e.g. --ignore fc")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE,...",
                        help="settings for model sources that build a model from a config "
                        "(e.g. hf:llama --config hidden_size=64,num_hidden_layers=2); repeatable")
    parser.add_argument("--heads", action="store_true",
                        help="prune_num_heads=True: whole attention heads become units")
    parser.set_defaults(run=run)


def inspect_model(
    spec: str,
    input_shape: Sequence[int] | None = None,
    *,
    ignore: Sequence[str] = (),
    heads: bool = False,
    config: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Plain-data description of ``spec``: structures, metrics, and what was unavailable.

    ``config`` holds ``--config`` settings for a model source that builds from a config.
    """
    _, regs = registries()
    model, default_shape = load_model(spec, regs, config)
    source = model_source(spec, regs)
    if source is not None and source.example_input is not None:
        x = source_example_input(model, spec, source, tuple(input_shape) if input_shape else None)
        shape = tuple(x.shape)
    else:
        shape = tuple(input_shape) if input_shape else default_shape
        x = example_input(model, spec, shape)
    ignored = []
    for name in ignore:
        try:
            ignored.append(model.get_submodule(name))
        except AttributeError:
            raise ConfigError(
                f"--ignore {name!r}: {spec} has no module of that name; use a name from the "
                "structure listing (e.g. fc, classifier.1)."
            ) from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = WeightTracker(model, x, ignored_layers=ignored, prune_num_heads=heads)
    metrics, unavailable = collect_metrics(tracker, INSPECT_TRACKERS)
    macs = total_macs(tracker)
    notes = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    return {
        "model": spec,
        "model_type": f"{type(model).__module__}.{type(model).__qualname__}",
        "input_shape": list(shape),
        "num_parameters": count_params(model),
        "macs": macs,
        "structures": tracker.view_structures().to_dict(),
        "metrics": metrics,
        "unavailable": unavailable,
        "notes": notes,
    }


def run(args: argparse.Namespace) -> int:
    shape = parse_shape(args.input_shape) if args.input_shape is not None else None
    data = inspect_model(args.model, shape, ignore=args.ignore, heads=args.heads,
                         config=parse_config(args.config))
    if args.format == "json":
        text = report.to_json(data)
    elif args.format == "html":
        text = report.inspect_html(data)
    else:
        text = report.inspect_text(data)
    emit(text, args.output)
    return 0
