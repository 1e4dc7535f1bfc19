"""A plugin that breaks the contract fails when it is registered, naming plugin, hook and fix.

One test per mistake: each registers a tiny bad plugin, checks the message, then follows
the advice of the message and checks that the fixed plugin works.
"""

from __future__ import annotations

import dataclasses
import importlib
import re

import attrs
import pytest
import torch
from torch import nn

from plugin_managers import CORE_PLUGIN_MODULES, core_plugin_manager
from weighttracker_core import WeightTracker, create_plugin_manager
from weighttracker_core.plugin import (
    CalculationSpec,
    DuplicateNameError,
    ImportanceSpec,
    PluginError,
    PrunerSpec,
    RegularizerSpec,
    TrackerSpec,
    hookimpl,
)
from weighttracker_core.registry import build_registries


def _model() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 4)


class Units:
    """A correct tracker: the number of units."""

    def __init__(self, ctx):
        self.n = ctx.structure.num_units

    def track(self, values):
        return {"units": self.n}


def _plugin(name: str, **hooks):
    """A run-time plugin object called ``name`` with the given hook implementations."""
    namespace = {"wt_plugin_name": name}
    for hook, fn in hooks.items():
        namespace[hook] = hookimpl(staticmethod(fn))
    return type(name.title().replace("_", ""), (), namespace)()


def _registered(plugin):
    pm = core_plugin_manager(plugin)
    build_registries(pm)
    return pm


def _works(plugin, tracker_name: str = "acme_units", expected: int = 8, **options) -> None:
    model, x = _model()
    tracker = WeightTracker(model, x, plugin_manager=_registered(plugin))
    result = tracker.create_tracker(tracker_name, **options).track()[tracker_name]
    assert result["units"] == expected  # the 8 hidden units (the output layer is kept whole)


def test_bare_spec_instead_of_a_tuple_names_plugin_hook_and_fix():
    spec = TrackerSpec(name="acme_units", build=Units)
    bad = _plugin("acme_bare", wt_register_trackers=lambda: spec)
    with pytest.raises(PluginError) as info:
        _registered(bad)
    message = str(info.value)
    assert "'acme_bare'" in message and "wt_register_trackers()" in message
    assert "bare TrackerSpec" in message and "`return (spec,)`" in message
    _works(_plugin("acme_fixed", wt_register_trackers=lambda: (spec,)))


def test_dataclass_options_are_refused_at_registration():
    @dataclasses.dataclass(frozen=True)
    class Options:
        scale: int = 1

    class Scaled(Units):
        def __init__(self, ctx):
            super().__init__(ctx)
            self.n *= ctx.options.scale

    bad = _plugin("acme_dc", wt_register_trackers=lambda: (
        TrackerSpec(name="acme_units", build=Scaled, options=Options),))
    with pytest.raises(PluginError) as info:
        _registered(bad)
    message = str(info.value)
    assert "'acme_dc'" in message and "wt_register_trackers()" in message
    assert "options=" in message and "which is a dataclass" in message
    assert "@attrs.frozen(kw_only=True)" in message

    # the fix the message gives: the same fields as an attrs class
    Fixed = attrs.frozen(kw_only=True)(type("Options", (), {"__annotations__": {"scale": int}, "scale": 1}))
    good = _plugin("acme_attrs", wt_register_trackers=lambda: (
        TrackerSpec(name="acme_units", build=Scaled, options=Fixed),))
    _works(good, expected=16, scale=2)


def test_tracker_class_without_track_fails_at_registration():
    class NoTrack:
        def __init__(self, ctx):
            pass

        def compute(self, values):  # the wrong name
            return {}

    bad = _plugin("acme_notrack", wt_register_trackers=lambda: (
        TrackerSpec(name="acme_units", build=NoTrack),))
    with pytest.raises(PluginError) as info:
        _registered(bad)
    message = str(info.value)
    assert "'acme_notrack'" in message and "wt_register_trackers()" in message
    assert "build=" in message and "NoTrack" in message and "no track() method" in message
    assert "def track(self, values) -> dict" in message

    class Fixed(NoTrack):
        def track(self, values):
            return {"units": values.structure.num_units}

    _works(_plugin("acme_track", wt_register_trackers=lambda: (
        TrackerSpec(name="acme_units", build=Fixed),)))


def test_tracker_factory_function_product_without_track_names_the_plugin_when_built():
    def make(ctx):
        return object()  # a factory function: only its product can be checked

    bad = _plugin("acme_factory", wt_register_trackers=lambda: (
        TrackerSpec(name="acme_units", build=make),))
    model, x = _model()
    tracker = WeightTracker(model, x, plugin_manager=_registered(bad))  # registers fine
    with pytest.raises(PluginError) as info:
        tracker.create_tracker("acme_units")
    message = str(info.value)
    assert "'acme_factory'" in message and "'acme_units'" in message
    assert "returned object without a track() method" in message
    assert "def track(self, values) -> dict" in message

    _works(_plugin("acme_factory2", wt_register_trackers=lambda: (
        TrackerSpec(name="acme_units", build=lambda ctx: Units(ctx)),)))


def test_regularizer_class_without_call_fails_at_registration():
    class NotCallable:
        def __init__(self, ctx):
            pass

    bad = _plugin("acme_reg", wt_register_regularizers=lambda: (
        RegularizerSpec(name="acme_reg", build=NotCallable),))
    with pytest.raises(PluginError, match=r"'acme_reg'.*wt_register_regularizers\(\).*no __call__\(\)"):
        _registered(bad)


