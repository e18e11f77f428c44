"""The DEQ layer: the fixed point of a user layer ``f(z, x)``, with a chosen backward.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Cell(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = nn.Linear(8, 8)
    ...     def forward(self, z, x):
    ...         return torch.tanh(0.5 * self.lin(z) + x)
    >>> deq = DEQ(Cell(), solver="anderson")
    >>> z, info = deq(torch.randn(4, 8))
    >>> z.shape, bool(info.converged.all())
    (torch.Size([4, 8]), True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.config import Config, ConfigError, check_int, check_positive
from ..solvers import SOLVERS, Solver, SolverResult, get_solver
from .backward import BackwardStrategy, get_backward


@dataclasses.dataclass
class SolverSpec(Config):
    """A solver and its options, as written in a configuration file."""

    name: str = "anderson"
    max_iter: int = 30
    tol: float = 1e-4
    stop_mode: str = "rel"
    options: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.name not in SOLVERS:
            raise ConfigError(f"solver name={self.name!r} is not valid; choose from {sorted(SOLVERS)}")
        check_int("max_iter", self.max_iter, minimum=1)
        check_positive("tol", self.tol, allow_zero=True)
        self.build()  # validates the solver-specific options

    def build(self, **overrides: Any) -> Solver:
        kwargs = {"max_iter": self.max_iter, "tol": self.tol, "stop_mode": self.stop_mode}
        kwargs.update(self.options)
        kwargs.update(overrides)
        return get_solver(self.name, **kwargs)


def _as_solver(spec: str | dict | Solver | SolverSpec, **defaults: Any) -> Solver:
    if isinstance(spec, SolverSpec):
        return spec.build()
    if isinstance(spec, str):
        return get_solver(spec, **defaults)
    if isinstance(spec, dict):
        merged = {**defaults, **spec}
        return get_solver(merged)
    return get_solver(spec)


class DEQ(nn.Module):
    """Fixed point ``z* = f(z*, x)`` of ``cell`` with solver statistics.

    Args:
        cell: a module (or callable) ``f(z, x) -> z``, ``z`` of shape ``(B, ...)``.
        solver: forward solver for training (name, dict, :class:`SolverSpec` or :class:`Solver`).
        eval_solver: forward solver in eval mode (defaults to ``solver``).
        backward: a :class:`BackwardStrategy`, a registered name (``implicit``, ``phantom``,
            ``jacobian_free`` or one added with ``register_backward``) or
            ``{"name": ..., **options}``.
        max_iter, tol: defaults for solvers given by name.

    ``forward(x, z0=None)`` returns ``(z, info)``: ``z`` of the shape of ``z0`` (zeros shaped by
    ``cell.state_shape(x)`` when ``z0`` is ``None``) and ``info`` the forward :class:`SolverResult`.
    """

    def __init__(
        self,
        cell: nn.Module | Callable[[Tensor, Any], Tensor],
        solver: str | dict | Solver | SolverSpec = "anderson",
        eval_solver: str | dict | Solver | SolverSpec | None = None,
        backward: str | dict | BackwardStrategy = "implicit",
        max_iter: int = 30,
        tol: float = 1e-4,
    ) -> None:
        super().__init__()
        self.cell = cell
        self.solver = _as_solver(solver, max_iter=max_iter, tol=tol)
        self.eval_solver = self.solver if eval_solver is None else _as_solver(
            eval_solver, max_iter=max_iter, tol=tol
        )
        self.backward_strategy = get_backward(backward)

    def f(self, z: Tensor, x: Any) -> Tensor:
        """One layer call (1 NFE)."""
        return self.cell(z, x)

    def initial_state(self, x: Any) -> Tensor:
        """Zeros of the state shape the cell declares for input ``x``."""
        shape_fn = getattr(self.cell, "state_shape", None)
        if shape_fn is None:
            if isinstance(x, Tensor):
                return torch.zeros_like(x)
            raise ValueError(
                "pass z0, or give the cell a state_shape(x) method returning the state shape"
            )
        ref = x if isinstance(x, Tensor) else next(iter(_tensors(x)))
        return torch.zeros(shape_fn(x), dtype=ref.dtype, device=ref.device)

    def solve(
        self,
        x: Any,
        z0: Tensor | None = None,
        solver: Solver | None = None,
        **solve_kwargs: Any,
    ) -> SolverResult:
        """Run a solver without a graph (training or eval solver by mode unless given)."""
        solver = solver or (self.solver if self.training else self.eval_solver)
        z0 = self.initial_state(x) if z0 is None else z0
        return solver.solve(self.f, z0, x, **solve_kwargs)

    def forward(self, x: Any, z0: Tensor | None = None) -> tuple[Tensor, SolverResult]:
        info = self.solve(x, z0)
        z = info.z
        if torch.is_grad_enabled() and (self.training or _needs_grad(x, self.cell)):
            z = self.backward_strategy.attach(self.f, z, x)
        return z, info


def _tensors(x: Any):
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for item in x:
            yield from _tensors(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _tensors(item)


def _needs_grad(x: Any, cell: Any) -> bool:
    if any(t.requires_grad for t in _tensors(x)):
        return True
    params = cell.parameters() if isinstance(cell, nn.Module) else []
    return any(p.requires_grad for p in params)
