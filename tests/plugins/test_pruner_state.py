"""Pruners save and resume their schedules; their handles take no attribute assignments.

Oracle: the same schedule run without interruption, on an identical copy of the model.
"""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from models import TinyConvNet, conv_input
from torch.nn.utils import prune

from weighttracker_core import (
    ConfigError,
    HandleAttributeError,
    PruningError,
    WeightTracker,
    apply_pruning_record,
)
from weighttracker_core.plugin import PrunerSpec, hookimpl

X = conv_input(batch=2)


def fresh(seed=0):
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def through_disk(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape and torch.equal(sa[key], sb[key]), key


RANKED = dict(importance="l2", pruning_ratio=0.6, iterative_steps=4, scope="global")


# ------------------------------------------------------------------------------ ranked


def test_ranked_physical_schedule_resumes_where_it_stopped():
    reference = fresh()
    original = copy.deepcopy(reference)
    tracker = WeightTracker(reference, X)
    pruner = tracker.create_pruner("ranked", ignored_layers=[reference.fc], **RANKED)
    for _ in range(2):
        pruner.step()
    saved_model = copy.deepcopy(reference.state_dict())
    saved_record = json.loads(json.dumps(tracker.pruning_record()))
    saved_state = json.loads(json.dumps(pruner.state_dict()))  # plain data
    for _ in range(2):
        pruner.step()

    model = copy.deepcopy(original)
    again = apply_pruning_record(model, X, saved_record)
    model.load_state_dict(saved_model)
    resumed = again.create_pruner("ranked", ignored_layers=[model.fc], **RANKED)
    resumed.load_state_dict(saved_state)
    assert resumed.current_step == 2
    for _ in range(2):
        resumed.step()
    assert_same_model(model, reference)
    assert resumed.report() == pruner.report()


def test_without_the_state_a_rebuilt_ranked_pruner_would_prune_differently():
    """The failure load_state_dict fixes: ratios measured from the pruned sizes."""
    reference = fresh()
    tracker = WeightTracker(reference, X)
    pruner = tracker.create_pruner("ranked", ignored_layers=[reference.fc], **RANKED)
    pruner.step()
    rebuilt = tracker.create_pruner("ranked", ignored_layers=[reference.fc], **RANKED)
    assert rebuilt.current_step == 0 and pruner.current_step == 1
    rebuilt.load_state_dict(pruner.state_dict())
    assert rebuilt.state_dict() == pruner.state_dict()


def test_ranked_mask_schedule_resumes_and_puts_the_masks_back():
    reference = fresh()
    original = copy.deepcopy(reference)
    tracker = WeightTracker(reference, X)
    options = dict(RANKED, apply="mask")
    pruner = tracker.create_pruner("ranked", ignored_layers=[reference.fc], **options)
    pruner.step()
    saved_model = copy.deepcopy(reference.state_dict())
    saved_state = through_disk(pruner.state_dict())
    pruner.step()
    pruner.step()

    model = copy.deepcopy(original)
    again = WeightTracker(model, X)
    resumed = again.create_pruner("ranked", ignored_layers=[model.fc], **options)
    resumed.load_state_dict(saved_state)
    model.load_state_dict(saved_model)  # needs the masks: weight_orig / weight_mask
    resumed.step()
    resumed.step()
    assert_same_model(model, reference)
    assert torch.equal(model(X), reference(X))


def test_ranked_state_refusals():
    model = fresh()
    tracker = WeightTracker(model, X)
    pruner = tracker.create_pruner("ranked", ignored_layers=[model.fc], **RANKED)
    pruner.step()
    state = pruner.state_dict()
    with pytest.raises(PruningError, match="has not taken a step; this one is at step 1"):
        pruner.load_state_dict(state)
    other = tracker.create_pruner("ranked", ignored_layers=[model.fc], **dict(RANKED, iterative_steps=5))
    with pytest.raises(ConfigError, match="had iterative_steps=4, this one has iterative_steps=5"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="not the state of a 'ranked' pruner .* 'magnitude'"):
        other.load_state_dict({**state, "pruner": "magnitude"})
    with pytest.raises(ConfigError, match=r"lacks \['history'\]"):
        other.load_state_dict({k: v for k, v in state.items() if k != "history"})


def test_a_physical_state_on_the_dense_model_is_refused_and_the_advice_works():
    model = fresh()
    original = copy.deepcopy(model)
    tracker = WeightTracker(model, X)
    pruner = tracker.create_pruner("ranked", ignored_layers=[model.fc], **RANKED)
    pruner.step()
    state, record = pruner.state_dict(), tracker.pruning_record()

    dense = copy.deepcopy(original)
    wrong = WeightTracker(dense, X).create_pruner("ranked", ignored_layers=[dense.fc], **RANKED)
    with pytest.raises(ConfigError, match="rebuild it with weighttracker_core.apply_pruning_record"):
        wrong.load_state_dict(state)
    right = apply_pruning_record(dense, X, record).create_pruner(
        "ranked", ignored_layers=[dense.fc], **RANKED)
    right.load_state_dict(state)
    assert right.current_step == 1


# --------------------------------------------------------------------------- magnitude

MAGNITUDE = {"global_config": {"target_sparsity": 0.75, "initial_sparsity": 0.25,
                               "scheduler": {"update_steps": [1, 2, 3, 4]}},
             "module_name_configs": {"conv3": {"granularity": "per_channel", "target_sparsity": 0.5}}}


def test_magnitude_schedule_resumes_where_it_stopped():
    reference = fresh()
    original = copy.deepcopy(reference)
    pruner = WeightTracker(reference, X).create_pruner("magnitude", config=MAGNITUDE)
    pruner.prepare()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)

    def train_step(model, opt):
        opt.zero_grad()
        model(X).square().mean().backward()
        opt.step()

    for _ in range(2):
        train_step(reference, optimizer)
        pruner.step()
    saved_model = copy.deepcopy(reference.state_dict())
    saved_state = through_disk(pruner.state_dict())
    for _ in range(3):
        train_step(reference, optimizer)
        pruner.step()

    model = copy.deepcopy(original)
    resumed = WeightTracker(model, X).create_pruner("magnitude", config=MAGNITUDE)
    resumed.load_state_dict(saved_state)  # instead of prepare()
    model.load_state_dict(saved_model)
    assert resumed.step_count == 2
    second = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        train_step(model, second)
        resumed.step()
    assert_same_model(model, reference)
    assert resumed.report() == pruner.report()
    mine, theirs = resumed.state_dict(), pruner.state_dict()
    assert mine["step_count"] == theirs["step_count"] == 5
    for name, entry in theirs["modules"].items():  # the pruner's own share of each mask
        assert torch.equal(mine["modules"][name]["mask"], entry["mask"]), name
        assert mine["modules"][name]["level"] == entry["level"]
    resumed.finalize()
    pruner.finalize()
    assert_same_model(model, reference)


