"""``PrunedMultiheadAttention``: an ``nn.MultiheadAttention`` whose widths may differ.

Stock ``nn.MultiheadAttention`` needs ``embed_dim == num_heads * head_dim`` and computes the
softmax scale from ``head_dim``. Removing embedding channels, whole heads or head
dimensions exactly (so that the pruned layer computes what the fake-pruned one did) breaks
both. Physical pruning therefore turns the layer into this subclass *in place*
(``layer.__class__`` changes; parameter names, ``state_dict`` keys and the object itself
stay), which reads every width from its parameters:

* input width ``E_in = in_proj_weight.shape[1]`` (query, key and value),
* attention width ``A = in_proj_weight.shape[0] // 3 = num_heads * head_dim``,
* output width ``E_out = out_proj.out_features``,

and keeps the softmax scale of the original layer (``scale = 1 / sqrt(original head_dim)``).
Example: ``MultiheadAttention(16, 4)`` with head 1 and embedding channel 3 removed has
``in_proj_weight`` ``[36, 15]``, ``out_proj.weight`` ``[15, 12]``, ``num_heads == 3``,
``head_dim == 4`` and ``scale == 0.5``.

The forward mirrors the operations of ``torch.nn.functional.multi_head_attention_forward``
(``linear`` projections, ``bmm`` / ``baddbmm`` when weights are returned,
``scaled_dot_product_attention`` otherwise), so fvcore counts a pruned layer exactly as it
counts a stock one of the same widths. ``batch_first``, unbatched inputs,
``key_padding_mask``, ``attn_mask`` (2-D, or 3-D with one mask per original or current
head), ``bias_k`` / ``bias_v``, ``add_zero_attn``, dropout and ``need_weights`` /
``average_attn_weights`` work; the averaged attention weights average the remaining heads.
Separate q/k/v projections (``kdim`` / ``vdim`` different from ``embed_dim``) are not
supported. A converted layer carries a no-op forward pre-hook (:func:`no_fused_kernels`)
so that ``nn.TransformerEncoderLayer`` never sends it to its fused fast path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from weighttracker_core import PruningError


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """Multi-head attention with independent input, attention, head and output widths.

    Built like ``nn.MultiheadAttention`` (then identical to it), or obtained from one with
    :func:`make_prunable`. Extra attributes: ``attn_dim`` (``num_heads * head_dim``),
    ``scale`` (softmax scale, fixed at creation), ``head_ids`` (the original index of each
    remaining head, used to select per-head 3-D ``attn_mask`` rows) and
    ``original_num_heads``.
    """

    def __init__(self, embed_dim: int, num_heads: int, **kwargs: object) -> None:
        super().__init__(embed_dim, num_heads, **kwargs)  # type: ignore[arg-type]
        if not self._qkv_same_embed_dim:
            raise ValueError(
                "PrunedMultiheadAttention needs the fused in_proj_weight (kdim == vdim == "
                "embed_dim)."
            )
        _init_pruned_state(self)

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        q_in, k_in, v_in = _to_batch_first((query, key, value), batched, self.batch_first)
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)."
            )
        bsz, tgt_len, _ = q_in.shape
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self._project(q_in, k_in, v_in)
        dtype = q.dtype
        mask = self._head_mask(_float_mask(attn_mask, dtype), bsz, tgt_len, k.shape[1])
        pad = _float_mask(key_padding_mask, dtype)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(bsz, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(bsz, 1, -1)], dim=1)
            mask = None if mask is None else F.pad(mask, (0, 1))
            pad = None if pad is None else F.pad(pad, (0, 1))
        q = q.view(bsz, tgt_len, heads, head_dim).transpose(1, 2)
        k = k.view(bsz, k.shape[1], heads, head_dim).transpose(1, 2)
        v = v.view(bsz, v.shape[1], heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            zeros = torch.zeros(bsz, heads, 1, head_dim, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            mask = None if mask is None else F.pad(mask, (0, 1))
            pad = None if pad is None else F.pad(pad, (0, 1))
        src_len = k.shape[2]
        if pad is not None:
            pad = pad.view(bsz, 1, 1, src_len)
            mask = pad if mask is None else mask + pad
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = self._attend_with_weights(q, k, v, mask, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale
            )
        out = out.transpose(1, 2).reshape(bsz, tgt_len, heads * head_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def _project(
        self, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v, each ``[batch, length, attn_dim]``.

        Three ``linear`` calls on row blocks of ``in_proj_weight`` (as many MACs as the
        stock layer's single packed call): splitting a packed activation instead would
        make Torch-Pruning's tracer follow shifting channel offsets inside the layer.
        """
        weight, bias = self.in_proj_weight, self.in_proj_bias
        width = weight.shape[0] // 3
        outs = []
        for i, x in enumerate((q_in, k_in, v_in)):
            rows = slice(i * width, (i + 1) * width)
            outs.append(F.linear(x, weight[rows], None if bias is None else bias[rows]))
        return outs[0], outs[1], outs[2]

    def _head_mask(
        self, mask: torch.Tensor | None, bsz: int, tgt_len: int, src_len: int
    ) -> torch.Tensor | None:
        """``attn_mask`` as ``[1 or batch, 1 or heads, tgt, src]`` for the remaining heads."""
        if mask is None:
            return None
        if mask.dim() == 2:
            return mask.view(1, 1, tgt_len, src_len)
        if mask.dim() != 3:
            raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported.")
        rows = mask.shape[0]
        if rows == bsz * self.num_heads:
            return mask.view(bsz, self.num_heads, tgt_len, src_len)
        if rows == bsz * self.original_num_heads:
            full = mask.view(bsz, self.original_num_heads, tgt_len, src_len)
            index = torch.tensor(self.head_ids, dtype=torch.long, device=mask.device)
            return full.index_select(1, index)
        if rows == 1:
            return mask.unsqueeze(0)
        raise RuntimeError(
            f"The 3-D attn_mask has {rows} rows; expected batch * num_heads "
            f"({bsz} * {self.num_heads}) or batch * original heads ({bsz} * "
            f"{self.original_num_heads})."
        )

    def _attend_with_weights(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        dropout: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit ``bmm`` attention (as the stock layer when weights are wanted)."""
        bsz, heads, tgt_len, head_dim = q.shape
        src_len = k.shape[2]
        q_flat = (q * self.scale).reshape(bsz * heads, tgt_len, head_dim)
        k_t = k.reshape(bsz * heads, src_len, head_dim).transpose(1, 2)
        if mask is not None:
            full = mask.expand(bsz, heads, tgt_len, src_len).reshape(bsz * heads, tgt_len, src_len)
            scores = torch.baddbmm(full, q_flat, k_t)
        else:
            scores = torch.bmm(q_flat, k_t)
        weights = torch.softmax(scores, dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        out = torch.bmm(weights, v.reshape(bsz * heads, src_len, head_dim))
        return (
            out.view(bsz, heads, tgt_len, head_dim),
            weights.view(bsz, heads, tgt_len, src_len),
        )


def no_fused_kernels(module: nn.Module, args: object) -> None:
    """A forward pre-hook that does nothing; its presence is what counts.

    ``nn.TransformerEncoderLayer`` (eval, no grad) hands its ``self_attn`` weights to a
    fused kernel that assumes the stock widths, unless some submodule has a hook.
    """
    return None


def _init_pruned_state(mha: nn.MultiheadAttention) -> None:
    mha.attn_dim = mha.num_heads * mha.head_dim  # type: ignore[assignment]
    mha.scale = float(mha.head_dim) ** -0.5  # type: ignore[assignment]
    mha.head_ids = tuple(range(mha.num_heads))  # type: ignore[assignment]
    mha.original_num_heads = mha.num_heads  # type: ignore[assignment]
    if no_fused_kernels not in mha._forward_pre_hooks.values():
        mha.register_forward_pre_hook(no_fused_kernels)


def make_prunable(mha: nn.MultiheadAttention) -> PrunedMultiheadAttention:
    """Turn ``mha`` into a :class:`PrunedMultiheadAttention` in place (same object).

    Nothing numeric changes: the converted layer computes what the stock one did.

    Raises:
        PruningError: The layer has separate q/k/v projections (``kdim``/``vdim``).
    """
    if isinstance(mha, PrunedMultiheadAttention):
        return mha
    if not mha._qkv_same_embed_dim:
        raise PruningError(
            f"nn.MultiheadAttention(embed_dim={mha.embed_dim}, kdim={mha.kdim}, "
            f"vdim={mha.vdim}) has separate q/k/v projections; only the fused in_proj_weight "
            "(kdim == vdim == embed_dim) can be pruned physically. Exclude it with "
            "ignore_prune=[...]."
        )
    if type(mha) is not nn.MultiheadAttention:
        raise PruningError(
            f"{type(mha).__name__} subclasses nn.MultiheadAttention; weighttracker only "
            "converts the stock class for physical pruning. Register a unit rule with its "
            "own layer_pruner for it."
        )
    _init_pruned_state(mha)
    mha.__class__ = PrunedMultiheadAttention
    return mha  # type: ignore[return-value]


def _to_batch_first(
    tensors: Sequence[torch.Tensor], batched: bool, batch_first: bool
) -> tuple[torch.Tensor, ...]:
    """``[batch, length, width]`` views, keeping ``query is key is value`` identities."""
    out: list[torch.Tensor] = []
    for i, t in enumerate(tensors):
        same = next((out[j] for j in range(i) if tensors[j] is t), None)
        if same is not None:
            out.append(same)
        elif not batched:
            out.append(t.unsqueeze(0))
        elif batch_first:
            out.append(t)
        else:
            out.append(t.transpose(0, 1))
    return tuple(out)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive float mask: ``True`` (not allowed) becomes ``-inf``; float masks unchanged."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"Only bool and floating masks are supported, got {mask.dtype}.")
    return mask.to(dtype)
