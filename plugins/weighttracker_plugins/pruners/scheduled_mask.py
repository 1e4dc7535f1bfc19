"""The old import path of the ``magnitude`` pruner's configs and schedulers.

Import them from ``weighttracker_plugins.pruners.magnitude``; this module re-exports that
package's names. The hook is among them, so that an installation whose metadata still names
this module as the ``magnitude_pruner`` entry point keeps registering the pruner (once: the
entry point names one module or the other).
"""

from __future__ import annotations

from . import magnitude
from .magnitude import *  # noqa: F403

__all__ = list(magnitude.__all__)
