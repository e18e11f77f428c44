"""Choosing multi-step inference plans on validation (or training) data, never the test split.

A plan (see :mod:`cdeq.consistency.student`) is a list of operations. For every budget
``k`` the search keeps the best plan found with at most ``k`` NFE and tries to extend it:

- ``plan_{k-1} + [jump(tau)]``: jump again from the estimate placed at time ``tau``;
- ``plan_{k-1} + [step]``: one teacher step from the estimate;
- ``plan_{k-2} + [step, jump(tau)]`` (and ``[step, jump_auto]`` with the residual schedule):
  re-entry by a teacher step, then a jump from the later time ``tau``;
- ``plan_j + [solve(k - j)]`` for ``j`` in 1, 2, 4 (``j <= k - 2``): the teacher's own solver
  takes over from the estimate of a short plan for the rest of the budget.

``plan_k`` is the best of these and ``plan_{k-1}`` itself, judged on the given batches (in a run,
``Task.selection_batches``: validation data) by the task metric; ``tie_break`` (the loss, or the
error to ``z*``) decides between tied metrics. With ``tie_within_se`` a candidate ties when its
metric trails the best one found so far (at any budget up to ``k``) by less than that many
standard errors of their per-item difference: a gain the selection data cannot tell from noise
does not outweigh a plan closer to ``z*``. With ``tie_with_teacher`` a candidate also ties when its
metric does not trail the converged teacher's (the student's head on ``z*``) by
``teacher_within_se`` standard errors: a
selection gain over the DEQ's own answer does not keep a plan from moving to it. Without
``tie_within_se``, ties are exact and on those batches a larger budget is never worse. With
``error_must_not_rise`` (the default) only candidates whose relative error to ``z*`` (the
teacher's eval solver on the same batches) is at most ``plan_{k-1}``'s compete, so on those
batches the error to ``z*`` never rises as calls are added: a plan may not buy accuracy by leaving
the equilibrium. With ``teacher_head`` (the default) a chosen plan is read out by the teacher's
head (a last ``("teacher_head",)``, 0 NFE) when that scores higher by ``tie_within_se`` standard
errors or more; the search itself ranks plans by the student's head.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..engine.config import Config, ConfigError, check_bool, check_choice, check_int, check_positive
from ..engine.fit import model_device
from ..engine.precision import to_device
from .conditioning import relative_error
from .plans import TEACHER_HEAD, Plan, plan_to_json
from .student import ConsistencyStudent

log = logging.getLogger(__name__)
ScoreFn = Callable[[Tensor, Any], tuple[Tensor, float]]
"""``(logits, y) -> (metric of each item (N,), loss sum over the items)``."""


SOLVER_HANDOVER = (1, 2, 4)
"""The budgets of the plans the teacher's solver may take over from (``("solve", n)``)."""


@dataclasses.dataclass
class PlanSearchConfig(Config):
    """Attributes:
        max_nfe: search plans up to this budget.
        times: candidate re-entry times ``tau`` (``()``: the schedule's times of iterates
            1, 2, 3, 4, 6, 8, 12 and 0.5/0.75/0.9 of ``T``).
        batches: number of batches (validation, in a run) to judge plans on.
        error_must_not_rise: a candidate for budget ``k`` must be at least as close to ``z*``
            (relative error on the same batches) as the plan chosen for ``k - 1``.
        tie_break: what decides between plans of tied metric: ``"error"`` (the error to ``z*``,
            then the loss) or ``"loss"`` (the task loss, then the error to ``z*``).
        tie_within_se: a candidate whose metric trails the best found so far by less than this
            many standard errors of their paired per-item difference ties with it (0: only
            equal metrics tie). The defaults (1 standard error, ties to the plan nearest ``z*``)
            were chosen on validation items the search did not see: ``benchmarks/tie_rule.py``.
        tie_with_teacher: with ``tie_within_se`` > 0, a candidate whose metric is within
            ``teacher_within_se`` of the converged teacher's (the student's head on ``z*``, same
            batches) ties too, even when an earlier plan's metric is higher (its default was
            chosen the same way).
        teacher_within_se: with ``tie_with_teacher``, the margin (standard errors) for the
            teacher: 0 (the default, chosen the same way) ties only candidates that do not
            trail the converged teacher at all.
        teacher_head: once a budget's plan is chosen (read out by the student's fine-tuned head),
            the teacher's head reads its state instead (the plan ends with ``("teacher_head",)``,
            0 NFE) when it scores higher by ``tie_within_se`` standard errors or more.
    """

    max_nfe: int = 16
    times: tuple = ()
    batches: int = 2
    error_must_not_rise: bool = True
    tie_break: str = "error"
    tie_within_se: float = 1.0
    tie_with_teacher: bool = True
    teacher_within_se: float = 0.0
    teacher_head: bool = True

    def validate(self) -> None:
        check_int("max_nfe", self.max_nfe, minimum=1)
        check_int("batches", self.batches, minimum=1)
        check_bool("error_must_not_rise", self.error_must_not_rise)
        check_choice("tie_break", self.tie_break, ["loss", "error"])
        check_positive("tie_within_se", self.tie_within_se, allow_zero=True)
        check_bool("tie_with_teacher", self.tie_with_teacher)
        check_positive("teacher_within_se", self.teacher_within_se, allow_zero=True)
        check_bool("teacher_head", self.teacher_head)
        if any(not isinstance(t, (int, float)) or t <= 0 for t in self.times):
            raise ConfigError(f"times={self.times!r} is not valid; give positive numbers")


