"""Limited-memory Broyden's ("good") method on ``g(z) = f(z) - z``.

The inverse Jacobian of ``g`` is approximated as ``H = -I + U V^T`` with at most ``memory`` rank-one
terms, so memory stays ``O(memory B n)`` whatever the iteration limit. The step is ``z <- z - H g(z)``;
with ``H = -I`` it is a Picard step. When ``memory`` updates are stored the approximation restarts
from ``H = -I`` (dropping only the oldest term instead would break the secant conditions the later
terms were built on, and the iteration soon diverges).

Each step applies ``H`` once and ``H^T`` once: ``H_{k-1} dg`` is obtained as ``H_{k-1} g_k -
H_{k-1} g_{k-1}``, the second term being kept from the previous step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..engine.config import check_int
from .base import Solver, SolverOptions, register_solver


@dataclasses.dataclass
class BroydenOptions(SolverOptions):
    """``memory``: the number of rank-one updates kept before the approximation restarts."""

    memory: int = 20

    def validate(self) -> None:
        super().validate()
        check_int("memory", self.memory, minimum=1)


def _apply_h(U: Tensor, V: Tensor, v: Tensor) -> Tensor:
    """``H v = -v + U (V^T v)`` for ``U, V: (B, h, n)``, ``v: (B, n)``."""
    if U.shape[1] == 0:
        return -v
    # (B, 1, n) @ (B, n, h) is several times faster on CPU than (B, h, n) @ (B, n, 1).
    coef = torch.bmm(v.unsqueeze(1), V.transpose(1, 2))  # (B, 1, h)
    return torch.baddbmm(v.unsqueeze(1), coef, U, beta=-1).squeeze(1)


def _apply_ht(U: Tensor, V: Tensor, v: Tensor) -> Tensor:
    """``H^T v = -v + V (U^T v)``."""
    return _apply_h(V, U, v)


@register_solver
class Broyden(Solver):
    """Limited-memory Broyden; one evaluation of ``f`` per step.

    Examples:
        >>> import torch
        >>> W = torch.tensor([[0.5, 0.3], [-0.2, 0.6]])
        >>> res = Broyden(tol=1e-6).solve(lambda z, x: z @ W.T + x, torch.zeros(2, 2), torch.ones(2, 2))
        >>> z_star = torch.linalg.solve(torch.eye(2) - W, torch.ones(2))
        >>> torch.allclose(res.z, z_star.expand(2, 2), atol=1e-5), bool(res.converged.all())
        (True, True)
    """

    name = "broyden"
    Options = BroydenOptions

    def init_state(self, z0: Tensor) -> dict[str, Any]:
        batch, n = z0.shape
        m = self.options.memory
        return {  # only the first ``count`` slots are read, each after it is written
            "U": z0.new_empty(batch, m, n),
            "V": z0.new_empty(batch, m, n),
            "count": 0,  # rank-one terms in use (since the last restart)
            "prev_z": None,
            "prev_g": None,
            "prev_hg": None,  # H g at the previous iterate, with the H of that step
        }

    def step(self, state: dict[str, Any], it: int, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        U, V = state["U"], state["V"]
        g = state["g"] if "g" in state else fz - z
        if state["prev_z"] is None:
            hg = -g
        else:
            dz = z - state["prev_z"]
            count = state["count"]
            if count == self.options.memory:  # restart from H = -I
                count = state["count"] = 0
            Uh, Vh = U[:, :count], V[:, :count]
            if count == 0:
                a, h_dg, v = -g, state["prev_g"] - g, -dz
            else:
                a = _apply_h(Uh, Vh, g)  # H g
                h_dg = a - state["prev_hg"]  # H dg
                v = _apply_ht(Uh, Vh, dz)  # H^T dz
            denom = torch.linalg.vecdot(dz, h_dg).unsqueeze(1)  # dz^T H dg
            ok = torch.isfinite(denom) & (denom.abs() > 1e-30) & torch.isfinite(v.sum(1, keepdim=True))
            u = (dz - h_dg) / denom
            # A running sample with a degenerate or non-finite update skips it (zero term); so
            # do the rows of stopped samples, whose next iterate is ignored. No host sync here.
            keep = ok & active[:, None]
            u = torch.where(keep, u, 0.0)
            v = torch.where(keep, v, 0.0)
            U[:, count] = u
            V[:, count] = v
            state["count"] = count + 1
            # the updated H applied to g: H g + u (v^T g)
            hg = torch.addcmul(a, u, torch.linalg.vecdot(v, g).unsqueeze(1))
        state["prev_z"], state["prev_g"], state["prev_hg"] = z, g, hg
        nxt = z - hg
        # One reduction instead of an elementwise isfinite: inf or nan anywhere makes the sum so.
        finite = torch.isfinite(nxt.sum(dim=1, keepdim=True))
        return torch.where(finite, nxt, fz)
