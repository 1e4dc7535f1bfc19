"""``weighttracker inspect hf:...``: models built from a config (random weights, nothing
downloaded), through the command line in-process and as a real subprocess.

Oracles: head counts and widths from the ``--config`` given; the model classes transformers
names for the model types; the error messages' advice, followed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import transformers  # noqa: E402

from weighttracker_core import ConfigError, UnknownNameError  # noqa: E402
from weighttracker_core.cli import main  # noqa: E402
from weighttracker_transformers import build_model  # noqa: E402

SCRIPT = Path(sys.executable).with_name("weighttracker")
LLAMA = "hidden_size=64,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,intermediate_size=96"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _groups(out):
    return {g["name"]: g for g in json.loads(out)["structures"]["groups"]}


def test_inspect_llama_from_a_config_prints_its_head_groups(capsys):
    code, out, _ = run(capsys, "inspect", "hf:llama", "--config", LLAMA, "--heads", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["model_type"] == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    assert data["input_shape"] == [1, 16]
    groups = _groups(out)
    for layer in range(2):
        attn = f"model.layers.{layer}.self_attn.q_proj"
        assert groups[f"{attn}:prune_num_heads"]["n_units"] == 4
        assert groups[f"{attn}:prune_kv_heads"]["n_units"] == 2
        assert groups[f"model.layers.{layer}.mlp.up_proj:prune_out_channels"]["n_units"] == 96
    assert data["metrics"]["structured_bops"]["compression"] == 0
    assert not data["unavailable"] and not data["notes"]


def test_inspect_text_output_lists_the_groups_and_input_shape_is_batch_and_length(capsys):
    code, out, _ = run(capsys, "inspect", "hf:qwen2", "--config", "num_attention_heads=2,num_key_value_heads=1",
                       "--input-shape", "2,5", "--heads")
    assert code == 0
    assert "model.layers.1.self_attn.q_proj:prune_kv_heads" in out and "kind=kv_head" in out
    code, _, err = run(capsys, "inspect", "hf:qwen2", "--input-shape", "1,3,8,8")
    assert code != 0 and "token ids of shape BATCH,LENGTH, e.g. --input-shape 1,16" in err


def test_vit_and_model_classes_by_name(capsys):
    code, out, _ = run(capsys, "inspect", "hf:vit", "--config", "image_size=16", "--heads", "--format", "json")
    assert code == 0 and json.loads(out)["input_shape"] == [1, 3, 16, 16]
    assert _groups(out)["vit.layers.0.attention.q_proj:prune_num_heads"]["n_units"] == 4
    code, out, _ = run(capsys, "inspect", "hf:BertModel", "--format", "json")
    assert code == 0
    assert json.loads(out)["model_type"].endswith("BertModel")
    assert _groups(out)["encoder.layer.0.intermediate.dense:prune_out_channels"]["n_units"] == 128


def test_unknown_names_and_settings_are_named_and_the_suggestions_work(capsys):
    with pytest.raises(UnknownNameError, match="Did you mean: llama"):
        build_model("lama")
    assert build_model("llama").config.model_type == "llama"
    with pytest.raises(ConfigError, match="has no setting 'hidden_szie'. Did you mean hidden_size"):
        build_model("llama", hidden_szie="32")
    assert build_model("llama", hidden_size="32").config.hidden_size == 32
    with pytest.raises(ConfigError, match="hidden_size takes a int"):
        build_model("llama", hidden_size="big")
    code, _, err = run(capsys, "inspect", "hf:llama", "--config", "num_attention_heads=3")
    assert code != 0 and "LlamaConfig(" in err and "is refused" in err
    # a head count alone also sets the kv heads (no GQA unless asked)
    model = build_model("mistral", num_attention_heads=8)
    assert model.config.num_key_value_heads == 8 and model.config.hidden_size == 64


def test_the_installed_command_inspects_a_tiny_llama():
    proc = subprocess.run([str(SCRIPT), "inspect", "hf:llama", "--config", LLAMA, "--heads"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.0.self_attn.q_proj:prune_num_heads  kind=head  units=4" in proc.stdout
    assert transformers.__version__  # the source used the installed transformers
