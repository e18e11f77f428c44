"""The solve loop every solver shares, as small steps on one :class:`LoopState`.

One iteration: :func:`evaluate` ``f`` on the running samples, :func:`residuals` of the new value,
:func:`update` the best iterate and the per-sample stop masks, and every ``check_every``
iterations :func:`check` which samples still run (the only host synchronisation of the loop;
it also narrows the rows ``f`` is evaluated on). Then the solver's update rule gives the next
iterate of the running samples.

Everything that decides a sample's result (its stop, its NFE, its best iterate, its trace) is
updated on the device at every iteration, whatever ``check_every`` is: a sample that stops
between two checks is frozen at once and its result and NFE are those of ``check_every=1``. What
a larger ``check_every`` changes is only the work done for it until the next check: ``f`` is
still evaluated on its row (the value is discarded, and not counted in ``nfe``) and the loop
runs at most ``check_every - 1`` iterations past the last sample's stop.

All the loop's tensors are made from ``z0`` (its device; its dtype, or float32 for a half type),
and its arithmetic runs outside autocast; only ``f`` runs under the caller's autocast.

A structured state (a tuple, list or dict of tensors, :mod:`cdeq.engine.tree`) is iterated as one
``(B, N)`` working matrix, its parts flattened and concatenated: one residual per sample over all
parts, one stop per sample. ``f`` gets views of that matrix laid out as the state (each part in its
working dtype) and its output is packed back (one concatenation per call); a lone tensor is only
reshaped, as it always was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor

from ..engine.precision import caller_autocast, full_precision, working_dtype
from ..engine.tree import Layout, relative


@dataclasses.dataclass
class SolverResult:
    """What every solver returns.

    A structured state gives ``z`` and ``trajectory`` of its structure (each part as described).

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

    z: Any
    nfe: Tensor
    residual: Tensor
    abs_residual: Tensor
    converged: Tensor
    diverged: Tensor
    trace: Tensor
    trajectory: Any = None
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


class NonFiniteError(FloatingPointError):
    """A sample's iterate or value became NaN or inf, and the solver was asked to raise."""