def candidate_times(student: ConsistencyStudent, last: int, config: PlanSearchConfig) -> list[float]:
    if config.times:
        return sorted(float(t) for t in config.times if t < student.schedule.T)
    sched = student.schedule
    idx = [k for k in (1, 2, 3, 4, 6, 8, 12) if k < last]
    ts = [float(t) for t in sched.index_time(torch.tensor(idx, device="cpu"), last)]
    ts += [f * sched.T for f in (0.5, 0.75, 0.9)]
    ts += list(student.trained_times)  # e.g. the time C-DEQ+'s chains of jumps were trained at
    return sorted(set(round(t, 6) for t in ts))


def loss_score(loss: Callable[[Tensor, Any], Tensor]) -> ScoreFn:
    """A :data:`ScoreFn` from a task loss ``(logits, y) -> mean loss``: lower is better."""

    def score(logits: Tensor, y: Any) -> tuple[Tensor, float]:
        n = logits.shape[0]
        value = float(loss(logits, y))  # a mean: the items share it, so only equal values tie
        return torch.full((n,), value), value * n

    return score


def teacher_score(logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, float]:
    """Label-free score: each row's relative squared distance to the converged teacher's logits
    (lower is better). ``logits``, ``teacher_logits``: ``(B, ...)``."""
    n = logits.shape[0]
    d = (logits - teacher_logits).reshape(n, -1).pow(2).sum(1)
    d = d / (teacher_logits.reshape(n, -1).pow(2).sum(1) + 1e-12)
    return d, float(d.sum())


def default_last(student: ConsistencyStudent) -> int:
    """The equilibrium index the student's times refer to: the teacher's eval solver budget."""
    return int(student.teacher.deq.eval_solver.options.max_iter)


def _search_data(student: ConsistencyStudent, batches: Iterable[Any], limit: int, to_teacher: bool
                 ) -> list[tuple[Any, Any, Any, Tensor]]:
    """``(u_student, u_teacher, y, z*)`` of the first ``limit`` batches (``z*``: the teacher's eval
    solver from its initial state); ``y`` is the converged teacher's logits when ``to_teacher``."""
    data = []
    for i, item in enumerate(batches):
        if i >= limit:
            break
        x, y = item if isinstance(item, (tuple, list)) and len(item) == 2 else (item, None)
        x, y = to_device((x, y), model_device(student))  # batches where the student is
        u_s, u_t = student.teacher_inputs(x)
        z_star = student.teacher.deq.solve(u_t, student.teacher.initial_state(u_t)).z
        if to_teacher:
            y = student.teacher.head(z_star)
        elif y is None:
            raise ValueError("plan search with a loss or score needs (x, y) batches; pass labelled "
                             "batches, or no loss to score against the converged teacher")
        data.append((u_s, u_t, y, z_star))
    if not data:
        raise ValueError("plan search needs at least one batch (validation or training data)")
    return data


@dataclasses.dataclass
class _Scored:
    """A plan, its states (one per selection batch) and its scores on the selection data."""

    plan: Plan
    states: list[Tensor]
    metric: float
    loss: float
    err: float
    items: Tensor  # the metric of each selection item, (N,)


def _trails(a: _Scored, ref: _Scored, higher_is_better: bool, within_se: float) -> bool:
    """Whether ``a``'s metric trails ``ref``'s by ``within_se`` standard errors (of their paired
    per-item difference) or more."""
    d = ref.items - a.items if higher_is_better else a.items - ref.items
    if float(d.mean()) <= 0:
        return False
    se = float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else 0.0
    return float(d.mean()) >= within_se * se


def _choose(scored: list[_Scored], ref: _Scored, config: PlanSearchConfig,
            higher_is_better: bool, teacher: list[_Scored]) -> tuple[_Scored, _Scored]:
    """The plan kept among ``scored`` and the new best-by-metric reference (``ref``: the best
    metric found at the budgets before; ``teacher``: the converged teacher's scores, further
    references to tie with)."""
    def ties(c: _Scored) -> tuple[float, float]:
        return (-c.err, -c.loss) if config.tie_break == "error" else (-c.loss, -c.err)

    def rank(c: _Scored) -> tuple[float, float, float]:
        return (c.metric if higher_is_better else -c.metric, *ties(c))

    top = max(scored, key=rank)
    if rank(top)[0] > rank(ref)[0]:
        ref = top
    if config.tie_within_se <= 0:
        return top, ref
    refs = [(ref, config.tie_within_se)] + [(t, config.teacher_within_se) for t in teacher]
    tied = [c for c in scored if any(not _trails(c, r, higher_is_better, se) for r, se in refs)]
    return (max(tied, key=ties) if tied else top), ref


