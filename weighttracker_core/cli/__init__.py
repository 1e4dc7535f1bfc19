"""The ``weighttracker`` command (SPEC §11).

* ``weighttracker plugins [--format text|json]``: every plugin and what it registers.
* ``weighttracker inspect MODEL [--input-shape 1,3,224,224] [--format text|json|html]``:
  canonical structures and metrics of a model (``torchvision:resnet18``,
  ``timm:vit_tiny_patch16_224`` or ``package.module:factory``).
* ``weighttracker demo``: group-lasso training of a small CNN on synthetic data, pruning
  of the zero units, and an HTML report.

One module per command; this one only parses arguments and turns errors into messages.
Models, trackers and model sources all come through plugins.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from ..errors import WeightTrackerError
from . import demo_cmd, inspect_cmd, plugins_cmd

PROG = "weighttracker"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``weighttracker`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Canonical units, compression metrics, group lasso and structured pruning "
        "for PyTorch models.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for module in (plugins_cmd, inspect_cmd, demo_cmd):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success).

    Errors about the user's input (unknown model, bad shape, a plugin that fails to load)
    are printed as one message on stderr with exit status 1; usage errors give 2.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        with warnings.catch_warnings():
            # fvcore's tracing triggers torch's own deprecation notices; they say nothing
            # about the user's model and would bury the output
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return int(args.run(args) or 0)
    except WeightTrackerError as err:
        sys.stderr.write(f"{PROG} {args.command}: error: {err}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG} {args.command}: interrupted\n")
        return 130


__all__ = ["build_parser", "main"]
