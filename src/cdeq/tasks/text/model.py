"""The DEQ-Transformer of the text tasks: injection, weight-tied causal block and head.

The teacher is one weight-tied causal transformer block iterated to its fixed point::

    u  = tok_emb(x) + pos_emb(t)                           (injection, computed once, no NFE)
    f(z, u) = LN_out(h + MLP(LN_2(h)))                      (the cell, 1 NFE per call)
        with h = z + u + Attn(LN_1(z + u))                  (causal self-attention)
    logits = Linear(LN(z*))                                 (the head)

The final LayerNorm keeps every iterate at unit scale per token, so the iteration cannot blow
up and the solvers converge in tens of steps. Attention is causal (``scaled_dot_product_attention``
with ``is_causal=True``) and the only other operations act per position, so position ``t`` of
``z*`` depends on tokens ``<= t`` only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CausalTransformerCell", "LMHead", "TextInjection"]


class TextInjection(nn.Module):
    """``x (B, T) -> u (B, T, D)``: token plus learned position embeddings.

    Variational dropout: in training one mask of shape ``(B, 1, D)`` is drawn per forward and
    applied to ``u``; ``u`` enters every solver iteration, so the same mask acts on all of them
    (and on every position), as DEQ-Transformers require.
    """

    def __init__(self, vocab_size: int, d_model: int, seq_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.seq_len = seq_len
        self.dropout = dropout
        nn.init.normal_(self.tok.weight, std=1.0)
        nn.init.normal_(self.pos.weight, std=0.2)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"x must be integer token ids of shape (B, T), got {x.dtype} {tuple(x.shape)}")
        length = x.shape[1]
        if length > self.seq_len:
            raise ValueError(f"sequence length {length} exceeds the model's seq_len {self.seq_len}")
        u = self.tok(x) + self.pos(torch.arange(length, device=x.device))
        if self.training and self.dropout > 0:
            keep = 1 - self.dropout
            mask = torch.empty(u.shape[0], 1, u.shape[2], device=u.device).bernoulli_(keep) / keep
            u = u * mask
        return u


class CausalTransformerCell(nn.Module):
    """One weight-tied causal transformer block ``f(z, u)`` with ``z, u`` of shape ``(B, T, D)``.

    ``h = z + u; h = h + Attn(LN(h)); h = h + MLP(LN(h)); return LN(h)``. The last LayerNorm
    bounds every iterate, which keeps the fixed-point iteration stable.
    """

    channel_dim = -1

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        self.channels = d_model
        self.n_heads = n_heads
        hidden = int(round(mlp_ratio * d_model))
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)
        self.ln_out = nn.LayerNorm(d_model)
        for lin in (self.qkv, self.proj, self.fc1, self.fc2):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def state_shape(self, u: Tensor) -> torch.Size:
        return u.shape

    def attention(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        h = z + u
        h = h + self.attention(self.ln1(h))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.ln_out(h)


class LMHead(nn.Module):
    """``z (B, T, D) -> logits (B, T, V)``: LayerNorm then Linear."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.ln(z))
