"""Bad input and faults (issue 12): pruner configs, the proximal step, plugin blocking, the CLI.

One test per case. Each asserts the error type, that the message names the bad value, and
that nothing was changed: model parameters, buffers, hooks and attributes are compared
bit for bit (NaN-aware) with a snapshot taken before the call, and ``torch.save`` still
works. Positive controls (marked so) check that the guards refuse only what they should.
"""

from __future__ import annotations

import copy
import io
import math
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from models import TinyConvNet, conv_input
from weighttracker_core import ConfigError, WeightTracker, WeightTrackerError
from weighttracker_core.cli import main
from weighttracker_core.manager import create_plugin_manager
from weighttracker_plugins.pruners import _config_io
from weighttracker_plugins.pruners.magnitude.config import MagnitudePrunerConfig, ModuleMagnitudePrunerConfig
from weighttracker_plugins.pruners.ranked.config import RankedPrunerConfig

# ------------------------------------------------------------------------------ helpers

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _bits(tensor):
    """The exact contents of a tensor (NaN == NaN), with dtype, shape and device."""
    data = tensor.detach().cpu().contiguous().reshape(-1)
    return (str(data.dtype), tuple(data.shape), str(tensor.device), bytes(data.view(torch.uint8).numpy()))


def snapshot(model):
    """Everything a failed call must leave as it was."""
    state = {}
    for name, module in model.named_modules():
        state[name] = {
            "class": type(module),
            "attributes": sorted(k for k in vars(module) if not k.startswith("_")),
            "params": {k: (id(p), p.requires_grad, _bits(p)) for k, p in module._parameters.items()
                       if p is not None},
            "buffers": {k: (id(b), _bits(b)) for k, b in module._buffers.items() if b is not None},
            "hooks": {d: list(getattr(module, d, {}).items()) for d in _HOOK_DICTS},
        }
    return state


def assert_unchanged(model, before):
    assert snapshot(model) == before
    torch.save(model, io.BytesIO())


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_user_error(code, out, err, *named):
    assert code == 2, err
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert "Traceback" not in err and ": error: " in err
    for part in named:
        assert part in err, (part, err)


def nested_alias_yaml(levels: int) -> str:
    """``update_steps`` holding ``9 ** levels`` numbers in a few hundred bytes of aliases."""
    node = "&a0 [1,2,3,4,5,6,7,8,9]"
    for i in range(1, levels):
        node = f"&a{i} [{node}" + f",*a{i - 1}" * 8 + "]"
    return f"global_config:\n  scheduler:\n    update_steps: [{node}]\n"


# ---------------------------------------------------------------- pruner configs (YAML)


def test_yaml_alias_bomb_is_refused_before_anything_is_built(monkeypatch):
    doc = nested_alias_yaml(8)  # 9**8 = 43 million numbers; the old reader quoted them all
    assert len(doc) < 400
    built = []
    original = yaml.SafeLoader.construct_document
    monkeypatch.setattr(yaml.SafeLoader, "construct_document",
                        lambda self, node: built.append(node) or original(self, node))
    for config in (MagnitudePrunerConfig, ModuleMagnitudePrunerConfig, RankedPrunerConfig):
        with pytest.raises(ConfigError) as info:
            config.from_yaml(io.StringIO(doc))
        message = str(info.value)
        assert "aliases" in message and f"{_config_io.MAX_YAML_NODES:,}" in message
        assert len(message) < 1000
    assert built == []  # refused on the node graph, no Python object was made


def test_yaml_alias_bomb_from_a_file_path(tmp_path):
    # (more levels would be refused just as fast; the reader before this check needed
    # gigabytes for 9 levels, so the battery stays at 8 to fail gently on such code)
    path = tmp_path / "bomb.yaml"
    path.write_text(nested_alias_yaml(8))
    with pytest.raises(ConfigError, match="expands to more than 100,000 nodes"):
        MagnitudePrunerConfig.from_yaml(str(path))


def test_yaml_alias_that_contains_itself_is_refused():
    with pytest.raises(ConfigError, match=r"alias to itself .*line 2"):
        MagnitudePrunerConfig.from_yaml(io.StringIO("global_config:\n  scheduler: &s {update_steps: *s}\n"))


