"""Sparsity schedules for the ``magnitude`` mask pruner.

A schedule turns the pruner's step counter into the sparsity a module should have now.
The counter is ``0`` right after ``prepare()`` and grows by one with every ``step()``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any, Protocol

import attrs
import torch

from weighttracker_core import ConfigError

from .._config_io import quote

__all__ = [
    "ConstantSparsityScheduler",
    "PolynomialDecayScheduler",
    "SparsityTargets",
    "parse_update_steps",
    "scheduler_from_dict",
]

#: Most steps a ``"range(...)"`` string of ``update_steps`` may stand for.
MAX_UPDATE_STEPS = 10_000_000

# ``range(a)``, ``range(a, b)`` or ``range(a, b, c)`` with whole numbers, nothing else.
_RANGE = re.compile(r"\s*range\s*\(\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?)?,?\s*\)\s*")


class SparsityTargets(Protocol):
    """What a schedule reads from a module's config."""

    initial_sparsity: float
    target_sparsity: float


def _whole(value: Any, what: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ConfigError(f"{what} must be a whole number, got a tensor of shape {tuple(value.shape)}.")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{what} must be a whole number, got {quote(value)}.")
    if isinstance(value, Integral):
        return int(value)
    if not float(value).is_integer():
        raise ConfigError(f"{what} must be a whole number, got {quote(value)}.")
    return int(value)


def parse_update_steps(value: Any) -> tuple[int, ...]:
    """Normalise ``update_steps`` to a tuple of step indices.

    Accepts a list/tuple/range of whole numbers, a 1-D tensor, or a string such as
    ``"range(0, 10, 3)"`` (parsed with a regular expression, never evaluated), which
    gives ``(0, 3, 6, 9)``.

    Raises:
        ConfigError: For anything else, a negative step, an empty or unsorted list.
    """
    if isinstance(value, str):
        match = _RANGE.fullmatch(value)
        if match is None:
            raise ConfigError(
                f"update_steps={quote(value)} is not understood. Strings must look like "
                f"'range(stop)', 'range(start, stop)' or 'range(start, stop, step)' with whole numbers; "
                f"or pass a list of step indices."
            )
        bounds = [int(g) for g in match.groups() if g is not None]
        if len(bounds) == 3 and bounds[2] == 0:
            raise ConfigError(f"update_steps={quote(value)}: the range step must not be 0.")
        if len(range(*bounds)) > MAX_UPDATE_STEPS:
            raise ConfigError(
                f"update_steps={quote(value)} has {len(range(*bounds)):,} steps; at most "
                f"{MAX_UPDATE_STEPS:,} are allowed. Use a larger range step."
            )
        steps = list(range(*bounds))
    elif isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ConfigError(f"update_steps must be a 1-D tensor, got shape {tuple(value.shape)}.")
        steps = value.tolist()
    elif isinstance(value, Iterable) and not isinstance(value, Mapping):
        steps = list(value)
    else:
        raise ConfigError(
            f"update_steps={quote(value)} must be a list of step indices, a 1-D tensor or a "
            f"'range(start, stop, step)' string."
        )
    out = tuple(_whole(s, "Each element of update_steps") for s in steps)
    if not out:
        raise ConfigError(f"update_steps={quote(value)} is empty; give at least one step index.")
    if any(s < 0 for s in out):
        raise ConfigError(f"update_steps={quote(list(out))} has a negative step; step indices start at 0.")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ConfigError(f"update_steps={quote(list(out))} must be strictly increasing (sorted, no repeats).")
    return out


def _begin_step(value: Any) -> int:
    step = _whole(value, "begin_step")
    if step < 0:
        raise ConfigError(f"begin_step={step} is negative; steps start at 0.")
    return step


def _power(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
        raise ConfigError(f"power={quote(value)} must be a number > 0 (3 is the usual cubic schedule).")
    return int(value) if isinstance(value, Integral) else float(value)


@attrs.frozen
class ConstantSparsityScheduler:
    """``initial_sparsity`` before ``begin_step``, ``target_sparsity`` from it on.

    With ``begin_step=0`` (the default) ``prepare()`` already applies the target.

    Args:
        begin_step: First step counter value with the target sparsity.
    """

    begin_step: int = attrs.field(default=0, converter=_begin_step)

    def compute_sparsity(self, step_count: int, prev_sparsity: float, config: SparsityTargets) -> float:
        """Sparsity for ``step_count``: the target once ``step_count >= begin_step``."""
        return float(config.target_sparsity) if step_count >= self.begin_step else float(prev_sparsity)

    def as_dict(self) -> dict[str, Any]:
        return {"type": "constant_sparsity", "begin_step": self.begin_step}


@attrs.frozen
class PolynomialDecayScheduler:
    """Gradual pruning of Zhu & Gupta, "To prune, or not to prune" (2017).

    At the ``i``-th of ``N`` update steps the sparsity becomes
    ``target + (initial - target) * (1 - i / (N - 1)) ** power`` (``i`` from 0; with a
    single update step the target is applied at once); between update steps it stays
    where it was. The first update applies ``initial_sparsity`` and the last one exactly
    ``target_sparsity``. Example: ``update_steps=[0, 1, 2]``, ``power=3``, initial 0,
    target 0.8 give 0.0, 0.8 - 0.8 * 0.5**3 = 0.7 and 0.8.

    Args:
        update_steps: Step counter values at which the sparsity changes: a list, a 1-D
            tensor or a string ``"range(start, stop, step)"``.
        power: Exponent of the decay (default 3).
    """

    update_steps: tuple[int, ...] = attrs.field(converter=parse_update_steps)
    power: float | int = attrs.field(default=3, converter=_power)

    def compute_sparsity(self, step_count: int, prev_sparsity: float, config: SparsityTargets) -> float:
        """Sparsity for ``step_count``: the formula at update steps, else ``prev_sparsity``."""
        try:
            index = self.update_steps.index(step_count)
        except ValueError:
            return float(prev_sparsity)
        total = len(self.update_steps)
        progress = 1.0 if total == 1 else index / (total - 1)
        initial, target = float(config.initial_sparsity), float(config.target_sparsity)
        return target + (initial - target) * (1.0 - progress) ** self.power

    def as_dict(self) -> dict[str, Any]:
        return {"type": "polynomial_decay", "update_steps": list(self.update_steps), "power": self.power}


_TYPES: dict[str, type] = {
    "constant_sparsity": ConstantSparsityScheduler,
    "ConstantSparsityScheduler": ConstantSparsityScheduler,
    "polynomial_decay": PolynomialDecayScheduler,
    "PolynomialDecayScheduler": PolynomialDecayScheduler,
}
_KEYS = {ConstantSparsityScheduler: ("begin_step",), PolynomialDecayScheduler: ("update_steps", "power")}

Scheduler = ConstantSparsityScheduler | PolynomialDecayScheduler


def scheduler_from_dict(data: Mapping[str, Any]) -> Scheduler:
    """Build a schedule from a dict such as ``{"update_steps": "range(0, 10, 2)"}``.

    ``"type"`` (``"constant_sparsity"`` or ``"polynomial_decay"``) may be left out: a dict
    with ``update_steps`` is a polynomial decay, anything else a constant schedule.

    Raises:
        ConfigError: For an unknown type or key (the message lists the allowed ones).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"A scheduler must be a dict or a scheduler object, got {quote(data)}.")
    values = dict(data)
    kind = values.pop("type", None)
    if kind is None:
        cls: type = PolynomialDecayScheduler if "update_steps" in values else ConstantSparsityScheduler
    elif kind in _TYPES:
        cls = _TYPES[kind]
    else:
        raise ConfigError(
            f"Unknown scheduler type {quote(kind)}; allowed: 'constant_sparsity', 'polynomial_decay'."
        )
    allowed = _KEYS[cls]
    unknown = sorted(str(k) for k in values if k not in allowed)
    if unknown:
        raise ConfigError(
            f"Unknown key {quote(unknown[0])} for {cls.__name__}; allowed keys: "
            f"{', '.join(('type',) + allowed)}."
        )
    if cls is PolynomialDecayScheduler and "update_steps" not in values:
        raise ConfigError("A polynomial_decay scheduler needs 'update_steps'.")
    return cls(**values)


def to_scheduler(value: Any) -> Scheduler:
    """Converter: a scheduler object passes through, a dict goes through ``scheduler_from_dict``."""
    if isinstance(value, (ConstantSparsityScheduler, PolynomialDecayScheduler)):
        return value
    if isinstance(value, Mapping):
        return scheduler_from_dict(value)
    raise ConfigError(
        f"scheduler={quote(value)} must be a ConstantSparsityScheduler, a PolynomialDecayScheduler or a dict "
        f"such as {{'update_steps': [0, 10, 20]}}."
    )
