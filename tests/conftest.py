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
