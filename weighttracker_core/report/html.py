"""Self-contained HTML reports (inline CSS and SVG; nothing fetched when opened)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from .svg import bar_chart, line_chart
from .text import number, scalar_metrics, stage_table

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; font-size: .9em; }
th:first-child, td:first-child { text-align: left; }
td.text { text-align: left; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.note { color: #555; font-size: .9em; }
"""


def page(title: str, body: Sequence[str]) -> str:
    """A complete HTML document."""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
        f"<h1>{escape(title)}</h1>",
        *body,
        "</body></html>",
    ])


def table(rows: Sequence[Sequence[Any]], header: bool = True, text_columns: Sequence[int] = ()) -> str:
    """An HTML table of already formatted cells; the first row is the header."""
    out = ["<table>"]
    for i, row in enumerate(rows):
        tag = "th" if header and i == 0 else "td"
        cells = []
        for j, cell in enumerate(row):
            klass = ' class="text"' if tag == "td" and j in text_columns else ""
            cells.append(f"<{tag}{klass}>{escape(str(cell))}</{tag}>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _notes(data: Mapping[str, Any]) -> list[str]:
    return [f'<p class="note">{escape(str(note))}</p>' for note in data.get("notes", ())]


def _metrics_section(data: Mapping[str, Any]) -> list[str]:
    rows = [["metric", "value"]]
    rows += [[key, number(value)] for key, value in scalar_metrics(data.get("metrics", {}))]
    rows += [[name, f"unavailable: {reason}"] for name, reason in data.get("unavailable", {}).items()]
    return ["<h2>Metrics</h2>", table(rows)]


def groups_table(structures: Mapping[str, Any]) -> str:
    rows: list[list[Any]] = [["id", "group", "kind", "units", "members (axis)"]]
    for group in structures["groups"]:
        members = "; ".join(f"{m['module'] or '<model>'} ({m['axis']})" for m in group["members"])
        rows.append([group["id"], group["name"], group["kind"], group["n_units"], members])
    return table(rows, text_columns=(1, 2, 4))


def inspect_html(data: Mapping[str, Any]) -> str:
    """``weighttracker inspect --format html``: summary, metrics and every group."""
    shape = "x".join(map(str, data["input_shape"]))
    structures = data["structures"]
    summary = table([
        ["model", data["model"]],
        ["type", data["model_type"]],
        ["input shape", shape],
        ["parameters", number(data["num_parameters"])],
        ["MACs (dense / active)", "n/a" if not data.get("macs") else
         f"{number(data['macs']['baseline'])} / {number(data['macs']['active'])}"],
        ["groups", number(structures["num_groups"])],
        ["units", number(structures["num_units"])],
    ], header=False, text_columns=(1,))
    sizes = [g["n_units"] for g in structures["groups"]]
    body = ["<h2>Summary</h2>", summary, *_metrics_section(data)]
    if sizes:
        body.append(bar_chart([g["name"] for g in structures["groups"]][:60], {"units": sizes[:60]},
                              title="Units per group", y_label="units"))
    body += ["<h2>Groups</h2>", groups_table(structures), *_notes(data)]
    return page(f"weighttracker inspect: {data['model']}", body)


def demo_html(data: Mapping[str, Any]) -> str:
    """The demo's report: settings, before/after table, training curves, layer widths."""
    config = [[key, str(value)] for key, value in data.get("config", {}).items()]
    history = data.get("history", {})
    steps = history.get("step", [])
    charts = [
        line_chart(steps, {"loss": history.get("loss", [])}, title="Training loss",
                   x_label="step", y_label="cross-entropy"),
        line_chart(steps, {"train batch": history.get("accuracy", []),
                           **({"test set": history["test_accuracy"]} if history.get("test_accuracy") else {})},
                   title="Accuracy", x_label="step", y_label="accuracy"),
        line_chart(steps, {"zero units": history.get("zero_units", [])},
                   title="Exactly-zero units", x_label="step", y_label="units"),
        line_chart(steps, {"structured BOPs": history.get("compression", [])},
                   title="Compression (1 - BOPs / dense 32-bit BOPs)", x_label="step",
                   y_label="compression"),
        line_chart(steps, {"group lasso": history.get("penalty", [])},
                   title="Group-lasso penalty", x_label="step", y_label="sum of weighted norms"),
    ]
    layers = data.get("layers", {})
    if layers.get("names"):
        charts.append(bar_chart(layers["names"], {"before": layers["before"], "after": layers["after"]},
                                title="Output channels per layer", y_label="channels"))
    pruned = data.get("pruned", {})
    pruned_rows = [["group", "units removed"]] + [[k, v] for k, v in pruned.get("groups", {}).items()]
    body = [
        f"<p>{escape(str(data.get('description', '')))}</p>",
        "<h2>Before and after</h2>",
        table(stage_table(data["stages"])),
        "<h2>Training</h2>",
        '<div class="charts">', *charts, "</div>",
        f"<h2>Pruned units ({number(pruned.get('num_units', 0))})</h2>",
        table(pruned_rows, text_columns=(0,)),
        "<h2>Settings</h2>",
        table([["setting", "value"], *config], text_columns=(1,)),
        *_notes(data),
    ]
    return page(str(data.get("title", "weighttracker demo")), body)
