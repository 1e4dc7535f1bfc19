"""Write a tracker's metrics and its units' L2 norms to TensorBoard.

``TensorBoardLogger(tracker, log_dir="runs/x").log(step)`` writes every number of
``tracker.track()`` as a scalar (tag ``weighttracker/structured_bops/compression``, ...)
and, per group, a histogram of the units' L2 norms (tag
``weighttracker/unit_l2_norm/layer1.0.conv1:prune_out_channels``): the histograms show a
group-lasso run pushing units towards zero long before they reach it.

Any writer with ``add_scalar`` and ``add_histogram`` works (``SummaryWriter`` from
``torch.utils.tensorboard`` or ``tensorboardX``); ``tensorboard`` itself is imported only
when the logger has to create a ``SummaryWriter``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from weighttracker_core.plugin import finite_scalars
from weighttracker_core.errors import ConfigError, MissingDependencyError

__all__ = ["TensorBoardLogger", "scalar_metrics", "unit_norms_by_group"]


#: Every finite number of a nested metrics dict under flat ``weighttracker/a/b`` tags.
scalar_metrics = finite_scalars


def unit_norms_by_group(tracker: Any) -> dict[str, torch.Tensor]:
    """``{group name: L2 norm of each unit}`` of the model as it is now (no autograd)."""
    with torch.no_grad():
        norms = tracker.graph.evaluation()["unit_l2_norm"].detach().to("cpu", torch.float32)
    return {g.name: norms[g.offset : g.offset + g.n_units] for g in tracker.groups}


def _summary_writer(log_dir: Any) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch's wrapper needs the tensorboard package
        raise MissingDependencyError(
            "TensorBoardLogger needs the tensorboard package to create a SummaryWriter: "
            "python -m pip install tensorboard (or pass writer= any object with add_scalar "
            f"and add_histogram). Cause: {err}"
        ) from err
    return SummaryWriter(log_dir=log_dir)


class TensorBoardLogger:
    """Logs ``tracker.track()`` scalars and unit-norm histograms at the steps you choose.

    Args:
        tracker: The ``WeightTracker``; create its trackers (``tracker.create_tracker``)
            before logging. After a physical prune, create them again.
        writer: A ``SummaryWriter`` (or anything with ``add_scalar`` / ``add_histogram``);
            default: a new ``SummaryWriter(log_dir)``, closed by :meth:`close`.
        log_dir: Folder for the new writer's event files (``None``: ``runs/<date>``).
        prefix: First part of every tag.
        histograms: Also write one histogram of unit L2 norms per group.
    """

    def __init__(
        self,
        tracker: Any,
        writer: Any = None,
        *,
        log_dir: Any = None,
        prefix: str = "weighttracker",
        histograms: bool = True,
    ) -> None:
        if writer is not None and log_dir is not None:
            raise ConfigError("Pass writer= or log_dir= to TensorBoardLogger, not both.")
        if writer is not None and not all(callable(getattr(writer, m, None))
                                          for m in ("add_scalar", "add_histogram")):
            raise ConfigError(
                f"writer must have add_scalar and add_histogram (a SummaryWriter); got "
                f"{type(writer).__name__}."
            )
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix must be a string, got {prefix!r}.")
        self.tracker = tracker
        self._owns_writer = writer is None
        self.writer = _summary_writer(log_dir) if writer is None else writer
        self.prefix = prefix
        self.histograms = bool(histograms)

    def log(self, step: int, metrics: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Write the scalars (of ``metrics``, default ``tracker.track()``) and histograms.

        Returns the scalars written, ``{tag: value}``.
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise ConfigError(f"step must be an int (the global training step), got {step!r}.")
        values = self.tracker.track() if metrics is None else metrics
        scalars = scalar_metrics(values, self.prefix)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        if self.histograms:
            base = f"{self.prefix}/unit_l2_norm" if self.prefix else "unit_l2_norm"
            for name, norms in unit_norms_by_group(self.tracker).items():
                self.writer.add_histogram(f"{base}/{name}", norms, step)
        return scalars

    def flush(self) -> None:
        """Write pending events to disk."""
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()

    def close(self) -> None:
        """Flush, and close the writer if this logger created it."""
        self.flush()
        if self._owns_writer:
            self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
