"""Backward strategies: how gradients reach the parameters through a fixed point.

Each strategy is a small object with one method, ``attach(f, z_star, x) -> z``: given the
equilibrium ``z_star`` found without a graph, it returns a tensor equal (or close) to ``z_star``
whose graph carries the chosen gradient to the parameters of ``f`` and to ``x``.

- :class:`ImplicitBackward`: exact implicit differentiation. The incoming gradient ``v`` is
  replaced by the solution ``g`` of ``g = J_f(z*)^T g + v`` (the adjoint fixed point), found with a
  solver of its own.
- :class:`PhantomBackward`: ``k`` damped unrolled steps from ``z*`` (phantom gradient).
- :class:`JacobianFreeBackward`: one step from ``z*``, i.e. ``J`` replaced by zero (``k = 1``,
  no damping).

A state may be a structure of tensors (:mod:`cdeq.engine.tree`): the implicit strategy then solves
one adjoint fixed point over all parts (their gradients packed into one ``(B, N)`` matrix), and the
unrolled ones step every part together.

Strategies are registered by name like solvers (:func:`register_backward`); the keys each one
accepts are the fields of its ``Options`` dataclass.

Examples:
    >>> get_backward({"name": "phantom", "steps": 3})
    PhantomBackward(steps=3, damping=0.5)
    >>> sorted(BACKWARDS)
    ['implicit', 'jacobian_free', 'phantom']
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..engine.config import Config, ConfigError, check_int, check_keys, check_positive, check_range
from ..engine.precision import caller_autocast
from ..engine.tree import Layout, tree_map
from ..solvers import Solver, SolverResult, get_solver


@dataclasses.dataclass
class NoOptions(Config):
    """A strategy without options."""


class BackwardStrategy:
    """Base class of backward strategies: ``name``, ``Options`` (a :class:`Config` dataclass whose
    fields are the constructor's keyword arguments) and :meth:`attach`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[Config]] = NoOptions
    extra_nfe: int = 1

    def attach(self, f: Any, z_star: Any, x: Any) -> Any:
        """A state equal (or close) to ``z_star`` (a tensor or a structure of tensors) whose graph
        carries this strategy's gradient to ``f``'s parameters and to ``x``."""
        raise NotImplementedError


BACKWARDS: dict[str, type[BackwardStrategy]] = {}


def register_backward(cls: type[BackwardStrategy]) -> type[BackwardStrategy]:
    """Class decorator: make a strategy available by ``cls.name`` to :func:`get_backward`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    if not (dataclasses.is_dataclass(cls.Options) and issubclass(cls.Options, Config)):
        raise ValueError(f"{cls.__name__}.Options must be a cdeq.engine.config.Config dataclass")
    BACKWARDS[cls.name] = cls
    return cls


@dataclasses.dataclass
class ImplicitOptions(Config):
    """``solver``: of the adjoint fixed point (name or ``{"name": ..., **options}``);
    ``max_iter``, ``tol``: its limits."""

    solver: str | dict = "anderson"
    max_iter: int = 30
    tol: float = 1e-5

    def validate(self) -> None:
        check_int("max_iter", self.max_iter, minimum=1)
        check_positive("tol", self.tol, allow_zero=True)


@register_backward
class ImplicitBackward(BackwardStrategy):
    """Exact gradient by the implicit function theorem.

    Args:
        solver: solver of the adjoint fixed point (name, dict or :class:`Solver`).
        max_iter: its iteration limit.
        tol: its tolerance.
    """

    name = "implicit"
    Options = ImplicitOptions
    extra_nfe = 1

    def __init__(self, solver: str | dict | Solver = "anderson", max_iter: int = 30,
                 tol: float = 1e-5) -> None:
        self.solver = get_solver(solver, max_iter=max_iter, tol=tol, compact=False)
        self.last_stats: SolverResult | None = None
    def __repr__(self) -> str:
        return f"ImplicitBackward({self.solver!r})"

    def attach(self, f: Any, z_star: Any, x: Any) -> Any:
        if not isinstance(z_star, Tensor):
            return self._attach_structured(f, z_star, x)
        z_in = z_star.detach().requires_grad_()
        z_out = f(z_in, x)
        if not z_out.requires_grad:
            return z_out

        rebuild_autocast = caller_autocast(z_star.device)  # backward runs outside the forward's
        inside = [False]  # the vector-Jacobian products below pass through this hook again
        # The hook holds z_out weakly: a strong reference would make a cycle through autograd's
        # C++ side that Python's collector cannot see, keeping every step's tensors alive.
        z_out_ref = weakref.ref(z_out)

        def hook(grad: Tensor) -> Tensor:
            if inside[0]:
                return grad
            zi, zo = z_in, z_out_ref()
            if zo is None:  # the caller dropped z_out: rebuild its one-call graph (1 NFE)
                zi = z_in.detach().requires_grad_()
                with torch.enable_grad(), rebuild_autocast():
                    zo = f(zi, x)

            def adjoint(g: Tensor, _: Any) -> Tensor:
                (vjp,) = torch.autograd.grad(zo, zi, g, retain_graph=True)
                return vjp + grad

            inside[0] = True
            try:
                res = self.solver.solve(adjoint, grad.detach().clone())
            finally:
                inside[0] = False
            self.last_stats = res
            return res.z

        z_out.register_hook(hook)
        return z_out

    def _attach_structured(self, f: Any, z_star: Any, x: Any) -> Any:
        """:meth:`attach` for a structured state: the output's parts are packed into one ``(B, N)``
        tensor whose gradient hook solves the adjoint over all parts at once; the parts returned
        are views of it."""
        layout = Layout.of(z_star)
        leaves_in = [t.detach().requires_grad_() for t in layout.leaves(z_star)]
        z_out = f(layout.unflatten(leaves_in), x)
        layout.check(z_out, leaves_in[0].shape[0], "the DEQ layer")
        packed = layout.pack(z_out)
        if not packed.requires_grad:
            return z_out
        rebuild_autocast = caller_autocast(leaves_in[0].device)
        inside = [False]
        packed_ref = weakref.ref(packed)  # held weakly, as in attach

        def hook(grad: Tensor) -> Tensor:
            if inside[0]:
                return grad
            zi, zo = leaves_in, packed_ref()
            if zo is None:
                zi = [t.detach().requires_grad_() for t in leaves_in]
                with torch.enable_grad(), rebuild_autocast():
                    zo = layout.pack(f(layout.unflatten(zi), x))

            def adjoint(g: Tensor, _: Any) -> Tensor:
                vjps = torch.autograd.grad(zo, zi, g, retain_graph=True, allow_unused=True)
                parts = [torch.zeros_like(t) if v is None else v for v, t in zip(vjps, zi, strict=True)]
                return layout.pack(layout.unflatten(parts)) + grad

            inside[0] = True
            try:
                res = self.solver.solve(adjoint, grad.detach().clone())
            finally:
                inside[0] = False
            self.last_stats = res
            return res.z

        packed.register_hook(hook)
        return layout.unpack(packed, dtypes=True)


@dataclasses.dataclass
class PhantomOptions(Config):
    """``steps``: unrolled steps k; ``damping``: lambda in (0, 1]."""

    steps: int = 5
    damping: float = 0.5

    def validate(self) -> None:
        check_int("steps", self.steps, minimum=1)
        check_range("damping", self.damping, 1e-6, 1.0)


PhantomConfig = PhantomOptions  # the earlier name


@register_backward
class PhantomBackward(BackwardStrategy):
    """Phantom gradient: ``k`` steps of ``z <- (1 - lam) z + lam f(z, x)`` from ``z*`` with a graph."""

    name = "phantom"
    Options = PhantomOptions

    def __init__(self, steps: int = 5, damping: float = 0.5) -> None:
        self.config = PhantomOptions(steps=steps, damping=damping)
        self.extra_nfe = steps

    def __repr__(self) -> str:
        return f"PhantomBackward(steps={self.config.steps}, damping={self.config.damping})"

    def attach(self, f: Any, z_star: Any, x: Any) -> Any:
        lam = self.config.damping
        z = tree_map(torch.Tensor.detach, z_star)
        for _ in range(self.config.steps):
            z = tree_map(lambda a, b: (1 - lam) * a + lam * b, z, f(z, x))
        return z


@register_backward
class JacobianFreeBackward(BackwardStrategy):
    """Jacobian-free backward: one step ``f(z*, x)``, treating ``J_f`` as zero."""

    name = "jacobian_free"

    extra_nfe = 1

    def __repr__(self) -> str:
        return "JacobianFreeBackward()"

    def attach(self, f: Any, z_star: Any, x: Any) -> Any:
        return f(tree_map(torch.Tensor.detach, z_star), x)


def get_backward(spec: str | dict | BackwardStrategy) -> BackwardStrategy:
    """A strategy from an instance, a registered name, or ``{"name": ..., **options}``."""
    if isinstance(spec, BackwardStrategy):
        return spec
    kwargs: dict[str, Any] = {}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        spec = kwargs.pop("name", None)
    if not isinstance(spec, str) or spec not in BACKWARDS:
        raise ConfigError(f"unknown backward {spec!r}; choose from {sorted(BACKWARDS)}")
    cls = BACKWARDS[spec]
    fields = [f.name for f in dataclasses.fields(cls.Options)]
    check_keys(f"backward {spec!r}", kwargs, fields)
    options = cls.Options.from_dict(kwargs)
    return cls(**{name: getattr(options, name) for name in fields})
