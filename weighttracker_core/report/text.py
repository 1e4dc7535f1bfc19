"""Plain-text and JSON renderings of the CLI's results (plain dicts in, strings out)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..metric_format import iter_flat
from ..summaries import structures_text
from .svg import fmt

#: Metric subtrees left out of text output (per-layer detail; use --format json).
DETAIL_KEYS = ("modules", "layers", "groups")


def to_json(data: Any) -> str:
    """Indented JSON; non-finite floats become ``null`` so the output is valid JSON."""
    return json.dumps(_finite(data), indent=2, sort_keys=False, default=str)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``("tracker/key", value)`` for every number or string, skipping per-layer detail."""
    for path, value in iter_flat(metrics, prefix, skip=DETAIL_KEYS):
        if isinstance(value, (int, float, str, bool)) or value is None:
            yield path, value


def number(value: Any) -> str:
    """A metric value for people: integers with separators, floats to 4 significant digits."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 1000:
            return f"{int(value):,}"
        return f"{value:.4g}"
    return str(value)


def plugins_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """One block per plugin: name, distribution, version, source and what it registers."""
    lines = [f"{len(rows)} plugins"]
    for row in rows:
        origin = (f"{row['distribution']} {row['version']}" if row.get("distribution")
                  else "registered at run time")
        lines.append(f"{row['name']}  ({origin}; {row['source']})")
        summaries = row.get("summaries", {})
        registers = row.get("registers", {})
        if not registers:
            lines.append("    (registers nothing)")
        for kind, names in registers.items():
            for name in names:
                summary = summaries.get(kind, {}).get(name, "")
                lines.append(f"    {kind}: {name}" + (f" - {summary}" if summary else ""))
    return "\n".join(lines)


def inspect_text(data: Mapping[str, Any]) -> str:
    """The ``weighttracker inspect`` result for a terminal."""
    shape = "x".join(map(str, data["input_shape"]))
    lines = [
        f"Model: {data['model']} ({data['model_type']}), input {shape}",
        f"Parameters: {data['num_parameters']:,}",
    ]
    if data.get("macs"):
        lines.append(f"MACs (weighted layers, fvcore): {number(data['macs']['baseline'])} dense, "
                     f"{number(data['macs']['active'])} active")
    lines += [
        "",
        structures_text(data["structures"]),
        "",
        "Metrics:",
    ]
    metrics = data.get("metrics", {})
    for name, values in metrics.items():
        scalars = list(scalar_metrics({name: values}))
        lines.extend(f"    {key}: {number(value)}" for key, value in scalars)
        if not scalars:
            lines.append(f"    {name}: per-layer or per-group values only (see --format json)")
    if not metrics:
        lines.append("    (none)")
    for name, reason in data.get("unavailable", {}).items():
        lines.append(f"    {name}: unavailable ({reason})")
    for note in data.get("notes", ()):
        lines.append(f"Note: {note}")
    return "\n".join(lines)


STAGE_COLUMNS = (
    ("params", "params"),
    ("macs", "MACs"),
    ("bops", "BOPs"),
    ("compression", "compression"),
    ("accuracy", "test accuracy"),
    ("latency_ms", "CPU latency"),
    ("zero_units", "zero units"),
)


def stage_table(stages: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Rows of strings (header first) for the demo's before/after table."""
    columns = [(key, label) for key, label in STAGE_COLUMNS if any(key in s for s in stages)]
    rows = [["stage"] + [label for _, label in columns]]
    for stage in stages:
        row = [str(stage["name"])]
        for key, _ in columns:
            value = stage.get(key)
            if value is None:
                row.append("n/a")
            elif key in ("macs", "bops"):
                row.append(fmt(float(value)))
            elif key in ("compression", "accuracy"):
                row.append(f"{100 * float(value):.1f}%")
            elif key == "latency_ms":
                row.append(f"{float(value):.2f} ms")
            else:
                row.append(number(value))
        rows.append(row)
    return rows


def demo_text(data: Mapping[str, Any]) -> str:
    """The summary ``weighttracker demo`` prints."""
    rows = stage_table(data["stages"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    pruned = data.get("pruned", {})
    lines.append("")
    lines.append(f"Pruned {pruned.get('num_units', 0)} zero units in "
                 f"{len(pruned.get('groups', {}))} groups.")
    for name, count in pruned.get("groups", {}).items():
        lines.append(f"    {name}: {count}")
    for note in data.get("notes", ()):
        lines.append(f"Note: {note}")
    return "\n".join(lines)
