"""Helpers shared by the commands: writing output, the plugin manager, metrics by name."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, WeightTrackerError
from ..manager import PluginManager, default_plugin_manager
from ..specs import LayerCategory
from ..registry import Registries, build_registries


def registries() -> tuple[PluginManager, Registries]:
    """The process-wide plugin manager and its registries (plugin errors propagate)."""
    pm = default_plugin_manager()
    return pm, build_registries(pm)


def emit(text: str, output: str | None = None) -> None:
    """Write ``text`` to the file ``output``, or to stdout when it is ``None`` or ``-``."""
    if output in (None, "-"):
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    path = Path(output)  # type: ignore[arg-type]
    try:
        path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"Cannot write {str(path)!r}: {err.strerror or err}. "
                          "Pass --output with a writable path.") from err


def collect_metrics(
    tracker: Any, wanted: Sequence[tuple[str, Mapping[str, Any]]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Metrics of every tracker in ``wanted`` that is installed and works on this model.

    Args:
        tracker: A ``WeightTracker``.
        wanted: ``(tracker name, options)`` pairs.

    Returns:
        ``(metrics by tracker name, {tracker name: why it is unavailable})``: a tracker
        that is not installed, or that refuses this model, is reported instead of failing
        the whole command.
    """
    installed = tracker.registries.trackers
    metrics: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for name, options in wanted:
        if name not in installed:
            unavailable[name] = "not installed"
            continue
        try:
            metrics[name] = tracker.create_tracker(name, **options).track()[name]
        except WeightTrackerError as err:
            unavailable[name] = str(err)
        except Exception as err:  # a third-party tracker's bug must not hide the others
            unavailable[name] = f"{type(err).__name__}: {err}"
    return metrics, unavailable


def total_macs(tracker: Any) -> dict[str, float] | None:
    """Dense and active MACs of the weighted layers, from the installed cost calculations.

    ``layer_baseline_macs`` (fvcore's count per layer) and ``layer_active_macs`` are read
    through the calculation graph; ``None`` when no installed plugin provides them.
    """
    calculations = tracker.registries.calculations
    if "layer_baseline_macs" not in calculations or "layer_active_macs" not in calculations:
        return None
    try:
        values = tracker.graph.evaluation()
        baseline, active = values["layer_baseline_macs"], values["layer_active_macs"]
    except WeightTrackerError:
        return None
    rows = [info.index for info in tracker.structure.modules
            if info.category is LayerCategory.WEIGHTED]
    return {"baseline": float(baseline[rows].sum()), "active": float(active[rows].sum())}
