"""Schedules of the ``magnitude`` pruner: formula step by step, constant schedule, range strings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from weighttracker_core import ConfigError, PruningError
from weighttracker_plugins.pruners.magnitude import (
    ConstantSparsityScheduler,
    MagnitudePruner,
    ModuleMagnitudePrunerConfig,
    PolynomialDecayScheduler,
)


def _expected_polynomial(step: int, previous: float, steps: list[int], power: float, initial: float, target: float):
    """Zhu & Gupta's schedule written out independently: the i-th of N updates (i from 0)
    sets target + (initial - target) * (1 - i / (N - 1)) ** power; other steps keep the value."""
    if step not in steps:
        return previous
    i, n = steps.index(step), len(steps)
    fraction_done = i / (n - 1) if n > 1 else 1.0
    return target + (initial - target) * (1 - fraction_done) ** power


def test_polynomial_formula_step_by_step():
    steps, power, initial, target = [2, 5, 9, 14], 3, 0.1, 0.7
    scheduler = PolynomialDecayScheduler(update_steps=steps, power=power)
    config = ModuleMagnitudePrunerConfig(initial_sparsity=initial, target_sparsity=target, scheduler=scheduler)
    got = expected = initial
    for step in range(20):
        got = scheduler.compute_sparsity(step, got, config)
        expected = _expected_polynomial(step, expected, steps, power, initial, target)
        assert got == pytest.approx(expected), step
    assert got == pytest.approx(target)  # the last update lands exactly on the target


def test_polynomial_hand_values():
    # update_steps [0, 1, 2], power 3, 0 -> 0.8: 0.0; 0.8 - 0.8 * 0.5**3 = 0.7; 0.8
    scheduler = PolynomialDecayScheduler([0, 1, 2])
    config = ModuleMagnitudePrunerConfig(target_sparsity=0.8, scheduler=scheduler)
    values = [scheduler.compute_sparsity(s, -1.0, config) for s in range(4)]
    assert values == pytest.approx([0.0, 0.7, 0.8, -1.0])


def test_single_update_step_applies_the_target():
    scheduler = PolynomialDecayScheduler([3])
    config = ModuleMagnitudePrunerConfig(target_sparsity=0.4, scheduler=scheduler)
    assert scheduler.compute_sparsity(2, 0.0, config) == 0.0
    assert scheduler.compute_sparsity(3, 0.0, config) == pytest.approx(0.4)


def test_pruner_follows_the_polynomial_schedule():
    # 240 random weights (no exact zeros): after each step the zero count is floor(240 * s_t).
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 20))
    steps, power = [1, 3, 4, 8], 2
    pruner = MagnitudePruner(model, {"global_config": {
        "scheduler": {"update_steps": steps, "power": power}, "initial_sparsity": 0.05, "target_sparsity": 0.9,
    }})
    pruner.prepare()
    expected = 0.05
    layer = model[0]
    for step in range(11):
        if step:
            pruner.step()
        expected = _expected_polynomial(step, expected, steps, power, 0.05, 0.9)
        zeros = int(((layer.weight_orig * layer.weight_mask) == 0).sum())
        assert zeros == math.floor(240 * expected + 1e-9), step
        assert pruner.sparsity_levels["0"] == pytest.approx(expected)
        assert pruner.report()["global"]["step_count"] == step


def test_constant_scheduler():
    scheduler = ConstantSparsityScheduler(begin_step=3)
    config = ModuleMagnitudePrunerConfig(initial_sparsity=0.2, target_sparsity=0.6, scheduler=scheduler)
    levels, level = [], 0.2
    for step in range(6):
        level = scheduler.compute_sparsity(step, level, config)
        levels.append(level)
    assert levels == [0.2, 0.2, 0.2, 0.6, 0.6, 0.6]


def test_constant_scheduler_in_the_pruner():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(10, 10))
    pruner = MagnitudePruner(model, {"global_config": {"scheduler": {"begin_step": 2}, "target_sparsity": 0.5}})
    pruner.prepare()
    counts = []
    for step in range(4):
        if step:
            pruner.step()
        counts.append(pruner.report()["0"]["num_zeros"])
    assert counts == [0, 0, 50, 50]


def test_default_schedule_prunes_at_prepare():
    model = nn.Sequential(nn.Linear(10, 10))
    pruner = MagnitudePruner(model)  # ConstantSparsityScheduler(begin_step=0), 50 %
    pruner.prepare()
    assert pruner.report()["0"]["num_zeros"] == 50


def test_n_m_schedule_goes_through_unstructured_and_1_4_to_2_4():
    # target becomes n/m = 0.5; update steps [0, 1, 2, 3] with power 1 give 0, 1/6, 1/3, 1/2:
    # 0 -> nothing; 1/6 -> floor(4/6) = 0 zeros per block, so unstructured at 1/6;
    # 1/3 -> floor(4/3) = 1 zero per block (1:4); 1/2 -> 2:4.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 6))
    pruner = MagnitudePruner(model, {"global_config": {
        "n_m_ratio": [2, 4], "scheduler": {"update_steps": [0, 1, 2, 3], "power": 1},
    }})
    pruner.prepare()
    layer = model[0]

    def zeros_per_block():
        w = layer.weight_orig * layer.weight_mask
        return (w == 0).reshape(6, 2, 4).sum(dim=2)

    assert int(zeros_per_block().sum()) == 0
    pruner.step()
    assert int(zeros_per_block().sum()) == math.floor(48 / 6)
    pruner.step()
    assert bool((zeros_per_block() >= 1).all())
    pruner.step()
    assert bool((zeros_per_block() >= 2).all())  # masks only add zeros: a block may keep a third


@pytest.mark.parametrize(
    "text,steps",
    [("range(0, 10, 3)", (0, 3, 6, 9)), ("range(4)", (0, 1, 2, 3)), ("range(2, 6)", (2, 3, 4, 5)),
     ("  range( 5 , 20 , 5 ) ", (5, 10, 15)), ("range(9, 0, -4)", None)],
)
def test_range_strings(text, steps):
    if steps is None:  # a descending range is parsed but refused: update steps must increase
        with pytest.raises(ConfigError, match="strictly increasing"):
            PolynomialDecayScheduler(text)
        return
    assert PolynomialDecayScheduler(text).update_steps == steps
    assert PolynomialDecayScheduler(update_steps=text).update_steps == steps


@pytest.mark.parametrize(
    "bad", ["range(0, 10, 0)", "range(1.5, 3)", "__import__('os').getcwd()", "list(range(3))", "range()", "range(0, 0)"]
)
def test_bad_range_strings_are_refused_without_evaluation(bad):
    with pytest.raises(ConfigError, match="update_steps"):
        PolynomialDecayScheduler(bad)


def test_update_steps_from_tensor_and_list():
    assert PolynomialDecayScheduler(torch.tensor([1, 4, 7])).update_steps == (1, 4, 7)
    assert PolynomialDecayScheduler(torch.tensor([1.0, 4.0])).update_steps == (1, 4)
    assert PolynomialDecayScheduler([0, 2]).update_steps == (0, 2)
    for bad in ([], [3, 1], [1, 1], [-1, 2], [0.5, 2], torch.zeros(2, 2), 5):
        with pytest.raises(ConfigError, match="update_steps"):
            PolynomialDecayScheduler(bad)


def test_scheduler_arguments_are_checked():
    with pytest.raises(ConfigError, match="power"):
        PolynomialDecayScheduler([1], power=0)
    with pytest.raises(ConfigError, match="begin_step"):
        ConstantSparsityScheduler(begin_step=-1)


def test_step_before_prepare_and_after_finalize():
    pruner = MagnitudePruner(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(PruningError, match="prepare"):
        pruner.step()
    pruner.prepare()
    pruner.step()
    pruner.finalize()
    with pytest.raises(PruningError, match="finalize"):
        pruner.step()
