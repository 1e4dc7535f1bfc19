"""``weighttracker plugins``: every plugin, its distribution and version, and what it registers."""

from __future__ import annotations

import argparse
from typing import Any

import attrs

from .. import report
from ..registry import Registries, describe_plugins
from .common import emit, registries


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "plugins",
        help="list installed plugins and what they register",
        description="List every weighttracker plugin (entry-point group 'weighttracker'): "
        "name, distribution, version and the names it registers.",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="output format (default: text)")
    parser.add_argument("-o", "--output", default=None, metavar="PATH",
                        help="write to PATH instead of stdout")
    parser.set_defaults(run=run)


def plugin_rows() -> list[dict[str, Any]]:
    """``describe_plugins`` of the process-wide manager, plus each registered name's summary."""
    pm, regs = registries()
    rows = describe_plugins(pm)
    summaries: dict[str, dict[str, str]] = {}
    for field in attrs.fields(Registries):
        registry = getattr(regs, field.name)
        for key in registry.names():
            spec = registry.get(key)
            summaries.setdefault(registry.kind, {})[key] = getattr(spec, "summary", "")
    for row in rows:
        row["summaries"] = {
            kind: {name: summaries.get(kind, {}).get(name, "") for name in names}
            for kind, names in row["registers"].items()
        }
    return rows


def run(args: argparse.Namespace) -> int:
    rows = plugin_rows()
    text = report.to_json({"plugins": rows}) if args.format == "json" else report.plugins_text(rows)
    emit(text, args.output)
    return 0
