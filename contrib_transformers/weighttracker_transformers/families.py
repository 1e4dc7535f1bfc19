"""What each supported Hugging Face model family stores in its config about the shapes.

A stock class rebuilds its layers from the config alone, so a pruned model can be reloaded
with ``from_pretrained`` only if its config can say what every layer looks like. These
records say, per ``config.model_type``, which layers carry ``intermediate_size`` and how
the attention finds its head width.

* Llama, Mistral, Qwen2, HF ViT: the attention reads ``config.head_dim`` (Qwen2 and ViT
  when it is set, falling back to ``hidden_size // num_attention_heads``), so heads can
  be removed at any hidden size: ``head_dim`` is written to the config explicitly.
* BERT: the head width is ``hidden_size // num_attention_heads`` and the attention output
  layer is ``hidden_size x hidden_size``; fewer heads are expressible only together with
  a hidden size of ``heads * head_width``.

Every family here has one ``num_attention_heads``, ``num_key_value_heads`` and
``intermediate_size`` for all layers (transformers 5 has no per-layer values for them).
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen(kw_only=True)
class Family:
    """How one model family's config describes its shapes.

    Attributes:
        model_type: ``config.model_type``.
        label: Name for messages.
        intermediate: Suffixes of module names whose output width is ``intermediate_size``.
        config_head_dim: The attention reads ``config.head_dim`` (else it derives the head
            width as ``hidden_size // num_attention_heads``).
        tested: Tested with this release (others get a best-effort sync).
    """

    model_type: str
    label: str
    intermediate: tuple[str, ...]
    config_head_dim: bool
    tested: bool = True


_SWIGLU = ("mlp.gate_proj", "mlp.up_proj")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(model_type="llama", label="Llama", intermediate=_SWIGLU, config_head_dim=True),
        Family(model_type="mistral", label="Mistral", intermediate=_SWIGLU, config_head_dim=True),
        Family(model_type="qwen2", label="Qwen2", intermediate=_SWIGLU, config_head_dim=True),
        Family(model_type="bert", label="BERT", intermediate=("intermediate.dense",),
               config_head_dim=False),
        Family(model_type="vit", label="ViT", intermediate=("mlp.fc1",), config_head_dim=True),
    )
}

#: Suffixes guessed for families not listed (checked against a rebuild from the config).
_GUESSED_INTERMEDIATE = (*_SWIGLU, "mlp.fc1", "intermediate.dense", "mlp.c_fc")


def family_of(config: Any) -> Family:
    """The record for ``config.model_type``, or a guess for an untested family."""
    model_type = str(getattr(config, "model_type", "") or "")
    family = FAMILIES.get(model_type)
    if family is not None:
        return family
    return Family(
        model_type=model_type,
        label=type(config).__name__.removesuffix("Config") or model_type,
        intermediate=_GUESSED_INTERMEDIATE,
        config_head_dim=hasattr(config, "head_dim"),
        tested=False,
    )


def tested_families() -> str:
    """``"Llama, Mistral, Qwen2, BERT, ViT"``."""
    return ", ".join(f.label for f in FAMILIES.values())
