"""``hf:NAME`` models for ``weighttracker inspect``: built from a config, random weights.

Nothing is downloaded: the model is ``cls(config)`` for a config made from a small default
size (:data:`TINY`) updated with the user's settings. ``NAME`` is a model type
(``llama``, ``mistral``, ``qwen2``, ``bert``, ``vit``, or any other ``config.model_type``
of the installed transformers) or a model class name (``LlamaModel``,
``BertForMaskedLM``)::

    weighttracker inspect hf:llama --config hidden_size=256,num_hidden_layers=2
    weighttracker inspect hf:vit --config image_size=64 --heads
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from weighttracker_core import ConfigError, UnknownNameError
from weighttracker_core.plugin import ModelSourceSpec, hookimpl

#: Sizes a model gets unless the user says otherwise (only keys its config has are used).
TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "image_size": 32,
    "patch_size": 8,
    "num_labels": 2,
}

#: The class built for a model type, where the first match below is not the one wanted.
DEFAULT_CLASSES = {"bert": "BertForSequenceClassification", "vit": "ViTForImageClassification"}

#: Example inputs: sequence length for token models.
DEFAULT_SEQUENCE = 16


# transformers is imported when a model is built, not when the plugin loads


def _model_types() -> list[str]:
    from transformers.models.auto import configuration_auto

    return sorted(configuration_auto.CONFIG_MAPPING_NAMES)


def _class_for(model_type: str) -> str:
    from transformers.models.auto import modeling_auto

    if model_type in DEFAULT_CLASSES:
        return DEFAULT_CLASSES[model_type]
    for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                    modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
                    modeling_auto.MODEL_MAPPING_NAMES):
        name = mapping.get(model_type)
        if isinstance(name, (tuple, list)):
            name = name[0]
        if name:
            return str(name)
    raise UnknownNameError(f"transformers has no model class for the model type {model_type!r}.")


def _resolve(name: str) -> tuple[type[nn.Module], type[Any]]:
    """The model class and config class ``name`` stands for."""
    import transformers
    from transformers.models.auto import configuration_auto

    if name in configuration_auto.CONFIG_MAPPING_NAMES:
        class_name = _class_for(name)
    else:
        class_name = name
    cls = getattr(transformers, class_name, None) if class_name.isidentifier() else None
    config_class = getattr(cls, "config_class", None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and isinstance(config_class, type)):
        close = difflib.get_close_matches(name, _model_types(), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownNameError(
            f"hf:{name} is neither a model type of transformers {transformers.__version__} nor a "
            f"model class of it.{hint} Use a model type (hf:llama, hf:bert, hf:vit, ...) or a "
            "class name (hf:LlamaModel)."
        )
    return cls, config_class


def _convert(key: str, text: str, default: Any) -> Any:
    """``text`` as the type of ``default`` (JSON for anything else: lists, null, numbers)."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        return json.loads(text)
    except ValueError:
        if default is None or isinstance(default, (list, dict)):
            return text
        raise ConfigError(
            f"--config {key}={text!r}: {key} takes a {type(default).__name__} (its default is "
            f"{default!r})."
        ) from None


def make_config(config_class: type[Any], settings: Mapping[str, Any]) -> Any:
    """``config_class`` with :data:`TINY` sizes and ``settings`` (strings are converted).

    Raises:
        ConfigError: A key the config does not have (close names are suggested), or a
            value that does not fit its type, or a config the class refuses.
    """
    default = config_class()
    values = {k: v for k, v in TINY.items() if hasattr(default, k)}
    for key, value in settings.items():
        if not hasattr(default, key):
            close = difflib.get_close_matches(key, [k for k in vars(default) if not k.startswith("_")], n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--config {key}: {config_class.__name__} has no setting {key!r}.{hint}")
        values[key] = _convert(key, value, getattr(default, key)) if isinstance(value, str) else value
    if ("num_attention_heads" in settings and "num_key_value_heads" not in settings
            and hasattr(default, "num_key_value_heads")):
        values["num_key_value_heads"] = values["num_attention_heads"]  # not the tiny 2 heads
    try:
        return config_class(**values)
    except Exception as err:
        raise ConfigError(f"{config_class.__name__}({_show(values)}) is refused: {err}") from None


def _show(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def build_model(name: str, **config: Any) -> nn.Module:
    """A Hugging Face model with random weights, in eval mode, built from a config.

    Args:
        name: A model type (``"llama"``, ``"qwen2"``, ``"bert"``, ``"vit"``, ...) or a model
            class name (``"LlamaModel"``).
        **config: Config settings over the small defaults (:data:`TINY`); strings are
            converted to the setting's type.

    Example: ``build_model("llama", hidden_size=32)`` is a ``LlamaForCausalLM`` with 2
    layers of 4 query heads in 2 kv groups of width 8.

    Raises:
        UnknownNameError: ``name`` is neither a model type nor a model class.
        ConfigError: A setting the config does not have, or does not accept.
    """
    cls, config_class = _resolve(name)
    model = cls(make_config(config_class, config))
    return model.eval()


def load(name: str, config: Mapping[str, str] | None = None) -> nn.Module:
    """The model source's ``load``: :func:`build_model` with the ``--config`` strings."""
    return build_model(name, **dict(config or {}))


def token_ids(model: nn.Module, batch: int = 1, length: int = DEFAULT_SEQUENCE) -> torch.Tensor:
    """Random token ids ``[batch, length]`` below the model's vocabulary size."""
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    return torch.randint(0, vocab, (batch, length))


def example_input(model: nn.Module, shape: tuple[int, ...] | None) -> torch.Tensor:
    """Token ids (``shape`` = batch, length) or pixel values (batch, channels, height, width)."""
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        config = model.config
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        return torch.randn(shape or (1, int(getattr(config, "num_channels", 3)), size, size))
    if shape is not None and len(shape) != 2:
        raise ConfigError(
            f"--input-shape {','.join(map(str, shape))}: {type(model).__name__} takes token ids of "
            "shape BATCH,LENGTH, e.g. --input-shape 1,16."
        )
    batch, length = shape if shape is not None else (1, DEFAULT_SEQUENCE)
    return token_ids(model, batch, length)


HF_SOURCE = ModelSourceSpec(
    prefix="hf",
    load=load,
    accepts_config=True,
    example_input=example_input,
    default_input_shape=(1, DEFAULT_SEQUENCE),
    summary="Hugging Face transformers models built from a config (--config key=value,...), "
    "random weights, nothing downloaded: hf:llama, hf:qwen2, hf:bert, hf:vit, hf:LlamaModel.",
)


@hookimpl
def wt_register_model_sources() -> tuple[ModelSourceSpec, ...]:
    return (HF_SOURCE,)

