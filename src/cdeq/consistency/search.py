"""Choosing multi-step inference plans on validation (or training) data, never the test split.

A plan (see :mod:`cdeq.consistency.student`) is a list of operations. For every budget
``k`` the search keeps the best plan found with at most ``k`` NFE and tries to extend it:

- ``plan_{k-1} + [jump(tau)]``: jump again from the estimate placed at time ``tau``;
- ``plan_{k-1} + [step]``: one teacher step from the estimate;
- ``plan_{k-2} + [step, jump(tau)]`` (and ``[step, jump_auto]`` with the residual schedule):
  re-entry by a teacher step, then a jump from the later time ``tau``;
- ``plan_j + [solve(k - j)]`` for ``j`` in 1, 2, 4 (``j <= k - 2``): the teacher's own solver
  takes over from the estimate of a short plan for the rest of the budget.

``plan_k`` is one of these or ``plan_{k-1}`` itself, judged on the given batches (in a run,
``Task.selection_batches``: validation data) by the task metric, with one fixed rule:

1. **The error to the equilibrium must not rise.** Only candidates at least as close to ``z*`` (the relative
   error, ``z*`` from the teacher's eval solver on the same batches) as ``plan_{k-1}`` compete, so
   on those batches the error never rises as calls are added: a plan may not buy metric by
   leaving the equilibrium.
2. **A gain the selection data cannot tell from noise is a tie.** A candidate ties when its metric
   trails the best found so far (at any budget up to ``k``) by less than one standard error of
   their paired per-item difference, or when it does not trail the converged teacher (the
   student's head on ``z*``) at all: a selection gain over the DEQ's own answer does not keep a
   plan from moving to it.
3. **Ties go to the plan nearest the equilibrium** (the error to ``z*``), then to the lower loss.
4. **The teacher's head reads a plan's state where it scores higher** by one standard error or
   more (the plan then ends with ``("teacher_head",)``, 0 NFE); the search itself ranks plans by
   the student's head.

A tuned student (:mod:`cdeq.consistency.tune`) gives its chains of ``1 .. K`` jumps as ``fixed``
plans: budget ``k <= K`` keeps its chain where it scores better than ``plan_{k-1}`` (its error to
``z*`` is free to rise), and above ``K`` the candidates are the teacher's solver from the start state
or from a tuned state, ``plan_j + [solve(k - j)]`` for ``j`` in ``0 .. K``, under the same rule; at
``max_nfe`` a plan without solver steps is not kept.

The rule was chosen among alternatives (exact ties, ties broken by the loss, no ties with the
teacher, a teacher margin of one standard error, no teacher head) on validation items the search
did not see, over seeds: ``benchmarks/tie_rule.py`` compares them (its results:
``benchmarks/results/tie_rule_*.json``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..engine import distributed
from ..engine.config import Config, ConfigError, check_int
from ..engine.fit import model_device
from ..engine.precision import to_device
from ..engine.tree import batch_size, relative, relative_error, squared_norms
from .plans import TEACHER_HEAD, Plan, plan_to_json
from .student import ConsistencyStudent

log = logging.getLogger(__name__)
ScoreFn = Callable[[Tensor, Any], tuple[Tensor, float]]
"""``(logits, y) -> (metric of each item (N,), loss sum over the items)``."""


SOLVER_HANDOVER = (1, 2, 4)
"""The budgets of the plans the teacher's solver may take over from (``("solve", n)``)."""


@dataclasses.dataclass
class PlanSearchConfig(Config):
    """What the plan search looks at (how it chooses is fixed: the module docstring's rule).

    Attributes:
        max_nfe: search plans up to this budget.
        times: candidate re-entry times ``tau`` (``()``: the schedule's times of iterates
            1, 2, 3, 4, 6, 8, 12 and 0.5/0.75/0.9 of ``T``).
        batches: number of batches (validation, in a run) to judge plans on.
    """

    max_nfe: int = 16
    times: tuple = ()
    batches: int = 2

    def validate(self) -> None:
        check_int("max_nfe", self.max_nfe, minimum=1)
        check_int("batches", self.batches, minimum=1)
        if any(not isinstance(t, (int, float)) or t <= 0 for t in self.times):
            raise ConfigError(f"times={self.times!r} is not valid; give positive numbers")


