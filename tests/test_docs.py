"""The documentation spine: README size, the docs index, the generated API reference, and
the persistence guide's round trip run in two real processes."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _links(path: Path) -> set[Path]:
    """Every relative link target of a markdown file, resolved."""
    out = set()
    for target in LINK.findall(path.read_text()):
        if "://" not in target and not target.startswith("mailto:"):
            out.add((path.parent / target).resolve())
    return out


def test_readme_is_short():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 10_000, f"README.md has {len(text)} characters; move detail into docs/"


def test_every_docs_page_is_linked_from_the_index():
    linked = _links(DOCS / "index.md")
    pages = {p.resolve() for p in DOCS.glob("*.md")} - {(DOCS / "index.md").resolve()}
    missing = sorted(p.name for p in pages - linked)
    assert not missing, f"docs/index.md does not link {missing}; add a line for each"
    assert (DOCS / "index.md").resolve() in _links(ROOT / "README.md")


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))],
                         ids=lambda p: p.name)
def test_relative_links_point_at_files_that_exist(page):
    broken = sorted(str(t.relative_to(ROOT)) for t in _links(page) if not t.exists())
    assert not broken, f"{page.name} links to missing files: {broken}"


def test_api_reference_is_up_to_date():
    apidoc = runpy.run_path(str(ROOT / "scripts" / "apidoc.py"))
    expected = apidoc["render"]()
    current = (DOCS / "api.md").read_text()
    assert current == expected, "docs/api.md is out of date; regenerate it with: python scripts/apidoc.py"


def test_api_reference_lists_every_public_name():
    import weighttracker_core

    text = (DOCS / "api.md").read_text()
    for name in weighttracker_core.__all__:
        assert re.search(rf"^### `(class )?{re.escape(name)}\b", text, re.M), name
    assert "```python" not in text  # docstring examples are shown, not run as doc examples


def test_apidoc_check_mode_reports_a_stale_page(tmp_path, monkeypatch):
    apidoc = runpy.run_path(str(ROOT / "scripts" / "apidoc.py"))
    assert subprocess.run([sys.executable, str(ROOT / "scripts" / "apidoc.py"), "--check"],
                          capture_output=True).returncode == 0
    main = apidoc["main"]
    stale = tmp_path / "api.md"
    stale.write_text("old\n")
    main.__globals__["OUTPUT"] = stale
    assert main(["--check"]) == 1
    assert main([]) == 0 and stale.read_text() == apidoc["render"]()


def test_changelog_has_an_unreleased_and_a_first_release_section():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.index("## Unreleased") < text.index("## 0.1.0")


@pytest.mark.slow
def test_persistence_guide_round_trip_in_two_processes(tmp_path):
    """The guide's save block and load block, each in a fresh Python process."""
    pytest.importorskip("torchvision")
    text = (DOCS / "persistence.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    save, load = blocks[0], blocks[1]
    assert "torch.save(model.state_dict()" in save and "apply_pruning_record" in load
    for code in (save, load):
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "resnet18-pruned.json").exists()
