"""Budget sweeps: the truncated teacher against the C-DEQ student, at the same NFE.

For every budget ``k`` on the held-out batches: the teacher truncated to ``k`` NFE with each
solver, the C-DEQ student with its plan of at most ``k`` NFE, the task metric and the relative
error to the reference equilibrium ``z*``; the converged teacher; the exact mode (student
warm start) against the teacher solver from ``z_0``; latency per batch of each.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .config import Config, ConfigError, check_int, check_positive
from .consistency.student import ConsistencyStudent
from .deq.layer import SolverSpec
from .deq.model import DEQModel
from .progress import progress
from .solvers import SOLVERS, get_solver
from .tasks.base import Task


@dataclasses.dataclass
class EvalConfig(Config):
    """Attributes:
        budgets: NFE budgets ``k``.
        solvers: truncated-teacher solvers compared.
        reference: the solver for ``z*`` and the converged teacher's figures.
        exact_solver / exact_tol: the solver and tolerance of the exact-mode comparison.
        exact_select_batches: training batches on which the exact mode's warm-start plan (the
            student's 1-, 2- or 4-NFE plan) is chosen; the test split only measures it.
        batch_size, max_batches: held-out batches (``max_batches`` 0: all).
        latency_batch, latency_repeats: batch size and repeats (median) of the latency figures.
    """

    budgets: tuple = (1, 2, 3, 4, 6, 8, 12, 16)
    solvers: tuple = ("picard", "anderson", "broyden")
    reference: SolverSpec = dataclasses.field(
        default_factory=lambda: SolverSpec(name="anderson", max_iter=100, tol=1e-5))
    exact_solver: str = "anderson"
    exact_tol: float = 1e-4
    exact_max_iter: int = 100
    exact_select_batches: int = 2
    batch_size: int = 256
    max_batches: int = 0
    latency_batch: int = 256
    latency_repeats: int = 5

    def validate(self) -> None:
        if not self.budgets or any(not isinstance(k, int) or k < 1 for k in self.budgets):
            raise ConfigError(f"budgets={self.budgets!r} is not valid; give positive integers")
        unknown = [s for s in self.solvers if s not in SOLVERS]
        if unknown:
            raise ConfigError(f"solvers {unknown} are not registered; choose from {sorted(SOLVERS)}")
        if self.exact_solver not in SOLVERS:
            raise ConfigError(f"exact_solver={self.exact_solver!r} is not valid; "
                              f"choose from {sorted(SOLVERS)}")
        check_positive("exact_tol", self.exact_tol)
        check_int("exact_max_iter", self.exact_max_iter, minimum=1)
        check_int("exact_select_batches", self.exact_select_batches, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("max_batches", self.max_batches, minimum=0)
        check_int("latency_batch", self.latency_batch, minimum=1)
        check_int("latency_repeats", self.latency_repeats, minimum=1)


def _rel_err(z: Tensor, ref: Tensor) -> Tensor:
    b = z.shape[0]
    return (z - ref).reshape(b, -1).norm(dim=1) / (ref.reshape(b, -1).norm(dim=1) + 1e-12)


class _Acc:
    """Running sums of metric, item count and relative error for one method at one budget."""

    def __init__(self) -> None:
        self.metric = 0.0
        self.count = 0
        self.err = 0.0
        self.err_n = 0

    def add(self, task: Task, logits: Tensor, y: Any, z: Tensor, ref: Tensor) -> None:
        m, c = task.metric_sum(logits, y)
        self.metric += m
        self.count += c
        e = _rel_err(z, ref)
        self.err += float(e.sum())
        self.err_n += e.numel()

    def value(self) -> float:
        return self.metric / max(1, self.count)

    def error(self) -> float:
        return self.err / max(1, self.err_n)


def _timeit(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def evaluate(task: Task, teacher: DEQModel, student: ConsistencyStudent | None,
             config: EvalConfig, extra_methods: dict[str, Callable[[Any, int], Tensor]] | None = None,
             ) -> dict[str, Any]:
    """Run the sweep; returns the report dictionary (fields in ``docs/results.md``).

    ``extra_methods`` maps a name to ``(x, k) -> (logits, z)`` for baselines evaluated at the same
    budgets (``None`` entries for budgets they do not support are skipped).
    """
    teacher.eval()
    if student is not None:
        student.eval()
    reference = config.reference.build()
    exact = get_solver(config.exact_solver, max_iter=config.exact_max_iter, tol=config.exact_tol)
    budgets = sorted(set(config.budgets))
    accs: dict[str, dict[int, _Acc]] = {s: {k: _Acc() for k in budgets} for s in config.solvers}
    if student is not None:
        accs["cdeq"] = {k: _Acc() for k in budgets}
    for name in extra_methods or {}:
        accs[name] = {k: _Acc() for k in budgets}
    teacher_acc = _Acc()
    ref_nfe, ref_n, ref_unconv = 0.0, 0, 0
    warm_budgets = [k for k in (1, 2, 4) if k <= max(budgets)]
    exact_cold, exact_n, exact_cold_unconv = 0.0, 0, 0
    exact_warm = dict.fromkeys(warm_budgets, 0.0)
    exact_warm_unconv = dict.fromkeys(warm_budgets, 0)
    seen = False
    for b, (x, y) in enumerate(progress(task.test_batches(config.batch_size), desc="evaluate")):
        if config.max_batches and b >= config.max_batches:
            break
        seen = True
        u = teacher.inject(x)
        z0 = teacher.initial_state(u)
        ref = reference.solve(teacher.cell, z0, u)
        z_ref = ref.z
        teacher_acc.add(task, teacher.head(z_ref), y, z_ref, z_ref)
        ref_nfe += float(ref.nfe.float().sum())
        ref_n += ref.nfe.numel()
        ref_unconv += int((~ref.converged).sum())
        for s in config.solvers:
            solver = get_solver(s, max_iter=max(budgets), tol=0.0)
            for k in budgets:
                z = solver.solve(teacher.cell, z0, u, max_iter=k).z
                accs[s][k].add(task, teacher.head(z), y, z, z_ref)
        if student is not None:
            u_s, u_t = student.teacher_inputs(x)
            for k in budgets:
                z = student.run_plan(u_s, student.plan_for(k), u_t)
                accs["cdeq"][k].add(task, student.head(z), y, z, z_ref)
            cold = exact.solve(teacher.cell, z0, u)
            exact_cold += float(cold.nfe.float().sum())
            exact_n += cold.nfe.numel()
            exact_cold_unconv += int((~cold.converged).sum())
            for k in warm_budgets:
                _, warm, warm_nfe = student.solve_exact(x, exact, student.plan_for(k))
                exact_warm[k] += float((warm.nfe + warm_nfe).float().sum())
                exact_warm_unconv[k] += int((~warm.converged).sum())
        for name, fn in (extra_methods or {}).items():
            for k in budgets:
                out = fn(x, k)
                if out is not None:
                    logits, z = out
                    accs[name][k].add(task, logits, y, z, z_ref)
    if not seen:
        raise ValueError(f"the task {task.name!r} has no held-out batches to evaluate on")

    report: dict[str, Any] = {
        "task": task.describe()["task"], "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "teacher": {"metric": teacher_acc.value(), "nfe": ref_nfe / max(1, ref_n),
                    "unconverged_fraction": ref_unconv / max(1, ref_n),
                    "solver": dataclasses.asdict(config.reference)},
        "budgets": budgets,
        "methods": {name: {str(k): a.value() for k, a in per.items() if a.count}
                    for name, per in accs.items()},
        "relative_error": {name: {str(k): a.error() for k, a in per.items() if a.count}
                           for name, per in accs.items()},
    }
    if student is not None:
        per_plan = {str(k): exact_warm[k] / max(1, exact_n) for k in warm_budgets}
        on_train = _exact_plan_nfe(task, student, exact, warm_budgets, config)
        best = min(warm_budgets, key=lambda k: on_train[k])
        cold_nfe = exact_cold / max(1, exact_n)
        report["exact_mode"] = {
            f"{config.exact_solver}_nfe": cold_nfe,
            "cdeq_warm_nfe": per_plan[str(best)],
            "warm_plan_nfe": best,
            "warm_nfe_by_plan": per_plan,
            "warm_nfe_by_plan_on_training_data": {str(k): v for k, v in on_train.items()},
            "tol": config.exact_tol,
            "cold_unconverged_fraction": exact_cold_unconv / max(1, exact_n),
            "warm_unconverged_fraction": exact_warm_unconv[best] / max(1, exact_n),
            "speedup": cold_nfe / max(1e-9, per_plan[str(best)]),
        }
        report["plans"] = {str(k): [list(op) for op in student.plan_for(k)] for k in budgets}
    report["latency_ms"] = _latency(task, teacher, student, config, budgets, extra_methods)
    return report


def _exact_plan_nfe(task: Task, student: ConsistencyStudent, solver: Any, budgets: list[int],
                    config: EvalConfig) -> dict[int, float]:
    """Mean exact-mode NFE (plan + solver) of each warm-start plan on training batches."""
    total, n = dict.fromkeys(budgets, 0.0), 0
    for b, (x, _) in enumerate(task.selection_batches(config.batch_size)):
        if b >= config.exact_select_batches:
            break
        for k in budgets:
            _, res, plan_nfe = student.solve_exact(x, solver, student.plan_for(k))
            total[k] += float((res.nfe + plan_nfe).float().sum())
        n += res.nfe.numel()
    return {k: v / max(1, n) for k, v in total.items()}


def _latency(task: Task, teacher: DEQModel, student: ConsistencyStudent | None, config: EvalConfig,
             budgets: list[int], extra_methods: dict | None) -> dict[str, float]:
    """Median wall time (ms) of one forward pass, input to logits, on one held-out batch."""
    x = next(iter(task.test_batches(config.latency_batch)))[0]
    reference = get_solver(config.exact_solver, max_iter=config.exact_max_iter, tol=config.exact_tol)
    out: dict[str, float] = {"batch_size": float(_batch_size(x))}

    def teacher_fn() -> Tensor:
        u = teacher.inject(x)
        return teacher.head(reference.solve(teacher.cell, teacher.initial_state(u), u).z)

    out["teacher"] = _timeit(teacher_fn, config.latency_repeats)
    for s in config.solvers:
        for k in budgets:
            solver = get_solver(s, max_iter=k, tol=0.0)

            def fn(solver=solver) -> Tensor:
                u = teacher.inject(x)
                return teacher.head(solver.solve(teacher.cell, teacher.initial_state(u), u).z)

            out[f"{s}@{k}"] = _timeit(fn, config.latency_repeats)
    if student is not None:
        for k in budgets:
            out[f"cdeq@{k}"] = _timeit(lambda k=k: student.predict(x, nfe=k), config.latency_repeats)
    for name, fn in (extra_methods or {}).items():
        for k in budgets:
            if fn(x, k) is not None:
                out[f"{name}@{k}"] = _timeit(lambda k=k, fn=fn: fn(x, k), config.latency_repeats)
    return out


def _batch_size(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0])
    if isinstance(x, (tuple, list)):
        return _batch_size(x[0])
    return 1