@dataclasses.dataclass(frozen=True)
class _Rule:
    """How the search chooses (the module docstring's rule is :data:`_RULE`); the alternatives
    exist for ``benchmarks/tie_rule.py``, which compares them, and for the tests.

    Attributes:
        error_must_not_rise: a candidate for budget ``k`` must be at least as close to ``z*``
            as the plan chosen for ``k - 1``.
        tie_break: what decides between tied plans: ``"error"`` (the error to ``z*``, then the
            loss) or ``"loss"`` (the loss, then the error).
        tie_within_se: a candidate trailing the best found so far by less than this many standard
            errors ties with it (0: only equal metrics tie).
        tie_with_teacher: with ``tie_within_se > 0``, a candidate within ``teacher_within_se``
            standard errors of the converged teacher's metric ties too.
        teacher_within_se: the margin for the teacher.
        teacher_head: read a chosen plan out by the teacher's head where that scores higher by
            ``tie_within_se`` standard errors or more.
    """

    error_must_not_rise: bool = True
    tie_break: str = "error"
    tie_within_se: float = 1.0
    tie_with_teacher: bool = True
    teacher_within_se: float = 0.0
    teacher_head: bool = True


_RULE = _Rule()
"""The plan search's rule."""


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
    d = relative(squared_norms(logits - teacher_logits), squared_norms(teacher_logits))
    return d, float(d.sum())


def default_last(student: ConsistencyStudent) -> int:
    """The equilibrium index the student's times refer to: the teacher's eval solver budget."""
    return int(student.teacher.deq.eval_solver.options.max_iter)


def _search_data(student: ConsistencyStudent, batches: Iterable[Any], limit: int, to_teacher: bool
                 ) -> list[tuple[Any, Any, Any, Tensor]]:
    """``(u_student, u_teacher, y, z*)`` of this rank's part of each of the first ``limit`` batches
    (``z*``: the teacher's eval solver from its initial state; under torchrun each rank holds its
    rows, or the batches it owns); ``y`` is the converged teacher's logits when ``to_teacher``."""
    data, seen = [], 0
    for p in distributed.parts(batches):
        if p.index >= limit:
            break
        seen += 1
        if p.empty:
            continue
        x, y = to_device((p.x, p.y), model_device(student))  # batches where the student is
        u_s, u_t = student.teacher_inputs(x)
        z_star = student.teacher.deq.solve(u_t, student.teacher.initial_state(u_t)).z
        distributed.TALLY.add("plan_search", batch_size(z_star))
        if to_teacher:
            y = student.teacher.head(z_star)
        elif y is None:
            raise ValueError("plan search with a loss or score needs (x, y) batches; pass labelled "
                             "batches, or no loss to score against the converged teacher")
        data.append((u_s, u_t, y, z_star))
    if not seen:
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


def _choose(scored: list[_Scored], ref: _Scored, rule: _Rule,
            higher_is_better: bool, teacher: list[_Scored]) -> tuple[_Scored, _Scored]:
    """The plan kept among ``scored`` and the new best-by-metric reference (``ref``: the best
    metric found at the budgets before; ``teacher``: the converged teacher's scores, further
    references to tie with)."""
    def ties(c: _Scored) -> tuple[float, float]:
        return (-c.err, -c.loss) if rule.tie_break == "error" else (-c.loss, -c.err)

    def rank(c: _Scored) -> tuple[float, float, float]:
        return (c.metric if higher_is_better else -c.metric, *ties(c))

    top = max(scored, key=rank)
    if rank(top)[0] > rank(ref)[0]:
        ref = top
    if rule.tie_within_se <= 0:
        return top, ref
    refs = [(ref, rule.tie_within_se)] + [(t, rule.teacher_within_se) for t in teacher]
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


def _hands_over(plan: Plan) -> bool:
    """Whether ``plan`` runs the teacher's solver."""
    return any(op[0] == "solve" for op in plan)


def _handovers(k: int, top: int) -> list[tuple[int, Plan]]:
    """A tuned student's candidates for budget ``k > top``: the teacher's solver from the start
    state (``plan_0``) or from a tuned plan ``j <= top``."""
    return [(j, [("solve", k - j)]) for j in range(0, min(top, k - 1) + 1)]


def _fixed_start(fixed: dict[int, Plan], starts: list[Tensor], extend: Callable,
                 scored: Callable, higher_is_better: bool) -> dict[int, _Scored]:
    """Budgets ``0 .. K`` of a tuned student: the start state, then ``fixed[k]`` where it scores
    better than the plan kept for ``k - 1`` (by the metric, then the loss)."""
    if sorted(fixed) != list(range(1, max(fixed) + 1)):
        raise ValueError(f"fixed plans must cover the budgets 1..K; got {sorted(fixed)}")
    best = {0: scored([], starts)}
    for k in range(1, max(fixed) + 1):
        c = scored(list(fixed[k]), extend(starts, fixed[k]))
        prev = best.get(k - 1) if k > 1 else None
        sign = 1 if higher_is_better else -1
        better = prev is None or (sign * c.metric, -c.loss) > (sign * prev.metric, -prev.loss)
        best[k] = c if better else prev
    return best


