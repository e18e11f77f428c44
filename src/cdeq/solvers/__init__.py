"""Batched fixed-point solvers with per-sample stopping and one result type.

Examples:
    >>> import torch
    >>> from cdeq.solvers import get_solver
    >>> W = 0.5 * torch.eye(4)
    >>> res = get_solver("anderson", tol=1e-6).solve(lambda z, x: z @ W + x, torch.zeros(3, 4),
    ...                                             torch.ones(3, 4))
    >>> bool(res.converged.all())
    True
"""

from .anderson import Anderson, AndersonOptions
from .base import (
    SOLVERS,
    FixedPointFn,
    NonFiniteError,
    Solver,
    SolverOptions,
    SolverResult,
    SolverSpec,
    get_solver,
    register_solver,
)
from .broyden import Broyden, BroydenOptions
from .picard import Picard, PicardOptions

__all__ = [
    "SOLVERS",
    "Anderson",
    "AndersonOptions",
    "Broyden",
    "BroydenOptions",
    "FixedPointFn",
    "NonFiniteError",
    "Picard",
    "PicardOptions",
    "Solver",
    "SolverOptions",
    "SolverResult",
    "SolverSpec",
    "get_solver",
    "register_solver",
]