def test_control_modest_aliases_still_work():
    # oracle: the same document written out without aliases
    with_aliases = textwrap.dedent("""
        module_name_configs:
          a: &dense {target_sparsity: 0.3, scheduler: {update_steps: [0, 5, 10], power: 2}}
          b: *dense
          c: *dense
    """)
    expanded = {"module_name_configs": {k: {"target_sparsity": 0.3,
                                            "scheduler": {"update_steps": [0, 5, 10], "power": 2}}
                                        for k in "abc"}}
    assert MagnitudePrunerConfig.from_yaml(io.StringIO(with_aliases)) == MagnitudePrunerConfig.from_dict(expanded)
    # a document without aliases is not limited by the node count
    plain = "module_name_configs:\n" + "".join(f"  m{i}: {{target_sparsity: 0.5}}\n" for i in range(40_000))
    assert len(MagnitudePrunerConfig.from_yaml(plain).module_name_configs) == 40_000


def test_error_messages_quote_huge_values_shortened():
    steps = [1, 2, 3]
    for _ in range(6):
        steps = [steps] * 9  # shared references: tiny in memory, 9**6 * 3 numbers as text
    with pytest.raises(ConfigError) as info:
        ModuleMagnitudePrunerConfig.from_dict({"scheduler": {"update_steps": steps}})
    message = str(info.value)
    assert "update_steps" in message and "[[[" in message and "..." in message
    assert len(message) < 500
    with pytest.raises(ValueError) as info:
        RankedPrunerConfig(pruning_ratio=[0.5] * 1_000_000)
    assert "pruning_ratio" in str(info.value) and "[0.5, 0.5" in str(info.value)
    assert len(str(info.value)) < 500
    with pytest.raises(ConfigError) as info:
        MagnitudePrunerConfig.from_dict({"x" * 100_000: None})
    assert "Unknown key 'xxxx" in str(info.value) and len(str(info.value)) < 500


def test_update_steps_range_string_is_bounded():
    with pytest.raises(ConfigError, match=r"range\(0, 1000000000000\).*1,000,000,000,000 steps"):
        ModuleMagnitudePrunerConfig.from_dict({"scheduler": {"update_steps": "range(0, 1000000000000)"}})
    # the advice: a larger range step
    config = ModuleMagnitudePrunerConfig.from_dict(
        {"scheduler": {"update_steps": "range(0, 1000000000000, 1000000)"}})
    assert len(config.scheduler.update_steps) == 1_000_000


@pytest.mark.parametrize("config", [MagnitudePrunerConfig, ModuleMagnitudePrunerConfig, RankedPrunerConfig])
@pytest.mark.parametrize("source", ["missing.yaml", "C:/configs/missing.yaml", "configs/run:1.yaml",
                                    "missing.yaml\n", Path("missing.yaml")])
