"""The shared machinery of all fixed-point solvers: options, the result type and the loop.

A solver finds ``z`` with ``z = f(z, x)`` for a batch ``z`` of shape ``(B, ...)``. Every sample
stops on its own: once its residual is under the tolerance (or its iterate is not finite) it is
frozen, ``f`` is no longer evaluated on it and it stops counting function evaluations (NFE).

Subclasses implement only the update rule (:meth:`Solver.init_state`, :meth:`Solver.step`);
the loop, stopping, best-iterate tracking and trajectory recording live here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..config import Config, ConfigError, check_choice, check_int, check_positive

FixedPointFn = Callable[..., Tensor]
"""``f(z, x) -> z'`` with ``z`` of shape ``(B, ...)``; ``x`` may be omitted (``None``)."""

Record = str | Sequence[int] | None


@dataclasses.dataclass
class SolverOptions(Config):
    """Options common to every solver.

    Attributes:
        max_iter: the most evaluations of ``f`` per sample (the NFE budget).
        tol: stop a sample once its residual is at most this.
        stop_mode: ``"rel"`` (``|f(z)-z| / |f(z)|``) or ``"abs"`` (``|f(z)-z|``).
        compact: evaluate ``f`` only on the samples still running (saves time; needs a
            layer without cross-sample interaction, true of every per-sample layer).
    """

    max_iter: int = 50
    tol: float = 1e-4
    stop_mode: str = "rel"
    compact: bool = True

    def validate(self) -> None:
        check_int("max_iter", self.max_iter, minimum=1)
        check_positive("tol", self.tol, allow_zero=True)
        check_choice("stop_mode", self.stop_mode, ["rel", "abs"])
        if not isinstance(self.compact, bool):
            raise ConfigError(f"compact={self.compact!r} is not valid; it must be true or false")


@dataclasses.dataclass
class SolverResult:
    """What every solver returns.

    Attributes:
        z: ``(B, ...)`` the solution: ``f(z_j)`` at the evaluated iterate ``z_j`` of lowest
            residual (for a contraction at least as close to ``z*`` as ``z_j``).
        nfe: ``(B,)`` evaluations of ``f`` spent on each sample.
        residual: ``(B,)`` residual of the best iterate, in the solver's ``stop_mode``.
        abs_residual: ``(B,)`` its absolute residual ``|f(z_j) - z_j|``.
        converged: ``(B,)`` bool, residual at most ``tol`` with every value finite.
        diverged: ``(B,)`` bool, a non-finite iterate or value was met.
        trace: ``(K, B)`` residual after each evaluation (frozen samples repeat their last value).
        trajectory: ``(L, B, ...)`` recorded iterates, or ``None``. Index ``k < max_iter`` is the
            iterate ``z_k`` (``z_0`` is the start; a stopped sample repeats its last iterate) and
            index ``max_iter`` is the solution ``z``.
        trajectory_index: the iterate index of each recorded entry.
    """

    z: Tensor
    nfe: Tensor
    residual: Tensor
    abs_residual: Tensor
    converged: Tensor
    diverged: Tensor
    trace: Tensor
    trajectory: Tensor | None = None
    trajectory_index: list[int] | None = None

    def stats(self) -> dict[str, float]:
        """Batch summary for logging: mean NFE, mean/max residual, converged fraction."""
        finite = torch.where(torch.isfinite(self.residual), self.residual, torch.inf)
        return {
            "nfe": float(self.nfe.float().mean()),
            "residual_mean": float(self.residual.float().mean()),
            "residual_max": float(finite.float().max()),
            "converged": float(self.converged.float().mean()),
        }


def take_rows(x: Any, index: Tensor, batch: int) -> Any:
    """Select rows ``index`` of every dense tensor in ``x`` whose leading dimension is ``batch``
    (sparse tensors, such as a graph's adjacency, pass through whole)."""
    if isinstance(x, Tensor):
        dense = x.layout == torch.strided
        return x[index] if dense and x.dim() > 0 and x.shape[0] == batch else x
    if isinstance(x, (tuple, list)):
        return type(x)(take_rows(item, index, batch) for item in x)
    if isinstance(x, dict):
        return {key: take_rows(item, index, batch) for key, item in x.items()}
    return x


