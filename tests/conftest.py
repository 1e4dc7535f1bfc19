"""Shared test setup: one torch thread (2-core CI machines stall with more), fixed seeds.

Skips in one place: ``gpu`` tests when CUDA is absent, tests marked
``requires_distribution("name")`` when that distribution is not installed, and ``slow``
tests (over ~5 s; each behaviour they check has a fast test too) unless ``--run-slow`` is
given or ``WEIGHTTRACKER_RUN_SLOW=1`` is set. ``scripts/test.sh`` runs them all.
"""

from __future__ import annotations

import importlib.metadata
import os
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


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (or set WEIGHTTRACKER_RUN_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs CUDA, which is not available here")
    not_slow = pytest.mark.skip(reason="slow: run with --run-slow or WEIGHTTRACKER_RUN_SLOW=1")
    cuda = torch.cuda.is_available()
    run_slow = config.getoption("--run-slow") or os.environ.get("WEIGHTTRACKER_RUN_SLOW") == "1"
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(no_cuda)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(not_slow)
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
