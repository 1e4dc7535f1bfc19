"""The Hugging Face ``Trainer`` callback, with the real Trainer on a tiny Llama and synthetic
tokens: the proximal step makes units exactly zero, the loss mode adds the penalty's
gradient, and the metrics land in the Trainer's logs every N steps.

Oracles: a hand-computed block soft-threshold of one unit; the penalty's gradient computed
separately; ``trainer.state.log_history``; the reloaded pruned model's logits.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _hf_models import logits, make  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from weighttracker_core import ConfigError, WeightTracker  # noqa: E402
from weighttracker_transformers import prune_zero_units_uniformly  # noqa: E402
from weighttracker_transformers.trainer import WeightTrackerCallback  # noqa: E402

KEY = "weighttracker/structured_bops/compression"


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=10, vocab=96):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, steps, **kw):
    return TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1000, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0, **kw)


class Seen(TrainerCallback):
    """Records the keys of every log call (a stand-in for a reporting integration)."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _weaken(model, layer, channels):
    """Scale MLP channels down 100x: the penalty should zero exactly these."""
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        mlp.up_proj.weight[channels] *= 1e-2
        mlp.gate_proj.weight[channels] *= 1e-2
        mlp.down_proj.weight[:, channels] *= 1e-2


def test_proximal_training_logs_every_n_steps_and_the_zero_units_prune_and_reload(tmp_path):
    family, model, x = make("llama")
    _weaken(model, 0, list(range(0, 64, 4)))  # 16 weak channels in layer 0, 8 in layer 1
    _weaken(model, 1, list(range(1, 64, 8)))
    callback = WeightTrackerCallback(strength=0.05, mode="proximal", track_every_n_steps=2,
                                     trackers=["structured_bops", "group_pruning_summary"])
    reporter = Seen()
    trainer = Trainer(model=model, args=_args(tmp_path, 6, optim="sgd"), train_dataset=Tokens(),
                      callbacks=[reporter])
    callback.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if KEY in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6]
    assert [KEY in entry for entry in reporter.logs[:3]] == [True, True, True]  # reporters see them
    assert logged[-1]["weighttracker/zero_units"] == 24
    zero = {callback.tracker.groups[g].name: u for g, u in callback.tracker.zero_units().items()}
    assert zero == {"model.layers.0.mlp.up_proj:prune_out_channels": list(range(0, 64, 4)),
                    "model.layers.1.mlp.up_proj:prune_out_channels": list(range(1, 64, 8))}
    assert logged[-1]["weighttracker/group_pruning_summary/pruned_units"] == logged[-1]["weighttracker/zero_units"]
    assert logged[-1]["weighttracker/group_lasso"] < logged[0]["weighttracker/group_lasso"]
    tracker = callback.tracker
    assert tracker.model is model and tracker.example_inputs.shape == (1, 10)  # the first example
    model.eval()
    before = logits(model, x)
    prune_zero_units_uniformly(tracker)
    assert model.config.intermediate_size == 64 - 8
    torch.testing.assert_close(logits(model, x), before, rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path / "pruned")
    reloaded = family.reload.from_pretrained(tmp_path / "pruned").eval()
    torch.testing.assert_close(logits(reloaded, x), before, rtol=1e-5, atol=1e-6)


def test_proximal_step_runs_after_the_optimizer_step_with_its_learning_rate(tmp_path):
    """The callback's shrink equals the regularizer's own proximal step (tested against the
    block soft-threshold formula in the plugin's tests) with lr 1e-2 and strength 0.5,
    applied to the weights right after the optimizer step."""
    family, model, x = make("llama")
    callback = WeightTrackerCallback(x[:1], strength=0.5, track_every_n_steps=0)
    trainer = Trainer(model=model, args=_args(tmp_path, 1, lr_scheduler_type="constant"),
                      train_dataset=Tokens(), callbacks=[callback])
    seen = {}

    class Capture(TrainerCallback):  # runs before the callback's on_optimizer_step
        def on_optimizer_step(self, args, state, control, **kwargs):
            seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    trainer.callback_handler.callbacks.insert(0, Capture())
    trainer.train()
    reference = copy.deepcopy(model)
    reference.load_state_dict(seen["state"])
    factors = WeightTracker(reference, x[:1]).create_regularizer("group_lasso").proximal_step_(
        lr=1e-2, strength=0.5)
    assert 0 < float(factors.min()) < 1  # every unit shrank, none vanished
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)


def test_loss_mode_adds_the_penalty_gradient_before_the_step(tmp_path):
    family, model, x = make("llama")
    callback = WeightTrackerCallback(x[:1], strength=0.25, mode="loss", track_every_n_steps=0)
    grads = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads["before"] = model.model.layers[1].mlp.up_proj.weight.grad.detach().clone()

    class After(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads["after"] = model.model.layers[1].mlp.up_proj.weight.grad.detach().clone()

    trainer = Trainer(model=model, args=_args(tmp_path, 1, max_grad_norm=0.0), train_dataset=Tokens(),
                      callbacks=[Capture(), callback, After()])
    # the penalty's gradient on the dense weights, computed apart from the Trainer
    lasso = WeightTrackerCallback(x[:1])
    lasso.on_train_begin(None, None, None, model=model)
    model.zero_grad()
    (0.25 * lasso.regularizer()).backward()
    expected = model.model.layers[1].mlp.up_proj.weight.grad.detach().clone()
    model.zero_grad()
    trainer.train()
    torch.testing.assert_close(grads["after"] - grads["before"], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "sometimes"}, "mode must be one of"),
    ({"strength": -1.0}, "strength must be a finite number >= 0"),
    ({"track_every_n_steps": 1.5}, "track_every_n_steps must be an int >= 0"),
    ({"tracker": "mine"}, "tracker must be a WeightTracker"),
])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        WeightTrackerCallback(**kwargs)


def test_a_dataset_without_the_main_input_asks_for_example_inputs(tmp_path):
    family, model, x = make("llama")

    class Other(Tokens):
        def __getitem__(self, i):
            return {"inputs_embeds": torch.zeros(10, 48), "labels": self.ids[i]}

    callback = WeightTrackerCallback(track_every_n_steps=0)
    trainer = Trainer(model=model, args=_args(tmp_path, 1), train_dataset=Other(), callbacks=[callback])
    with pytest.raises(ConfigError, match="pass example_inputs="):
        trainer.train()
    # following it
    callback = WeightTrackerCallback(x[:1], track_every_n_steps=0, regularizer=None, trackers=())
    callback.on_train_begin(None, None, None, model=model)
    assert callback.tracker is not None