def _record_indices(record: Record, max_iter: int) -> list[int] | None:
    if record is None:
        return None
    if isinstance(record, str):
        if record != "all":
            raise ConfigError(f"record={record!r} is not valid; use 'all', a list of ints or None")
        return list(range(max_iter + 1))
    indices = [int(i) for i in record]
    bad = [i for i in indices if not 0 <= i <= max_iter]
    if bad or not indices:
        raise ConfigError(
            f"record indices {bad or indices} are not valid; each must lie in [0, {max_iter}]"
        )
    return sorted(set(indices))


class Solver:
    """Base class. Subclasses set ``name``, ``Options`` and the update rule.

    Example:
        >>> import torch
        >>> solver = get_solver("picard", max_iter=100, tol=1e-8)
        >>> res = solver.solve(lambda z, x: 0.5 * z + x, torch.zeros(2, 3), torch.ones(2, 3))
        >>> torch.allclose(res.z, torch.full((2, 3), 2.0))
        True
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[SolverOptions]] = SolverOptions

    def __init__(self, options: SolverOptions | dict | None = None, **overrides: Any) -> None:
        if isinstance(options, SolverOptions):
            if not isinstance(options, self.Options):
                raise ConfigError(
                    f"solver {self.name!r} takes {self.Options.__name__}, "
                    f"not {type(options).__name__}"
                )
            options = options.replace(**overrides) if overrides else options
        else:
            options = self.Options.from_dict(options, **overrides)
        self.options = options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # --- the update rule -------------------------------------------------------------------
    def init_state(self, z0: Tensor) -> dict[str, Any]:
        """Per-solve state, given the flattened start ``(B, n)``."""
        return {}

    def step(self, state: dict[str, Any], it: int, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        """Next iterate ``(B, n)`` from the current iterate ``z`` and its image ``fz``.

        ``active`` is the ``(B,)`` mask of samples still running; the loop keeps the iterate of
        every other sample as it is, so what the step returns (or stores) for them is ignored.
        Before the call the loop puts the residual ``fz - z`` in ``state["g"]``. Neither ``z`` nor
        ``fz`` may be modified in place (the loop keeps references to both).
        """
        raise NotImplementedError

    # --- the loop ----------------------------------------------------------------------------
    @torch.no_grad()
    def solve(
        self,
        f: FixedPointFn,
        z0: Tensor,
        x: Any = None,
        *,
        record: Record = None,
        max_iter: int | None = None,
    ) -> SolverResult:
        """Solve ``z = f(z, x)`` from ``z0`` of shape ``(B, ...)``.

        Args:
            f: the map; called as ``f(z, x)`` on the running samples only (rows of every
                tensor in ``x`` with leading dimension ``B`` are selected to match). It must not
                modify ``z`` in place, and must return a tensor it does not modify later.
            z0: ``(B, ...)`` start.
            x: the input the map is conditioned on (tensor, tuple, dict or ``None``).
            record: ``None``, ``"all"`` or iterate indices to keep (see :class:`SolverResult`).
            max_iter: override the NFE limit for this call.
        """
        opts = self.options
        limit = opts.max_iter if max_iter is None else max_iter
        check_int("max_iter", limit, minimum=1)
        if not isinstance(z0, Tensor) or z0.dim() < 1 or z0.shape[0] == 0:
            raise ValueError(
                f"z0 must be a tensor of shape (B, ...) with B >= 1, got "
                f"{tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__}"
            )
        if not (z0.is_floating_point() or z0.is_complex()):
            raise ValueError(f"z0 must be a floating-point tensor, got dtype {z0.dtype}")
        wanted = _record_indices(record, limit)
        wanted_set = set(wanted or ())
        batch, shape = z0.shape[0], z0.shape[1:]
        device = z0.device
        rel_mode = opts.stop_mode == "rel"

        # Invariant: the loop never modifies ``z`` or ``fz`` in place, so plain references to them
        # (``prev_fz``, solver state) stay valid without copies.
        z = z0.reshape(batch, -1).clone()
        fz = z
        best_z = z.clone()  # f(best iterate), materialised lazily (see ``pending``)
        pending = torch.zeros(batch, dtype=torch.bool, device=device)  # best is f(z) of last step
        best_res = torch.full((batch,), torch.inf, device=device, dtype=z.real.dtype)
        best_abs = torch.full_like(best_res, torch.inf)
        last_res = best_res
        nfe = torch.zeros(batch, dtype=torch.long, device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        converged = torch.zeros_like(active)
        diverged = torch.zeros_like(active)
        all_active = True
        rows = torch.arange(batch, device=device)
        x_rows = x
        trace: list[Tensor] = []
        frames: dict[int, Tensor] = {}
        state = self.init_state(z)

        for it in range(limit):
            if it in wanted_set:
                frames[it] = z.reshape(batch, *shape).clone()
            prev_fz = fz
            if all_active:
                out = f(z.reshape(batch, *shape), x)
                _check_output(out, (batch, *shape))
                fz = out.reshape(batch, -1).to(z.dtype)
                nfe += 1
            elif opts.compact:
                out = f(z[rows].reshape(-1, *shape), x_rows)
                _check_output(out, (rows.numel(), *shape))
                fz = fz.index_copy(0, rows, out.reshape(rows.numel(), -1).to(z.dtype))
                nfe[rows] += 1
            else:
                out = f(z.reshape(batch, *shape), x)
                _check_output(out, (batch, *shape))
                fz = torch.where(active[:, None], out.reshape(batch, -1).to(z.dtype), fz)
                nfe[rows] += 1

            g = fz - z
            abs_res = torch.linalg.vector_norm(g, dim=1)
            # A non-finite entry of z or f(z) makes that entry of g, hence |g|, inf or nan.
            finite = torch.isfinite(abs_res)
            if rel_mode:
                res = abs_res / (torch.linalg.vector_norm(fz, dim=1) + 1e-12)
                finite &= torch.isfinite(res)
            else:
                res = abs_res
            res = torch.where(finite, res, torch.inf)
            if not all_active:
                res = torch.where(active, res, last_res)
            last_res = res
            trace.append(res)

            better = active & (res < best_res)
            best_res = torch.where(better, res, best_res)
            best_abs = torch.where(better, abs_res, best_abs)
            # ``pending`` samples have their best at ``prev_fz``; keep it if this step is worse.
            lost = pending & ~better
            if lost.any():
                idx = lost.nonzero().squeeze(1)
                best_z[idx] = prev_fz[idx]
            pending = better

            stop = active & (~finite | (res <= opts.tol))
            if stop.any():
                diverged |= stop & ~finite
                converged |= stop & finite
                keep = stop & better
                if keep.any():
                    idx = keep.nonzero().squeeze(1)
                    best_z[idx] = fz[idx]
                pending = pending & ~stop
                active = active & ~stop
                rows = active.nonzero().squeeze(1)
                all_active = False
                if rows.numel() == 0:
                    break
                if opts.compact:
                    x_rows = take_rows(x, rows, batch)
            if it == limit - 1:
                break
            state["g"] = g
            z_next = self.step(state, it, z, fz, active)
            z = z_next if all_active else torch.where(active[:, None], z_next, z)

        if pending.any():
            idx = pending.nonzero().squeeze(1)
            best_z[idx] = fz[idx]
        # A sample that never produced a finite value keeps its start (best_z began as z0).
        trajectory = None
        if wanted is not None:
            solution = best_z.reshape(batch, *shape)
            last = z.reshape(batch, *shape)
            frames[limit] = solution
            trajectory = torch.stack([frames.get(i, last) for i in wanted])
        return SolverResult(
            z=best_z.reshape(batch, *shape),
            nfe=nfe,
            residual=best_res,
            abs_residual=best_abs,
            converged=converged,
            diverged=diverged,
            trace=torch.stack(trace),
            trajectory=trajectory,
            trajectory_index=wanted,
        )

    __call__ = solve


def _check_output(out: Any, expected: tuple[int, ...]) -> None:
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(expected):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the fixed-point map must return a tensor shaped like its input z {expected}, got {got}"
        )


# --- registry ----------------------------------------------------------------------------------
SOLVERS: dict[str, type[Solver]] = {}


def register_solver(cls: type[Solver]) -> type[Solver]:
    """Class decorator: make a solver available by ``cls.name`` to :func:`get_solver`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    SOLVERS[cls.name] = cls
    return cls


def get_solver(spec: str | Solver | dict, **options: Any) -> Solver:
    """Build a solver from a name (``"anderson"``), a dict ``{"name": ..., **options}`` or
    return a given :class:`Solver` as is."""
    if isinstance(spec, Solver):
        if options:
            return type(spec)(spec.options, **options)
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        if "name" not in spec:
            raise ConfigError(f"a solver dict needs a 'name' key; choose from {sorted(SOLVERS)}")
        name = spec.pop("name")
        spec.update(options)
        return get_solver(name, **spec)
    if spec not in SOLVERS:
        raise ConfigError(f"unknown solver {spec!r}; registered solvers: {sorted(SOLVERS)}")
    return SOLVERS[spec](**options)
