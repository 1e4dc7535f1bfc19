"""Unit rules for the RMSNorm classes of Hugging Face models (``LlamaRMSNorm``, ...).

Each of these classes holds one ``weight`` of shape ``[hidden]`` (no bias) and normalises
over the last axis by the mean of squares, computed from the input's own width: removing
feature ``c`` only needs ``weight[c]`` removed. A channel of the residual stream owns one
entry of every such weight. Example: removing feature 1 of ``LlamaRMSNorm(4)`` leaves
``weight`` of shape ``[3]``.

Only classes of this form are listed. Gemma's RMSNorm scales by ``1 + weight``, so a zero
weight does not zero a feature there; it is deliberately not covered.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch
from torch import nn

from weighttracker_core.plugin import LayerCategory, ParamSlice, UnitRule, hookimpl

#: ``(module, class)`` of the RMSNorm classes covered: weight only, ``x * weight``.
RMS_NORM_CLASSES: tuple[tuple[str, str], ...] = (
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm"),
    ("transformers.models.phi3.modeling_phi3", "Phi3RMSNorm"),
)


def rms_norm_types() -> tuple[type[nn.Module], ...]:
    """The covered RMSNorm classes that this transformers version has.

    Imports their modeling modules (the rules need the classes). A transformers that cannot
    be imported gives no classes: then no model can hold one either.
    """
    found = []
    for module_name, class_name in RMS_NORM_CLASSES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - absent or broken: a missing model family
            continue
        cls = getattr(module, class_name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            found.append(cls)
    return tuple(found)


class HFRMSNormPruner:
    """Removes features of a Hugging Face RMSNorm: entries of its ``weight``.

    Input and output are one axis. The normalisation reads the width from its input, so
    nothing else needs changing.
    """

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        drop = {int(i) for i in idxs}
        old = layer.weight
        keep = torch.tensor([i for i in range(old.shape[-1]) if i not in drop], dtype=torch.long,
                            device=old.device)
        layer.weight = nn.Parameter(old.detach().index_select(-1, keep).clone(),
                                    requires_grad=old.requires_grad)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.weight.shape[-1])

    def get_in_channels(self, layer: nn.Module) -> int:
        return self.get_out_channels(layer)


HF_RMS_NORM_SLICES = (ParamSlice(param="weight", dim=-1),)


@hookimpl
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    types = rms_norm_types()
    if not types:
        return ()
    return (
        UnitRule(
            name="transformers_rms_norm",
            module_types=types,
            out_slices=HF_RMS_NORM_SLICES,
            in_slices=HF_RMS_NORM_SLICES,
            category=LayerCategory.NORMALIZATION,
            layer_pruner=HFRMSNormPruner(),
        ),
    )
