"""Configuration and ratio schedulers of the ``ranked`` pruner.

``RankedPrunerConfig`` mirrors the arguments of Torch-Pruning's ``BasePruner`` that make
sense over canonical units. Every ratio is checked to lie in ``[0, 1]``; a bad value raises
``ValueError`` naming the option and the value (``create_pruner`` turns it into a
``ConfigError``). No hook implementations live here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from torch import nn

from .._config_io import config_from_dict, is_ratio, load_yaml, quote, shorten

SCOPES = ("local", "global", "isomorphic")
APPLY_MODES = ("physical", "mask")
NORMALIZERS = (None, "mean", "max", "sum", "standardization", "gaussian")


def linear_scheduler(pruning_ratio: float, steps: int) -> list[float]:
    """Cumulative ratios that grow linearly: entry ``i`` is the target after step ``i``.

    >>> linear_scheduler(0.5, 5)
    [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    """
    return [pruning_ratio * (step / steps) for step in range(steps + 1)]


def geometric_scheduler(pruning_ratio: float, steps: int) -> list[float]:
    """Cumulative ratios that keep the same *fraction* of what is left at every step.

    After step ``i`` a fraction ``(1 - pruning_ratio) ** (i / steps)`` remains, so early
    steps remove more units in absolute terms. ``geometric_scheduler(0.75, 2)`` gives
    ``[0.0, 0.5, 0.75]`` (half remains, then half of that).
    """
    keep = 1.0 - pruning_ratio
    return [1.0 - keep ** (step / steps) for step in range(steps + 1)]


def check_schedule(scheduler: Callable[[float, int], Sequence[float]], ratio: float, steps: int) -> list[float]:
    """Run ``scheduler(ratio, steps)`` and check its output: ``steps + 1`` ratios in [0, 1]."""
    name = getattr(scheduler, "__name__", repr(scheduler))
    try:
        values = [float(v) for v in scheduler(ratio, steps)]
    except Exception as err:  # noqa: BLE001 - any failure of user code is reported the same way
        raise ValueError(
            f"iterative_pruning_ratio_scheduler {name} failed on ({ratio}, {steps}): {shorten(str(err))}"
        ) from err
    if len(values) != steps + 1:
        raise ValueError(
            f"iterative_pruning_ratio_scheduler {name}({ratio}, {steps}) returned {len(values)} "
            f"ratios; it must return iterative_steps + 1 = {steps + 1} (entry 0 is before the "
            "first step)."
        )
    bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise ValueError(
            f"iterative_pruning_ratio_scheduler {name}({ratio}, {steps}) returned {quote(bad[0])}; "
            "every ratio must lie in [0, 1]."
        )
    return values


def _ratio(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not is_ratio(value):
        raise ValueError(f"{attribute.name} must be a number in [0, 1], got {quote(value)}.")


def _ratio_dict(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise ValueError(f"{attribute.name} must be a dict {{module or tuple of modules: ratio}}, got {quote(value)}.")
    for key, ratio in value.items():
        modules = key if isinstance(key, tuple) else (key,)
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError(
                f"{attribute.name} keys must be modules of the model or tuples of them; got {quote(key)}."
            )
        if not is_ratio(ratio):
            raise ValueError(
                f"{attribute.name}[{type(modules[0]).__name__}...] must be a number in [0, 1], "
                f"got {quote(ratio)}."
            )


def _steps(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"iterative_steps must be a whole number >= 1, got {quote(value)}.")


def _round_to(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"round_to must be None or a whole number >= 1, got {quote(value)}.")


def _one_of(choices: Sequence[Any]) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {list(choices)}, got {quote(value)}.")

    return check


def _normalizer(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not callable(value) and value not in NORMALIZERS:
        raise ValueError(
            f"normalizer must be one of {list(NORMALIZERS)} or a callable tensor -> tensor, "
            f"got {quote(value)}."
        )


def _layers(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    for item in value:
        if not (isinstance(item, nn.Module) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise ValueError(
                f"{attribute.name} takes modules of the model or nn.Module subclasses; got {quote(item)}."
            )


def _importance(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not (isinstance(value, str) or callable(value) or hasattr(value, "build")):
        raise ValueError(
            "importance must be a registered name ('l1', 'l2', 'bn_scale', 'taylor', ...), an "
            f"ImportanceSpec or a callable values -> tensor[num_units]; got {quote(value)}."
        )


def _scheduler(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not callable(value):
        raise ValueError(f"iterative_pruning_ratio_scheduler must be callable (ratio, steps) -> ratios, got {quote(value)}.")


@attrs.frozen(kw_only=True)
class RankedPrunerConfig:
    """Options of ``tracker.create_pruner("ranked", ...)`` (Torch-Pruning ``BasePruner`` names).

    Args:
        importance: Registered importance name, an ``ImportanceSpec``, or a callable
            ``score(values) -> tensor[num_units]`` (higher is more important).
        importance_options: Keyword options for the importance's options class.
        pruning_ratio: Fraction of units to remove by the last step.
        pruning_ratio_dict: ``{module or tuple of modules: ratio}``; groups whose output
            side touches such a module are ranked in their own scope with that ratio. A
            tuple shares one scope under global ranking and gives each module its own
            scope under local ranking (as in Torch-Pruning).
        max_pruning_ratio: No group and no layer loses more than this fraction.
        iterative_steps: Number of ``step()`` calls that reach the target.
        iterative_pruning_ratio_scheduler: ``(ratio, steps) -> steps + 1`` cumulative ratios.
        ignored_layers: Modules (their subtrees) or module types; a group whose output side
            touches one is never pruned.
        round_to: Keep a multiple of this many units in every pruned group.
        scope: ``"local"``, ``"global"`` or ``"isomorphic"``; overrides the two flags below.
        global_pruning: Rank all groups together (Torch-Pruning's flag).
        isomorphic: Rank groups with the same member layout together (needs global ranking).
        head_pruning_ratio: Fraction of attention heads to remove (groups of kind ``head``;
            under grouped-query attention the same number from every kv group).
        head_pruning_ratio_dict: ``{qkv or attention module: ratio}`` per attention layer.
        kv_head_pruning_ratio: Fraction of key/value heads to remove under grouped-query
            attention (groups of kind ``kv_head``; each takes its query heads along).
        normalizer: How scores are scaled per group before ranking: ``"mean"`` (default, as
            Torch-Pruning), ``"max"``, ``"sum"``, ``"standardization"``, ``"gaussian"``,
            ``None`` or a callable.
        apply: ``"physical"`` removes units through Torch-Pruning; ``"mask"`` keeps shapes and
            holds the units at zero with ``torch.nn.utils.prune`` masks (``finalize()``
            bakes them in).
    """

    importance: Any = attrs.field(default="l2", validator=_importance)
    importance_options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    pruning_ratio: float = attrs.field(default=0.5, validator=_ratio)
    pruning_ratio_dict: Mapping[Any, float] | None = attrs.field(default=None, validator=_ratio_dict)
    max_pruning_ratio: float = attrs.field(default=1.0, validator=_ratio)
    iterative_steps: int = attrs.field(default=1, validator=_steps)
    iterative_pruning_ratio_scheduler: Callable[[float, int], Sequence[float]] = attrs.field(
        default=linear_scheduler, validator=_scheduler
    )
    ignored_layers: tuple[Any, ...] = attrs.field(default=(), converter=lambda v: tuple(v or ()), validator=_layers)
    round_to: int | None = attrs.field(default=None, validator=_round_to)
    scope: str | None = attrs.field(default=None, validator=_one_of((None, *SCOPES)))
    global_pruning: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    isomorphic: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    head_pruning_ratio: float = attrs.field(default=0.0, validator=_ratio)
    head_pruning_ratio_dict: Mapping[Any, float] | None = attrs.field(default=None, validator=_ratio_dict)
    kv_head_pruning_ratio: float = attrs.field(default=0.0, validator=_ratio)
    normalizer: Any = attrs.field(default="mean", validator=_normalizer)
    apply: str = attrs.field(default="physical", validator=_one_of(APPLY_MODES))

    def __attrs_post_init__(self) -> None:
        if self.scope == "local" and (self.global_pruning or self.isomorphic):
            raise ValueError(
                "scope='local' contradicts global_pruning=True / isomorphic=True; pass one of them."
            )
        if self.scope == "global" and self.isomorphic:
            raise ValueError("scope='global' contradicts isomorphic=True; use scope='isomorphic'.")
        check_schedule(self.iterative_pruning_ratio_scheduler, self.pruning_ratio, self.iterative_steps)

    @property
    def ranking(self) -> str:
        """The resolved scope: ``"local"``, ``"global"`` or ``"isomorphic"``."""
        if self.scope is not None:
            return self.scope
        if self.isomorphic:
            return "isomorphic"
        return "global" if self.global_pruning else "local"

    # ----------------------------------------------------------------------- conversions

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankedPrunerConfig:
        """Build from a plain dict; unknown keys are an error listing the accepted ones."""
        return config_from_dict(cls, data, "the ranked pruner's config", noun="option")

    @classmethod
    def from_yaml(cls, source: Any) -> RankedPrunerConfig:
        """Build from YAML text, a stream or a file path (only plain options fit in YAML)."""
        return cls.from_dict(load_yaml(source) or {})

    def as_dict(self) -> dict[str, Any]:
        """The options as a dict (modules and callables are kept as objects)."""
        return {f.name: getattr(self, f.name) for f in attrs.fields(type(self))}
