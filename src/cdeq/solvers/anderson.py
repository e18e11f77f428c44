"""Anderson acceleration (type II) with a ring buffer of the last ``memory`` iterates.

At each step the mixing weights ``alpha`` (summing to one) minimise ``|sum_i alpha_i g_i|`` over
the stored residuals ``g_i = f(z_i) - z_i``; the next iterate is
``beta * sum alpha_i f(z_i) + (1 - beta) * sum alpha_i z_i``.

The Gram matrix ``G G^T`` of the stored residuals is kept up to date one row at a time, so a step
costs ``O(m B n)`` (one new row of inner products and one mixing), not ``O(m^2 B n)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..engine.config import check_int, check_positive, check_range
from .base import Solver, SolverOptions, register_solver


@dataclasses.dataclass
class AndersonOptions(SolverOptions):
    """``memory``: history size m; ``regularization``: Tikhonov weight, relative to each stored
    residual's squared norm (the Gram matrix ``A`` becomes ``A + regularization * diag(A)``);
    ``mixing``: beta in (0, 1]."""

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
    """Anderson acceleration; one evaluation of ``f`` per step, memory ``O(m B n)``.

    Examples:
        >>> import torch
        >>> W = 0.9 * torch.eye(3)
        >>> res = Anderson(tol=1e-6).solve(lambda z, x: z @ W + x, torch.zeros(2, 3), torch.ones(2, 3))
        >>> torch.allclose(res.z, torch.full((2, 3), 10.0), rtol=1e-4), int(res.nfe.max()) < 10
        (True, True)
    """

    name = "anderson"
    Options = AndersonOptions

    def init_state(self, z0: Tensor) -> dict[str, Any]:
        m = self.options.memory
        batch, n = z0.shape
        return {  # only the filled slots (the first min(count, m)) are ever read
            "F": z0.new_empty(batch, m, n),  # f(z_i)
            "G": z0.new_empty(batch, m, n),  # g_i = f(z_i) - z_i
            "gram": z0.new_empty(batch, m, m),  # <g_i, g_j>
            "ones": z0.new_ones(batch, m, 1),
            "picard": torch.eye(m, dtype=z0.dtype, device=z0.device),  # row i: all weight on slot i
            "count": 0,
        }

    def step(self, state: dict[str, Any], it: int, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        opts = self.options
        F, G, gram = state["F"], state["G"], state["gram"]
        g = state["g"] if "g" in state else fz - z
        slot = state["count"] % opts.memory
        # Rows of stopped samples are written too: the loop ignores their next iterate.
        F[:, slot] = fz
        G[:, slot] = g
        state["count"] += 1
        h = min(state["count"], opts.memory)
        Gh = G[:, :h]
        # <g_i, g> as (B, 1, n) @ (B, n, h): on CPU several times faster than (B, h, n) @ (B, n, 1).
        row = torch.bmm(g.unsqueeze(1), Gh.transpose(1, 2)).squeeze(1)  # (B, h)
        gram[:, slot, :h] = row
        gram[:, :h, slot] = row
        if h == 1:
            return fz if opts.mixing == 1.0 else z + opts.mixing * g
        A = gram[:, :h, :h]
        # Tikhonov term relative to each residual's own squared norm (scale invariant, and it does
        # not swamp the newest, smallest residuals the way a term relative to the largest would).
        diag = A.diagonal(dim1=1, dim2=2)
        A = A + torch.diag_embed(opts.regularization * diag + torch.finfo(A.dtype).tiny)
        # (B, h, 1) = A^-1 1; no error if singular
        weights, _ = torch.linalg.solve_ex(A, state["ones"][:, :h])
        total = weights.sum(dim=1, keepdim=True)
        ok = torch.isfinite(weights).all(dim=1, keepdim=True) & (total.abs() > 1e-30)
        alpha = (weights / torch.where(ok, total, 1.0)).transpose(1, 2)  # (B, 1, h)
        # A degenerate system (all residuals zero or non-finite) falls back to a Picard step, the
        # weight 1 on the newest value (exactly f(z) while the stored values are finite; a row
        # with a non-finite one has stopped). No host sync, and no ``where`` over the full state.
        if opts.mixing == 1.0:
            alpha = torch.where(ok, alpha, state["picard"][slot, :h])
            return torch.bmm(alpha, F[:, :h]).squeeze(1)
        nxt = torch.bmm(alpha, F[:, :h]).squeeze(1)
        nxt = nxt - (1 - opts.mixing) * torch.bmm(alpha, Gh).squeeze(1)  # sum alpha_i z_i + ...
        return torch.where(ok.reshape(-1, 1), nxt, fz)
