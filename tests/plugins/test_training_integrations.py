"""TensorBoard logging and the Lightning callback, against the real libraries.

Oracles: TensorBoard's own event reader on the files written, a per-unit brute-force norm,
and a plain PyTorch loop doing by hand what the callback does inside ``Trainer.fit``.
Skipped when tensorboard / lightning are not installed (they are in the test extras).
"""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from _unit_oracle import unit_elements
from models import TinyConvNet
from torch import nn

from weighttracker_core import ConfigError, WeightTracker


def images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(5, (n,), generator=g)


# -------------------------------------------------------------------------- TensorBoard


def test_tensorboard_event_files_parse_back_with_the_expected_tags(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator

    from weighttracker_plugins.training.tensorboard import TensorBoardLogger

    torch.manual_seed(0)
    model = TinyConvNet()
    tracker = WeightTracker(model, images()[0][:1])
    tracker.create_tracker(["structured_bops", "group_pruning_summary"])
    written = {}
    with TensorBoardLogger(tracker, log_dir=str(tmp_path)) as logger:
        written[0] = logger.log(0)
        tracker.fake_prune_unit(0, 1)
        written[5] = logger.log(5)
    events = event_accumulator.EventAccumulator(
        str(tmp_path), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0})
    events.Reload()
    tags = events.Tags()
    assert "weighttracker/structured_bops/compression" in tags["scalars"]
    assert "weighttracker/group_pruning_summary/pruned_units" in tags["scalars"]
    assert set(tags["scalars"]) == set(written[0])
    for tag in tags["scalars"]:
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(0, pytest.approx(written[0][tag])), (5, pytest.approx(written[5][tag]))]
    assert [e.value for e in events.Scalars("weighttracker/group_pruning_summary/pruned_units")] == [0, 1]
    assert sorted(tags["histograms"]) == sorted(f"weighttracker/unit_l2_norm/{g.name}" for g in tracker.groups)
    elements = unit_elements(model, tracker.groups)  # brute force, after the fake prune
    for group in tracker.groups:
        last = events.Histograms(f"weighttracker/unit_l2_norm/{group.name}")[-1]
        norms = [float(elements[group.offset + u].norm()) for u in range(group.n_units)]
        assert last.step == 5
        assert last.histogram_value.num == group.n_units
        assert last.histogram_value.sum == pytest.approx(sum(norms), rel=1e-5)
        assert last.histogram_value.min == pytest.approx(min(norms), abs=1e-6)
    assert min(float(elements[u].norm()) for u in range(tracker.groups[0].n_units)) == 0.0


def test_tensorboard_logger_takes_any_writer_and_checks_its_input():
    from weighttracker_plugins.training.tensorboard import TensorBoardLogger, scalar_metrics

    class Recorder:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append(("scalar", tag, value, step))

        def add_histogram(self, tag, values, step):
            self.calls.append(("histogram", tag, len(values), step))

    tracker = WeightTracker(TinyConvNet(), images()[0][:1])
    writer = Recorder()
    logger = TensorBoardLogger(tracker, writer, histograms=False, prefix="wt")
    assert logger.log(3, {"a": {"b": 1, "c": [1, 2], "d": float("nan")}, "e": True}) == {"wt/a/b": 1.0, "wt/e": 1.0}
    assert writer.calls == [("scalar", "wt/a/b", 1.0, 3), ("scalar", "wt/e", 1.0, 3)]
    assert scalar_metrics({"x": {"y": torch.tensor(2.5)}}) == {"weighttracker/x/y": 2.5}
    with pytest.raises(ConfigError, match="writer must have add_scalar and add_histogram.*got object"):
        TensorBoardLogger(tracker, object())
    with pytest.raises(ConfigError, match="step must be an int .* got 1.5"):
        logger.log(1.5)


def test_the_core_and_the_training_package_import_without_tensorboard_or_lightning():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorboard', 'lightning', 'pytorch_lightning'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import weighttracker_core, weighttracker_plugins.training\n"
        "from weighttracker_plugins.training.tensorboard import TensorBoardLogger\n"
        "from weighttracker_core import WeightTracker, MissingDependencyError\n"
        "import torch, torch.nn as nn\n"
        "tracker = WeightTracker(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), torch.zeros(1, 3))\n"
        "try:\n"
        "    TensorBoardLogger(tracker, log_dir='x')\n"
        "except MissingDependencyError as err:\n"
        "    print('TB', err)\n"
        "try:\n"
        "    import weighttracker_plugins.training.lightning\n"
        "except MissingDependencyError as err:\n"
        "    print('PL', err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "TB TensorBoardLogger needs the tensorboard package" in result.stdout
    assert "python -m pip install tensorboard" in result.stdout
    assert "PL weighttracker_plugins.training.lightning needs Lightning: python -m pip install lightning" in result.stdout


# ---------------------------------------------------------------------------- Lightning


