"""Renders the command line's results from plain data.

Every function takes plain Python data (dicts, lists, numbers, strings), never models or
trackers, and returns a string: JSON and text for ``weighttracker plugins`` and
``inspect``, self-contained HTML with inline SVG charts for ``inspect --format html`` and
the ``demo`` report.
"""

from __future__ import annotations

from .html import demo_html, inspect_html
from .svg import bar_chart, line_chart
from ..summaries import structures_text
from .text import demo_text, inspect_text, plugins_text, to_json

__all__ = [
    "bar_chart",
    "demo_html",
    "demo_text",
    "inspect_html",
    "inspect_text",
    "line_chart",
    "plugins_text",
    "structures_text",
    "to_json",
]
