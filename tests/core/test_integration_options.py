"""Integrations: ``before_prune`` refuses before anything changes; ``tracker_options`` may
fill ``forward_fn`` / ``output_transform``.

Oracles: the model's state and hooks compared with a copy taken before the call, and the
calls the hooks record.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plugin_managers import core_plugin_manager
from weighttracker_core import PruningError, WeightTracker
from weighttracker_core.plugin import IntegrationSpec, hookimpl


class DictOut(nn.Module):
    """Returns a dict with a non-tensor entry: tracing needs an ``output_transform``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, scale=1.0):
        return {"logits": self.fc2(torch.relu(self.fc1(x))) * scale, "note": "not a tensor"}


class Recorder:
    """An integration whose hooks record what they saw; ``refuse`` makes ``before_prune`` raise."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.before: list[dict] = []
        self.after: list[dict] = []
        self.calls: list[float] = []

    def forward_fn(self, model, x):
        self.calls.append(2.0)
        return model(x, scale=2.0)

    def check(self, tracker):
        self.before.append(dict(tracker.pruned_units))
        # nothing changed yet: the layer still has the width the structure describes
        assert tracker.model.fc1.out_features == tracker.groups[0].n_units
        if self.refuse:
            raise PruningError("refused by the test integration")

    @hookimpl
    def wt_register_integrations(self):
        return (
            IntegrationSpec(
                name="recorder",
                applies_to=lambda model: isinstance(model, DictOut),
                tracker_options=lambda model: {"forward_fn": self.forward_fn,
                                               "output_transform": lambda out: out["logits"]},
                before_prune=self.check,
                after_prune=lambda tracker: self.after.append(dict(tracker.pruned_units)),
            ),
        )


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_tracker_options_fill_forward_fn_and_output_transform():
    model, recorder = DictOut().eval(), Recorder()
    tracker = WeightTracker(model, torch.randn(2, 4), plugin_manager=core_plugin_manager(recorder))
    assert recorder.calls, "the integration's forward_fn traced the model"
    assert [g.n_units for g in tracker.groups] == [6]
    assert tracker.structure.options.forward_fn == recorder.forward_fn
    # the user's own options win
    own = []
    WeightTracker(model, torch.randn(2, 4), plugin_manager=core_plugin_manager(Recorder()),
                  forward_fn=lambda m, x: own.append(1) or m(x))
    assert own
    # without the integration the dict output cannot be traced
    with pytest.raises(Exception, match="output"):
        WeightTracker(model, torch.randn(2, 4), plugin_manager=core_plugin_manager(), integrations=None)


def test_before_prune_sees_the_request_then_after_prune_runs():
    model, recorder = DictOut().eval(), Recorder()
    tracker = WeightTracker(model, torch.randn(2, 4), plugin_manager=core_plugin_manager(recorder))
    (group,) = tracker.groups
    tracker.prune_units({group.id: [4, 1]})
    assert recorder.before == [{group.name: [1, 4]}] == recorder.after
    assert model.fc1.out_features == 4
    assert tracker.pruned_units is None and tracker.pruned_attention is None
    # a dry run is checked too; nothing to remove calls nothing
    tracker.prune_units({tracker.groups[0].id: [0]}, dry_run=True)
    assert len(recorder.before) == 2 and len(recorder.after) == 1
    tracker.prune_zero_units()
    assert len(recorder.before) == 2


def test_a_refusal_in_before_prune_leaves_the_model_untouched():
    model, recorder = DictOut().eval(), Recorder(refuse=True)
    tracker = WeightTracker(model, torch.randn(2, 4), plugin_manager=core_plugin_manager(recorder))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)
    with pytest.raises(PruningError, match="refused by the test integration"):
        tracker.prune_units({0: [2]})
    assert recorder.after == [] and tracker.pruned_units is None
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert _hooks(model) == hooks
    assert tracker.groups[0].n_units == 6  # the tracker is still current and usable
    tracker.fake_prune_unit(0, 2)


def test_the_core_refusals_come_before_the_integration_check():
    model, recorder = DictOut().eval(), Recorder()
    tracker = WeightTracker(model, torch.randn(2, 4), plugin_manager=core_plugin_manager(recorder))
    with pytest.raises(PruningError, match="all 6 units"):
        tracker.prune_units({0: list(range(6))})
    assert recorder.before == []
