"""The student's conditioning pieces: the time embedding, the channel-wise MLP and the helpers
that broadcast per-sample and per-channel coefficients against a state (or a part of one)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_structure


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` broadcastable against ``like``."""
    return v.reshape(v.shape[0], *[1] * (like.dim() - 1))


def _broadcast(v: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    """``(B, C)`` -> shape broadcastable against ``like`` along ``channel_dim``."""
    shape = [1] * like.dim()
    shape[0] = v.shape[0]
    shape[channel_dim] = v.shape[1]
    return v.reshape(shape)


def _injected_state(u: Any, z: Tensor) -> Tensor | None:
    """The injection ``u`` itself, or its first tensor, when it has the state's shape; else ``None``."""
    for v in (u,) if isinstance(u, Tensor) else (u if isinstance(u, (tuple, list)) else ()):
        if isinstance(v, Tensor) and v.layout == torch.strided and v.shape == z.shape:
            return v
    return None


def injected_parts(u: Any, z: Any) -> list[Tensor | None]:
    """For each part of the state ``z``, the part of the injection ``u`` it is mixed with, or
    ``None``: for a tensor state, :func:`_injected_state`; for a structured one, the part of ``u``
    at the same place when ``u`` has the state's structure and that part has the state part's
    shape."""
    if isinstance(z, Tensor):
        return [_injected_state(u, z)]
    zs = tree_leaves(z)
    if isinstance(u, Tensor) or tree_structure(u) != tree_structure(z):
        return [None] * len(zs)
    return [v if isinstance(v, Tensor) and v.layout == torch.strided and v.shape == p.shape else None
            for v, p in zip(tree_leaves(u), zs, strict=True)]


class ChannelMLP(nn.Module):
    """An MLP over the channel dimension, applied at every position (a 1x1 convolution)."""

    def __init__(self, c_in: int, hidden: int, c_out: int, channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.net = nn.Sequential(nn.Linear(c_in, hidden), nn.SiLU(), nn.Linear(hidden, c_out))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: Tensor) -> Tensor:
        if self.channel_dim == 1 and h.dim() == 4:  # (B, C, H, W): 1x1 convolutions, no transposes
            first, last = self.net[0], self.net[2]
            h = F.conv2d(h, first.weight[:, :, None, None], first.bias)
            return F.conv2d(F.silu(h), last.weight[:, :, None, None], last.bias)
        moved = h.movedim(self.channel_dim, -1)
        return self.net(moved).movedim(-1, self.channel_dim)


class TimeEmbedding(nn.Module):
    """``t (B,) -> (B, out)`` through Fourier features of ``log t`` and an MLP (last layer zero)."""

    def __init__(self, features: int, hidden: int, out: int) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(32.0), features // 2)))
        self.net = nn.Sequential(nn.Linear(2 * (features // 2) + 1, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, t: Tensor) -> Tensor:
        s = torch.log(t.clamp_min(1e-6))[:, None] / 4
        ang = s * self.freqs[None]
        return self.net(torch.cat([torch.sin(ang), torch.cos(ang), s], dim=1))