def test_wrong_spec_type_for_the_hook_names_the_right_hook():
    spec = TrackerSpec(name="acme_units", build=Units)
    bad = _plugin("acme_wrong_hook", wt_register_regularizers=lambda: (spec,))
    with pytest.raises(PluginError) as info:
        _registered(bad)
    message = str(info.value)
    assert "'acme_wrong_hook'" in message and "wt_register_regularizers()" in message
    assert "expects RegularizerSpec" in message
    assert "Return it from wt_register_trackers() instead." in message
    _works(_plugin("acme_right_hook", wt_register_trackers=lambda: (spec,)))


def test_misspelled_hook_name_is_refused_with_the_close_name():
    spec = TrackerSpec(name="acme_units", build=Units)
    bad = _plugin("acme_typo", wt_register_tracker=lambda: (spec,))
    with pytest.raises(PluginError) as info:
        core_plugin_manager(bad)
    message = str(info.value)
    assert "'acme_typo'" in message and "wt_register_tracker" in message
    assert "Did you mean wt_register_trackers()? Rename the function." in message
    _works(_plugin("acme_renamed", wt_register_trackers=lambda: (spec,)))


def test_hook_with_arguments_is_refused_at_registration():
    spec = TrackerSpec(name="acme_units", build=Units)
    bad = _plugin("acme_args", wt_register_trackers=lambda pm: (spec,))
    with pytest.raises(PluginError) as info:
        core_plugin_manager(bad)
    message = str(info.value)
    assert "'acme_args'" in message and "wt_register_trackers()" in message
    assert "argument(s) 'pm'" in message and "takes none" in message
    assert "`def wt_register_trackers():`" in message
    _works(_plugin("acme_noargs", wt_register_trackers=lambda: (spec,)))


def test_duplicate_names_name_both_plugins_and_blocking_one_fixes_it(monkeypatch):
    spec = TrackerSpec(name="acme_units", build=Units)
    first = _plugin("acme_first", wt_register_trackers=lambda: (spec,))
    second = _plugin("acme_second", wt_register_trackers=lambda: (spec,))
    with pytest.raises(DuplicateNameError) as info:
        build_registries(core_plugin_manager(first, second))
    message = str(info.value)
    assert "'acme_first'" in message and "'acme_second'" in message
    advice = re.search(r"set (WEIGHTTRACKER_DISABLE_PLUGINS)=(\w+)", message)
    assert advice is not None
    monkeypatch.setenv(advice.group(1), advice.group(2))
    modules = [importlib.import_module(name) for name in CORE_PLUGIN_MODULES]
    pm = create_plugin_manager(*modules, first, second, entry_points=False)
    assert pm.is_blocked(advice.group(2))
    model, x = _model()
    assert WeightTracker(model, x, plugin_manager=pm).create_tracker("acme_units").track()


def test_membership_in_an_evaluation_does_not_compute():
    calls = []

    def expensive(evaluation):
        calls.append(1)
        return 1.0

    plugin = _plugin("acme_calc", wt_register_calculations=lambda: (
        CalculationSpec(name="acme_expensive", compute=expensive),))
    model, x = _model()
    tracker = WeightTracker(model, x, plugin_manager=_registered(plugin))
    evaluation = tracker.graph.evaluation()
    assert "acme_expensive" in evaluation and "acme_missing" not in evaluation
    assert 3 not in evaluation
    assert calls == []
    assert evaluation["acme_expensive"] == 1.0 and calls == [1]


class _Factory:
    def __init__(self, ctx):
        self.ctx = ctx


@pytest.mark.parametrize("hook,spec_type,method,body", [
    ("wt_register_regularizers", RegularizerSpec, "__call__", lambda self, values: torch.zeros(())),
    ("wt_register_importances", ImportanceSpec, "__call__", lambda self, values: torch.zeros(8)),
    ("wt_register_pruners", PrunerSpec, "step", lambda self: None),
])
def test_a_factory_class_without_its_method_is_refused_and_adding_it_works(hook, spec_type, method, body):
    kind = hook.removeprefix("wt_register_")[:-1]
    bad = _plugin(f"acme_no_{kind}", **{hook: lambda: (spec_type(name=f"acme_{kind}", build=_Factory),)})
    with pytest.raises(PluginError) as info:
        _registered(bad)
    message = str(info.value)
    assert f"'acme_no_{kind}'" in message and f"{hook}()" in message
    assert f"no {method}() method" in message and f"def {method}(self" in message
    fixed = type("Fixed", (_Factory,), {method: body})
    pm = _registered(_plugin(f"acme_{kind}_fixed", **{hook: lambda: (spec_type(name=f"acme_{kind}", build=fixed),)}))
    getattr(build_registries(pm), f"{kind}s").get(f"acme_{kind}")  # registered


def test_a_build_that_is_not_callable_is_refused():
    bad = _plugin("acme_not_callable", wt_register_trackers=lambda: (
        TrackerSpec(name="acme_units", build="Units"),))  # a name, not the class
    with pytest.raises(PluginError, match=r"'acme_not_callable'.*wt_register_trackers\(\).*not callable. "
                                          r"Pass a class or function taking the build context"):
        _registered(bad)
    _works(_plugin("acme_class", wt_register_trackers=lambda: (TrackerSpec(name="acme_units", build=Units),)))
