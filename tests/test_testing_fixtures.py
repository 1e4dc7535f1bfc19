"""The pytest plugin for plugin authors (``weighttracker_core.testing``, SPEC §8)."""

from __future__ import annotations

import inspect

import torch

import weighttracker_core.testing as testing
from weighttracker_core import WeightTracker
from weighttracker_core.plugin import TrackerSpec, hookimpl


class OnePlugin:
    @hookimpl
    def wt_register_trackers(self):
        class Count:
            def __init__(self, ctx):
                self.n = ctx.structure.num_units

            def track(self, values):
                return {"units": self.n}

        return (TrackerSpec(name="fixture_units", build=Count),)


def test_module_is_inert_fixtures_only():
    public = {n: v for n, v in vars(testing).items() if not n.startswith("_") and callable(v)}
    hooks = [n for n in public if n.startswith("pytest_")]
    assert not hooks
    fixtures = sorted(n for n in public if n.startswith("wt_"))
    assert fixtures == ["wt_plugin_manager", "wt_tiny_attention", "wt_tiny_convnet", "wt_tiny_mlp"]
    for name in fixtures:
        marker = getattr(public[name], "_fixture_function_marker", None) or getattr(
            public[name], "_pytestfixturefunction", None
        )
        assert marker is not None, name
        assert not getattr(marker, "autouse", False), name
    assert "import torch" not in inspect.getsource(testing).split("def ", 1)[0]


def test_plugin_manager_fixture_holds_builtins_and_the_plugin_only(wt_plugin_manager, wt_tiny_mlp):
    pm = wt_plugin_manager(OnePlugin())
    names = pm.registered_names()
    assert "wt_example" not in names  # another installed distribution does not leak in
    assert "linear_rules" in names
    tracker = WeightTracker(wt_tiny_mlp(), torch.zeros(1, 4), plugin_manager=pm)
    # 8 hidden features; the 3 outputs are the model's interface, not units
    assert tracker.create_tracker("fixture_units").track() == {"fixture_units": {"units": 8}}


def test_plugin_manager_fixture_without_builtins(wt_plugin_manager):
    pm = wt_plugin_manager(OnePlugin(), builtins=False)
    assert len(pm.registered_names()) == 1


def test_tiny_model_fixtures_run(wt_plugin_manager, wt_tiny_convnet, wt_tiny_attention):
    pm = wt_plugin_manager()
    conv = WeightTracker(wt_tiny_convnet(), torch.zeros(1, 3, 8, 8), plugin_manager=pm)
    assert conv.num_units > 0
    attention = wt_tiny_attention()
    tracker = WeightTracker(attention, torch.zeros(1, 5, 4), plugin_manager=pm,
                            num_heads={attention.attn: 2}, prune_num_heads=True)
    assert any(g.kind == "head" for g in tracker.groups)