def _candidates(k: int, times: list[float], auto: bool) -> list[tuple[int, Plan]]:
    """``(base budget, operations appended to its plan)`` of every extension tried for budget
    ``k`` (the module docstring lists them), besides ``plan_{k-1}`` itself."""
    out: list[tuple[int, Plan]] = [(k - 1, [("step",)])]
    out += [(k - 1, [("jump", t)]) for t in times]
    if k - 2 >= 1:
        out += [(k - 2, [("step",), ("jump", t)]) for t in times]
        if auto:
            out.append((k - 2, [("step",), ("jump_auto",)]))
    out += [(j, [("solve", k - j)]) for j in SOLVER_HANDOVER if j <= k - 2]
    return out


@torch.no_grad()
def select_plans(
    student: ConsistencyStudent,
    batches: Iterable[Any],
    score: ScoreFn | None = None,
    higher_is_better: bool = False,
    last: int | None = None,
    config: PlanSearchConfig | None = None,
    loss: Callable[[Tensor, Any], Tensor] | None = None,
) -> dict[str, Any]:
    """Choose ``student.plans`` for budgets ``1..max_nfe`` on ``batches`` (validation or training data).

    Scoring, in order: ``score`` (``(logits, y) -> (metric of each item (N,), loss sum)`` with
    ``higher_is_better``); else ``loss`` (a task loss ``(logits, y) -> mean``, lower is better;
    every item of a batch gets the batch's mean); else the distance to the converged teacher's
    logits (``batches`` may then hold inputs alone). ``last``: the recorded equilibrium index
    (default: the teacher's eval solver ``max_iter``). Returns the search log: for each budget
    the plan, its metric, loss and relative error to ``z*``.
    """
    config = config or PlanSearchConfig()
    last = default_last(student) if last is None else int(last)
    if score is None:
        score, higher_is_better = (loss_score(loss), False) if loss is not None else (teacher_score, False)
    student.eval()
    data = _search_data(student, batches, config.batches, score is teacher_score)
    times = candidate_times(student, last, config)
    auto = student.schedule.config.kind == "residual"

    def scored(plan: Plan, states: list[Tensor], head: Callable[[Tensor], Tensor] = student.head
               ) -> _Scored:
        items, l_sum, e_sum, e_count = [], 0.0, 0.0, 0
        for z, (_, _, y, z_star) in zip(states, data, strict=True):
            m, lo = score(head(z), y)
            items.append(m.detach().float().reshape(-1).cpu())
            l_sum += lo
            err = relative_error(z, z_star)
            e_sum, e_count = e_sum + float(err.sum()), e_count + err.numel()
        flat = torch.cat(items)
        n = max(1, flat.numel())
        return _Scored(plan, states, float(flat.sum()) / n, l_sum / n, e_sum / max(1, e_count), flat)

    def extend(states: list[Tensor], ops: Plan) -> list[Tensor]:
        return [student.run_plan(u_s, ops, u_t, z0=z)
                for z, (u_s, u_t, _, _) in zip(states, data, strict=True)]

    def readout(c: _Scored) -> _Scored:
        """``c`` read out by the teacher's head when that beats the student's by the tie margin."""
        if not config.teacher_head:
            return c
        t = scored(c.plan + [TEACHER_HEAD], c.states, student.teacher.head)
        return t if _trails(c, t, higher_is_better, config.tie_within_se) else c

    start: Plan = [("jump", student.start_time)]
    best = {1: scored(start, extend([student.initial_state(u_s) for u_s, _, _, _ in data], start))}
    ref = best[1]
    teacher = [scored([], [z_star for *_, z_star in data])] if config.tie_with_teacher else []
    for k in range(2, config.max_nfe + 1):
        prev = best[k - 1]
        cands = [prev]
        for base, ops in _candidates(k, times, auto):
            c = scored(best[base].plan + ops, extend(best[base].states, ops))
            if not config.error_must_not_rise or c.err <= prev.err:
                cands.append(c)  # plan_{k-1} itself always stays in
        best[k], ref = _choose(cands, ref, config, higher_is_better, teacher)
    best = {k: readout(v) for k, v in best.items()}
    student.plans = {k: list(v.plan) for k, v in best.items()}
    log.info("selected plans for 1..%d NFE on %d batches", config.max_nfe, len(data))
    return {str(k): {"plan": plan_to_json(v.plan), "metric": v.metric, "loss": v.loss,
                     "relative_error": v.err} for k, v in best.items()}
