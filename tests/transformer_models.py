"""Transformer blocks written in plain PyTorch, the way people write them.

* :class:`LlamaLike`: RMSNorm, separate q/k/v/o projections with grouped-query attention,
  rotary embeddings (``rotate_half`` or interleaved pairs), SDPA, a SwiGLU MLP, and a tied
  or untied ``lm_head``. The attention stores ``num_heads`` / ``num_kv_heads`` /
  ``head_dim`` and views with them, like most hand-written models: a post-prune hook must
  update them (:func:`sync_heads`).
* :class:`BertLike`: post-norm encoder with separate ``query`` / ``key`` / ``value``,
  explicit ``softmax(q k^T / sqrt(d)) v`` and LayerNorm, and a classifier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Interleaved rotation: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


class Rotary(nn.Module):
    """cos / sin tables for rotary embeddings; ``style`` is ``"half"`` or ``"interleaved"``."""

    def __init__(self, head_dim: int, style: str = "half", base: float = 10000.0) -> None:
        super().__init__()
        self.style = style
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=self.inv_freq.device), self.inv_freq)
        if self.style == "half":
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = freqs.repeat_interleave(2, dim=-1)
        return emb.cos(), emb.sin()

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotated = rotate_half(x) if self.style == "half" else rotate_pairs(x)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # a no-op in float32; bf16 models stay bf16
        return x * cos + rotated * sin


class LlamaAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, rope: str | None, repeat: str) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = heads, kv_heads
        self.head_dim = hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.rotary = Rotary(self.head_dim, rope) if rope else None
        self.repeat = repeat

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        n_rep = self.num_heads // self.num_kv_heads
        if n_rep == 1:
            return x
        if self.repeat == "interleave":
            return x.repeat_interleave(n_rep, dim=1)
        b, kv, t, d = x.shape  # HF's repeat_kv: expand a new axis after the kv heads
        return x[:, :, None, :, :].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            cos, sin = self.rotary(t)
            q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        out = F.scaled_dot_product_attention(q, self._repeat_kv(k), self._repeat_kv(v), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, inner: int, rope: str | None, repeat: str) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(hidden, eps=1e-6)
        self.self_attn = LlamaAttention(hidden, heads, kv_heads, rope, repeat)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=1e-6)
        self.mlp = SwiGLU(hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaLike(nn.Module):
    """A decoder-only LM. Defaults: hidden 64, 8 query heads, 2 kv heads (head_dim 8)."""

    def __init__(
        self,
        vocab: int = 96,
        hidden: int = 64,
        heads: int = 8,
        kv_heads: int = 2,
        inner: int = 128,
        layers: int = 2,
        rope: str | None = "half",
        repeat: str = "repeat_kv",
        tie: bool = False,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            [LlamaBlock(hidden, heads, kv_heads, inner, rope, repeat) for _ in range(layers)]
        )
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def sync_heads(tracker) -> None:
    """Post-prune hook: the attention modules' head counts follow the pruned projections."""
    for name, change in tracker.pruned_attention.items():
        attention = tracker.model.get_submodule(name)
        attention.num_heads = change.num_heads
        attention.num_kv_heads = change.num_kv_heads
        attention.head_dim = change.head_dim


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, hidden // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.num_kv_heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        context = torch.matmul(scores.softmax(dim=-1), v)
        return context.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int) -> None:
        super().__init__()
        self.attention = BertSelfAttention(hidden, heads)
        self.output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden)
        self.intermediate = nn.Linear(hidden, inner)
        self.out = nn.Linear(inner, hidden)
        self.output_norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.output(self.attention(x)))
        return self.output_norm(x + self.out(F.gelu(self.intermediate(x))))


class BertLike(nn.Module):
    """An encoder with a [CLS] classifier. Defaults: hidden 32, 4 heads of 8, MLP 64."""

    def __init__(self, vocab: int = 50, hidden: int = 32, heads: int = 4, inner: int = 64,
                 layers: int = 2, classes: int = 3, length: int = 16) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(length, hidden)
        self.embedding_norm = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList([BertLayer(hidden, heads, inner) for _ in range(layers)])
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        x = self.embedding_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x[:, 0])


def token_ids(batch: int = 2, length: int = 12, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)
