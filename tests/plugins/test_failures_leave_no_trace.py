"""Failed MAC counts leave no hooks behind; NaN / inf weights are refused, never counted as zero."""

from __future__ import annotations

import io

import pytest
import torch
from models import TinyConvNet, conv_input
from torch import nn

from weighttracker_core import ConfigError, PlanError, WeightTracker


def _hook_keys(model: nn.Module) -> dict[str, tuple]:
    """Every hook dict of every module, by module name (handles' ids, in order)."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
             "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
    return {n: tuple(tuple(getattr(m, h, {})) for h in names) for n, m in model.named_modules()}


def test_failed_mac_count_after_double_names_the_dtypes_and_leaves_no_hooks():
    model = TinyConvNet()
    x = conv_input()
    tracker = WeightTracker(model, x)
    tracker.create_tracker("structured_bops")
    model.double()
    before = _hook_keys(model)
    with pytest.raises(ConfigError, match=r"torch\.float64 but the example inputs are torch\.float32") as info:
        tracker.track()
    assert "fvcore could not count" in str(info.value)
    assert _hook_keys(model) == before
    torch.save(model, io.BytesIO())  # fvcore's local hook classes would not pickle

    # following the advice: a tracker built with inputs of the model's dtype counts
    again = WeightTracker(model, x.to(torch.float64))
    again.create_tracker("structured_bops", log_total_bops=True)
    assert again.track()["structured_bops"]["baseline"] > 0


class _Interrupting(nn.Module):
    """Stops with KeyboardInterrupt while it is being traced (as a user's Ctrl-C would)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise KeyboardInterrupt
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_keyboard_interrupt_during_the_count_removes_the_hooks_and_propagates():
    model = _Interrupting()
    tracker = WeightTracker(model, torch.randn(1, 3, 8, 8))
    tracker.create_tracker("structured_bops")
    before = _hook_keys(model)
    with pytest.raises(KeyboardInterrupt):
        tracker.track()
    assert _hook_keys(model) == before
    torch.save(model, io.BytesIO())


def _poisoned(value: float) -> tuple[nn.Module, WeightTracker]:
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    with torch.no_grad():
        model.conv2.weight[3, 1, 0, 0] = value
    return model, tracker


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("tracker_name", ["structured_bops", "group_pruning_summary"])
def test_trackers_deciding_zero_units_refuse_non_finite_weights(value, tracker_name):
    model, tracker = _poisoned(value)
    tracker.create_tracker(tracker_name)
    with pytest.raises(PlanError, match=r"'conv2\.weight'.*NaN or inf.*index \[3, 1, 0, 0\]"):
        tracker.track()


def test_trackers_with_a_selection_refuse_non_finite_weights_too():
    model, tracker = _poisoned(float("nan"))
    tracker.create_tracker("group_pruning_summary", ignore=[model.fc])
    with pytest.raises(PlanError, match="'conv2.weight'"):
        tracker.track()


@pytest.mark.parametrize("name", ["group_lasso", "bops_group_lasso"])
def test_group_lasso_refuses_non_finite_weights_and_the_advice_works(name):
    model, tracker = _poisoned(float("nan"))
    lasso = tracker.create_regularizer(name)
    with pytest.raises(PlanError, match=r"'conv2\.weight'.*nan_to_num_") as info:
        lasso()
    assert isinstance(info.value, ValueError)
    with pytest.raises(PlanError, match="'conv2.weight'"):
        lasso.proximal_step_(lr=0.1, strength=0.1)  # a NaN unit is never shrunk to zero
    with torch.no_grad():
        model.conv2.weight.nan_to_num_(0.0)  # the advice of the message
    assert torch.isfinite(lasso())


def test_zero_units_and_pruning_refuse_non_finite_weights():
    model, tracker = _poisoned(float("inf"))
    with pytest.raises(PlanError, match="'conv2.weight'"):
        tracker.zero_units()


def test_unstructured_counts_treat_nan_as_a_non_zero_weight():
    # sparsity does not decide zero units: a NaN is simply not a zero
    model, tracker = _poisoned(float("nan"))
    tracker.create_tracker("unstructured_sparsity")
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("weight")
                and not n.startswith("bn"))
    assert tracker.track()["unstructured_sparsity"]["num_zero_weights"] == zeros
