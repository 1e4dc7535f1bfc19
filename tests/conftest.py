"""Shared test setup: one torch thread (2-core CI machines stall with more), fixed seeds.

Skips in one place: ``gpu`` tests when CUDA is absent, and tests marked
``requires_distribution("name")`` when that distribution is not installed.
"""

from __future__ import annotations

import importlib.metadata
import random

import pytest
import torch


def installed(distribution: str) -> bool:
    """Whether ``distribution`` (e.g. ``"wt-example"``) is installed in this environment."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs CUDA, which is not available here")
    cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(no_cuda)
        for mark in item.iter_markers("requires_distribution"):
            name = mark.args[0]
            if not installed(name):
                item.add_marker(pytest.mark.skip(
                    reason=f"distribution {name!r} is not installed (bash scripts/test.sh installs it)"))


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