def test_from_yaml_missing_file_says_it_does_not_exist(config, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        config.from_yaml(source)
    message = str(info.value)
    assert "does not exist" in message and str(source).strip() in message
    assert str(tmp_path) in message  # where relative paths are looked up


def test_from_yaml_name_too_long_for_the_file_system():
    with pytest.raises(ConfigError) as info:
        MagnitudePrunerConfig.from_yaml("c" * 5000 + ".yaml")
    assert "'ccc" in str(info.value) and len(str(info.value)) < 500


def test_from_yaml_one_line_neither_file_nor_yaml():
    with pytest.raises(ConfigError) as info:
        MagnitudePrunerConfig.from_yaml("global_config: [")
    message = str(info.value)
    assert "'global_config: ['" in message and "neither an existing file" in message
    assert "not valid YAML" not in message or "line 1" in message


def test_from_yaml_syntax_error_is_a_config_error():
    with pytest.raises(ConfigError, match=r"not valid YAML.*line 2"):
        MagnitudePrunerConfig.from_yaml("global_config:\n  target_sparsity: [0.5\n")


def test_control_from_yaml_reads_files_streams_and_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("global_config: {target_sparsity: 0.25}\n")
    expected = MagnitudePrunerConfig.from_dict({"global_config": {"target_sparsity": 0.25}})
    assert MagnitudePrunerConfig.from_yaml(path) == expected
    assert MagnitudePrunerConfig.from_yaml(str(path)) == expected
    assert MagnitudePrunerConfig.from_yaml(path.open()) == expected
    assert MagnitudePrunerConfig.from_yaml("global_config: {target_sparsity: 0.25}") == expected


# ---------------------------------------------------------- pruner configs (type keys)


@pytest.mark.parametrize("key, suggestion", [("Conv2D", "'Conv2d'"), ("linear", "'Linear'"),
                                             ("torch.nn.conv2d", "'torch.nn.Conv2d'")])
def test_type_key_differing_in_case_is_refused_when_built(key, suggestion):
    with pytest.raises(ConfigError) as info:
        MagnitudePrunerConfig.from_dict({"module_type_configs": {key: {"target_sparsity": 0.9}}})
    message = str(info.value)
    assert repr(key) in message and f"Did you mean {suggestion}" in message
    with pytest.raises(ConfigError, match=repr(key)):
        MagnitudePrunerConfig().set_module_type(key, None)


def test_type_key_naming_no_class_is_refused_at_prepare():
    model = TinyConvNet()
    tracker = WeightTracker(model, conv_input())
    config = MagnitudePrunerConfig.from_dict({"module_type_configs": {"Conv2dd": {"target_sparsity": 0.9}}})
    pruner = tracker.create_pruner("magnitude", config=config)
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        pruner.prepare()
    message = str(info.value)
    assert "'Conv2dd'" in message and "'Conv2d'" in message and "match no layer" in message
    assert_unchanged(model, before)
    # following the advice: the class's own name works and masks the convolutions
    fixed = tracker.create_pruner("magnitude", config={"module_type_configs": {"Conv2d": {"target_sparsity": 0.5}},
                                                       "global_config": None})
    fixed.prepare()
    assert set(fixed.module_names) == {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_control_type_key_of_a_class_defined_after_the_config():
    config = MagnitudePrunerConfig.from_dict({"module_type_configs": {"GatedLinearForBattery": None}})

    class GatedLinearForBattery(nn.Linear):
        pass

    assert config.lookup("g", GatedLinearForBattery(2, 2)) == ("type", None)
    assert config.lookup("l", nn.Linear(2, 2))[0] == "global"


# -------------------------------------------------------------------- the proximal step


def _conv_lasso():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    tracker = WeightTracker(model, torch.randn(1, 3, 8, 8), ignored_layers=[model[3]])
    return model, tracker.create_regularizer("group_lasso")


@pytest.mark.parametrize("value, what", [(float("nan"), "1 NaN"), (float("inf"), "1 infinite"),
                                         (-float("inf"), "1 infinite")])
def test_proximal_step_refuses_non_finite_weights(value, what):
    model, lasso = _conv_lasso()
    with torch.no_grad():
        model[0].weight[2, 1, 0, 0] = value
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        lasso.proximal_step_(lr=0.1, strength=0.05)
    message = str(info.value)
    assert "'0.weight'" in message and what in message and "(2, 1, 0, 0)" in message
    assert "Nothing was changed" in message
    assert_unchanged(model, before)
    # following the advice (replace the value) lets the step run
    with torch.no_grad():
        model[0].weight[2, 1, 0, 0] = 0.1
    factors = lasso.proximal_step_(lr=0.1, strength=0.05)
    assert bool(torch.isfinite(factors).all())


def test_proximal_step_names_every_non_finite_parameter_under_torch_prune():
    model, lasso = _conv_lasso()
    torch.nn.utils.prune.l1_unstructured(model[3], "weight", amount=0.5)
    with torch.no_grad():
        model[3].weight_orig[0, 0, 0, 0] = float("nan")
        model[1].bias[3] = float("inf")
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        lasso.proximal_step_(lr=0.1, strength=0.05)
    assert "'3.weight' has 1 NaN" in str(info.value) and "'1.bias' has 1 infinite" in str(info.value)
    assert_unchanged(model, before)


def test_control_huge_finite_weights_are_not_refused():
    model, lasso = _conv_lasso()
    with torch.no_grad():
        model[0].weight.fill_(3e38)  # the sum overflows to inf; every value is finite
    lasso.proximal_step_(lr=0.1, strength=0.05)
    assert bool(torch.isfinite(model[0].weight).all())


def test_proximal_step_leaves_frozen_parameters_alone():
    model, lasso = _conv_lasso()
    reference, reference_lasso = _conv_lasso()  # the same weights, nothing frozen
    for net in (model, reference):
        with torch.no_grad():  # a weak unit 5, which the step sets to zero
            for tensor in (net[0].weight[5], net[0].bias[5:6], net[1].weight[5:6], net[1].bias[5:6],
                           net[3].weight[:, 5]):
                tensor.mul_(0.01)
    model[0].weight.requires_grad_(False)
    model[1].requires_grad_(False)
    frozen = {k: _bits(v) for k, v in model.state_dict().items() if k.startswith(("0.weight", "1."))}
    factors = lasso.proximal_step_(lr=0.5, strength=0.2)
    reference_factors = reference_lasso.proximal_step_(lr=0.5, strength=0.2)
    assert bool((factors < 1).all()) and factors[5] == 0  # the step did bite
    assert {k: _bits(v) for k, v in model.state_dict().items() if k in frozen} == frozen
    # the trainable parameters got the factors the unfrozen model got (oracle: that model)
    torch.testing.assert_close(factors, reference_factors)
    for name in ("0.bias", "3.weight", "3.bias"):
        torch.testing.assert_close(model.state_dict()[name], reference.state_dict()[name])
    # unit 5 is zero in its trainable parts only
    assert not model[0].bias[5] and not model[3].weight[:, 5].any() and model[0].weight[5].any()


# --------------------------------------------------------------------- plugin blocking


def test_typo_in_disable_plugins_warns_with_the_installed_names(monkeypatch):
    monkeypatch.setenv("WEIGHTTRACKER_DISABLE_PLUGINS", "nvidia_24_sparsity, group_lasso")
    with pytest.warns(UserWarning) as caught:
        pm = create_plugin_manager()
    message = str(caught[0].message)
    assert "'nvidia_24_sparsity' (did you mean 'nvidia_2_4_sparsity'?)" in message
    assert "WEIGHTTRACKER_DISABLE_PLUGINS" in message and "unstructured_bops" in message
    assert "'group_lasso'" not in message.split("Installed")[0]  # the valid name is not flagged
    assert pm.is_blocked("group_lasso") and "nvidia_2_4_sparsity" in pm.registered_names()


def test_control_valid_disable_plugins_names_do_not_warn(monkeypatch):
    monkeypatch.setenv("WEIGHTTRACKER_DISABLE_PLUGINS", "group_lasso")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm = create_plugin_manager()
    assert pm.is_blocked("group_lasso")


# ------------------------------------------------------------------------------ the CLI


def _module(tmp_path, monkeypatch, name, source):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_cli_module_that_raises_on_import(capsys, tmp_path, monkeypatch):
    name = _module(tmp_path, monkeypatch, "wt_battery_raises", """
        import torch
        raise RuntimeError("no GPU here")
    """)
    code, out, err = run_cli(capsys, "inspect", f"{name}:build")
    assert_one_line_user_error(code, out, err, f"importing {name!r}", "RuntimeError: no GPU here",
                               f"{name}.py:3")


def test_cli_module_that_exits_on_import(capsys, tmp_path, monkeypatch):
    name = _module(tmp_path, monkeypatch, "wt_battery_exits", """
        import sys
        sys.exit(3)
    """)
    code, out, err = run_cli(capsys, "inspect", f"{name}:build")
    assert_one_line_user_error(code, out, err, f"importing {name!r}", "SystemExit: 3", "__main__")


def test_cli_module_with_a_syntax_error(capsys, tmp_path, monkeypatch):
    name = _module(tmp_path, monkeypatch, "wt_battery_syntax", "def build(:\n    pass\n")
    code, out, err = run_cli(capsys, "inspect", f"{name}:build")
    assert_one_line_user_error(code, out, err, "SyntaxError", f"{name}.py:1")


def test_cli_module_whose_dependency_is_missing(capsys, tmp_path, monkeypatch):
    name = _module(tmp_path, monkeypatch, "wt_battery_dep", "import wt_no_such_dependency_xyz\n")
    code, out, err = run_cli(capsys, "inspect", f"{name}:build")
    assert_one_line_user_error(code, out, err, f"importing {name!r}", "'wt_no_such_dependency_xyz'")
    assert "neither an installed model source" not in err  # the module itself was found


def test_cli_factory_that_exits(capsys, tmp_path, monkeypatch):
    name = _module(tmp_path, monkeypatch, "wt_battery_factory_exits", """
        import sys
        def build():
            sys.exit("cannot build")
    """)
    code, out, err = run_cli(capsys, "inspect", f"{name}:build")
    assert_one_line_user_error(code, out, err, "calling build()", "SystemExit: cannot build")


def test_cli_huge_input_shape_is_refused_before_allocating(capsys, monkeypatch):
    allocated = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: allocated.append(a) or real(*a, **k))
    code, out, err = run_cli(capsys, "inspect", "models:TinyConvNet", "--input-shape", "1,3,100000,100000")
    assert_one_line_user_error(code, out, err, "--input-shape 1,3,100000,100000", "30,000,000,000 elements",
                               "16,777,216")
    assert not any(math.prod(a[0]) > 2**24 for a in allocated if a and isinstance(a[0], tuple))
    # the advice: a small shape the model accepts
    code, out, err = run_cli(capsys, "inspect", "models:TinyConvNet", "--input-shape", "1,3,8,8")
    assert code == 0 and "conv3:prune_out_channels" in out


def test_cli_input_the_allocator_cannot_hold(capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")

    monkeypatch.setattr(torch, "randn", refuse)
    code, out, err = run_cli(capsys, "inspect", "models:TinyConvNet", "--input-shape", "1,3,8,8")
    assert_one_line_user_error(code, out, err, "shape 1,3,8,8", "can't allocate memory", "smaller --input-shape")


def test_cli_unknown_model_exits_2(capsys):
    code, out, err = run_cli(capsys, "inspect", "torchvision:resnet_eighteen")
    assert_one_line_user_error(code, out, err, "'resnet_eighteen'", "resnet18")


@pytest.mark.parametrize("argv, named", [
    (["inspect", "models:TinyConvNet", "--format", "pdf"], ["'pdf'", "'json'", "weighttracker inspect --help"]),
    (["plugins", "--format", "html"], ["'html'", "'text'", "weighttracker plugins --help"]),
    (["inspect"], ["MODEL"]),
    (["frobnicate"], ["'frobnicate'", "'inspect'"]),
    (["demo", "--steps", "x"], ["--steps", "'x'"]),
])
def test_cli_usage_errors_are_one_line(capsys, argv, named):
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_user_error(code, out, err, *named)
    assert "usage:" not in err


def test_cli_multi_line_library_error_is_joined_into_one_line(capsys, monkeypatch):
    from weighttracker_core.cli import inspect_cmd

    def fail(*args, **kwargs):
        raise ConfigError("first line\n  second line\n")

    monkeypatch.setattr(inspect_cmd, "inspect_model", fail)
    code, out, err = run_cli(capsys, "inspect", "models:TinyConvNet")
    assert_one_line_user_error(code, out, err, "first line second line")


def test_control_cli_bug_keeps_its_traceback(capsys, monkeypatch):
    from weighttracker_core.cli import inspect_cmd

    def bug(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(inspect_cmd, "WeightTracker", bug)
    with pytest.raises(KeyError, match="internal"):
        main(["inspect", "models:TinyConvNet", "--input-shape", "1,3,8,8"])
    assert not isinstance(KeyError("x"), WeightTrackerError)


def test_control_the_battery_snapshot_sees_changes():
    # the oracle of "unchanged" must be able to fail
    model = TinyConvNet()
    before = snapshot(model)
    other = copy.deepcopy(model)
    assert snapshot(other) != before  # new identities
    handle = model.conv1.register_forward_hook(lambda *a: None)
    assert snapshot(model) != before
    handle.remove()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] += 1
    assert snapshot(model) != before
