"""The calculation DAG: sharing, lifetimes, cycles and unknown names (SPEC §3.5)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from weighttracker_core import CalculationCycleError, ConfigError, UnknownNameError, WeightTracker
from weighttracker_core.plugin import (
    CalculationSpec,
    Lifetime,
    RegularizerSpec,
    TrackerSpec,
    hookimpl,
)


class CountingPlugin:
    """Calculations that count their own calls, and consumers that share them."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def _calc(self, name, value, lifetime=Lifetime.PER_EVALUATION, requires=()):
        def compute(ctx):
            self.calls[name] += 1
            return value(ctx)

        return CalculationSpec(name=name, compute=compute, lifetime=lifetime, requires=requires)

    @hookimpl
    def wt_register_calculations(self):
        return (
            self._calc("t_static", lambda ctx: 2.0, Lifetime.STATIC),
            self._calc("t_shared", lambda ctx: ctx["t_static"] * 3, requires=("t_static",)),
            self._calc("t_grad", lambda ctx: ctx.structure.plan().unit_reduce("l2", grad=True).sum(),
                       Lifetime.DIFFERENTIABLE),
        )

    @hookimpl
    def wt_register_trackers(self):
        class Reads:
            def __init__(self, ctx):
                pass

            def track(self, values):
                return {"value": values["t_shared"]}

        return (
            TrackerSpec(name="t_first", build=Reads, requires=("t_shared",)),
            TrackerSpec(name="t_second", build=Reads, requires=("t_shared",)),
        )

    @hookimpl
    def wt_register_regularizers(self):
        class Loss:
            def __init__(self, ctx):
                pass

            def __call__(self, values):
                return values["t_grad"] + values["t_grad"]  # read twice, computed once

        return (RegularizerSpec(name="t_loss", build=Loss, requires=("t_grad",)),)


@pytest.fixture
def counting(core_pm):
    plugin = CountingPlugin()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    tracker = WeightTracker(model, torch.zeros(1, 3), plugin_manager=core_pm(plugin))
    return plugin, tracker


def test_shared_calculation_runs_once_per_evaluation(counting):
    plugin, tracker = counting
    tracker.create_tracker(["t_first", "t_second"])
    assert tracker.track() == {"t_first": {"value": 6.0}, "t_second": {"value": 6.0}}
    assert plugin.calls["t_shared"] == 1
    tracker.track()
    assert plugin.calls["t_shared"] == 2  # per evaluation: once per track()
    assert plugin.calls["t_static"] == 1  # static: once until the structure changes


def test_separately_created_trackers_still_share_one_evaluation(counting):
    plugin, tracker = counting
    tracker.create_tracker("t_first")
    tracker.create_tracker("t_second")
    tracker.track()
    assert plugin.calls["t_shared"] == 1


def test_differentiable_values_are_never_kept_across_calls(counting):
    plugin, tracker = counting
    loss = tracker.create_regularizer("t_loss")
    first = loss()
    assert first.requires_grad
    loss()
    assert plugin.calls["t_grad"] == 2  # once per call, read twice within a call


def _plugin(*specs):
    class P:
        @hookimpl
        def wt_register_calculations(self):
            return specs

        @hookimpl
        def wt_register_trackers(self):
            class T:
                def __init__(self, ctx):
                    pass

                def track(self, values):
                    return {"x": values["c_a"]}

            return (TrackerSpec(name="t_cycle", build=T, requires=("c_a",)),)

    return P()


def test_cycle_error_names_the_chain(core_pm):
    plugin = _plugin(
        CalculationSpec(name="c_a", compute=lambda ctx: ctx["c_b"], requires=("c_b",)),
        CalculationSpec(name="c_b", compute=lambda ctx: ctx["c_c"], requires=("c_c",)),
        CalculationSpec(name="c_c", compute=lambda ctx: ctx["c_a"], requires=("c_a",)),
    )
    tracker = WeightTracker(torch.nn.Linear(2, 2), torch.zeros(1, 2), plugin_manager=core_pm(plugin))
    with pytest.raises(CalculationCycleError, match="c_a -> c_b -> c_c -> c_a"):
        tracker.create_tracker("t_cycle")


def test_cycle_found_while_computing_names_the_chain(core_pm):
    # requires= does not declare the dependency; the cycle shows up at evaluation time
    plugin = _plugin(
        CalculationSpec(name="c_a", compute=lambda ctx: ctx["c_b"]),
        CalculationSpec(name="c_b", compute=lambda ctx: ctx["c_a"]),
    )
    tracker = WeightTracker(torch.nn.Linear(2, 2), torch.zeros(1, 2), plugin_manager=core_pm(plugin))
    handle = tracker.create_tracker("t_cycle")
    with pytest.raises(CalculationCycleError, match="c_a -> c_b -> c_a"):
        handle.track()


def test_unknown_name_error_names_the_chain_and_the_installed_names(core_pm):
    plugin = _plugin(
        CalculationSpec(name="c_a", compute=lambda ctx: ctx["c_b"], requires=("c_b",)),
        CalculationSpec(name="c_b", compute=lambda ctx: 1, requires=("c_missing",)),
    )
    tracker = WeightTracker(torch.nn.Linear(2, 2), torch.zeros(1, 2), plugin_manager=core_pm(plugin))
    with pytest.raises(UnknownNameError) as info:
        tracker.create_tracker("t_cycle")
    message = str(info.value)
    assert "c_missing" in message and "c_a -> c_b -> c_missing" in message
    assert "c_a" in message.split("Installed calculations:")[1]


def test_static_calculation_cannot_depend_on_per_evaluation_one(core_pm):
    plugin = _plugin(
        CalculationSpec(name="c_a", compute=lambda ctx: ctx["c_b"], requires=("c_b",),
                        lifetime=Lifetime.STATIC),
        CalculationSpec(name="c_b", compute=lambda ctx: 1),
    )
    tracker = WeightTracker(torch.nn.Linear(2, 2), torch.zeros(1, 2), plugin_manager=core_pm(plugin))
    with pytest.raises(ConfigError, match="c_a.*static.*c_b.*per_evaluation"):
        tracker.create_tracker("t_cycle")
