"""A failing call leaves the model exactly as it was: values, shapes, hooks, attributes.

Each case is one kind of bad input or fault; every test checks the error type, that the
message names the value, that parameters and buffers are bit-identical, that no module
carries a hook it did not have, that later forwards keep no autograd history, and that
``torch.save(model)`` still works.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from models import TinyConvNet, conv_input
from weighttracker_core import (
    ConfigError,
    PluginError,
    PruningError,
    StaleConsumerError,
    UnitIndexError,
    WeightTracker,
)
from weighttracker_core.plugin import TrackerSpec, hookimpl
from weighttracker_core.hooks import hook_state


class Everything:
    """The state a failed call must not change."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        self.hooks = hook_state(model)
        self.modes = [m.training for m in model.modules()]
        self.classes = [type(m) for m in model.modules()]

    def assert_same(self, inputs=None) -> None:
        model = self.model
        state = model.state_dict(keep_vars=True)
        assert {k: tuple(v.shape) for k, v in state.items()} == self.shapes
        for key, value in self.tensors.items():
            assert torch.equal(state[key].detach(), value), key
        assert hook_state(model) == self.hooks
        assert [m.training for m in model.modules()] == self.modes
        assert [type(m) for m in model.modules()] == self.classes
        torch.save(model, io.BytesIO())  # no local hook functions left to pickle
        for _ in range(3):  # no hook keeps autograd history of later outputs
            with torch.no_grad():
                out = model(conv_input() if inputs is None else inputs)
            assert out.grad_fn is None


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyConvNet().eval()


def _fails(model, error, match, call, inputs=None):
    everything = Everything(model)
    with pytest.raises(error, match=match):
        call()
    everything.assert_same(inputs)


# ----------------------------------------------------------------------- failed builds


@pytest.mark.parametrize("inputs,match", [
    (torch.zeros(1, 5, 8, 8), r"tensor of shape \(1, 5, 8, 8\).*do not fit"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.float64), r"do not fit.*(Double|double|dtype)"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int64), r"do not fit"),
    (None, r"example_inputs \(NoneType\) do not fit"),
    ({"y": torch.zeros(1, 3, 8, 8)}, r"\{'y': tensor of shape .*do not fit"),
])
def test_a_failed_build_leaves_no_hooks(model, inputs, match):
    _fails(model, ConfigError, match, lambda: WeightTracker(model, inputs))


def test_a_build_on_meta_inputs_for_a_real_model_leaves_no_hooks(model):
    _fails(model, Exception, r".", lambda: WeightTracker(model, torch.zeros(1, 3, 8, 8, device="meta")))


def test_ctrl_c_while_tracing_leaves_no_hooks(model):
    def interrupted(m, x):
        m.conv1(x)  # Torch-Pruning's hooks are registered and have fired once
        raise KeyboardInterrupt

    _fails(model, KeyboardInterrupt, None, lambda: WeightTracker(model, conv_input(), forward_fn=interrupted))


def test_a_string_forward_fn_is_refused_before_tracing(model):
    _fails(model, ConfigError, r"forward_fn must be a callable .*'forward'",
           lambda: WeightTracker(model, conv_input(), forward_fn="forward"))


def test_a_failing_output_transform_is_named(model):
    def transform(out):
        raise KeyError("logits")

    _fails(model, ConfigError, r"output_transform failed .*KeyError",
           lambda: WeightTracker(model, conv_input(), output_transform=transform))


def test_inference_mode_tensors_are_traced():
    model = TinyConvNet().eval()
    with torch.inference_mode():
        x = conv_input()
        tracker = WeightTracker(model, x)  # inside inference_mode, with an inference input
    assert len(tracker.groups) == 2  # conv1 (with conv2 through the residual) and conv3
    assert hook_state(model) == {}


def test_a_model_built_under_inference_mode_is_refused_and_deepcopy_fixes_it():
    import copy

    with torch.inference_mode():
        model = TinyConvNet()
    with pytest.raises(ConfigError, match=r"inference tensors.*copy\.deepcopy"):
        WeightTracker(model, conv_input())
    fixed = copy.deepcopy(model)  # the advice
    assert len(WeightTracker(fixed, conv_input()).groups) == 2


@pytest.mark.parametrize("options,match", [
    ({"ignored_layers": ["8"]}, r"ignored_layers takes modules of the model, got '8'.*get_submodule\('8'\)"),
    ({"ignored_layers": [3, None]}, r"ignored_layers takes modules of the model, got 3"),
    ({"ignored_layers": [nn.Linear]}, r"ignored_layers takes module instances .*not the type Linear"),
    ({"ignored_layers": [nn.Linear(2, 2)]}, r"ignored_layers lists a Linear that is not part of the model"),
    ({"ignored_layers": nn.Linear(2, 2)}, r"ignored_layers must be a list .*wrap a single one"),
    ({"root_module_types": ["Conv2d"]}, r"root_module_types takes nn.Module subclasses .*torch\.nn\.Conv2d"),
    ({"prune_num_heads": "yes"}, r"prune_num_heads must be True or False, got 'yes'"),
    ({"prune_model_outputs": 1}, r"prune_model_outputs must be True or False, got 1"),
    ({"num_heads": [4]}, r"num_heads must be a dict"),
    ({"num_heads": {"attn": 4}}, r"num_heads keys must be modules"),
    ({"post_prune_hooks": [1]}, r"post_prune_hooks must be callables, got 1"),
    ({"weight_bitwidth_fn": 8}, r"weight_bitwidth_fn must be a callable"),
])
def test_options_are_type_checked_where_they_enter(model, options, match):
    _fails(model, ConfigError, match, lambda: WeightTracker(model, conv_input(), **options))


