"""Pruning as ``WeightTracker`` offers it, and a physical prune as the tracker runs it.

A physical prune: one check of the request, integration checks, hooks, rebuild, roll-back.

While integrations' checks and hooks run, ``tracker.pruned_units`` and
``tracker.pruned_attention`` say what is being removed, numbered as in ``tracker.structure``
(still the structure from before the prune: it is rebuilt after the hooks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from . import masking, options as opt, surgery
from .heads import AttentionChange
from .records import PruningHistory
from .structure import Selection, Structure, model_version, set_model_version
from .surgery import PruneReport
from .summaries import ZeroUnitsView


class PruningMethods:
    """The pruning methods of ``WeightTracker``: fake, zero detection, physical, records.

    Each checks that the tracker is current and delegates; ``WeightTracker`` provides
    ``structure``, ``model``, ``_ready``, ``_selection`` and ``_pruning_history``.
    """

    structure: Structure
    _pruning_history: PruningHistory
    #: While integration checks and post-prune hooks run: ``{group name: local unit ids}``
    #: being removed, and ``{attention name: AttentionChange}``; ``None`` otherwise.
    pruned_units: dict[str, list[int]] | None = None
    pruned_attention: dict[str, AttentionChange] | None = None

    def _ready(self, action: str) -> None:
        raise NotImplementedError

    def _selection(self, include: Any, ignore: Any) -> Selection:
        raise NotImplementedError

    def fake_prune_unit(self, group_id: int, unit_id: int) -> None:
        """Zero every weight of one unit in every coupled layer (shapes unchanged)."""
        self._ready("fake_prune_unit")
        masking.fake_prune_units_(self.structure, {group_id: [unit_id]})

    def fake_prune_units(self, units: Mapping[int, Iterable[int]]) -> None:
        """Zero several units: ``{group id: [unit ids]}``."""
        self._ready("fake_prune_units")
        masking.fake_prune_units_(self.structure, units)

    def zero_units(self, ignore: Sequence[Any] = ()) -> dict[int, list[int]]:
        """``{group id: zero unit ids}``; a unit is zero when all its weights are.

        Weights of layers selected by ``ignore`` are not looked at.
        """
        self._ready("zero_units")
        return masking.zero_units(self.structure, self._selection((), ignore))

    def view_zero_units(self, ignore: Sequence[Any] = ()) -> ZeroUnitsView:
        """Zero units per group with the Torch-Pruning indices that would remove them."""
        return ZeroUnitsView(self.structure.groups, self.zero_units(ignore))

    view_zero_structures = view_zero_units

    def prune_unit(self, group_id: int, unit_id: int) -> PruneReport:
        """Physically remove one unit (and its coupled slices) from the model."""
        return self.prune_units({group_id: [unit_id]})

    def prune_units(self, units: Mapping[int, Iterable[int]], dry_run: bool = False) -> PruneReport:
        """Physically remove several units: ``{group id: [unit ids]}`` (atomic).

        Groups sharing a layer (heads and head dimensions) are removed together, every id
        numbered as in the current ``tracker.groups``.
        """
        self._ready("prune_units")
        return prune(self, units, opt.check_bool(dry_run, "dry_run"))

    def prune_zero_units(
        self, ignore: Sequence[Any] = (), ignore_prune: Sequence[Any] = (), dry_run: bool = False
    ) -> PruneReport:
        """Physically remove every zero unit.

        ``ignore`` only changes zero detection. ``ignore_prune`` keeps the listed modules'
        output widths: groups that cut their output channels (or features) are left as they
        are, while groups that only cut their inputs are still pruned. ``dry_run`` reports
        without changing anything. The report's ``left_zero`` names zero units left in place
        and why.
        """
        self._ready("prune_zero_units")
        return prune_zero(self, ignore, ignore_prune, dry_run)

    prune_zero_structures = prune_zero_units

    def pruning_record(self) -> dict[str, Any]:
        """Every physical prune so far and a fingerprint of the dense model (JSON-able).

        Save it next to the pruned ``state_dict``: ``apply_pruning_record(model,
        example_inputs, record)`` rebuilds the pruned architecture from a fresh dense model.
        """
        return self._pruning_history.record()


def prune(tracker: Any, units: Mapping[int, Iterable[int]], dry_run: bool) -> surgery.PruneReport:
    """Check ``units`` once, let integrations refuse them, then remove them; atomic."""
    plan = surgery.plan_prune(tracker.structure, units)
    steps = TrackerPrune(tracker, plan)
    steps.check_integrations()
    report = surgery.prune_units(tracker.structure, plan, steps, dry_run=dry_run)
    tracker._pruning_history.add(report)
    return report


def prune_zero(tracker: Any, ignore: Any, ignore_prune: Any, dry_run: Any) -> surgery.PruneReport:
    """Remove every zero unit, keeping the output widths of the ``ignore_prune`` layers."""
    opt.check_bool(dry_run, "dry_run")
    zero = tracker.zero_units(opt.check_selection(tracker.model, ignore, "ignore"))
    blocked_by = opt.check_selection(tracker.model, ignore_prune, "ignore_prune")
    left: dict[str, str] = {}
    if blocked_by:  # an empty selection would select every layer
        blocked = tracker.structure.selection(blocked_by, ())
        zero, left = surgery.keep_output_widths(tracker.structure, zero, blocked)
    report = prune(tracker, zero, dry_run)
    return attrs.evolve(report, left_zero={**report.left_zero, **left})


class TrackerPrune:
    """The tracker's side of one prune (``surgery.PruneSteps``): hooks, rebuild, roll-back."""

    def __init__(self, tracker: Any, plan: surgery.PrunePlan) -> None:
        self.tracker = tracker
        self.plan = plan
        self.model_version = model_version(tracker.model)
        self.saved = (tracker.structure, tracker.graph, tracker._settings, dict(tracker._trackers))

    @contextlib.contextmanager
    def _announced(self) -> Iterator[None]:
        tracker = self.tracker
        tracker.pruned_units, tracker.pruned_attention = dict(self.plan.by_name), dict(self.plan.changes)
        try:
            yield
        finally:
            tracker.pruned_units = tracker.pruned_attention = None

    def check_integrations(self) -> None:
        """Integrations refuse what their models cannot express, before anything changes."""
        checks = [i.before_prune for i in self.tracker.integrations if i.before_prune is not None]
        if self.plan.units and checks:
            with self._announced():
                for check in checks:
                    check(self.tracker)

    def after_prune(self) -> None:
        tracker = self.tracker
        with self._announced():
            for integration in tracker.integrations:
                if integration.after_prune is not None:
                    integration.after_prune(tracker)
            for hook in tracker.post_prune_hooks:
                hook(tracker)

    def rebuild(self) -> None:
        tracker = self.tracker
        tracker._settings = tracker._settings.after_prune(
            tracker.structure, self.plan.units, self.plan.changes
        )
        set_model_version(tracker.model, self.model_version + 1)
        tracker._build(version=tracker.structure.version + 1)
        tracker._trackers.clear()

    def roll_back(self) -> None:
        tracker = self.tracker
        set_model_version(tracker.model, self.model_version)
        tracker.structure, tracker.graph, tracker._settings, tracker._trackers = self.saved
        try:
            # Torch-Pruning's graph bookkeeping may be half-updated: trace afresh
            tracker._build(version=tracker.structure.version)
        except Exception:  # noqa: BLE001 - keep the old structure, raise the real error
            tracker.structure, tracker.graph, tracker._settings = self.saved[:3]
