"""report: text/JSON/HTML rendering from plain data, and the inline SVG charts."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from weighttracker_core import report
from weighttracker_core.report.svg import fmt, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("low, high", [(0, 1), (0.013, 2.31), (-3, 120000), (5, 5), (1e-7, 3e-7)])
def test_ticks_cover_the_range_with_even_steps(low, high):
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high
    steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1 and 3 <= len(ticks) <= 8


def test_fmt():
    assert fmt(1234567) == "1.23M"
    assert fmt(2.83e9) == "2.83G"
    assert fmt(0.25) == "0.25"


def test_line_chart_skips_missing_values_and_is_valid_svg():
    svg = report.line_chart([1, 2, 3, 4], {"a": [1.0, None, 3.0, float("nan")], "b": [0, 1, 2, 3]},
                            title="T <1>", x_label="step", y_label="y")
    root = ET.fromstring(svg)
    lines = root.findall(f"{SVG}polyline")
    assert [len(line.get("points").split()) for line in lines] == [2, 4]
    assert root.find(f"{SVG}title").text == "T <1>"  # escaped in the markup, intact when parsed


def test_line_chart_without_data_says_so():
    assert "no data" in report.line_chart([], {"a": []}, title="empty")


def test_bar_chart_has_one_bar_per_value():
    svg = report.bar_chart(["conv1", "conv2", "conv3"], {"before": [16, 32, 32], "after": [7, 30, 0]},
                           title="channels")
    root = ET.fromstring(svg)
    bars = [r for r in root.findall(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert len(bars) == 6
    heights = [float(r.get("height")) for r in bars]
    # bars are proportional to their values: 16 vs 32 (before), and 0 has no height
    assert heights[0] * 2 == pytest.approx(heights[2], abs=0.2)
    assert heights[5] == pytest.approx(0.0, abs=1e-6)


def test_to_json_writes_non_finite_numbers_as_null():
    text = report.to_json({"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": 2}})
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": {"d": 2}}


def _inspect_data():
    return {
        "model": "pkg:<factory>",
        "model_type": "pkg.Net",
        "input_shape": [1, 3, 8, 8],
        "num_parameters": 12345,
        "macs": {"baseline": 2000.0, "active": 1500.0},
        "structures": {"num_groups": 1, "num_units": 4, "groups": [{
            "id": 0, "name": "conv<1>:prune_out_channels", "kind": "channel", "n_units": 4,
            "members": [{"module": "conv<1>", "type": "Conv2d", "axis": "out_channel",
                         "slices": [{"param": "weight", "dims": [0]}]}]}]},
        "metrics": {"structured_bops": {"compression": 0.25, "modules": {"conv": {"bops": 1.0}}},
                    "norms": {"groups": {"conv": {"min": 0.5}}}},
        "unavailable": {"l2_norm_distribution": "not installed"},
        "notes": ["a note"],
    }


def test_inspect_text_lists_groups_metrics_and_unavailable_trackers():
    text = report.inspect_text(_inspect_data())
    assert "Parameters: 12,345" in text
    assert "[0] conv<1>:prune_out_channels  kind=channel  units=4" in text
    assert "    structured_bops/compression: 0.25" in text
    assert "modules" not in text  # per-layer detail is for --format json
    assert "l2_norm_distribution: unavailable (not installed)" in text
    assert "    norms: per-layer or per-group values only (see --format json)" in text


def test_inspect_html_escapes_names():
    html = report.inspect_html(_inspect_data())
    assert "conv&lt;1&gt;:prune_out_channels" in html
    assert "<1>" not in html and "<factory>" not in html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")


def test_demo_text_table():
    data = {
        "stages": [
            {"name": "dense", "params": 1000, "macs": 2e6, "bops": 2.048e9, "compression": 0.0,
             "accuracy": 0.25, "latency_ms": 12.345, "zero_units": 0},
            {"name": "pruned", "params": 400, "macs": 5e5, "bops": 5.12e8, "compression": 0.75,
             "accuracy": 0.99, "latency_ms": 3.0, "zero_units": 0},
        ],
        "pruned": {"num_units": 3, "groups": {"conv:prune_out_channels": 3}},
        "notes": [],
    }
    lines = report.demo_text(data).splitlines()
    assert lines[0].split() == ["stage", "params", "MACs", "BOPs", "compression", "test",
                                "accuracy", "CPU", "latency", "zero", "units"]
    assert lines[2].split() == ["dense", "1,000", "2M", "2.05G", "0.0%", "25.0%", "12.35", "ms", "0"]
    assert lines[3].split() == ["pruned", "400", "500k", "512M", "75.0%", "99.0%", "3.00", "ms", "0"]
    assert "Pruned 3 zero units in 1 groups." in lines
