"""The ``weighttracker`` command.

* ``weighttracker plugins [--format text|json]``: every plugin and what it registers.
* ``weighttracker inspect MODEL [--input-shape 1,3,224,224] [--format text|json|html]``:
  canonical structures and metrics of a model (``torchvision:resnet18``,
  ``timm:vit_tiny_patch16_224`` or ``package.module:factory``).
* ``weighttracker demo``: group-lasso training of a small CNN on synthetic data, pruning
  of the zero units, and an HTML report.

One module per command; this one only parses arguments and turns errors into messages.
Models, trackers and model sources all come through plugins.

Exit status: 0 on success; 2 for a user error (a bad argument, or input that weighttracker
refuses: every ``WeightTrackerError``, which includes failures of the user's own code that
the commands run, such as importing a model's module), printed as one line
``weighttracker COMMAND: error: ...`` on stderr; 130 after Ctrl-C. Any other exception is
a bug in weighttracker or a plugin and propagates with its traceback (status 1).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from ..errors import WeightTrackerError
from . import demo_cmd, inspect_cmd, plugins_cmd

PROG = "weighttracker"

#: Exit status of a user error (argparse uses the same for usage errors).
USER_ERROR = 2


def one_line(text: str) -> str:
    """``text`` as one line: its lines joined with ``" "`` (blank ones dropped)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``weighttracker`` command (subcommands share its class)."""
    parser = _Parser(
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

    User errors (a bad argument, an unknown model, a shape that does not fit, a module that
    fails to import, a plugin that fails to load: any ``WeightTrackerError``) are printed as
    one line on stderr and give status 2. Other exceptions are bugs and propagate.
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
        sys.stderr.write(f"{PROG} {args.command}: error: {one_line(str(err))}\n")
        return USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG} {args.command}: interrupted\n")
        return 130


__all__ = ["build_parser", "main"]
