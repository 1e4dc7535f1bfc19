"""Entry-point declarations match the plugin modules on disk, and every one loads."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path

import pytest

from weighttracker_core import create_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
HOOKIMPL = re.compile(r"^@hookimpl", re.M)


def _declared(distribution: str) -> dict[str, str]:
    dist = importlib.metadata.distribution(distribution)
    return {ep.name: ep.value for ep in dist.entry_points if ep.group == "weighttracker"}


def _modules_with_hooks(base: Path, package_root: Path) -> set[str]:
    found = set()
    for path in base.rglob("*.py"):
        if HOOKIMPL.search(path.read_text()):
            parts = path.relative_to(package_root).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))  # a package
    return found


@pytest.mark.parametrize(
    "distribution,base,root",
    [
        ("weighttracker", ROOT / "plugins" / "weighttracker_plugins", ROOT / "plugins"),
        pytest.param("weighttracker-timm", ROOT / "contrib_timm" / "weighttracker_timm", ROOT / "contrib_timm",
                     marks=pytest.mark.requires_distribution("weighttracker-timm")),
    ],
)
def test_every_hook_module_is_declared(distribution, base, root):
    declared = set(_declared(distribution).values())
    missing = _modules_with_hooks(base, root) - declared
    assert not missing, f"modules with @hookimpl but no entry point in {distribution}: {sorted(missing)}"


@pytest.mark.parametrize("distribution", [
    "weighttracker",
    pytest.param("weighttracker-timm", marks=pytest.mark.requires_distribution("weighttracker-timm")),
    pytest.param("wt-example", marks=pytest.mark.requires_distribution("wt-example")),
])
def test_every_declared_entry_point_loads(distribution):
    declared = _declared(distribution)
    assert declared, f"{distribution} declares no entry point in group 'weighttracker'"
    for name, value in declared.items():
        module = importlib.import_module(value)
        pm = create_plugin_manager(module, entry_points=False, use_env=False)  # runs check_pending
        implemented = [hook for hook in pm.hook.__dict__.values() if hasattr(hook, "get_hookimpls")
                       and any(impl.plugin is module for impl in hook.get_hookimpls())]
        assert implemented, f"entry point {name} = {value} implements no weighttracker hook"


def test_console_script_and_pytest_plugin_are_declared():
    dist = importlib.metadata.distribution("weighttracker")
    eps = {(ep.group, ep.name): ep.value for ep in dist.entry_points}
    assert eps[("console_scripts", "weighttracker")] == "weighttracker_core.cli:main"
    assert eps[("pytest11", "weighttracker")] == "weighttracker_core.testing"


def test_version_comes_from_metadata():
    import weighttracker_core

    assert weighttracker_core.__version__ == importlib.metadata.version("weighttracker")
    assert "__version__ =" not in (ROOT / "weighttracker_core" / "__init__.py").read_text().replace(
        '__version__ = importlib.metadata.version("weighttracker")', ""
    )
