"""The part of a training-loop callback that does not depend on the loop.

The Lightning callback (``weighttracker_plugins.training.lightning``) and the Hugging Face
``Trainer`` callback (``weighttracker_transformers.trainer``) differ only in where the loop
calls them. :class:`TrainingCallback` holds what they share: checking the options, building
the tracker on the model's device, (re)creating the regularizer and trackers after a
physical prune, the group-lasso step in either mode, and the numbers to log.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .metric_format import finite_scalars
from .tracker import WeightTracker

#: What a callback does with the group lasso: a proximal step after each optimizer step,
#: or its gradient added before it (training on ``loss + strength * penalty``).
MODES = ("proximal", "loss")


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor (in nested dicts, lists and tuples) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


class TrainingCallback:
    """Options, consumers, group-lasso steps and metrics of a training-loop callback.

    Subclasses call :meth:`_configure` from their ``__init__`` and the ``_`` methods from
    the loop's hooks. ``_starts`` names the moment the loop builds the tracker, for errors.
    """

    _starts = "training starts"
    tracker: WeightTracker | None

    def _configure(
        self, *, example_inputs: Any, tracker: WeightTracker | None,
        tracker_options: Mapping[str, Any] | None, regularizer: str | None,
        regularizer_options: Mapping[str, Any] | None, strength: float | Callable[[int], float],
        mode: str, trackers: Sequence[str] | str, tracker_kwargs: Mapping[str, Any] | None,
        track_every_n_steps: int, prefix: str,
    ) -> None:
        """Check and keep the options shared by every callback.

        Raises:
            ConfigError: An option of the wrong type or out of range, naming it.
        """
        if tracker is not None and not isinstance(tracker, WeightTracker):
            raise ConfigError(f"tracker must be a WeightTracker, got {type(tracker).__name__}.")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}.")
        if not callable(strength) and (isinstance(strength, bool) or not isinstance(strength, (int, float))
                                       or not 0 <= strength < math.inf):
            raise ConfigError(f"strength must be a finite number >= 0 or a callable, got {strength!r}.")
        if isinstance(track_every_n_steps, bool) or not isinstance(track_every_n_steps, int) \
                or track_every_n_steps < 0:
            raise ConfigError(f"track_every_n_steps must be an int >= 0, got {track_every_n_steps!r}.")
        self.example_inputs = example_inputs
        self.tracker = tracker
        self.tracker_options = dict(tracker_options or {})
        self.regularizer_name = regularizer
        self.regularizer_options = dict(regularizer_options or {})
        self.strength = strength
        self.mode = mode
        self.tracker_names = (trackers,) if isinstance(trackers, str) else tuple(trackers)
        self.tracker_kwargs = dict(tracker_kwargs or {})
        self.track_every_n_steps = track_every_n_steps
        self.prefix = prefix
        self.regularizer: Any = None
        self._metrics: Any = None
        self._lr: float | None = None

    def _build_tracker(self, model: nn.Module, example_inputs: Any) -> None:
        """The tracker on ``model`` (inputs moved to its device, its train mode kept), then
        the regularizer and trackers."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        was_training = model.training
        try:
            self.tracker = WeightTracker(model, to_device(example_inputs, device), **self.tracker_options)
        finally:
            model.train(was_training)
        self._consumers()

    def _consumers(self) -> None:
        """(Re)create the regularizer and trackers when missing or stale after a prune."""
        assert self.tracker is not None
        if self.regularizer_name is not None and (self.regularizer is None or self.regularizer.stale):
            self.regularizer = self.tracker.create_regularizer(self.regularizer_name,
                                                               **self.regularizer_options)
        if self.tracker_names and (self._metrics is None or self._metrics.stale):
            self._metrics = self.tracker.create_tracker(list(self.tracker_names), **self.tracker_kwargs)

    def _strength(self, step: int) -> float:
        return float(self.strength(step) if callable(self.strength) else self.strength)

    def _add_penalty_gradient(self, step: int) -> None:
        """``mode="loss"``: add the gradient of ``strength * penalty`` (before the step)."""
        if self.mode != "loss" or self.regularizer_name is None:
            return
        self._consumers()
        strength = self._strength(step)
        if strength:
            (strength * self.regularizer()).backward()

    def _proximal_step(self, step: int) -> None:
        """``mode="proximal"``: shrink every unit with the last optimizer step's learning rate."""
        if self.mode != "proximal" or self.regularizer_name is None or self._lr is None:
            return
        self._consumers()
        strength = self._strength(step)
        if strength:
            self.regularizer.proximal_step_(lr=self._lr, strength=strength)

    def metrics(self) -> dict[str, float]:
        """The numbers logged now: tracker metrics, penalty and exactly-zero units."""
        if self.tracker is None:
            raise ConfigError(f"The callback has no tracker yet: it is built when {self._starts}.")
        self._consumers()
        values: dict[str, Any] = dict(self._metrics.track()) if self._metrics is not None else {}
        if self.regularizer is not None:
            with torch.no_grad():
                values[str(self.regularizer_name)] = float(self.regularizer())
        values["zero_units"] = sum(len(u) for u in self.tracker.zero_units().values())
        return finite_scalars(values, self.prefix)
