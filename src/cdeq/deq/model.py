"""A complete DEQ network: input injection, the equilibrium layer, and a head.

``logits = head(z*)`` with ``z* = cell(z*, inject(x))``. Only calls of ``cell`` count as NFE.
Everything a consistency student needs to copy (``injection``, ``cell``, ``head``) is a named
submodule, so a student can be built from any :class:`DEQModel`.

The cell is any ``f(z, u) -> z`` (a module or a plain function), as in TorchDEQ. What cdeq needs
to know beyond that is inferred:

- the state shape: ``cell.state_shape(u)`` when the cell has it, else the ``state_shape``
  argument (per-sample dims, or a function ``u -> shape``), else the shape of ``u`` itself;
- the channel size and axis the student's time conditioning acts on (only when distilling):
  the ``channels``/``channel_dim`` arguments, else the cell's attributes of those names, else read
  off the state the model last saw (axis 1 for ``(B, C, H, W)`` states, the last axis otherwise).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = DEQModel(nn.Linear(20, 64), lambda z, u: torch.tanh(0.5 * z + u), nn.Linear(64, 10))
    >>> logits, info = model(torch.randn(4, 20))
    >>> logits.shape, model.state_layout()
    (torch.Size([4, 10]), (64, -1))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..solvers import SolverResult
from .layer import DEQ, _tensors

StateShape = Sequence[int] | Callable[[Any], Sequence[int]]


class FunctionCell(nn.Module):
    """A plain function ``f(z, u)`` as a (parameter-free) module, so every cell is a module."""

    def __init__(self, fn: Callable[[Tensor, Any], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, z: Tensor, u: Any) -> Tensor:
        return self.fn(z, u)


class DEQModel(nn.Module):
    """``head(DEQ(cell)(injection(x)))``.

    Args:
        injection: ``x -> u``, the input injection (no NFE).
        cell: ``(z, u) -> z``, the equilibrium layer (1 NFE per call); any module or function.
        head: ``z -> logits``.
        state_shape: per-sample state dims (``(64,)``) or ``u -> full shape``; default: the cell's
            ``state_shape`` method, else the shape of ``u``.
        channels, channel_dim: size and axis of the state's channel dimension (for a student);
            default: the cell's attributes, else inferred from the state.
        **deq_kwargs: solver, eval_solver, backward, max_iter, tol for :class:`DEQ`.
    """

    def __init__(self, injection: nn.Module, cell: nn.Module | Callable[[Tensor, Any], Tensor],
                 head: nn.Module, *, state_shape: StateShape | None = None, channels: int | None = None,
                 channel_dim: int | None = None, **deq_kwargs: Any) -> None:
        super().__init__()
        if not callable(cell):
            raise TypeError(f"the cell must be a module or function f(z, u) -> z, not {type(cell).__name__}")
        if state_shape is not None and not callable(state_shape) and not all(
                isinstance(d, int) and d > 0 for d in state_shape):
            raise ValueError(f"state_shape={state_shape!r} is not valid; give the per-sample dims as "
                             "positive ints, e.g. (64,), or a function u -> full shape")
        self.injection = injection
        self.head = head
        self.deq = DEQ(cell if isinstance(cell, nn.Module) else FunctionCell(cell), **deq_kwargs)
        self.state_shape = state_shape
        self.channels = channels
        self.channel_dim = channel_dim
        self.deq_kwargs = dict(deq_kwargs)  # as given, so that the model can be saved and rebuilt
        self._seen_state: tuple[int, ...] | None = None  # per-sample shape of the last state

    @property
    def cell(self) -> nn.Module:
        return self.deq.cell

    def inject(self, x: Any) -> Any:
        return self.injection(x)

    def initial_state(self, u: Any) -> Tensor:
        """Zeros of the state shape ``(B, ...)`` for injected input ``u``."""
        if self.state_shape is None:
            z0 = self.deq.initial_state(u)
        else:
            ref = u if isinstance(u, Tensor) else next(iter(_tensors(u)))
            shape = (tuple(self.state_shape(u)) if callable(self.state_shape)
                     else (ref.shape[0], *self.state_shape))
            z0 = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        self._seen_state = tuple(z0.shape[1:])
        return z0

    def state_layout(self, x: Any = None) -> tuple[int, int]:
        """``(channels, channel_dim)`` of the state; ``x``: an example input to probe with.

        Raises ``ValueError`` naming what to pass when neither is given nor can be inferred."""
        channels = self.channels if self.channels is not None else getattr(self.cell, "channels", None)
        channel_dim = self.channel_dim if self.channel_dim is not None else getattr(
            self.cell, "channel_dim", None)
        if channels is not None and channel_dim is not None:
            return int(channels), int(channel_dim)
        shape = self._seen_state
        if x is not None:
            with torch.no_grad():
                shape = tuple(self.initial_state(self.inject(x)).shape[1:])
        elif shape is None and self.state_shape is not None and not callable(self.state_shape):
            shape = tuple(self.state_shape)
        if shape is None:
            raise ValueError(
                "the student needs the size and axis of the state's channel dimension, and this model "
                "has not seen a state yet: run the model once, pass an example input "
                "(ConsistencyStudent(model, example=x)), or build DEQModel(..., channels=C, "
                "channel_dim=D)")
        if channel_dim is None:
            channel_dim = 1 if len(shape) == 3 else -1  # (B, C, H, W) -> 1; (B, C), (B, T, C) -> -1
        axis = channel_dim - 1 if channel_dim > 0 else channel_dim  # axis in the per-sample shape
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"channel_dim={channel_dim} is not an axis of the state (B, {shape})")
        return int(channels if channels is not None else shape[axis]), int(channel_dim)

    def forward(self, x: Any, z0: Tensor | None = None) -> tuple[Tensor, SolverResult]:
        """Return ``(logits, info)`` where ``info`` is the forward solver's result."""
        u = self.inject(x)
        z, info = self.deq(u, self.initial_state(u) if z0 is None else z0)
        return self.head(z), info
