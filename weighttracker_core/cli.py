"""The ``weighttracker`` command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("weighttracker: command line not built yet", file=sys.stderr)
    return 1