def test_magnitude_state_composes_with_other_torch_pruning_on_the_same_weight():
    def build():
        model = fresh()
        torch.manual_seed(5)
        prune.random_unstructured(model.conv1, "weight", amount=0.3)
        return model

    reference = build()
    pruner = WeightTracker(reference, X).create_pruner("magnitude", config=MAGNITUDE)
    pruner.prepare()
    pruner.step()
    saved_model, saved_state = copy.deepcopy(reference.state_dict()), pruner.state_dict()
    pruner.step()

    model = build()  # carries the same random mask
    resumed = WeightTracker(model, X).create_pruner("magnitude", config=MAGNITUDE)
    resumed.load_state_dict(saved_state)
    model.load_state_dict(saved_model)
    resumed.step()
    assert_same_model(model, reference)


def test_magnitude_state_refusals():
    model = fresh()
    pruner = WeightTracker(model, X).create_pruner("magnitude", config=MAGNITUDE)
    pruner.prepare()
    state = pruner.state_dict()
    with pytest.raises(PruningError, match="not prepared yet"):
        pruner.load_state_dict(state)
    other_model = fresh()
    other = WeightTracker(other_model, X).create_pruner(
        "magnitude", config={"global_config": {"target_sparsity": 0.5}})
    with pytest.raises(ConfigError, match=r"Module 'conv1' has config .* in the saved state"):
        other.load_state_dict(state)
    assert not hasattr(other_model.conv1, "weight_orig")  # nothing was changed
    with pytest.raises(ConfigError, match="not the state of a 'magnitude' pruner"):
        other.load_state_dict({"pruner": "ranked"})


# ----------------------------------------------------------------------------- handles


def test_assigning_to_a_pruner_handle_is_refused_and_the_advice_works():
    model = fresh()
    tracker = WeightTracker(model, X)
    pruner = tracker.create_pruner("magnitude", config=MAGNITUDE)
    pruner.prepare()
    for _ in range(3):
        pruner.step()
    state = pruner.state_dict()

    other_model = fresh()
    rebuilt = WeightTracker(other_model, X).create_pruner("magnitude", config=MAGNITUDE)
    with pytest.raises(HandleAttributeError, match=r"Cannot set 'step_count' on the 'magnitude' pruner "
                                                   r"\(it is read-only\).*pruner\.load_state_dict"):
        rebuilt.step_count = 3
    assert isinstance(HandleAttributeError("x"), AttributeError)
    with pytest.raises(HandleAttributeError, match="Cannot set 'stepcount'"):
        rebuilt.stepcount = 3  # a typo is no more silent
    assert rebuilt.step_count == 0
    rebuilt.load_state_dict(state)  # the advice
    assert rebuilt.step_count == 3


def test_assigning_to_a_regularizer_handle_is_refused():
    tracker = WeightTracker(fresh(), X)
    lasso = tracker.create_regularizer("group_lasso")
    with pytest.raises(HandleAttributeError, match=r"create_regularizer\('group_lasso', \.\.\.\)"):
        lasso.weighting = "none"


class _Stateless:
    def __init__(self, ctx):
        pass

    def step(self):
        return None


class StatelessPlugin:
    @hookimpl
    def wt_register_pruners(self):
        return (PrunerSpec(name="stateless_test", build=_Stateless),)


def test_a_pruner_without_state_support_says_so():
    tracker = WeightTracker(fresh(), X, plugins=[StatelessPlugin()])
    pruner = tracker.create_pruner("stateless_test")
    with pytest.raises(ConfigError, match="'stateless_test' cannot be saved and resumed: .* no state_dict"):
        pruner.state_dict()
    with pytest.raises(ConfigError, match="no load_state_dict"):
        pruner.load_state_dict({})
