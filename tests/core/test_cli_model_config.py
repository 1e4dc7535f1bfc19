"""``weighttracker inspect --config``: settings reach a model source that accepts them, and
its own example input is used; everything else is refused with advice that works."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from weighttracker_core import ConfigError, create_plugin_manager
from weighttracker_core.plugin import ModelSourceSpec, hookimpl
from weighttracker_core.cli import inspect_cmd, main
from weighttracker_core.cli.models import parse_config
from weighttracker_core.registry import build_registries


class TokenNet(nn.Module):
    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(vocab, 4), nn.Linear(4, width)
        self.out = nn.Linear(width, 3)

    def forward(self, ids):
        return self.out(torch.relu(self.fc(self.embed(ids))))


SEEN = {}


def _load(name, config=None):
    SEEN["config"] = config
    config = config or {}
    return TokenNet(int(config.get("vocab", 10)), int(config.get("width", 4)))


def _ids(model, shape):
    SEEN["shape"] = shape
    return torch.zeros(shape or (1, 5), dtype=torch.long)


class Sources:
    @hookimpl
    def wt_register_model_sources(self):
        return (
            ModelSourceSpec(prefix="tok", load=_load, accepts_config=True, example_input=_ids),
            ModelSourceSpec(prefix="plain", load=lambda name: nn.Linear(3, 2), default_input_shape=(1, 3)),
        )


@pytest.fixture
def cli(monkeypatch, capsys):
    import weighttracker_plugins.unit_rules.embedding as emb
    import weighttracker_plugins.unit_rules.linear as lin
    import weighttracker_plugins.calculations.structure as calc

    pm = create_plugin_manager(Sources(), lin, emb, calc, entry_points=False, use_env=False)
    monkeypatch.setattr(inspect_cmd, "registries", lambda: (pm, build_registries(pm)))
    SEEN.clear()

    def run(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_config_and_example_input_come_from_the_source(cli):
    code, out, _ = cli("inspect", "tok:net", "--config", "width=6,vocab=12", "--config", "x=1",
                       "--format", "json")
    assert code == 0
    assert SEEN == {"config": {"width": "6", "vocab": "12", "x": "1"}, "shape": None}
    data = json.loads(out)
    assert data["input_shape"] == [1, 5]
    assert [g["n_units"] for g in data["structures"]["groups"]] == [6]
    code, out, _ = cli("inspect", "tok:net", "--input-shape", "2,7", "--format", "json")
    assert code == 0 and SEEN["shape"] == (2, 7) and json.loads(out)["input_shape"] == [2, 7]
    assert SEEN["config"] is None  # no --config: load(name) as before


def test_config_for_a_source_that_takes_none_is_refused_and_the_advice_works(cli):
    code, _, err = cli("inspect", "plain:x", "--config", "width=6")
    assert code != 0 and "does not take a config" in err and "tok:NAME" in err
    assert "Drop --config" in err
    assert cli("inspect", "plain:x")[0] == 0  # following it


@pytest.mark.parametrize("text", ["width", "=3", "width=", "a-b=1"])
def test_malformed_config_is_named(text):
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_config([text])


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match="sets 'a' twice"):
        parse_config(["a=1", "a=2"])
    assert parse_config(["a=1, b=x,"]) == {"a": "1", "b": "x"}