@dataclasses.dataclass
class LoopState:
    """Per-solve bookkeeping; ``(B, n)`` and ``(B,)`` tensors on the device of ``z0``.

    ``best_z`` holds ``f(z_j)`` at the iterate ``z_j`` of lowest residual so far, ``fz`` the
    latest value of ``f`` (stopped samples keep their last one), ``rows`` the rows ``f`` is
    evaluated on (``None`` while every sample runs).
    """

    z: Tensor
    fz: Tensor
    best_z: Tensor
    best_res: Tensor
    best_abs: Tensor
    last_res: Tensor
    nfe: Tensor
    active: Tensor
    converged: Tensor
    diverged: Tensor
    rows: Tensor | None = None
    x_rows: Any = None
    all_running: bool = True  # known on the host: every sample runs (set by check, reset by update)
    trace: list[Tensor] = dataclasses.field(default_factory=list)
    frames: dict[int, Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def start(cls, z: Tensor) -> LoopState:
        batch = z.shape[0]
        inf = torch.full((batch,), torch.inf, device=z.device, dtype=z.real.dtype)
        active = torch.ones(batch, dtype=torch.bool, device=z.device)
        return cls(z=z, fz=z, best_z=z.clone(), best_res=inf, best_abs=inf, last_res=inf,
                   nfe=torch.zeros(batch, dtype=torch.long, device=z.device), active=active,
                   converged=torch.zeros_like(active), diverged=torch.zeros_like(active))


def evaluate(loop: LoopState, f: Any, x: Any, layout: Layout, compact: bool,
             call_context: Any) -> Tensor:
    """``f`` at the current iterate ``(B, n)`` (given to ``f`` laid out as the state, ``layout``):
    on ``loop.rows`` only when ``compact``; rows of stopped samples keep their last value. Counts
    one NFE for every running sample."""
    batch = loop.z.shape[0]
    autocast = call_context is not contextlib.nullcontext  # low-precision parts are expected
    with call_context():
        if loop.rows is None or not compact:
            out = f(layout.unpack(loop.z, dtypes=True), x)
            layout.check(out, batch, autocast=autocast)
            new = layout.pack(out).to(loop.z.dtype)
        else:
            rows = loop.rows
            out = f(layout.unpack(loop.z[rows], dtypes=True), loop.x_rows)
            layout.check(out, rows.numel(), autocast=autocast)
            new = loop.fz.index_copy(0, rows, layout.pack(out).to(loop.z.dtype))
    loop.nfe += loop.active
    return new if loop.all_running else torch.where(loop.active[:, None], new, loop.fz)


def residuals(fz: Tensor, z: Tensor, rel_mode: bool,
              g: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(res, abs_res, finite)``, each ``(B,)``: the stopping residual (inf where not finite),
    ``|f(z) - z|`` and whether every entry of ``z`` and ``f(z)`` is finite. ``g``: ``fz - z``
    if the caller has it already."""
    abs_res = torch.linalg.vector_norm(fz - z if g is None else g, dim=1)
    # A non-finite entry of z or f(z) makes that entry of g, hence |g|, inf or nan. The norms are
    # never negative, so ``< inf`` is ``isfinite`` in one comparison.
    finite = abs_res < torch.inf
    if rel_mode:
        res = relative(abs_res, torch.linalg.vector_norm(fz, dim=1))
        finite &= res < torch.inf
    else:
        res = abs_res
    return torch.where(finite, res, torch.inf), abs_res, finite


def update(loop: LoopState, fz: Tensor, res: Tensor, abs_res: Tensor, finite: Tensor,
           tol: float) -> None:
    """Record the trace, keep the best iterate, and stop the samples that converged (residual at
    most ``tol``) or met a non-finite value. Runs on the device, without synchronising.
    While ``loop.all_running`` the masks by ``active`` are skipped (they would change nothing)."""
    if loop.all_running:
        better = res < loop.best_res
        stop = ~finite | (res <= tol)
        loop.all_running = False  # some sample may stop here; only check can tell
    else:
        res = torch.where(loop.active, res, loop.last_res)  # stopped samples repeat their last one
        better = loop.active & (res < loop.best_res)
        stop = loop.active & (~finite | (res <= tol))
    loop.last_res = res
    loop.trace.append(res)
    loop.best_res = torch.where(better, res, loop.best_res)
    loop.best_abs = torch.where(better, abs_res, loop.best_abs)
    loop.best_z = torch.where(better[:, None], fz, loop.best_z)
    loop.diverged = loop.diverged | (stop & ~finite)
    loop.converged = loop.converged | (stop & finite)
    loop.active = loop.active & ~stop
    loop.fz = fz


def check(loop: LoopState, x: Any, compact: bool) -> bool:
    """Whether any sample still runs (one host synchronisation); when ``compact``, narrows
    ``loop.rows`` (and the rows of ``x``) to the running samples if some stopped since the last
    check (masked stopping, ``compact=False``, never needs the rows)."""
    batch = loop.z.shape[0]
    running = int(loop.active.sum())
    loop.all_running = running == batch
    if running == 0 or not compact:
        return running > 0
    if running == (batch if loop.rows is None else loop.rows.numel()):
        return True
    loop.rows = loop.active.nonzero().squeeze(1)
    loop.x_rows = take_rows(x, loop.rows, batch)
    return True


def run(solver: Any, f: Any, z0: Any, x: Any, wanted: list[int] | None, limit: int) -> Any:
    """The loop of :meth:`Solver.solve` (arguments validated there); returns a ``SolverResult``.
    ``z0``: a tensor or a structure of tensors (:mod:`cdeq.engine.tree`)."""
    opts = solver.options
    layout = Layout.of(z0)  # the caller's dtypes: the solution's
    # the parts as f sees them: each in its working dtype (float32 for a half type)
    work = Layout(layout.spec, layout.names, layout.shapes, [working_dtype(d) for d in layout.dtypes])
    first = layout.leaves(z0)[0]
    device = first.device
    wanted_set = set(wanted or ())
    call_context = caller_autocast(device)  # taken before leaving autocast below
    with full_precision(device):
        start = layout.pack(z0)
        loop = LoopState.start(start.to(working_dtype(start.dtype)).clone())
        state = solver.init_state(loop.z)
        for it in range(limit):
            if it in wanted_set:
                loop.frames[it] = loop.z.clone()
            fz = evaluate(loop, f, x, work, opts.compact, call_context)
            g = fz - loop.z
            update(loop, fz, *residuals(fz, loop.z, opts.stop_mode == "rel", g), opts.tol)
            if it == limit - 1:
                break
            if (it + 1) % opts.check_every == 0 and not check(loop, x, opts.compact):
                break
            state["g"] = g
            z_next = solver.step(state, it, loop.z, fz, loop.active)
            loop.z = z_next if loop.all_running else torch.where(loop.active[:, None], z_next, loop.z)
    trace = torch.stack(loop.trace)
    # one read of the device at the end: the iterations any sample ran, and whether any diverged
    ran, any_diverged = torch.stack([loop.nfe.max(), loop.diverged.any().long()]).tolist()
    if opts.check_every > 1:  # drop the iterations run after the last sample stopped
        trace = trace[:ran]
    if any_diverged:
        report_nonfinite(loop.diverged, opts.on_nonfinite)
    # A sample that never produced a finite value keeps its start (best_z began as z0).
    solution = layout.unpack(loop.best_z, dtypes=True)
    trajectory = None
    if wanted is not None:
        frames = {k: layout.unpack(v, dtypes=True) for k, v in loop.frames.items()}
        frames[limit] = solution
        last = layout.unpack(loop.z, dtypes=True)
        picked = [layout.leaves(frames.get(i, last)) for i in wanted]
        trajectory = layout.unflatten([torch.stack(parts) for parts in zip(*picked, strict=True)])
    return SolverResult(z=solution, nfe=loop.nfe, residual=loop.best_res, abs_residual=loop.best_abs,
                        converged=loop.converged, diverged=loop.diverged, trace=trace,
                        trajectory=trajectory, trajectory_index=wanted)


def report_nonfinite(diverged: Tensor, mode: str) -> None:
    """Warn (``"warn"``), raise :class:`NonFiniteError` (``"raise"``) or do nothing (``"ignore"``)
    when a sample met a non-finite value; the message names how many and which."""
    if mode == "ignore":
        return
    bad = diverged.nonzero().squeeze(1).tolist()
    if not bad:
        return
    shown = bad if len(bad) <= 10 else [*bad[:10], "..."]
    message = (f"{len(bad)} of {diverged.numel()} samples became non-finite (NaN or inf) in the "
               f"fixed-point solve, at batch indices {shown}; each is returned as the value at "
               "its best finite iterate (its start z0 if it had none) and flagged diverged. "
               "Check those inputs for NaN/inf, or set the solver option on_nonfinite='raise' or 'ignore'.")
    if mode == "raise":
        raise NonFiniteError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=5)  # the caller of solve


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
