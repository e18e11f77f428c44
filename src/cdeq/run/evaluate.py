"""Budget sweeps: the truncated teacher against the C-DEQ student and the baselines, at each budget.

For every budget ``k``, on the validation split and on the test split: the teacher truncated to
``k`` NFE with each solver, the C-DEQ student with its plan of at most ``k`` NFE, the baselines,
the task metric and the relative error to the equilibrium ``z*``; the converged teacher. ``z*``
and the converged teacher are the teacher's eval solver (``teacher.eval_solver`` in a run, the
one place for it). On the test split also the exact mode (student warm start against the teacher solver
from ``z_0``). Then what each prediction costs (:mod:`cdeq.run.cost`): FLOPs per sample, layer-call
equivalents and interleaved wall time, and the teacher-accuracy cost chosen on validation figures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..consistency.student import ConsistencyStudent
from ..deq.model import DEQModel
from ..engine import distributed
from ..engine.config import Config, ConfigError, check_int, check_positive
from ..engine.fit import model_device
from ..engine.progress import progress
from ..engine.tree import Layout, batch_size, relative_error
from ..solvers import SOLVERS, get_solver
from ..solvers.loop import residuals
from ..tasks.base import Task, on_device
from . import cost


@dataclasses.dataclass
class EvalConfig(Config):
    """How a run is evaluated: the budgets, the methods compared, the exact mode and the timing.

    Attributes:
        budgets: NFE budgets ``k``.
        solvers: truncated-teacher solvers compared.
        exact_solver / exact_tol / exact_max_iter: the solver and tolerance of the exact-mode
            comparison (student warm start against a cold start, both run to ``exact_tol``), and
            of the converged teacher's FLOPs and wall time in the cost figures (a deployment's
            tolerance). The converged teacher's metric, NFE and ``z*`` are the teacher's eval
            solver (``teacher.eval_solver``).
        exact_select_batches: selection (validation) batches on which the exact mode's warm-start
            plan (the student's 1-, 2- or 4-NFE plan) is chosen; the test split only measures it.
        batch_size, max_batches: evaluation batches, validation and test (``max_batches`` 0: all).
        latency_batch, latency_repeats: batch size and timed repeats (median, interquartile
            range) of the wall-time figures; ``timing_warmup`` rounds first; ``timing_threads``
            intra-op threads while timing (0: the process's setting); ``timing_budgets`` the
            budgets timed (``()``: all).
        teacher_tolerance: how close to the converged teacher's validation metric counts as
            "teacher accuracy" (negative: 0.25 accuracy points, or 0.5% of a loss).
    """

    budgets: tuple = (1, 2, 3, 4, 6, 8, 12, 16)
    solvers: tuple = ("picard", "anderson", "broyden")
    exact_solver: str = "anderson"
    exact_tol: float = 1e-4
    exact_max_iter: int = 100
    exact_select_batches: int = 2
    batch_size: int = 256
    max_batches: int = 0
    latency_batch: int = 256
    latency_repeats: int = 20
    timing_warmup: int = 2
    timing_threads: int = 1
    timing_budgets: tuple = ()
    teacher_tolerance: float = -1.0

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
        check_int("timing_warmup", self.timing_warmup, minimum=0)
        check_int("timing_threads", self.timing_threads, minimum=0)
        if any(not isinstance(k, int) or k < 1 for k in self.timing_budgets):
            raise ConfigError(f"timing_budgets={self.timing_budgets!r} is not valid; give positive "
                              "integers (or [] for every budget)")
        if not isinstance(self.teacher_tolerance, (int, float)):
            raise ConfigError(f"teacher_tolerance={self.teacher_tolerance!r} is not valid; give a "
                              "number (negative: the default rule)")


def solver_json(solver: Any) -> dict[str, Any]:
    """A solver's name and options as JSON: ``{"name", "max_iter", "tol", "stop_mode", "options"}``
    (``options``: those beyond the three)."""
    opts = solver.options.to_dict()
    main = {k: opts.pop(k) for k in ("max_iter", "tol", "stop_mode")}
    return {"name": solver.name, **main, "options": opts}


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
        e = relative_error(z, ref)
        self.err += float(e.sum())
        self.err_n += e.numel()

    def sums(self) -> list[float]:
        return [self.metric, self.count, self.err, self.err_n]

    def set_sums(self, values: list[float]) -> None:
        self.metric, self.count, self.err, self.err_n = values

    def value(self) -> float:
        return self.metric / max(1, self.count)

    def error(self) -> float:
        return self.err / max(1, self.err_n)


Predictor = Callable[[Any], Any]
"""``x -> logits`` (or ``(logits, z)``): one method at one budget, input to prediction."""


def truncated_states(solver: Any, f: Callable, z0: Any, u: Any, budgets: list[int]
                     ) -> dict[int, Any]:
    """The solver's result ``z`` cut to each budget ``k``, from one run of ``max(budgets)`` steps.

    A ``k``-step run returns ``f(z_j)`` at the iterate ``z_j`` (``j < k``) of lowest residual, the
    first such; the first ``k`` steps of a longer run are the same computation, so the ``k``-step
    result is read off the longer run's evaluations. When a sample stops early (an exact fixed
    point or a non-finite value) or the run's residuals differ from the ones recomputed here, the
    budgets are run one by one instead, so the figures always equal separate runs.
    """
    outs: list[tuple[Tensor, Any]] = []
    layout = Layout.of(z0)
    batch = layout.leaves(z0)[0].shape[0]

    def capture(z: Any, x: Any) -> Any:
        out = f(z, x)
        outs.append((layout.pack(z), out))
        return out

    rel = solver.options.stop_mode == "rel"
    res = solver.solve(capture, z0, u, max_iter=max(budgets))
    full = all(z.shape[0] == batch for z, _ in outs) and len(outs) == max(budgets)
    if full:
        mine = torch.stack([residuals(layout.pack(o).to(z.dtype), z, rel)[0] for z, o in outs])
        full = torch.equal(mine, res.trace)
    if not full:
        return {k: solver.solve(f, z0, u, max_iter=k).z for k in budgets}
    out = {}
    rows = torch.arange(batch, device=res.nfe.device)
    stacked = [torch.stack(parts) for parts in zip(*(layout.leaves(o) for _, o in outs), strict=True)]
    for k in budgets:
        best = torch.argmin(res.trace[:k], dim=0)  # the first minimum, as the solver's strict <
        out[k] = layout.unflatten([s[best, rows] for s in stacked])  # (B, ...) per part
    return out


def _sweep(task: Task, teacher: DEQModel, student: ConsistencyStudent | None, config: EvalConfig,
           batches: Any, extra: dict[str, Callable] | None, split: str) -> dict[str, Any]:
    """Metric and relative error to ``z*`` of every method at every budget on ``batches``; ``z*``
    and the converged teacher: the teacher's eval solver."""
    reference = teacher.deq.eval_solver
    budgets = sorted(set(config.budgets))
    names = list(config.solvers) + (["cdeq"] if student is not None else []) + list(extra or {})
    accs = {name: {k: _Acc() for k in budgets} for name in names}
    teacher_acc = _Acc()
    ref_nfe, ref_n, ref_unconv = 0.0, 0, 0
    for p in progress(distributed.parts(batches), desc=f"evaluate ({split})"):
        if config.max_batches and p.index >= config.max_batches:
            break
        if p.empty:  # another rank evaluates this batch
            continue
        x, y = p.x, p.y  # this rank's rows (or a batch it owns)
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
            for k, z in truncated_states(solver, teacher.cell, z0, u, budgets).items():
                accs[s][k].add(task, teacher.head(z), y, z, z_ref)
        if student is not None:
            for k in budgets:
                logits, z = student.predict(x, nfe=k)
                accs["cdeq"][k].add(task, logits, y, z, z_ref)
        for name, fn in (extra or {}).items():
            for k in budgets:
                out = fn(x, k)
                if out is not None:
                    accs[name][k].add(task, out[0], y, out[1], z_ref)
        distributed.TALLY.add("evaluate", batch_size(z_ref))
    # every rank's sums (one collective)
    every = [teacher_acc] + [a for per in accs.values() for a in per.values()]
    flat = distributed.reduce_sums([v for a in every for v in a.sums()] + [ref_nfe, ref_n, ref_unconv])
    for i, a in enumerate(every):
        a.set_sums(flat[4 * i : 4 * i + 4])
    ref_nfe, ref_n, ref_unconv = flat[-3:]
    if not ref_n:
        raise ValueError(f"the task {task.name!r} has no {split} batches to evaluate on")
    return {
        "teacher": {"metric": teacher_acc.value(), "nfe": ref_nfe / ref_n,
                    "unconverged_fraction": ref_unconv / ref_n,
                    "solver": solver_json(reference)},
        "methods": {name: {str(k): a.value() for k, a in per.items() if a.count}
                    for name, per in accs.items()},
        "relative_error": {name: {str(k): a.error() for k, a in per.items() if a.count}
                           for name, per in accs.items()},
    }


@torch.no_grad()
def evaluate(task: Task, teacher: DEQModel, student: ConsistencyStudent | None,
             config: EvalConfig, extra_methods: dict[str, Callable[[Any, int], Tensor]] | None = None,
             seed: int | None = None) -> dict[str, Any]:
    """Run the sweep; returns the report dictionary (fields in ``docs/reference/report-files.md``).

    ``extra_methods`` maps a name to ``(x, k) -> (logits, z)`` for baselines evaluated at the same
    budgets (``None`` for budgets they do not support). Validation figures choose; the test
    split is evaluated once and only reported.
    """
    task = on_device(task, model_device(teacher))  # batches where the models are
    teacher.eval()
    if student is not None:
        student.eval()
    budgets = sorted(set(config.budgets))
    valid = _sweep(task, teacher, student, config, task.validation_batches(config.batch_size),
                   extra_methods, "valid")
    test = _sweep(task, teacher, student, config, task.test_batches(config.batch_size),
                  extra_methods, "test")
    report: dict[str, Any] = {
        "task": task.describe()["task"], "metric": task.metric,
        "higher_is_better": task.higher_is_better, "seed": seed, "splits": task.split_sizes(),
        "teacher": test["teacher"], "budgets": budgets, "methods": test["methods"],
        "relative_error": test["relative_error"], "valid": valid,
    }
    if student is not None:
        report["exact_mode"] = exact_mode(task, teacher, student, config, budgets)
        report["plans"] = {str(k): [list(op) for op in student.plan_for(k)] for k in budgets}
    if not distributed.is_main():  # FLOPs and wall time are measured by one process, rank 0
        return report
    x = next(iter(task.test_batches(config.latency_batch)))[0]
    preds = predictors(teacher, student, config, budgets, extra_methods, x)
    report["cost"] = measure_flops(teacher, preds, x)
    tol = config.teacher_tolerance if config.teacher_tolerance >= 0 else None
    by_flops = cost.teacher_accuracy_cost({**report, "timing": {}}, tol)["by_flops"]
    picked = {(p["method"], str(p["budget"])) for p in by_flops.values() if p}  # timed too
    report["timing"] = measure_time(preds, config, x, picked)
    report["latency_ms"] = {"batch_size": float(cost.batch_size(x)), **{
        (name if k is None else f"{name}@{k}"): v["median_ms"] for name, k, v in _timed(report)}}
    report["teacher_accuracy_cost"] = cost.teacher_accuracy_cost(report, tol)
    data = task.data_report(teacher)
    if data:
        report["data"] = data
    return report


def _timed(report: dict[str, Any]) -> list[tuple[str, str | None, dict]]:
    out = []
    for name, per in report["timing"].items():
        if name == "teacher":
            out.append((name, None, per))
        elif isinstance(per, dict):
            out += [(name, k, v) for k, v in per.items()]
    return out


def exact_mode(task: Task, teacher: DEQModel, student: ConsistencyStudent, config: EvalConfig,
               budgets: list[int]) -> dict[str, Any]:
    """The exact mode on the test split, the warm-start plan chosen on the selection (validation)
    batches."""
    exact = get_solver(config.exact_solver, max_iter=config.exact_max_iter, tol=config.exact_tol)
    warm_budgets = [k for k in (1, 2, 4) if k <= max(budgets)]
    cold_nfe, n, cold_unconv = 0.0, 0, 0
    warm = dict.fromkeys(warm_budgets, 0.0)
    warm_unconv = dict.fromkeys(warm_budgets, 0)
    for p in distributed.parts(task.test_batches(config.batch_size)):
        if config.max_batches and p.index >= config.max_batches:
            break
        if p.empty:
            continue
        x = p.x
        u = teacher.inject(x)
        cold = exact.solve(teacher.cell, teacher.initial_state(u), u)
        cold_nfe += float(cold.nfe.float().sum())
        n += cold.nfe.numel()
        cold_unconv += int((~cold.converged).sum())
        for k in warm_budgets:
            _, res, plan_nfe = student.solve_exact(x, exact, student.plan_for(k))
            warm[k] += float((res.nfe + plan_nfe).float().sum())
            warm_unconv[k] += int((~res.converged).sum())
    flat = distributed.reduce_sums([cold_nfe, n, cold_unconv] + [warm[k] for k in warm_budgets]
                                   + [warm_unconv[k] for k in warm_budgets])
    cold_nfe, n, cold_unconv = flat[:3]
    warm = dict(zip(warm_budgets, flat[3 : 3 + len(warm_budgets)], strict=True))
    warm_unconv = dict(zip(warm_budgets, flat[3 + len(warm_budgets) :], strict=True))
    per_plan = {str(k): warm[k] / max(1, n) for k in warm_budgets}
    on_train = _exact_plan_nfe(task, student, exact, warm_budgets, config)
    best = min(warm_budgets, key=lambda k: on_train[k])
    cold_mean = cold_nfe / max(1, n)
    return {
        f"{config.exact_solver}_nfe": cold_mean,
        "cdeq_warm_nfe": per_plan[str(best)],
        "warm_plan_nfe": best,
        "warm_nfe_by_plan": per_plan,
        "warm_nfe_by_plan_on_training_data": {str(k): v for k, v in on_train.items()},
        "tol": config.exact_tol,
        "cold_unconverged_fraction": cold_unconv / max(1, n),
        "warm_unconverged_fraction": warm_unconv[best] / max(1, n),
        "speedup": cold_mean / max(1e-9, per_plan[str(best)]),
    }


def _exact_plan_nfe(task: Task, student: ConsistencyStudent, solver: Any, budgets: list[int],
                    config: EvalConfig) -> dict[int, float]:
    """Mean exact-mode NFE (plan + solver) of each warm-start plan on the selection (validation) batches."""
    total, n = dict.fromkeys(budgets, 0.0), 0
    for p in distributed.parts(task.selection_batches(config.batch_size)):
        if p.index >= config.exact_select_batches:
            break
        if p.empty:
            continue
        for k in budgets:
            _, res, plan_nfe = student.solve_exact(p.x, solver, student.plan_for(k))
            total[k] += float((res.nfe + plan_nfe).float().sum())
        n += res.nfe.numel()
    *sums, n = distributed.reduce_sums([total[k] for k in budgets] + [n])
    return {k: v / max(1, n) for k, v in zip(budgets, sums, strict=True)}


def predictors(teacher: DEQModel, student: ConsistencyStudent | None, config: EvalConfig,
               budgets: list[int], extra: dict[str, Callable] | None, x: Any
               ) -> dict[str, dict[str, Predictor]]:
    """Every method's whole prediction path, input to logits: ``{method: {k: fn}}`` and
    ``{"teacher": {"converged": fn}}`` (the exact-mode solver to its tolerance)."""
    reference = get_solver(config.exact_solver, max_iter=config.exact_max_iter, tol=config.exact_tol)

    def solve(solver: Any) -> Predictor:
        def fn(x: Any) -> Tensor:
            u = teacher.inject(x)
            return teacher.head(solver.solve(teacher.cell, teacher.initial_state(u), u).z)
        return fn

    out: dict[str, dict[str, Predictor]] = {"teacher": {"converged": solve(reference)}}
    for s in config.solvers:
        out[s] = {str(k): solve(get_solver(s, max_iter=k, tol=0.0)) for k in budgets}
    if student is not None:
        out["cdeq"] = {str(k): (lambda x, k=k: student.predict(x, nfe=k)) for k in budgets}
    for name, fn in (extra or {}).items():
        out[name] = {str(k): (lambda x, k=k, fn=fn: fn(x, k)) for k in budgets if fn(x, k) is not None}
    return out


def measure_flops(teacher: DEQModel, preds: dict[str, dict[str, Predictor]], x: Any) -> dict[str, Any]:
    """FLOPs per sample of every predictor on batch ``x`` and its layer-call equivalents:
    ``(FLOPs - injection - head) / one teacher layer call`` (see :mod:`cdeq.run.cost`)."""
    per = 1.0 / cost.batch_size(x)
    u = teacher.inject(x)
    z0 = teacher.initial_state(u)
    inj = cost.count_flops(lambda: teacher.inject(x)).total * per
    head = cost.count_flops(lambda: teacher.head(z0)).total * per
    layer = cost.count_flops(lambda: teacher.cell(z0, u)).scaled(per)
    shared = inj + head

    def calls(f: float) -> float:
        return (f - shared) / max(layer.total, 1e-30)

    flops: dict[str, dict[str, float]] = {}
    for name, per_k in preds.items():
        flops[name] = {k: cost.count_flops(lambda fn=fn: fn(x)).total * per for k, fn in per_k.items()}
    teacher_flops = flops.pop("teacher")["converged"]
    return {
        "per": "sample", "batch_size": cost.batch_size(x), "layer_call_flops": layer.total,
        "layer_call_breakdown": layer.to_dict(), "injection_flops": inj, "head_flops": head,
        "teacher": {"flops": teacher_flops, "layer_calls": calls(teacher_flops)},
        "flops": flops,
        "layer_calls": {name: {k: calls(f) for k, f in per_k.items()} for name, per_k in flops.items()},
        "counted": "dense products (torch.utils.flop_counter formulas) + bias adds + sparse products "
                   "(2 nnz d) + elementwise ops, reductions, norms and solves (cdeq.run.cost)",
    }


def measure_time(preds: dict[str, dict[str, Predictor]], config: EvalConfig, x: Any,
                 also: set[tuple[str, str]] = frozenset()) -> dict[str, Any]:
    """Interleaved wall time of every predictor on batch ``x`` (:func:`cdeq.run.cost.time_methods`)
    at the timing budgets, and of the ``(method, budget)`` pairs in ``also`` (the teacher-accuracy
    picks by FLOPs, so that the speed-up in time has both its ends measured)."""
    timed = {str(k) for k in (config.timing_budgets or config.budgets)}
    fns = {(name, k): (lambda fn=fn: fn(x)) for name, per_k in preds.items()
           for k, fn in per_k.items() if name == "teacher" or k in timed or (name, k) in also}
    got = cost.time_methods(fns, repeats=config.latency_repeats, warmup=config.timing_warmup,
                            threads=config.timing_threads)
    out: dict[str, Any] = {"threads": config.timing_threads or torch.get_num_threads(),
                           "batch_size": cost.batch_size(x), "repeats": config.latency_repeats,
                           "warmup": config.timing_warmup, "interleaved": True}
    for (name, k), v in got.items():
        if name == "teacher":
            out["teacher"] = v
        else:
            out.setdefault(name, {})[k] = v
    return out
