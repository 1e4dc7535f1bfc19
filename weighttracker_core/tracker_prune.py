"""A physical prune as ``WeightTracker`` runs it: integration checks, hooks, rebuild, roll-back.

While integrations' checks and hooks run, ``tracker.pruned_units`` and
``tracker.pruned_attention`` say what is being removed, numbered as in ``tracker.structure``
(still the structure from before the prune: it is rebuilt after the hooks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

from . import options as opt, surgery
from .structure import model_version, set_model_version


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
