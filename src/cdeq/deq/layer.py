"""The DEQ layer: the fixed point of a user layer ``f(z, x)``, with a chosen backward.

Examples:
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

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_leaves, tree_unflatten

from ..engine.tree import check_tensors, zeros_like
from ..solvers import Solver, SolverResult, SolverSpec, get_solver
from .backward import BackwardStrategy, get_backward


def _as_solver(spec: str | SolverSpec, **defaults: Any) -> Solver:
    """The solver named by ``spec``: a registered name (``defaults``: ``max_iter``, ``tol``) or a
    :class:`SolverSpec` (a dict or a built solver still work for one release, with a warning)."""
    if isinstance(spec, SolverSpec):
        return spec.build()
    if isinstance(spec, str):
        return get_solver(spec, **defaults)
    if isinstance(spec, dict):
        return get_solver({**defaults, **spec})
    return get_solver(spec)


class DEQ(nn.Module):
    """Fixed point ``z* = f(z*, x)`` of ``cell`` with solver statistics.

    Args:
        cell: a module (or callable) ``f(z, x) -> z``, ``z`` of shape ``(B, ...)``.
        solver: forward solver for training: a registered name (``"anderson"``; ``max_iter`` and
            ``tol`` below) or a :class:`SolverSpec` (a dict or a built solver still work for one
            release, with a ``DeprecationWarning``).
        eval_solver: forward solver in eval mode, named the same way (defaults to ``solver``).
        backward: a :class:`BackwardStrategy`, a registered name (``implicit``, ``phantom``,
            ``jacobian_free`` or one added with ``register_backward``) or
            ``{"name": ..., **options}``.
        max_iter: default iteration limit for solvers given by name.
        tol: default tolerance for solvers given by name.

    ``forward(x, z0=None)`` returns ``(z, info)``: ``z`` of the shape of ``z0`` (zeros shaped by
    ``cell.state_shape(x)`` when ``z0`` is ``None``) and ``info`` the forward :class:`SolverResult`.
    A state may be a tuple, list or dict of tensors (:mod:`cdeq.engine.tree`): ``z0``, the cell's
    input and output and ``z`` then share that structure.
    """

    def __init__(
        self,
        cell: nn.Module | Callable[[Tensor, Any], Tensor],
        solver: str | SolverSpec = "anderson",
        eval_solver: str | SolverSpec | None = None,
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

    def f(self, z: Any, x: Any) -> Any:
        """One layer call (1 NFE)."""
        return self.cell(z, x)

    def initial_state(self, x: Any) -> Any:
        """Zeros of the state shape the cell declares for input ``x`` (``cell.state_shape(x)``: a
        full shape, or a tuple / list / dict of them for a structured state), else zeros shaped
        like ``x`` (every part of it, for a structured ``x`` of dense floating-point tensors)."""
        shape_fn = getattr(self.cell, "state_shape", None)
        if shape_fn is None:
            if isinstance(x, Tensor):
                return torch.zeros_like(x)
            parts = list(_tensors(x))
            if parts and all(t.layout == torch.strided and t.is_floating_point() for t in parts):
                check_tensors(x, "injection")
                return zeros_like(x)
            raise ValueError(
                "pass z0, or give the cell a state_shape(x) method returning the state shape"
            )
        ref = x if isinstance(x, Tensor) else next(iter(_tensors(x)))
        return zeros_of(shape_fn(x), ref)

    def solve(
        self,
        x: Any,
        z0: Any = None,
        solver: Solver | None = None,
        **solve_kwargs: Any,
    ) -> SolverResult:
        """Run a solver without a graph (training or eval solver by mode unless given)."""
        solver = solver or (self.solver if self.training else self.eval_solver)
        z0 = self.initial_state(x) if z0 is None else z0
        return solver.solve(self.f, z0, x, **solve_kwargs)

    def forward(self, x: Any, z0: Any = None) -> tuple[Any, SolverResult]:
        """Solve ``z = cell(z, x)`` from ``z0`` (zeros by default).

        Args:
            x: the cell's input: a tensor ``(B, ...)`` or any structure of tensors.
            z0: the start: ``(B, ...)``, or a tuple / list / dict of such parts; zeros of the cell's
                state shape when ``None``.

        Returns:
            ``(z, info)``: the equilibrium (shaped like ``z0``), carrying gradients through the
            backward strategy when they are needed, and the forward solve's :class:`SolverResult`.
        """
        info = self.solve(x, z0)
        z = info.z
        if torch.is_grad_enabled() and (self.training or _needs_grad(x, self.cell)):
            z = self.backward_strategy.attach(self.f, z, x)
        return z, info


def _tensors(x: Any):
    yield from (t for t in tree_leaves(x) if isinstance(t, Tensor))


def _is_shape(s: Any) -> bool:
    """Whether ``s`` is one shape (a ``torch.Size`` or a tuple / list of sizes: ints, or the
    symbolic sizes of export and tracing), not a structure of shapes."""
    return isinstance(s, torch.Size) or (isinstance(s, (tuple, list)) and not any(
        isinstance(d, (tuple, list, dict, bool, float, str)) or d is None for d in s))


def zeros_of(shapes: Any, ref: Tensor) -> Any:
    """Zeros of ``shapes`` (one full shape, or a tuple / list / dict of them) with ``ref``'s dtype
    and device; ``ValueError`` naming a part that is not a shape."""
    if _is_shape(shapes):
        return torch.zeros(tuple(shapes), dtype=ref.dtype, device=ref.device)
    flat, spec = tree_flatten(shapes, is_leaf=_is_shape)
    for path, leaf in tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]:
        if not _is_shape(leaf) or not leaf:
            raise ValueError(f"state shape part {keystr(path) or leaf!r} is {leaf!r}, not a shape; give "
                             "a shape (a tuple of ints) or a tuple / list / dict of shapes")
    return tree_unflatten([torch.zeros(tuple(s), dtype=ref.dtype, device=ref.device) for s in flat], spec)


def _needs_grad(x: Any, cell: Any) -> bool:
    if any(t.requires_grad for t in _tensors(x)):
        return True
    params = cell.parameters() if isinstance(cell, nn.Module) else []
    return any(p.requires_grad for p in params)
