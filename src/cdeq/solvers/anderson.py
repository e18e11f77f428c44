"""Anderson acceleration (type II) with a ring buffer of the last ``memory`` iterates.

At each step the mixing weights ``alpha`` (summing to one) minimise ``|sum_i alpha_i g_i|`` over
the stored residuals ``g_i = f(z_i) - z_i``; the next iterate is
``beta * sum alpha_i f(z_i) + (1 - beta) * sum alpha_i z_i``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..config import check_int, check_positive, check_range
from .base import Solver, SolverOptions, register_solver


@dataclasses.dataclass
class AndersonOptions(SolverOptions):
    """``memory``: history size m; ``regularization``: Tikhonov weight relative to the mean
    diagonal of the Gram matrix; ``mixing``: beta in (0, 1]."""

    memory: int = 5
    regularization: float = 1e-4
    mixing: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_int("memory", self.memory, minimum=1)
        check_positive("regularization", self.regularization, allow_zero=True)
        check_range("mixing", self.mixing, 1e-6, 1.0)


@register_solver
class Anderson(Solver):
    """Anderson acceleration; one evaluation of ``f`` per step, memory ``O(m B n)``."""

    name = "anderson"
    Options = AndersonOptions

    def init_state(self, z0: Tensor) -> dict[str, Any]:
        m = self.options.memory
        batch, n = z0.shape
        return {
            "X": z0.new_zeros(batch, m, n),
            "F": z0.new_zeros(batch, m, n),
            "count": 0,
        }

    def step(self, state: dict[str, Any], it: int, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        opts = self.options
        X, F = state["X"], state["F"]
        slot = state["count"] % opts.memory
        keep = active[:, None]
        X[:, slot] = torch.where(keep, z, X[:, slot])
        F[:, slot] = torch.where(keep, fz, F[:, slot])
        state["count"] += 1
        h = min(state["count"], opts.memory)
        if h == 1:
            return (1 - opts.mixing) * z + opts.mixing * fz
        G = F[:, :h] - X[:, :h]  # (B, h, n)
        gram = torch.bmm(G, G.transpose(1, 2))  # (B, h, h)
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
        eye = torch.eye(h, dtype=z.dtype, device=z.device)
        gram = gram + (opts.regularization * scale)[:, None, None] * eye
        ones = z.new_ones(z.shape[0], h, 1)
        weights = torch.linalg.solve(gram, ones)  # (B, h, 1)  gram^-1 1
        total = weights.sum(dim=1, keepdim=True)
        ok = torch.isfinite(weights).all(dim=1, keepdim=True) & (total.abs() > 1e-30)
        alpha = torch.where(ok, weights / torch.where(ok, total, torch.ones_like(total)), 0.0)
        mixed_f = torch.bmm(alpha.transpose(1, 2), F[:, :h]).squeeze(1)
        mixed_x = torch.bmm(alpha.transpose(1, 2), X[:, :h]).squeeze(1)
        nxt = opts.mixing * mixed_f + (1 - opts.mixing) * mixed_x
        # A degenerate system (all residuals zero or non-finite) falls back to a Picard step.
        return torch.where(ok.squeeze(2), nxt, fz)