# -------------------------------------------------------------------- failed calls


def test_bad_include_and_ignore_are_named(model):
    tracker = WeightTracker(model, conv_input())
    _fails(model, ConfigError, r"include must be a list .*Conv2d",
           lambda: tracker.create_tracker("unstructured_sparsity", include=nn.Conv2d))
    _fails(model, ConfigError, r"ignore accepts module instances .*'8'",
           lambda: tracker.create_regularizer("group_lasso", ignore=["8"]))
    _fails(model, ConfigError, r"ignore_prune accepts module instances .*'8'",
           lambda: tracker.prune_zero_units(ignore_prune=["8"]))
    _fails(model, ConfigError, r"dry_run must be True or False, got 'no'",
           lambda: tracker.prune_zero_units(dry_run="no"))
    _fails(model, UnitIndexError, r"group_id 99 is out of range",
           lambda: tracker.fake_prune_unit(99, 0))


def test_a_rebuild_that_cannot_trace_restores_and_leaves_no_hooks(model):
    tracker = WeightTracker(model, conv_input())
    model.double()  # the float example inputs no longer fit: the rebuild after a prune fails
    group = tracker.groups[0]
    _fails(model, PruningError, r"restored unchanged", lambda: tracker.prune_unit(group.id, 0),
           inputs=conv_input().double())


def test_a_hook_that_edits_through_data_and_raises_is_undone(model):
    def edit_then_fail(tracker):
        tracker.model.fc.weight.data[0, 0] = 123.0  # does not bump the version counter
        raise RuntimeError("hook failed")

    tracker = WeightTracker(model, conv_input(), post_prune_hooks=[edit_then_fail])
    group = next(g for g in tracker.groups if g.root_module == "conv1")
    everything = Everything(model)
    with pytest.raises(RuntimeError, match="hook failed"):
        tracker.prune_unit(group.id, 0)
    everything.assert_same()


def test_a_prune_through_one_tracker_makes_another_on_the_same_model_stale(model):
    a = WeightTracker(model, conv_input())
    b = WeightTracker(model, conv_input())
    metrics = a.create_tracker("unstructured_sparsity")
    group = next(g for g in b.groups if g.root_module == "conv1")
    b.prune_units({group.id: [0, 1]})
    everything = Everything(model)
    for call in (lambda: a.fake_prune_unit(group.id, 6), lambda: a.track(), lambda: metrics.track(),
                 lambda: a.prune_zero_units(), lambda: a.create_tracker("unstructured_sparsity")):
        with pytest.raises(StaleConsumerError, match="another WeightTracker on the same model"):
            call()
    everything.assert_same()
    assert WeightTracker(model, conv_input()).groups  # the advice: build a new one


class BrokenTrackers:
    @hookimpl
    def wt_register_trackers(self):
        class ReturnsNone:
            def __init__(self, ctx):
                pass

            def track(self, values):
                return None

        return (TrackerSpec(name="returns_none", build=ReturnsNone),)


def test_a_plugin_tracker_that_returns_no_dict_is_named(model):
    tracker = WeightTracker(model, conv_input(), plugins=[BrokenTrackers()])
    handle = tracker.create_tracker("returns_none")
    with pytest.raises(PluginError, match=r"Tracker 'returns_none' returned NoneType"):
        handle.track()
    with pytest.raises(PluginError, match="returns_none"):
        tracker.track()


# ------------------------------------------------------- every entry point, one bad call


def _bad_calls(model, tracker):
    """One failing call with user input for every public entry point."""
    from weighttracker_core import apply_pruning_record

    return {
        "WeightTracker": lambda: WeightTracker(model, torch.zeros(2, 7)),
        "create_tracker": lambda: tracker.create_tracker("no_such_tracker"),
        "create_tracker options": lambda: tracker.create_tracker("structured_bops", no_such_option=1),
        "create_regularizer": lambda: tracker.create_regularizer("group_lasso", include=[nn.Linear(1, 1)]),
        "create_pruner": lambda: tracker.create_pruner("ranked", pruning_ratio=1.5),
        "fake_prune_unit": lambda: tracker.fake_prune_unit(0, 10**6),
        "fake_prune_units": lambda: tracker.fake_prune_units({0: 3}),
        "prune_unit": lambda: tracker.prune_unit("0", 0),
        "prune_units": lambda: tracker.prune_units({0: list(range(tracker.groups[0].n_units))}),
        "prune_zero_units": lambda: tracker.prune_zero_units(ignore=[3]),
        "zero_units": lambda: tracker.zero_units(ignore=nn.BatchNorm2d),
        "view_bitwidths": lambda: tracker.view_bitwidths(include=["conv1"]),
        "apply_pruning_record": lambda: apply_pruning_record(model, conv_input(), {"format": "nope"}),
    }


@pytest.mark.parametrize("entry", list(_bad_calls(None, None)))
def test_every_entry_point_fails_without_leaving_anything(model, entry):
    from weighttracker_core import WeightTrackerError

    tracker = WeightTracker(model, conv_input())
    everything = Everything(model)
    with pytest.raises(WeightTrackerError):  # every user error is one of ours
        _bad_calls(model, tracker)[entry]()
    everything.assert_same()
    assert tracker.structure.version == 0 and tracker.structure.current
