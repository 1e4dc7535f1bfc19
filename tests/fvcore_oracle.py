"""fvcore MACs per module: the independent oracle of every BOPs test.

fvcore has no count for ``scaled_dot_product_attention`` (which ``nn.MultiheadAttention``
and most transformer code run): it counts here as its two matrix products.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn


@contextlib.contextmanager
def no_mha_fastpath():
    # nn.MultiheadAttention's eval-mode fast path is one fused op fvcore counts as 0 MACs
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _attention_macs(inputs, outputs):
    """scaled_dot_product_attention = scores (q @ k^T) + weighted values (p @ v), as matmuls."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = q[:-2]
    n = 1
    for s in batch:
        n *= s
    return n * q[-2] * k[-2] * q[-1] + n * q[-2] * k[-2] * v[-1]


def fvcore_macs(model: nn.Module, inputs) -> dict[str, int]:
    """fvcore ``by_module()`` MACs of ``model`` in eval mode (the model is left in eval).

    ``scaled_dot_product_attention`` counts as its two matrix products (fvcore has no
    count for it).
    """
    from fvcore.nn import FlopCountAnalysis

    model.eval()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    with no_mha_fastpath(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import and tracer warnings
        analysis = FlopCountAnalysis(model, inputs)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _attention_macs)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        return dict(analysis.by_module())
