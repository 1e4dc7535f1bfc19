"""Handles around plugin-built trackers, regularizers and pruners.

A handle remembers the structure version it was built for: after a physical prune the
structure is rebuilt and every older handle raises :class:`StaleConsumerError` instead of
computing numbers for a model that no longer exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from .context import Bitwidths
from .dag import CalculationGraph, Evaluation
from .errors import ConfigError, HandleAttributeError, PluginError, StaleConsumerError
from .metric_format import flatten_metrics, to_python
from .structure import Selection, Structure


@attrs.define(kw_only=True)
class ConsumerContext:
    """What a plugin's ``build(ctx)`` receives (it satisfies the ``BuildContext`` protocol).

    Attributes:
        name: The registered name being built.
        tracker: The ``WeightTracker`` (for pruners that prune, and for bit-widths).
        structure: Groups, layer table and reduction plans.
        graph: The calculation DAG (``ctx.graph.evaluation()`` for a fresh evaluation).
        options: Instance of the spec's options/config class (or ``None``).
        selection: The ``include`` / ``ignore`` filter.
        bitwidths: The user's weight / activation bit-widths (from the graph).
        example_inputs: The inputs the model was traced with (from the structure).
    """

    name: str
    tracker: Any
    structure: Structure
    graph: CalculationGraph
    options: Any
    selection: Selection

    @property
    def bitwidths(self) -> Bitwidths:
        return self.graph.bitwidths

    @property
    def example_inputs(self) -> Any:
        return self.structure.example_inputs


class _Handle:
    _kind = "consumer"

    def __init__(self, owner: Any, version: int, names: Sequence[str]) -> None:
        self._owner = owner
        self._version = version
        self._names = tuple(names)

    @property
    def stale(self) -> bool:
        return self._owner.structure.version != self._version

    def _check(self) -> None:
        current = getattr(self._owner, "check_current", None)
        if current is not None:
            current()  # another tracker pruned the model: the owner itself is stale
        if self.stale:
            what = ", ".join(repr(n) for n in self._names)
            raise StaleConsumerError(
                f"This {self._kind} ({what}) was created before a physical prune changed the "
                f"model; its numbers would be wrong. Create it again with "
                f"tracker.create_{self._kind}(...) on the pruned model."
            )


class TrackerHandle(_Handle):
    """One or more trackers created together; ``track()`` returns their merged metrics."""

    _kind = "tracker"

    def __init__(
        self,
        owner: Any,
        version: int,
        built: Sequence[tuple[str, Any]],
        *,
        convert_tensors: bool = True,
        wandb_format: bool = False,
    ) -> None:
        super().__init__(owner, version, [name for name, _ in built])
        self._built = list(built)
        self.convert_tensors = convert_tensors
        self.wandb_format = wandb_format

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def metrics(self, evaluation: Evaluation, names: Sequence[str] | None = None) -> dict[str, Any]:
        """``{tracker name: metrics}`` of the named trackers (default: all of this handle).

        Tensors become Python numbers when the handle converts them; keys stay nested.
        """
        self._check()
        wanted = self._names if names is None else tuple(names)
        out: dict[str, Any] = {}
        for name, impl in self._built:
            if name in wanted:
                out[name] = _checked_metrics(name, impl.track(evaluation))
        return to_python(out) if self.convert_tensors else out

    def format(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """``metrics()`` as this handle returns them: nested, or with W&B ``a/b`` keys."""
        return flatten_metrics(metrics) if self.wandb_format else dict(metrics)

    def compute(self, evaluation: Evaluation) -> dict[str, Any]:
        """Metrics of every tracker in this handle, using a shared evaluation."""
        return self.format(self.metrics(evaluation))

    def track(self) -> dict[str, Any]:
        """Compute this handle's metrics now."""
        self._check()
        return self.compute(self._owner.graph.evaluation())


def _checked_metrics(name: str, metrics: Any) -> Mapping[str, Any]:
    if not isinstance(metrics, Mapping):
        raise PluginError(
            f"Tracker {name!r} returned {type(metrics).__name__} from track(); a tracker "
            "must return a dict of metrics (nested dicts, numbers or tensors). Fix the "
            "plugin that registers it (`weighttracker plugins` names it)."
        )
    return metrics


class RegularizerHandle(_Handle):
    """A regularizer: call it for a scalar loss tensor; other attributes are forwarded.

    Attributes are read-only: assigning one raises :class:`HandleAttributeError` rather
    than setting an attribute of the handle that the plugin would never read.
    """

    _kind = "regularizer"

    def __init__(self, owner: Any, version: int, name: str, impl: Any) -> None:
        super().__init__(owner, version, [name])
        self._impl = impl

    def __call__(self) -> torch.Tensor:
        self._check()
        return self._impl(self._owner.graph.evaluation(differentiable=True))

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        value = getattr(self._impl, attr)
        if callable(value):
            def checked(*args: Any, **kwargs: Any) -> Any:
                self._check()
                return value(*args, **kwargs)

            checked.__doc__ = getattr(value, "__doc__", None)
            return checked
        return value

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr.startswith("_"):
            object.__setattr__(self, attr, value)
            return
        raise HandleAttributeError(self._read_only_message(attr))

    def _read_only_message(self, attr: str) -> str:
        name = self._names[0]
        return (f"Cannot set {attr!r} on the {name!r} {self._kind}: options are fixed when it "
                f"is created; create it again with tracker.create_{self._kind}({name!r}, ...).")


class PrunerHandle(RegularizerHandle):
    """A pruner; its methods are forwarded after a staleness check.

    Pruners that prune physically rebuild the structure themselves and stay valid.
    """

    _kind = "pruner"

    def __call__(self) -> Any:  # type: ignore[override]
        raise TypeError("Pruners are not callable; use step(), prepare(), finalize().")

    @property
    def stale(self) -> bool:
        survives = getattr(self._impl, "survives_physical_prune", False)
        return False if survives else super().stale

    def state_dict(self) -> dict[str, Any]:
        """The pruner's progress (its schedule step and what it removed), to save.

        ``load_state_dict`` on a pruner created the same way resumes from it.
        """
        return self._stateful("state_dict")()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from a ``state_dict()`` of a pruner created with the same options."""
        self._stateful("load_state_dict")(state)

    def _stateful(self, method: str) -> Any:
        self._check()
        fn = getattr(self._impl, method, None)
        if not callable(fn):
            raise ConfigError(
                f"The pruner {self._names[0]!r} cannot be saved and resumed: its plugin defines "
                f"no {method}(). Re-create it and replay its steps instead."
            )
        return fn

    def _read_only_message(self, attr: str) -> str:
        name = self._names[0]
        hint = (" (it is read-only)" if hasattr(type(self._impl), attr)
                or attr in getattr(self._impl, "__dict__", {}) else "")
        return (f"Cannot set {attr!r} on the {name!r} pruner{hint}: assigning to a pruner "
                "would not change what it does. Options are fixed by tracker.create_pruner("
                f"{name!r}, ...); to continue a schedule where it stopped, use "
                "pruner.load_state_dict(state) with a state saved by pruner.state_dict().")


def merged_metrics(trackers: Mapping[str, TrackerHandle], evaluation: Evaluation) -> dict[str, Any]:
    """Metrics of every tracker in ``{name: handle}``, each formatted by its handle.

    A name re-created by a later ``create_tracker`` counts only in its newest handle.
    """
    out: dict[str, Any] = {}
    for handle in dict.fromkeys(trackers.values()):
        names = [name for name in handle.names if trackers.get(name) is handle]
        out.update(handle.format(handle.metrics(evaluation, names)))
    return out
