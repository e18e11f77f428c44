"""Limited-memory Broyden's ("good") method on ``g(z) = f(z) - z``.

The inverse Jacobian of ``g`` is approximated as ``H = -I + U V^T`` with at most ``memory`` rank-one
terms kept in a ring buffer, so memory stays ``O(memory B n)`` whatever the iteration limit. The step
is ``z <- z - H g(z)``; with ``H = -I`` it is a Picard step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..config import check_int
from .base import Solver, SolverOptions, register_solver


@dataclasses.dataclass
class BroydenOptions(SolverOptions):
    """``memory``: the number of rank-one updates kept (oldest dropped first)."""

    memory: int = 20

    def validate(self) -> None:
        super().validate()
        check_int("memory", self.memory, minimum=1)


def _apply_h(U: Tensor, V: Tensor, v: Tensor) -> Tensor:
    """``H v = -v + U (V^T v)`` for ``U, V: (B, m, n)``, ``v: (B, n)``."""
    return -v + torch.einsum("bmn,bm->bn", U, torch.einsum("bmn,bn->bm", V, v))


def _apply_ht(U: Tensor, V: Tensor, v: Tensor) -> Tensor:
    """``H^T v = -v + V (U^T v)``."""
    return -v + torch.einsum("bmn,bm->bn", V, torch.einsum("bmn,bn->bm", U, v))


@register_solver
class Broyden(Solver):
    """Limited-memory Broyden; one evaluation of ``f`` per step."""

    name = "broyden"
    Options = BroydenOptions

    def init_state(self, z0: Tensor) -> dict[str, Any]:
        batch, n = z0.shape
        m = self.options.memory
        return {
            "U": z0.new_zeros(batch, m, n),
            "V": z0.new_zeros(batch, m, n),
            "count": 0,
            "prev_z": None,
            "prev_g": None,
        }

    def step(self, state: dict[str, Any], it: int, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        U, V = state["U"], state["V"]
        g = fz - z
        if state["prev_z"] is not None:
            dz = z - state["prev_z"]
            dg = g - state["prev_g"]
            h_dg = _apply_h(U, V, dg)
            ht_dz = _apply_ht(U, V, dz)
            denom = (dz * h_dg).sum(dim=1, keepdim=True)
            ok = active[:, None] & torch.isfinite(denom) & (denom.abs() > 1e-30)
            safe = torch.where(ok, denom, torch.ones_like(denom))
            u = torch.where(ok, (dz - h_dg) / safe, 0.0)
            v = torch.where(ok, ht_dz, 0.0)
            slot = state["count"] % self.options.memory
            keep = ok
            U[:, slot] = torch.where(keep, u, U[:, slot])
            V[:, slot] = torch.where(keep, v, V[:, slot])
            state["count"] += 1
        state["prev_z"] = z.clone()
        state["prev_g"] = g.clone()
        nxt = z - _apply_h(U, V, g)
        return torch.where(torch.isfinite(nxt).all(dim=1, keepdim=True), nxt, fz)
