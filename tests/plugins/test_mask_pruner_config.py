"""Configs of the ``magnitude`` pruner: dict/YAML round trips, validation, module selection."""

from __future__ import annotations

import io

import pytest
import torch
import yaml
from torch import nn

from weighttracker_core import ConfigError, WeightTracker
from weighttracker_plugins.pruners.magnitude import (
    ConstantSparsityScheduler,
    MagnitudePruner,
    MagnitudePrunerConfig,
    ModuleMagnitudePrunerConfig,
    PolynomialDecayScheduler,
)

FULL = {
    "global_config": {"target_sparsity": 0.6, "scheduler": {"update_steps": "range(0, 10, 5)", "power": 2}},
    "module_type_configs": {"Conv2d": {"granularity": "per_channel", "block_size": 2}, "Linear": None},
    "module_name_configs": {
        "features.1": {"n_m_ratio": [2, 4], "dim": 0},
        "features.0": None,
        "head": {"param_name": "bias", "target_sparsity": 0.25, "scheduler": {"begin_step": 3}},
    },
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.features(x).mean(dim=(2, 3))
        return self.head(self.proj(y))


def test_from_dict_builds_typed_objects():
    config = MagnitudePrunerConfig.from_dict(FULL)
    assert config.global_config.scheduler == PolynomialDecayScheduler([0, 5], power=2)
    assert config.module_type_configs["Linear"] is None
    assert config.module_name_configs["features.1"].n_m_ratio == (2, 4)
    assert config.module_name_configs["head"].scheduler == ConstantSparsityScheduler(3)


def test_as_dict_round_trip_and_yaml_round_trip(tmp_path):
    config = MagnitudePrunerConfig.from_dict(FULL)
    plain = config.as_dict()
    assert MagnitudePrunerConfig.from_dict(plain) == config
    # as_dict is plain data: safe_dump accepts it, and from_yaml (stream and path) gives it back
    text = yaml.safe_dump(plain)
    assert MagnitudePrunerConfig.from_yaml(io.StringIO(text)) == config
    path = tmp_path / "pruning.yaml"
    path.write_text(text)
    assert MagnitudePrunerConfig.from_yaml(str(path)) == config
    assert MagnitudePrunerConfig.from_yaml(path) == config


def test_module_config_round_trip():
    config = ModuleMagnitudePrunerConfig(target_sparsity=0.3, block_size=4, granularity="per_kernel")
    assert ModuleMagnitudePrunerConfig.from_dict(config.as_dict()) == config
    assert ModuleMagnitudePrunerConfig.from_yaml(io.StringIO(yaml.safe_dump(config.as_dict()))) == config
    assert config.as_dict()["scheduler"] == {"type": "constant_sparsity", "begin_step": 0}


def test_class_keys_become_names_in_as_dict():
    config = MagnitudePrunerConfig(module_type_configs={nn.Conv2d: {"target_sparsity": 0.1}})
    assert list(config.as_dict()["module_type_configs"]) == ["torch.nn.modules.conv.Conv2d"]


def test_hand_written_yaml():
    text = """
global_config:
  target_sparsity: 0.75
  scheduler:
    update_steps: range(0, 100, 10)
module_name_configs:
  head: null
"""
    config = MagnitudePrunerConfig.from_yaml(io.StringIO(text))
    assert config.global_config.scheduler.update_steps == tuple(range(0, 100, 10))
    assert config.module_name_configs == {"head": None}


@pytest.mark.parametrize(
    "data,key",
    [
        ({"global_cfg": {}}, "global_cfg"),
        ({"global_config": {"target_sparsity": 0.5, "sparsity": 0.1}}, "sparsity"),
        ({"module_name_configs": {"a": {"blocksize": 2}}}, "blocksize"),
        ({"global_config": {"scheduler": {"update_steps": [1], "exponent": 2}}}, "exponent"),
        ({"global_config": {"scheduler": {"begin": 1}}}, "begin"),
    ],
)
def test_unknown_keys_are_named_with_the_allowed_ones(data, key):
    with pytest.raises(ConfigError, match=f"Unknown key '{key}'.*allowed keys: "):
        MagnitudePrunerConfig.from_dict(data)


@pytest.mark.parametrize(
    "fields,culprit",
    [
        ({"target_sparsity": 1.5}, "target_sparsity=1.5"),
        ({"initial_sparsity": -0.1}, "initial_sparsity=-0.1"),
        ({"target_sparsity": "half"}, "'half'"),
        ({"granularity": "per_row"}, "per_row"),
        ({"block_size": 0}, "block_size=0"),
        ({"n_m_ratio": [3, 2]}, "n_m_ratio"),
        ({"n_m_ratio": [2]}, "n_m_ratio"),
        ({"dim": 2}, "dim=2"),
        ({"n_m_ratio": [2, 4], "block_size": 2}, "block_size=2"),
        ({"n_m_ratio": [2, 4], "granularity": "per_channel"}, "per_channel"),
        ({"n_m_ratio": [2, 4], "initial_sparsity": 0.1}, "initial_sparsity=0.1"),
        ({"param_name": ""}, "param_name"),
    ],
)
def test_bad_values_are_config_errors_naming_the_value(fields, culprit):
    with pytest.raises(ConfigError) as info:
        ModuleMagnitudePrunerConfig.from_dict(fields)
    assert culprit in str(info.value)
    assert isinstance(info.value, ValueError)


def test_default_config_is_global_half_sparsity():
    assert MagnitudePrunerConfig().global_config == ModuleMagnitudePrunerConfig()
    assert MagnitudePrunerConfig.from_dict({}).global_config.target_sparsity == 0.5
    # with only per-name entries there is no global config: other layers are left alone
    assert MagnitudePrunerConfig(module_name_configs={"x": None}).global_config is None


def _pruned(model: nn.Module, config) -> dict[str, str]:
    pruner = MagnitudePruner(model, config)
    pruner.prepare()
    return {name: pruner.module_config(name) for name in pruner.module_names}


def test_precedence_name_over_type_over_global_and_none_skips():
    model = Net()
    chosen = _pruned(model, FULL)
    # features.0: named None -> skipped; features.1: named config beats the Conv2d type config;
    # features.2: Conv2d type config; proj: Linear type None -> skipped; head: named config.
    assert sorted(chosen) == ["features.1", "features.2", "head"]
    assert chosen["features.1"].n_m_ratio == (2, 4)
    assert chosen["features.2"].granularity == "per_channel"
    assert chosen["head"].param_name == "bias"
    assert not hasattr(model.features[0], "weight_mask")
    assert not hasattr(model.proj, "weight_mask")
    assert hasattr(model.head, "bias_mask") and not hasattr(model.head, "weight_mask")


@pytest.mark.parametrize("key", [nn.Linear, "Linear", "torch.nn.Linear", "torch.nn.modules.linear.Linear"])
def test_type_keys_as_class_or_name(key):
    chosen = _pruned(Net(), {"global_config": {"target_sparsity": 0.1}, "module_type_configs": {key: {"target_sparsity": 0.9}}})
    assert chosen["proj"].target_sparsity == 0.9
    assert chosen["features.0"].target_sparsity == 0.1


def test_type_config_reaches_subclasses():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(4, 4), nn.Linear(4, 4))
    chosen = _pruned(model, {"module_type_configs": {nn.Linear: {"target_sparsity": 0.25}}})
    assert sorted(chosen) == ["0", "1"]


