"""A Lightning callback: group lasso (as a loss term or a proximal step) and tracking.

::

    from weighttracker_plugins.training.lightning import WeightTrackerCallback

    callback = WeightTrackerCallback(example_inputs, strength=1e-3, mode="proximal",
                                     trackers=["structured_bops"], track_every_n_steps=50)
    lightning.Trainer(callbacks=[callback], ...).fit(module, data)
    callback.tracker.prune_zero_units()

``mode="proximal"`` shrinks every canonical unit after each optimizer step (block
soft-thresholding with the learning rate of that step), so weak units become exactly zero
and can be pruned. ``mode="loss"`` adds the gradient of ``strength * group_lasso`` to the
gradients before each optimizer step, which is training on ``loss + strength *
group_lasso`` without touching ``training_step``. Every ``track_every_n_steps`` optimizer
steps the metrics of ``trackers``, the penalty and the number of exactly-zero units go to
every logger of the trainer (``logger.log_metrics``), under ``weighttracker/...``.

Works with the ``lightning`` package (``lightning.pytorch``) or the older
``pytorch_lightning``; importing this module imports one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from weighttracker_core import WeightTracker
from weighttracker_core.errors import ConfigError, MissingDependencyError
from weighttracker_core.training import MODES, TrainingCallback

try:
    import lightning.pytorch as _pl
except ImportError:  # the older distribution
    try:
        import pytorch_lightning as _pl
    except ImportError as err:
        raise MissingDependencyError(
            "weighttracker_plugins.training.lightning needs Lightning: python -m pip install "
            f"lightning (or pytorch-lightning). Cause: {err}"
        ) from err

__all__ = ["MODES", "WeightTrackerCallback"]


class WeightTrackerCallback(TrainingCallback, _pl.Callback):
    """Group lasso and compression metrics inside ``Trainer.fit``.

    Args:
        example_inputs: Inputs the tracker traces the model with (moved to its device).
            Not needed when ``tracker`` is given.
        tracker: An existing ``WeightTracker`` on the model (or on a submodule of the
            LightningModule); default: one is built at the start of ``fit``.
        module: Which model to track when the callback builds the tracker: the name of an
            attribute of the LightningModule (``"model"``) or ``None`` for the
            LightningModule itself (its ``forward`` is traced).
        tracker_options: Keyword options for the ``WeightTracker`` it builds.
        regularizer: Regularizer name (``"group_lasso"``, ``"bops_group_lasso"``) or
            ``None`` for tracking only.
        regularizer_options: Options for ``tracker.create_regularizer``.
        strength: The penalty's multiplier, or ``strength(global_step) -> float``.
        mode: ``"proximal"`` or ``"loss"`` (see the module docstring).
        trackers: Tracker names whose metrics are logged.
        tracker_kwargs: Options for ``tracker.create_tracker(trackers, ...)``.
        track_every_n_steps: Log every this many optimizer steps (and at the last one of
            ``fit``); ``0`` logs nothing.
        prefix: First part of every metric name.
    """

    _starts = "fit starts"

    def __init__(
        self,
        example_inputs: Any = None,
        *,
        tracker: WeightTracker | None = None,
        module: str | None = None,
        tracker_options: Mapping[str, Any] | None = None,
        regularizer: str | None = "group_lasso",
        regularizer_options: Mapping[str, Any] | None = None,
        strength: float | Callable[[int], float] = 1e-4,
        mode: str = "proximal",
        trackers: Sequence[str] = ("structured_bops",),
        tracker_kwargs: Mapping[str, Any] | None = None,
        track_every_n_steps: int = 50,
        prefix: str = "weighttracker",
    ) -> None:
        super().__init__()
        if tracker is None and example_inputs is None:
            raise ConfigError("WeightTrackerCallback needs example_inputs (to build the tracker) "
                              "or tracker= an existing WeightTracker.")
        self._configure(
            example_inputs=example_inputs, tracker=tracker, tracker_options=tracker_options,
            regularizer=regularizer, regularizer_options=regularizer_options, strength=strength,
            mode=mode, trackers=trackers, tracker_kwargs=tracker_kwargs,
            track_every_n_steps=track_every_n_steps, prefix=prefix,
        )
        self.module = module
        self._last_step = -1
        self._last_logged = -1

    # ------------------------------------------------------------------------ set-up

    def _target(self, pl_module: Any) -> torch.nn.Module:
        if self.module is None:
            return pl_module
        target = getattr(pl_module, self.module, None)
        if not isinstance(target, torch.nn.Module):
            raise ConfigError(
                f"module={self.module!r}: the LightningModule has no submodule of that name; "
                f"its children: {[n for n, _ in pl_module.named_children()]}."
            )
        return target

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.tracker is None:
            self._build_tracker(self._target(pl_module), self.example_inputs)
        else:
            self._consumers()
        self._last_step = trainer.global_step

    # ---------------------------------------------------------------------- training

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # gradients are unscaled (AMP) and accumulated here; the step has not happened yet
        self._lr = float(optimizer.param_groups[0]["lr"])
        self._add_penalty_gradient(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step this batch
            return
        self._last_step = step
        self._proximal_step(step - 1)  # the step just taken
        if self.track_every_n_steps and step % self.track_every_n_steps == 0:
            self.log_metrics(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.track_every_n_steps and trainer.global_step != self._last_logged:
            self.log_metrics(trainer)

    # ----------------------------------------------------------------------- logging

    def log_metrics(self, trainer: Any) -> dict[str, float]:
        """Send :meth:`metrics` to every logger of ``trainer`` at its global step."""
        values = self.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        self._last_logged = trainer.global_step
        return values
