"""A complete DEQ network: input injection, the equilibrium layer, and a head.

``logits = head(z*)`` with ``z* = cell(z*, inject(x))``. Only calls of ``cell`` count as NFE.
Everything a consistency student needs to copy (``injection``, ``cell``, ``head``) is a named
submodule, so a student can be built from any :class:`DEQModel`.

Cell contract: ``cell(z, u) -> z`` with ``z`` of shape ``cell.state_shape(u)``. A cell also
declares ``channels`` (size of its feature dimension) and ``channel_dim`` (1 for ``(B, C, H, W)``
states, -1 for ``(B, T, C)`` or ``(B, N, C)``), which the student uses for time conditioning.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..solvers import SolverResult
from .layer import DEQ


class DEQModel(nn.Module):
    """``head(DEQ(cell)(injection(x)))``.

    Args:
        injection: ``x -> u``, the input injection (no NFE).
        cell: ``(z, u) -> z``, the equilibrium layer (1 NFE per call).
        head: ``z -> logits``.
        **deq_kwargs: solver, eval_solver, backward, max_iter, tol for :class:`DEQ`.
    """

    def __init__(self, injection: nn.Module, cell: nn.Module, head: nn.Module, **deq_kwargs: Any) -> None:
        super().__init__()
        for attr in ("channels", "channel_dim", "state_shape"):
            if not hasattr(cell, attr):
                raise TypeError(f"the cell must define {attr!r} (see cdeq.deq.model's docstring)")
        self.injection = injection
        self.head = head
        self.deq = DEQ(cell, **deq_kwargs)

    @property
    def cell(self) -> nn.Module:
        return self.deq.cell

    def inject(self, x: Any) -> Any:
        return self.injection(x)

    def initial_state(self, u: Any) -> Tensor:
        return self.deq.initial_state(u)

    def forward(self, x: Any, z0: Tensor | None = None) -> tuple[Tensor, SolverResult]:
        """Return ``(logits, info)`` where ``info`` is the forward solver's result."""
        u = self.inject(x)
        z, info = self.deq(u, z0)
        return self.head(z), info