def test_global_config_covers_only_linear_and_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.Embedding(5, 4))
    assert sorted(_pruned(model, {})) == ["0", "3"]


def test_multihead_attention_out_proj_is_skipped_and_refused_by_name():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    assert _pruned(model, {}) == {}  # its out_proj weight is read by the parent, not through forward
    with pytest.raises(ConfigError, match="0.out_proj"):
        _pruned(nn.Sequential(nn.MultiheadAttention(8, 2)), {"module_name_configs": {"0.out_proj": {}}})


def test_set_methods_return_updated_copies():
    base = MagnitudePrunerConfig()
    changed = (
        base.set_global({"target_sparsity": 0.2})
        .set_module_type("Linear", None)
        .set_module_name("head", ModuleMagnitudePrunerConfig(target_sparsity=0.9))
    )
    assert base.global_config.target_sparsity == 0.5
    assert changed.global_config.target_sparsity == 0.2
    assert changed.module_type_configs == {"Linear": None}
    assert changed.module_name_configs["head"].target_sparsity == 0.9
    assert changed.set_module_type("Linear", {"target_sparsity": 0.3}).module_type_configs["Linear"].target_sparsity == 0.3


def test_errors_that_need_the_model_leave_it_unchanged():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [
        ({"module_name_configs": {"featurs.1": {}}}, "featurs.1.*Did you mean 'features.1'"),
        ({"module_name_configs": {"head": {"param_name": "gain"}}}, "no parameter 'gain'"),
        # block_size 8 is more than half of features.2's 8 output channels; features.0 is fine before it
        ({"global_config": {"block_size": 4}, "module_name_configs": {"features.2": {"block_size": 8}}},
         "block_size=8.*features.2.*at most half"),
    ]
    for config, message in bad:
        with pytest.raises(ConfigError, match=message):
            MagnitudePruner(model, config).prepare()
        assert list(model.state_dict()) == list(before)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_create_pruner_accepts_dict_object_and_keywords():
    model = Net()
    tracker = WeightTracker(model, torch.randn(1, 3, 12, 12))
    config = MagnitudePrunerConfig(module_name_configs={"proj": {"target_sparsity": 0.25}})
    assert tracker.create_pruner("magnitude", config=config).config is config
    from_dict = tracker.create_pruner("magnitude", config={"module_name_configs": {"proj": {"target_sparsity": 0.25}}})
    assert from_dict.config == config
    keywords = tracker.create_pruner("magnitude", module_name_configs={"proj": {"target_sparsity": 0.25}})
    assert keywords.config == config
    with pytest.raises(ConfigError, match="target_sparsity=2.0"):
        tracker.create_pruner("magnitude", config={"global_config": {"target_sparsity": 2.0}})
    with pytest.raises(ConfigError, match="Unknown key 'globl_config'"):
        tracker.create_pruner("magnitude", config={"globl_config": {}})