def small_convnet():
    """TinyConvNet with a few weak channels, which a mild group lasso zeroes first."""
    model = TinyConvNet()
    with torch.no_grad():
        for conv, weak in ((model.conv1, 3), (model.conv3, 5)):
            conv.weight[:weak] *= 0.05
            conv.bias[:weak] *= 0.05
    return model


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


def _module_class(pl):
    class Classifier(pl.LightningModule):
        def __init__(self, lr):
            super().__init__()
            self.model = small_convnet()
            self.lr = lr

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    return Classifier


def _fit(pl, tmp_path, make_callback, steps, lr):
    torch.manual_seed(0)
    module = _module_class(pl)(lr)
    callback = make_callback(module)
    x, y = images(4 * steps)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(max_steps=steps, logger=logger, callbacks=[callback], accelerator="cpu", devices=1,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, loader)
    return module, trainer, callback


def _by_hand(steps, lr, after_step=None, extra_loss=None):
    """What the callback should amount to, as a plain loop on an identical model."""
    torch.manual_seed(0)
    model = small_convnet()
    tracker = WeightTracker(model, images()[0][:1], ignored_layers=[model.fc])
    lasso = tracker.create_regularizer("group_lasso")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = images(4 * steps)
    for step in range(steps):
        xb, yb = x[4 * step: 4 * step + 4], y[4 * step: 4 * step + 4]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        if extra_loss is not None:
            loss = loss + extra_loss(lasso)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(lasso)
    return model, tracker


def _logged(trainer):
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_lightning_callback_proximal_step_matches_a_plain_loop_and_logs(tmp_path):
    pl = _lightning()
    from weighttracker_plugins.training.lightning import WeightTrackerCallback

    steps, lr, strength = 6, 0.5, 0.04
    def make(module):  # the classifier's outputs are the classes: not units
        return WeightTrackerCallback(images()[0][:1], module="model", strength=strength,
                                     tracker_options={"ignored_layers": [module.model.fc]},
                                     trackers=["structured_bops"], track_every_n_steps=2)

    module, trainer, callback = _fit(pl, tmp_path, make, steps, lr)
    expected, by_hand_tracker = _by_hand(steps, lr, after_step=lambda lasso: lasso.proximal_step_(lr=lr, strength=strength))
    for (name, got), want in zip(module.model.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    zero = sum(len(u) for u in by_hand_tracker.zero_units().values())
    assert zero > 0  # the proximal step made units exactly zero

    rows = _logged(trainer)
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    last = rows[-1]
    assert float(last["weighttracker/zero_units"]) == zero
    compression = by_hand_tracker.create_tracker("structured_bops").track()["structured_bops"]["compression"]
    assert float(last["weighttracker/structured_bops/compression"]) == pytest.approx(compression, rel=1e-5)
    with torch.no_grad():
        penalty = float(by_hand_tracker.create_regularizer("group_lasso")())
    assert float(last["weighttracker/group_lasso"]) == pytest.approx(penalty, rel=1e-4)
    # the tracker is the user's afterwards: prune what became zero
    report = callback.tracker.prune_zero_units()
    assert report.num_units == zero


@pytest.mark.slow
def test_lightning_callback_loss_mode_trains_on_loss_plus_penalty(tmp_path):
    pl = _lightning()
    from weighttracker_plugins.training.lightning import WeightTrackerCallback

    steps, lr, strength = 4, 0.1, 0.05
    def make(module):
        return WeightTrackerCallback(images()[0][:1], module="model", strength=strength, mode="loss",
                                     tracker_options={"ignored_layers": [module.model.fc]},
                                     trackers=(), track_every_n_steps=0)

    module, trainer, _ = _fit(pl, tmp_path, make, steps, lr)
    expected, _ = _by_hand(steps, lr, extra_loss=lambda lasso: strength * lasso())
    untouched, _ = _by_hand(steps, lr)
    for (name, got), want, plain in zip(module.model.state_dict().items(),
                                        expected.state_dict().values(), untouched.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.allclose(a, b) for a, b in zip(expected.parameters(), untouched.parameters()))


def test_lightning_callback_checks_its_options():
    _lightning()
    from weighttracker_plugins.training.lightning import WeightTrackerCallback

    with pytest.raises(ConfigError, match="needs example_inputs .* or tracker="):
        WeightTrackerCallback()
    with pytest.raises(ConfigError, match=r"mode must be one of \('proximal', 'loss'\), got 'prox'"):
        WeightTrackerCallback(torch.zeros(1), mode="prox")
    with pytest.raises(ConfigError, match="strength must be a finite number >= 0 .* got -1"):
        WeightTrackerCallback(torch.zeros(1), strength=-1)
    with pytest.raises(ConfigError, match="track_every_n_steps must be an int >= 0, got 2.5"):
        WeightTrackerCallback(torch.zeros(1), track_every_n_steps=2.5)
