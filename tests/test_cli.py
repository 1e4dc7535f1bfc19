"""The ``weighttracker`` command: plugins, inspect, demo; in-process and as a subprocess."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torchvision

from weighttracker_core import WeightTracker
from weighttracker_core.cli import main

SCRIPT = Path(sys.executable).with_name("weighttracker")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class _Checker(HTMLParser):
    """Collects tags and fails on unbalanced svg/table/html elements."""

    def __init__(self):
        super().__init__()
        self.stack, self.seen = [], []

    def handle_starttag(self, tag, attrs):
        self.seen.append(tag)
        if tag in ("html", "table", "svg", "tr"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in ("html", "table", "svg", "tr"):
            assert self.stack and self.stack[-1] == tag, (tag, self.stack)
            self.stack.pop()


def check_html(text):
    checker = _Checker()
    checker.feed(text)
    assert not checker.stack
    return checker.seen


# ------------------------------------------------------------------------------ plugins


def test_plugins_json_lists_every_entry_point_with_distribution_and_version(capsys):
    code, out, _ = run(capsys, "plugins", "--format", "json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)["plugins"]}
    # oracle: the installed entry points themselves
    for ep in importlib.metadata.entry_points(group="weighttracker"):
        assert ep.name in rows, ep.name
        assert rows[ep.name]["distribution"] == ep.dist.metadata["Name"]
        assert rows[ep.name]["version"] == ep.dist.version
        assert rows[ep.name]["source"] == ep.value
    assert rows["group_lasso"]["registers"] == {"regularizer": ["group_lasso"]}
    assert rows["torchvision_source"]["registers"] == {"model source": ["torchvision"]}
    assert rows["group_lasso"]["summaries"]["regularizer"]["group_lasso"]


def test_plugins_text_names_plugins_and_what_they_register(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert re.search(r"^group_lasso  \(weighttracker \S+;", out, re.M)
    assert "    regularizer: group_lasso - " in out
    assert "    model source: torchvision - " in out


def test_plugins_broken_plugin_is_a_clear_error(capsys, monkeypatch):
    from weighttracker_core import default_plugin_manager

    real = importlib.metadata.entry_points
    broken = importlib.metadata.EntryPoint(name="broken_plugin", value="no_such_module_xyz",
                                           group="weighttracker")

    def entry_points(**kwargs):
        found = list(real(**kwargs))
        return found + [broken] if kwargs.get("group") == "weighttracker" else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    default_plugin_manager.cache_clear()
    try:
        code, out, err = run(capsys, "plugins")
    finally:
        monkeypatch.undo()
        default_plugin_manager.cache_clear()
    assert code == 2 and out == ""
    assert "'broken_plugin' = 'no_such_module_xyz'" in err and "failed to import" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ inspect


def test_inspect_torchvision_json(capsys):
    code, out, _ = run(capsys, "inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32",
                       "--format", "json")
    assert code == 0
    data = json.loads(out)
    reference = torchvision.models.resnet18()
    assert data["num_parameters"] == sum(p.numel() for p in reference.parameters())
    assert data["input_shape"] == [1, 3, 32, 32]
    assert data["model_type"].endswith("ResNet")
    import torch

    tracker = WeightTracker(reference, torch.randn(1, 3, 32, 32))
    assert data["structures"] == json.loads(json.dumps(tracker.view_structures().to_dict()))
    for name in data["metrics"]:
        assert name not in data["unavailable"]
    assert 0.0 <= data["metrics"]["structured_bops"]["compression"] <= 1e-9  # dense model


def test_inspect_text_and_ignore(capsys):
    code, out, _ = run(capsys, "inspect", "torchvision:resnet18", "--input-shape", "1x3x32x32",
                       "--ignore", "fc")
    assert code == 0
    assert out.startswith("Model: torchvision:resnet18 (torchvision.models.resnet.ResNet), input 1x3x32x32")
    assert "fc:prune_out_channels" not in out  # fc's outputs are not units any more
    assert "Metrics:" in out


def test_inspect_factory_and_html_output(capsys, tmp_path):
    target = tmp_path / "inspect.html"
    code, out, _ = run(capsys, "inspect", "models:TinyConvNet", "--input-shape", "1,3,8,8",
                       "--format", "html", "--output", str(target))
    assert code == 0 and out == ""
    tags = check_html(target.read_text())
    assert "svg" in tags and "table" in tags
    assert "conv3:prune_out_channels" in target.read_text()


def test_inspect_dispatches_to_the_timm_source(capsys):
    pytest.importorskip("timm")
    code, out, _ = run(capsys, "plugins", "--format", "json")
    rows = json.loads(out)["plugins"]
    if not any("timm" in r["registers"].get("model source", []) for r in rows):
        pytest.skip("no timm model source installed")
    code, out, err = run(capsys, "inspect", "timm:not_a_timm_model")
    assert code == 2
    assert "not_a_timm_model" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["torchvision:resnet_eighteen"], "no classification model named 'resnet_eighteen'"),
        (["resnet18"], "must look like PREFIX:NAME"),
        (["no_such_package_xyz:factory"], "neither an installed model source"),
        (["models:NoSuchFactory"], "has no attribute 'NoSuchFactory'"),
        (["models:conv_input"], "not a torch.nn.Module"),
        (["torchvision:resnet18", "--input-shape", "1,3,abc"], "--input-shape '1,3,abc'"),
        (["torchvision:resnet18", "--input-shape", "0,3,32,32"], "is not a shape"),
        (["torchvision:resnet18", "--input-shape", "1,1,32,32"], "does not fit torchvision:resnet18"),
        (["torchvision:resnet18", "--input-shape", "1,3,32,32", "--ignore", "fc9"], "--ignore 'fc9'"),
    ],
)
def test_inspect_bad_input_is_a_clear_error(capsys, argv, message):
    code, out, err = run(capsys, "inspect", *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys)[0] == 2
    assert run(capsys, "inspect")[0] == 2
    assert run(capsys, "inspect", "torchvision:resnet18", "--format", "pdf")[0] == 2
    assert run(capsys, "--help")[0] == 0


# --------------------------------------------------------------------------------- demo

SHORT = ["--train-steps", "60", "--steps", "60", "--width", "8", "--no-progress"]


def test_demo_short_run_trains_prunes_and_reports(capsys, tmp_path):
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    html, data_path = tmp_path / "demo.html", tmp_path / "demo.json"
    code, out, _ = run(capsys, "demo", *SHORT, "--strength", "0.1",
                       "--output", str(html), "--json", str(data_path))
    assert code == 0
    data = json.loads(data_path.read_text())
    dense, trained, sparse, pruned = data["stages"]
    # a real data set, split into train and test (oracle: scikit-learn's own count)
    digits = sklearn_datasets.load_digits()
    assert data["config"]["train_images"] + data["config"]["test_images"] == len(digits.images)
    assert data["config"]["test_images"] == pytest.approx(0.25 * len(digits.images), abs=1)
    assert dense["accuracy"] < 0.3 < 0.8 < trained["accuracy"]  # it learned something real
    assert sparse["zero_units"] > 0 and trained["zero_units"] == 0
    assert data["pruned"]["num_units"] == sparse["zero_units"] == sum(data["pruned"]["groups"].values())
    assert pruned["params"] < sparse["params"] == dense["params"] and pruned["zero_units"] == 0
    # removing exactly-zero units changes neither the outputs nor the active cost
    assert pruned["accuracy"] == sparse["accuracy"]
    assert pruned["bops"] == pytest.approx(sparse["bops"], rel=1e-9)
    assert pruned["macs"] == pytest.approx(sparse["macs"], rel=1e-9)
    assert 0 < pruned["compression"] == pytest.approx(sparse["compression"], rel=1e-9)
    assert dense["compression"] == 0.0 and dense["macs"] > pruned["macs"]
    assert all(stage["latency_ms"] > 0 for stage in data["stages"])
    assert sum(data["layers"]["after"]) < sum(data["layers"]["before"])
    assert len(data["history"]["step"]) == 120
    assert set(data["history"]["phase"]) == {"training", "group lasso"}
    tags = check_html(html.read_text())
    assert tags.count("svg") == 6
    assert "CPU latency" in html.read_text() and "test set" in html.read_text()
    assert "stage" in out and "pruned" in out and "test accuracy" in out and " ms " in out
    assert "Test accuracy: " in out and "held-out digits" in out


def test_demo_collapsed_groups_are_kept_and_reported(capsys):
    pytest.importorskip("sklearn")
    code, out, _ = run(capsys, "demo", *SHORT, "--strength", "1.0", "--output", "")
    assert code == 0
    assert "the network has collapsed. Use a lower --strength." in out


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--train-steps", "-1"], ["--lr", "-1"],
                                  ["--strength", "nan"]])
def test_demo_bad_options(capsys, argv):
    code, _, err = run(capsys, "demo", "--no-progress", *argv)
    assert code == 2 and "must be" in err and argv[0] in err


def test_demo_without_scikit_learn_names_the_install_command(capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now fails
    code, out, err = run(capsys, "demo", "--no-progress", "--output", "")
    assert code != 0 and out == ""
    assert "python -m pip install 'weighttracker[demo]'" in err and "scikit-learn" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_demo_script_installs_the_demo_extra():
    """scripts/demo.sh is the documented first command: it must install scikit-learn."""
    script = (Path(__file__).resolve().parents[1] / "scripts" / "demo.sh").read_text()
    assert "-e \".[demo]\"" in script
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert any(req.startswith("scikit-learn") for req in project["optional-dependencies"]["demo"])


def test_demo_unwritable_output(capsys, tmp_path):
    pytest.importorskip("sklearn")
    code, _, err = run(capsys, "demo", "--train-steps", "0", "--steps", "2", "--no-progress",
                       "--output", str(tmp_path / "missing" / "r.html"))
    assert code == 2 and "Cannot write" in err


@pytest.mark.slow
def test_default_demo_end_to_end_through_the_installed_script(tmp_path):
    """The main job with default settings, as a user runs it (about 10-30 s on 2 cores)."""
    pytest.importorskip("sklearn")
    assert SCRIPT.exists(), SCRIPT
    result = subprocess.run([str(SCRIPT), "demo", "--json", "demo.json"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = tmp_path / "weighttracker-demo.html"
    check_html(report.read_text())
    rows = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    trained = next(line for name, line in rows.items() if name.startswith("trained"))
    pruned = next(line for name, line in rows.items() if name.startswith("pruned"))
    compression, accuracy = (float(v) for v in re.findall(r"([\d.]+)%", pruned)[:2])
    trained_accuracy = float(re.findall(r"([\d.]+)%", trained)[1])
    assert compression > 50
    assert accuracy > 95
    assert accuracy >= trained_accuracy - 1.0  # pruning costs at most one point
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["stages"][-1]["params"] < data["stages"][1]["params"] / 2
