"""A Hugging Face ``Trainer`` callback: group lasso (a proximal step or a loss term) and tracking.

::

    from weighttracker_transformers.trainer import WeightTrackerCallback

    callback = WeightTrackerCallback(strength=1e-3, mode="proximal",
                                     trackers=["structured_bops"], track_every_n_steps=50)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    callback.tracker.prune_zero_units()
    model.save_pretrained("pruned")       # reloads with the stock class

``mode="proximal"`` shrinks every canonical unit after each optimizer step (block
soft-thresholding with that step's learning rate), so weak units become exactly zero and
can be pruned. ``mode="loss"`` adds the gradient of ``strength * group_lasso`` to the
gradients before each optimizer step (after the Trainer's gradient clipping), which is
training on ``loss + strength * group_lasso`` without a custom ``compute_loss``.

Every ``track_every_n_steps`` optimizer steps the callback asks the Trainer to log, and adds
the metrics of ``trackers``, the penalty and the number of exactly-zero units to that log
entry (``trainer.state.log_history`` and every callback after this one, under
``weighttracker/...``). The Trainer runs callbacks passed as ``callbacks=`` after its
reporting integrations (TensorBoard, W&B, ...); ``callback.attach(trainer)`` moves this one
first so that they receive the metrics too.

Importing this module imports ``transformers.Trainer``'s callback classes; training needs
``accelerate`` (``pip install 'weighttracker-transformers[trainer]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from weighttracker_core import ConfigError, WeightTracker
from weighttracker_core.training import MODES, TrainingCallback

__all__ = ["MODES", "WeightTrackerCallback"]


class WeightTrackerCallback(TrainingCallback, TrainerCallback):
    """Group lasso and compression metrics inside ``Trainer.train()``.

    Args:
        example_inputs: Inputs the tracker traces the model with (moved to its device).
            Default: the model's main input (``input_ids``, ``pixel_values``) of the first
            example of the first training batch. Not used when ``tracker`` is given.
        tracker: An existing ``WeightTracker`` on the Trainer's model; default: one is built
            when training starts.
        tracker_options: Keyword options for the ``WeightTracker`` it builds.
        regularizer: ``"group_lasso"``, ``"bops_group_lasso"``, or ``None`` to track only.
        regularizer_options: Options for ``tracker.create_regularizer``.
        strength: The penalty's multiplier, or ``strength(global_step) -> float``.
        mode: ``"proximal"`` or ``"loss"`` (see the module docstring).
        trackers: Tracker names whose metrics are logged.
        tracker_kwargs: Options for ``tracker.create_tracker(trackers, ...)``.
        track_every_n_steps: Log every this many optimizer steps; ``0`` logs nothing.
        prefix: First part of every metric name.

    Raises:
        ConfigError: An option of the wrong type or out of range, naming it.
    """

    def __init__(
        self,
        example_inputs: Any = None,
        *,
        tracker: WeightTracker | None = None,
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
        self._configure(
            example_inputs=example_inputs, tracker=tracker, tracker_options=tracker_options,
            regularizer=regularizer, regularizer_options=regularizer_options, strength=strength,
            mode=mode, trackers=trackers, tracker_kwargs=tracker_kwargs,
            track_every_n_steps=track_every_n_steps, prefix=prefix,
        )
        self._pending: dict[str, float] | None = None

    # ------------------------------------------------------------------------ set-up

    def attach(self, trainer: Any) -> Any:
        """Run this callback before the Trainer's others (its reporting integrations then
        receive the metrics too); adds it if it is not there yet. Returns ``trainer``."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return trainer

    def _example_inputs(self, model: Any, dataloader: Any) -> Any:
        if self.example_inputs is not None:
            return self.example_inputs
        name = getattr(model, "main_input_name", "input_ids")
        batch = next(iter(dataloader), None) if dataloader is not None else None
        if not isinstance(batch, Mapping) or not isinstance(batch.get(name), torch.Tensor):
            raise ConfigError(
                f"WeightTrackerCallback could not take example inputs from the first training "
                f"batch (no tensor {name!r} in it); pass example_inputs= (e.g. a batch of "
                "token ids) to the callback."
            )
        return batch[name][:1]

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if self.tracker is None:
            if model is None:
                raise ConfigError("The Trainer gave the callback no model; pass tracker= instead.")
            self._build_tracker(model, self._example_inputs(model, train_dataloader))
        else:
            self._consumers()

    # ---------------------------------------------------------------------- training

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        # gradients are accumulated (and clipped) here; the step has not happened yet
        if optimizer is not None:
            self._lr = float(optimizer.param_groups[0]["lr"])
        self._add_penalty_gradient(state.global_step)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._proximal_step(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.track_every_n_steps and state.global_step % self.track_every_n_steps == 0:
            self._pending = self.metrics()
            control.should_log = True  # the Trainer logs this step; on_log adds the metrics
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not self._pending or logs is None:
            return
        logs.update(self._pending)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(self._pending)
        self._pending = None
