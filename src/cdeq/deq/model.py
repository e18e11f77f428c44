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

A state may be a tuple, list or dict of tensors (MDEQ's resolutions, DEQ-Flow's (flow, hidden)):
the cell takes and returns that structure, the head reads it, and by default it is zeros shaped
like the parts of ``u``. A ``state_shape`` may then be a structure of per-sample shapes (or a
function returning one of full shapes), and ``channels``/``channel_dim`` one value per part (or
one for every part); inferred, each part's channel axis is read off the part.

Examples:
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

from ..engine.tree import Layout
from ..solvers import SolverResult
from .layer import DEQ, _is_shape, _tensors, zeros_of

StateShape = Sequence[int] | Callable[[Any], Any] | Any


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
        state_shape: per-sample state dims (``(64,)``), a tuple / list / dict of them for a
            structured state, or ``u -> full shape(s)``; default: the cell's ``state_shape``
            method, else the shape of ``u`` (of each part of ``u``).
        channels: size of the state's channel dimension (for a student), one value or one per
            part (a tuple in the parts' order); default: the cell's ``channels`` attribute, else
            inferred from the state.
        channel_dim: axis of that dimension, one value or one per part; default: the cell's
            ``channel_dim`` attribute, else 1 for ``(B, C, H, W)`` states and the last axis
            otherwise.
        **deq_kwargs: solver, eval_solver, backward, max_iter, tol for :class:`DEQ`.
    """

    def __init__(self, injection: nn.Module, cell: nn.Module | Callable[[Tensor, Any], Tensor],
                 head: nn.Module, *, state_shape: StateShape | None = None, channels: int | None = None,
                 channel_dim: int | None = None, **deq_kwargs: Any) -> None:
        super().__init__()
        if not callable(cell):
            raise TypeError(f"the cell must be a module or function f(z, u) -> z, not {type(cell).__name__}")
        if state_shape is not None and not callable(state_shape) and not _valid_dims(state_shape):
            raise ValueError(f"state_shape={state_shape!r} is not valid; give the per-sample dims as "
                             "positive ints, e.g. (64,), a tuple / list / dict of such dims for a "
                             "structured state, or a function u -> full shape")
        self.injection = injection
        self.head = head
        self.deq = DEQ(cell if isinstance(cell, nn.Module) else FunctionCell(cell), **deq_kwargs)
        self.state_shape = state_shape
        self.channels = channels
        self.channel_dim = channel_dim
        self.deq_kwargs = dict(deq_kwargs)  # as given, so that the model can be saved and rebuilt
        self._seen_state: Layout | None = None  # the layout of the last state

    @property
    def cell(self) -> nn.Module:
        return self.deq.cell

    def inject(self, x: Any) -> Any:
        """The input injection ``u = injection(x)`` (computed once per input; not a layer call)."""
        return self.injection(x)

    def initial_state(self, u: Any) -> Any:
        """Zeros of the state shape ``(B, ...)`` (or of each part's) for injected input ``u``."""
        if self.state_shape is None:
            z0 = self.deq.initial_state(u)
        else:
            ref = u if isinstance(u, Tensor) else next(iter(_tensors(u)))
            if callable(self.state_shape):
                z0 = zeros_of(self.state_shape(u), ref)
            else:
                full = _map_dims(lambda dims: (ref.shape[0], *dims), self.state_shape)
                z0 = zeros_of(full, ref)
        self._seen_state = Layout.of(z0, "initial state")
        return z0

    def state_layout(self, x: Any = None) -> tuple[Any, Any]:
        """``(channels, channel_dim)`` of the state, ints for a tensor state and tuples (one per
        part, in the parts' order) for a structured one; ``x``: an example input to probe with.

        Raises ``ValueError`` naming what to pass when neither is given nor can be inferred."""
        channels = self.channels if self.channels is not None else getattr(self.cell, "channels", None)
        channel_dim = self.channel_dim if self.channel_dim is not None else getattr(
            self.cell, "channel_dim", None)
        layout = self._seen_state
        if x is not None:
            with torch.no_grad():
                self.initial_state(self.inject(x))
            layout = self._seen_state
        elif layout is None and self.state_shape is not None and not callable(self.state_shape):
            dims = _map_dims(tuple, self.state_shape)
            layout = Layout.of(_map_dims(lambda d: torch.empty(1, *d, device="meta"), dims))
        if channels is not None and channel_dim is not None:
            if isinstance(channels, int) and isinstance(channel_dim, int) and (
                    layout is None or layout.single):
                return int(channels), int(channel_dim)
            if not isinstance(channels, int):  # one per part, given: no state needed
                dims = _per_part("channel_dim", channel_dim, len(channels))
                return tuple(int(c) for c in channels), tuple(int(d) for d in dims)
        if layout is None:
            raise ValueError(
                "the student needs the size and axis of the state's channel dimension, and this model "
                "has not seen a state yet: run the model once, pass an example input "
                "(ConsistencyStudent(model, example=x)), or build DEQModel(..., channels=C, "
                "channel_dim=D)")
        n = len(layout.shapes)
        per_c = _per_part("channels", channels, n)
        per_d = _per_part("channel_dim", channel_dim, n)
        cs, ds = [], []
        for name, shape, c, d in zip(layout.names, layout.shapes, per_c, per_d, strict=True):
            if d is None:
                d = 1 if len(shape) == 3 else -1  # (B, C, H, W) -> 1; (B, C), (B, T, C) -> -1
            axis = d - 1 if d > 0 else d  # axis in the per-sample shape
            if not -len(shape) <= axis < len(shape):
                part = f" part z{name}" if name else ""
                raise ValueError(f"channel_dim={d} is not an axis of the state{part} (B, {shape})")
            cs.append(int(c if c is not None else shape[axis]))
            ds.append(int(d))
        if layout.single:
            return cs[0], ds[0]
        return tuple(cs), tuple(ds)

    def forward(self, x: Any, z0: Any = None) -> tuple[Tensor, SolverResult]:
        """``head(z*)`` for the input ``x``.

        Args:
            x: the model's input (``(B, ...)``, or what the injection takes).
            z0: the solver's start (``(B, ...)`` or a structure of parts); zeros of the state
                shape when ``None``.

        Returns:
            ``(logits, info)``: the head's output ``(B, ...)`` and the forward solve's
            :class:`SolverResult` (``info.nfe``, ``info.residual``, ``info.converged`` per sample).
        """
        u = self.inject(x)
        z, info = self.deq(u, self.initial_state(u) if z0 is None else z0)
        return self.head(z), info


def _valid_dims(dims: Any) -> bool:
    """Per-sample dims: positive ints, or a non-empty tuple / list / dict of such dims."""
    if _is_shape(dims):
        return all(isinstance(d, int) and d > 0 for d in dims)
    if isinstance(dims, dict):
        return bool(dims) and all(_valid_dims(v) for v in dims.values())
    if isinstance(dims, (tuple, list)):
        return bool(dims) and all(_valid_dims(v) for v in dims)
    return False


def _map_dims(fn: Callable[[Sequence[int]], Any], dims: Any) -> Any:
    """``fn`` applied to each shape of a (structure of) per-sample dims."""
    if _is_shape(dims):
        return fn(dims)
    if isinstance(dims, dict):
        return {k: _map_dims(fn, v) for k, v in dims.items()}
    return type(dims)(_map_dims(fn, v) for v in dims)


def _per_part(name: str, value: Any, parts: int) -> list[Any]:
    """``value`` (``None``, one int for every part, or one per part) as a list of ``parts``."""
    if value is None or isinstance(value, int):
        return [value] * parts
    values = list(value)
    if len(values) != parts:
        raise ValueError(f"{name}={value!r} gives {len(values)} values for a state of {parts} parts; "
                         "give one per part, in the parts' order")
    return values
