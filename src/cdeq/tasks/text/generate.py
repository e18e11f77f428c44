"""Sampling text from any model that maps token ids to logits (a teacher DEQ or a student)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ...engine.config import check_int
from ...engine.precision import clock

__all__ = ["Generation", "generate"]


@dataclasses.dataclass
class Generation:
    """What :func:`generate` returns.

    Attributes:
        ids: ``(B, n_tokens)`` the sampled tokens (the prompt not included).
        seconds: wall time of the sampling loop.
        tokens_per_second: ``B * n_tokens / seconds``.
        nfe_per_token: mean layer calls per sampled token when ``step_fn`` returns solver info
            (``(logits, info)`` with ``info.nfe``), else ``None``.
    """

    ids: Tensor
    seconds: float
    tokens_per_second: float
    nfe_per_token: float | None = None


@torch.no_grad()
def generate(step_fn: Callable[[Tensor], Any], prompt_ids: Tensor | list[int], n_tokens: int,
             seq_len: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> Generation:
    """Sample ``n_tokens`` tokens after ``prompt_ids`` from any model mapping ids to logits.

    Args:
        step_fn: ``ids (B, t) -> logits (B, t, V)`` (or ``(logits, info)``, as a
            :class:`DEQModel` returns; ``info.nfe`` is then averaged into ``nfe_per_token``).
        prompt_ids: ``(t,)`` or ``(B, t)`` token ids, ``t >= 1``.
        n_tokens: how many tokens to sample.
        seq_len: the model's context: each step runs the model on the last ``seq_len`` tokens
            only. A DEQ has no key/value cache (its fixed point at every position changes with
            the whole window), so each new token costs a full solve over the window.
        temperature: softmax temperature; 0 picks the most likely token (greedy).
        top_k: sample among the ``top_k`` most likely tokens only (0: all).
        generator: seeds the sampling.
    """
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must hold at least one token id, shape (t,) or (B, t); "
                         f"got shape {tuple(ids.shape)}")
    check_int("n_tokens", n_tokens, minimum=0)
    check_int("seq_len", seq_len, minimum=1)
    check_int("top_k", top_k, minimum=0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} is not valid; it must be a number >= 0")
    start = ids.shape[1]
    nfe_total, nfe_seen = 0.0, False
    t0 = clock()
    for _ in range(n_tokens):
        out = step_fn(ids[:, -seq_len:])
        if isinstance(out, tuple):
            out, info = out[0], (out[1] if len(out) > 1 else None)
            if info is not None and hasattr(info, "nfe"):
                nfe_total += float(torch.as_tensor(info.nfe).float().mean())
                nfe_seen = True
        logits = out[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, nxt.to(ids.dtype)], dim=1)
    seconds = clock() - t0
    new = ids[:, start:]
    return Generation(
        ids=new,
        seconds=seconds,
        tokens_per_second=new.numel() / seconds if seconds > 0 else math.inf,
        nfe_per_token=nfe_total / n_tokens if nfe_seen and n_tokens else None,
    )