@torch.no_grad()
def select_plans(
    student: ConsistencyStudent,
    batches: Iterable[Any],
    score: ScoreFn | None = None,
    higher_is_better: bool = False,
    last: int | None = None,
    config: PlanSearchConfig | None = None,
    loss: Callable[[Tensor, Any], Tensor] | None = None,
    fixed: dict[int, Plan] | None = None,
) -> dict[str, Any]:
    """Choose ``student.plans`` for budgets ``1..max_nfe`` on ``batches`` (validation or training data).

    ``fixed`` (``{k: plan}`` for ``k = 1 .. K``, a tuned student's chains,
    :mod:`cdeq.consistency.tune`): budget ``k <= K`` takes ``fixed[k]`` where its metric beats
    ``plan_{k-1}``'s (its error to ``z*`` is free to rise), and every budget above ``K`` hands
    over to the teacher's solver: ``plan_j + [solve(k - j)]`` for ``j`` in ``0 .. K`` (``plan_0``
    the start state) compete with ``plan_{k-1}`` under the rules above (the error must not rise),
    and at ``max_nfe`` a plan without solver steps is not kept.

    Scoring, in order: ``score`` (``(logits, y) -> (metric of each item (N,), loss sum)`` with
    ``higher_is_better``); else ``loss`` (a task loss ``(logits, y) -> mean``, lower is better;
    every item of a batch gets the batch's mean); else the distance to the converged teacher's
    logits (``batches`` may then hold inputs alone). ``last``: the recorded equilibrium index
    (default: the teacher's eval solver ``max_iter``). Returns the search log: for each budget
    the plan, its metric, loss and relative error to ``z*``.
    """
    return _select_plans(student, batches, score, higher_is_better, last, config, loss, _RULE, fixed)


def _select_plans(student: ConsistencyStudent, batches: Iterable[Any], score: ScoreFn | None,
                  higher_is_better: bool, last: int | None, config: PlanSearchConfig | None,
                  loss: Callable[[Tensor, Any], Tensor] | None, rule: _Rule,
                  fixed: dict[int, Plan] | None = None) -> dict[str, Any]:
    """:func:`select_plans` with the choosing ``rule`` given."""
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
        """The plan's scores over every rank's part of the selection data (a collective)."""
        items, l_sum, e_sum, e_count = [torch.zeros(0)], 0.0, 0.0, 0
        for z, (_, _, y, z_star) in zip(states, data, strict=True):
            m, lo = score(head(z), y)
            items.append(m.detach().float().reshape(-1).cpu())
            l_sum += lo
            err = relative_error(z, z_star)
            e_sum, e_count = e_sum + float(err.sum()), e_count + err.numel()
        flat = distributed.all_gather_cat(torch.cat(items))
        l_sum, e_sum, e_count = distributed.reduce_sums([l_sum, e_sum, e_count])
        n = max(1, flat.numel())
        return _Scored(plan, states, float(flat.sum()) / n, l_sum / n, e_sum / max(1, e_count), flat)

    def extend(states: list[Tensor], ops: Plan) -> list[Tensor]:
        return [student._run_plan(u_s, ops, u_t, z0=z)
                for z, (u_s, u_t, _, _) in zip(states, data, strict=True)]

    def readout(c: _Scored) -> _Scored:
        """``c`` read out by the teacher's head when that beats the student's by the tie margin."""
        if not rule.teacher_head:
            return c
        t = scored(c.plan + [TEACHER_HEAD], c.states, student.teacher.head)
        return t if _trails(c, t, higher_is_better, rule.tie_within_se) else c

    starts = [student.initial_state(u_s) for u_s, _, _, _ in data]
    teacher = [scored([], [z_star for *_, z_star in data])] if rule.tie_with_teacher else []
    if fixed:
        best = _fixed_start(fixed, starts, extend, scored, higher_is_better)
        top = max(fixed)
    else:
        start: Plan = [("jump", student.start_time)]
        best, top = {1: scored(start, extend(starts, start))}, 1
    ref = max((best[k] for k in range(1, top + 1)),
              key=lambda c: c.metric if higher_is_better else -c.metric)
    for k in range(top + 1, config.max_nfe + 1):
        prev = best[k - 1]
        keep_prev = not fixed or k < config.max_nfe or _hands_over(prev.plan)
        cands = [prev] if keep_prev else []
        options = _handovers(k, top) if fixed else _candidates(k, times, auto)
        for base, ops in options:
            c = scored(best[base].plan + ops, extend(best[base].states, ops))
            if not rule.error_must_not_rise or c.err <= prev.err or not keep_prev:
                cands.append(c)  # plan_{k-1} itself always stays in
        best[k], ref = _choose(cands, ref, rule, higher_is_better, teacher)
    best = {k: readout(v) for k, v in best.items() if k >= 1}
    student.plans = {k: list(v.plan) for k, v in best.items()}
    log.info("selected plans for 1..%d NFE on %d batches (this rank's parts)", config.max_nfe, len(data))
    return {str(k): {"plan": plan_to_json(v.plan), "metric": v.metric, "loss": v.loss,
                     "relative_error": v.err} for k, v in best.items()}
