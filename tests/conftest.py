"""Shared test setup: one torch thread (2-core CI machines stall with more), fixed seeds."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    yield



@pytest.fixture
def core_pm():
    """``core_pm(*extra)``: a plugin manager with the unit rules and structure calculations only."""
    from plugin_managers import core_plugin_manager

    return core_plugin_manager
