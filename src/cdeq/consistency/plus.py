"""C-DEQ+: the consistency student started from a learned estimate of the equilibrium.

A cheap initialiser ``h(u)`` (:class:`cdeq.consistency.initialiser.LearnedInit`: a channel-wise
MLP of the input injection, plus a depthwise 3x3 convolution for image states) predicts ``z*``
without a layer call.
The student's plans start from ``h(u)`` instead of zeros, its first jump at the time ``t_h``
*matched to the estimate's residual*: of the recorded trajectory points, the one whose median
relative residual on the training data is nearest (in log) to ``h(u)``'s lends its time (the
equilibrium excluded). In sequence, from a distilled C-DEQ student:

1. ``h`` is fit to the recorded ``z*`` (relative squared error), as the learned-initialiser
   baseline is, for ``init_epochs`` passes over the recorded samples;
2. ``t_h`` is matched;
3. student and ``h`` are distilled jointly for ``epochs`` epochs with the usual consistency loss
   plus the start term (:class:`StartTerm`, an extra term of :func:`cdeq.consistency.distill.distill`)::

       w_s (w_g d(F(h(u), t_h), z*) + w_i d(h(u), z*) + chain)

   With ``chain_k > 1`` (the default, 4) ``chain`` is the task loss after each of ``chain_k``
   jumps from ``h(u)``, averaged: the first at ``t_h``, the rest at a re-entry time ``t_r``
   matched the same way to the residual of one jump's output. The plans are then supervised step
   by step, as the anytime unrolled network is. That chain needs no trajectory: when the
   recording holds only part of the training split (``record.max_samples``), it reads
   minibatches of the whole training split (``chain_data``). With ``chain_k`` 0 or 1 it is
   ``w_task task(h(F(h(u), t_h)), y)``;
4. the multi-step plans (jumps, and teacher steps that re-enter the trajectory) are searched on
   validation data like C-DEQ's.

The result is a :class:`PlusStudent`: a :class:`ConsistencyStudent` whose plans start from
``h(u)`` at ``t_h`` and whose plan search also tries ``t_r``. It is one model for every budget,
like C-DEQ; each prediction runs ``h`` and its FLOPs count in the method's cost
(:mod:`cdeq.run.cost`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..deq.model import DEQModel
from ..engine import distributed
from ..engine.config import Config, check_bool, check_choice, check_int, check_positive
from ..engine.fit import OptimConfig, batch_rows, model_device
from ..engine.precision import to_device
from ..engine.tree import leaves, relative_error
from .distill import DistillConfig, LossTerm, TaskBatches, TermInputs, distill, relative_distance
from .initialiser import LearnedInit, train_learned_init
from .schedule import TimeSchedule
from .student import ConsistencyStudent, StudentConfig
from .trajectory import TrajectoryBatch

logger = logging.getLogger(__name__)

CHAIN_DATA = ("auto", "recorded", "train")


@dataclasses.dataclass
class PlusConfig(Config):
    """C-DEQ+'s own settings; the rest of its joint distillation is the ``distill`` section's.

    Attributes:
        enabled: build and evaluate C-DEQ+ in ``cdeq run`` (stage ``plus``).
        init_hidden: width of the initialiser's channel-wise MLP (its cost per prediction).
        init_conv: add a depthwise 3x3 convolution of ``u`` for image states.
        init_epochs: passes over the recorded samples to fit ``h`` to ``z*`` before the joint stage.
        epochs: epochs of the joint distillation of student and ``h`` (0: ``distill.epochs``).
        start_weight, init_weight: the weight of the start term and, inside it, of ``h(u)``'s own
            distance to ``z*``.
        chain_k: also supervise the task loss after each of ``chain_k`` jumps from ``h(u)`` (the
            first at the start time, the rest at the re-entry time), averaged, as the anytime
            unrolled network is supervised after each of its steps (0 or 1: the first jump's task
            loss alone, weighted by ``distill.task_weight``). Chosen on validation data
            (``benchmarks/plus_choices.py``).
        chain_data: what the chain's task term reads. ``recorded``: the recorded minibatch;
            ``train``: a minibatch of the training split of the same size (the chain needs no
            trajectory), so no training sample is left out when the recording holds a subset;
            ``auto`` (default): ``train`` when ``record.max_samples`` caps the recording,
            otherwise ``recorded``.

    C-DEQ+ has its own trainable copy of the input injection when the C-DEQ student has one
    (``student.train_injection``); ``h`` and the jumps read it, teacher steps the teacher's.
    """

    enabled: bool = True
    init_hidden: int = 32
    init_conv: bool = True
    init_epochs: int = 10
    epochs: int = 0
    start_weight: float = 1.0
    init_weight: float = 0.1
    chain_k: int = 4
    chain_data: str = "auto"

    def validate(self) -> None:
        check_bool("enabled", self.enabled)
        check_int("init_hidden", self.init_hidden, minimum=1)
        check_bool("init_conv", self.init_conv)
        check_int("init_epochs", self.init_epochs, minimum=1)
        check_int("epochs", self.epochs, minimum=0)
        check_positive("start_weight", self.start_weight, allow_zero=True)
        check_positive("init_weight", self.init_weight, allow_zero=True)
        check_int("chain_k", self.chain_k, minimum=0)
        check_choice("chain_data", self.chain_data, list(CHAIN_DATA))


class PlusStudent(ConsistencyStudent):
    """A consistency student whose plans start from a learned ``h(u)`` (:class:`LearnedInit`) at
    the time ``start_time`` instead of from zeros at ``t_min``.

    Args:
        teacher: the trained DEQ, as for :class:`ConsistencyStudent`.
        schedule: the time schedule, as for :class:`ConsistencyStudent`.
        config: the student's architecture, as for :class:`ConsistencyStudent`.
        example: an example input, as for :class:`ConsistencyStudent`.
        init_hidden: the width of the initialiser's channel-wise MLP.
        init_conv: add the initialiser's depthwise 3x3 convolution (image states).
        start_time: the time of ``h(u)`` in ``[t_min, T)`` (default ``t_min``; :func:`train_plus`
            matches it to ``h(u)``'s residual).
        reentry_time: the time C-DEQ+'s chains of jumps were trained at after the first jump
            (``None``: none); the plan search tries it.
    """

    zero_start = False

    def __init__(self, teacher: DEQModel, schedule: TimeSchedule | None = None,
                 config: StudentConfig | None = None, example: Any = None, *, init_hidden: int = 32,
                 init_conv: bool = True, start_time: float | None = None,
                 reentry_time: float | None = None) -> None:
        super().__init__(teacher, schedule, config, example)
        self.init_hidden, self.init_conv = int(init_hidden), bool(init_conv)
        self.initialiser = LearnedInit(self.channels, self.channel_dim, init_hidden, init_conv)
        self.set_times(self.schedule.t_min if start_time is None else start_time, reentry_time)

    def plus_settings(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this student's start (JSON): the initialiser's
        shape and the two times."""
        return {"init_hidden": self.init_hidden, "init_conv": self.init_conv,
                "start_time": self.start_time, "reentry_time": self.reentry_time}

    def set_times(self, start_time: float, reentry_time: float | None = None) -> None:
        """Start every plan from ``h(u)`` at ``start_time`` (in ``[t_min, T)``); the 1-NFE plan
        becomes one jump from there and any selected plans are dropped. ``reentry_time``: the
        chain's re-entry time, or ``None``."""
        for name, t in (("start_time", start_time), ("reentry_time", reentry_time)):
            if t is not None and not self.schedule.t_min <= float(t) < self.schedule.T:
                raise ValueError(f"{name}={t!r} is not valid; it must lie in "
                                 f"[{self.schedule.t_min}, {self.schedule.T})")
        self._start_time = float(start_time)
        self.reentry_time = None if reentry_time is None else float(reentry_time)
        self._plans = {1: [("jump", self._start_time)]}
        self.plans_selected = False

    @property
    def start_time(self) -> float:
        """The time of ``h(u)``, the start of every plan."""
        return self._start_time

    @property
    def trained_times(self) -> tuple[float, ...]:
        """The re-entry time of the chain, when it was trained with one."""
        return () if self.reentry_time is None else (self.reentry_time,)

    def initial_state(self, u: Any) -> Any:
        """``h(u)`` ``(B, ...)`` (of the state's structure) for the student's injection ``u``."""
        return self.initialiser.init_state(self.teacher, u)


def _endless(batches: TaskBatches, seed: int) -> Iterator[tuple[Any, Any]]:
    """``batches(generator)`` over and over (a new shuffle each pass)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        empty = True
        for batch in batches(gen):
            empty = False
            yield batch
        if empty:
            raise ValueError("task_batches yielded no batch: the training split is empty")


def _inject(student: ConsistencyStudent, x: Any) -> Any:
    """The student's injection of ``x``; the teacher's own (shared) injection runs without grad."""
    if student.injection is None:
        with torch.no_grad():
            return student.inject(x)
    return student.inject(x)


class StartTerm(LossTerm):
    """C-DEQ+'s start term of the joint distillation (the module docstring's step 3): the jump
    from ``h(u)`` at the start time to ``z*``, ``h(u)``'s own distance to ``z*`` and the task loss
    of the chain of jumps. Its chain reads ``task_batches`` (training ``(x, y)``, drawn afresh
    from ``seed``) when given, else the recorded minibatch."""

    name = "start"

    def __init__(self, config: PlusConfig, task_batches: TaskBatches | None = None,
                 seed: int = 0) -> None:
        self.config = config
        self.weight = config.start_weight
        chained = config.chain_k > 1 and task_batches is not None
        self._batches = _endless(task_batches, seed) if chained else None
        self._samples = 0

    @property
    def samples(self) -> int:
        return self._samples

    def __call__(self, inputs: TermInputs) -> Tensor:
        student, mb, u, weight, share = (inputs.student, inputs.batch, inputs.u, inputs.weight,
                                         inputs.share)
        dcfg, k, task_loss = inputs.config, self.config.chain_k, inputs.task_loss
        chain_batch = next(self._batches) if self._batches is not None else None
        self._samples = 0
        z_h = student.initial_state(u)  # a tensor, or a structure of tensors
        ref = leaves(z_h)[0]
        t = torch.full((mb.batch_size,), student.start_time, dtype=ref.dtype, device=ref.device)
        out = student.F(z_h, t, u)
        loss = dcfg.global_weight * (relative_distance(out, mb.z_star, mb.z_star, dcfg.distance)
                                     * weight).sum()
        if self.config.init_weight > 0:
            loss = loss + self.config.init_weight * (
                relative_distance(z_h, mb.z_star, mb.z_star, dcfg.distance) * weight).sum()
        if k > 1 and chain_batch is not None:
            p = distributed.part(*chain_batch, inputs.index)  # this rank's part of it
            if not p.empty:
                u_s = _inject(student, p.x)
                first = student.F(student.initial_state(u_s), student.start_time, u_s)
                loss = loss + p.share * chain_task_loss(student, first, u_s, p.y, k, task_loss,
                                                        student.reentry_time)
                self._samples = batch_rows(p.y)
        elif k > 1:
            loss = loss + share * chain_task_loss(student, out, u, mb.y, k, task_loss,
                                                  torch.full_like(t, student.reentry_time))
        elif dcfg.task_weight > 0:
            loss = loss + dcfg.task_weight * share * task_loss(student.head(out), mb.y)
        return loss


def chain_task_loss(student: ConsistencyStudent, first: Any, u: Any, y: Any, k: int,
                    task_loss: Callable, t_re: Tensor | float) -> Tensor:
    """The task loss after each of ``k`` jumps, averaged: ``first`` (the jump from ``h(u)``), then
    ``k - 1`` more at the re-entry time ``t_re`` (a float, or per-sample ``(B,)``)."""
    out, losses = first, [task_loss(student.head(first), y)]
    for _ in range(k - 1):
        out = student.F(out, t_re, u)
        losses.append(task_loss(student.head(out), y))
    return torch.stack(losses).mean()


@torch.no_grad()
def match_start_time(student: ConsistencyStudent, init: Any,
                     trajectories: Iterable[TrajectoryBatch]) -> dict[str, Any]:
    """The time ``t_h`` of the start ``init.init_state(teacher, u)`` (``h(u)``): that of the
    recorded point (equilibrium excluded) whose median relative residual is nearest in log to
    the median residual of ``h(u)``.

    Returns ``{"time", "init_residual", "point_index", "point_residual"}`` (medians over the
    recorded samples)."""
    teacher = student.teacher
    h_res, rec_idx, rec_res, rec_times = [], [], [], []
    for batch in trajectories:
        batch = to_device(batch, model_device(student))
        u_s, u = student.teacher_inputs(batch.x)
        z = init.init_state(teacher, u_s)  # h reads the student's injection
        h_res.append(relative_error(z, teacher.cell(z, u)).float())  # the residual
        idx = batch.grid()  # (B, L): each sample's recorded iterates (its own subset, if kept so)
        rec_idx.append(idx.flatten())
        rec_res.append(batch.residual.float().flatten())
        rec_times.append(student.schedule.times(idx, batch.last, batch.residual).float().flatten())
    if not h_res:
        raise ValueError("no recorded trajectories to match the initialiser's start time on")
    r_h = float(torch.cat(h_res).median())
    idx, res_all, times_all = torch.cat(rec_idx), torch.cat(rec_res), torch.cat(rec_times)
    index = sorted(set(idx.tolist()))  # per recorded iterate index, the medians over its samples
    residual = torch.stack([res_all[idx == k].median() for k in index])
    times = torch.stack([times_all[idx == k].median() for k in index])
    gap = (residual.clamp_min(1e-30).log() - math.log(max(r_h, 1e-30))).abs()
    p = int(gap.argmin())
    t = min(max(float(times[p]), student.schedule.t_min), math.nextafter(student.schedule.T, 0))
    return {"time": t, "init_residual": r_h, "point_index": index[p],
            "point_residual": float(residual[p])}


def _recorded_samples(trajectories: Sequence[TrajectoryBatch] | Any) -> int:
    if isinstance(trajectories, Sequence):
        return sum(int(t.batch_size) for t in trajectories)
    return int(trajectories.manifest()["samples"])  # a TrajectoryStore


def train_plus(student: ConsistencyStudent, trajectories: Sequence[TrajectoryBatch] | Any,
               config: PlusConfig, distill_config: DistillConfig,
               task_loss: Callable[[Tensor, Any], Tensor], seed: int = 0,
               task_batches: TaskBatches | None = None, student_config: StudentConfig | None = None
               ) -> tuple[PlusStudent, dict[str, Any]]:
    """C-DEQ+ from the distilled ``student`` (left unchanged): a :class:`PlusStudent` trained as
    the module docstring says (plans not yet selected).

    Args:
        config: C-DEQ+'s settings; ``distill_config``: those of the joint distillation (its
            ``epochs`` unless ``config.epochs`` is set).
        task_batches: the chain's training batches (``config.chain_data``), on the student's
            device; ``None``: the chain reads the recorded minibatch.
        student_config: C-DEQ+'s architecture (default: ``student``'s); e.g. with
            ``train_injection`` it gets its own injection even when ``student`` has none.

    Returns ``(student_plus, info)``; ``info`` holds the matched start, the training work and the
    training time."""
    plus = _shaped_like(student, config, student_config)
    missing, unexpected = plus.load_state_dict(student.state_dict(), strict=False)
    if unexpected or any(not k.startswith(("injection.", "initialiser.")) for k in missing):
        raise RuntimeError(f"the C-DEQ student's state does not fit C-DEQ+: missing {missing}, "
                           f"unexpected {unexpected}")  # only h and an added injection may be missing
    init = plus.initialiser
    fitted = train_learned_init(init, student.teacher, trajectories,
                                config.init_epochs * _recorded_samples(trajectories),
                                optim=OptimConfig(lr=2e-3, weight_decay=0.0, grad_clip=0.0),
                                max_residual=distill_config.max_residual, seed=seed)
    start = match_start_time(plus, init, trajectories)
    logger.info("C-DEQ+: h(u) has median relative residual %.3g, nearest the recorded iterate %d "
                "(%.3g); start time %.4g", start["init_residual"], start["point_index"],
                start["point_residual"], start["time"])
    plus.set_times(start["time"])
    if config.chain_k > 1:  # the time of a jump from a jump's output, matched the same way
        reentry = match_start_time(plus, _Jumped(plus), trajectories)
        plus.set_times(start["time"], reentry["time"])
        start["reentry"] = reentry
        logger.info("C-DEQ+: one jump from h(u) has median residual %.3g; re-entry time %.4g",
                    reentry["init_residual"], reentry["time"])
    epochs = config.epochs or distill_config.epochs
    terms = [StartTerm(config, task_batches, seed)] if config.start_weight > 0 else []
    history = distill(plus, trajectories, dataclasses.replace(distill_config, epochs=epochs),
                      task_loss=task_loss, seed=seed, terms=terms)
    work = {"init": fitted["work"], "joint": {"steps": history["steps"][-1],
                                              "samples": sum(history["samples"]),
                                              "epochs": len(history["steps"])}}
    return plus, {"start": start, "work": work,
                  "train_time_s": fitted["train_time_s"] + sum(history["epoch_time"])}


def _shaped_like(student: ConsistencyStudent, config: PlusConfig,
                 student_config: StudentConfig | None = None) -> PlusStudent:
    """A new C-DEQ+ student on ``student``'s teacher, schedule and device (fresh weights), with
    ``student_config`` (default: ``student``'s)."""
    return PlusStudent(student.teacher, student.schedule, student_config or student.config,
                       init_hidden=config.init_hidden, init_conv=config.init_conv
                       ).to(model_device(student))


class _Jumped:
    """The estimate after one jump from ``h(u)``, as an 'initialiser' to match a time to."""

    def __init__(self, student: PlusStudent) -> None:
        self.student = student

    def init_state(self, teacher: Any, u: Any) -> Any:
        s = self.student
        return s.F(s.initial_state(u), s.start_time, u)


def load_plus(student: ConsistencyStudent, config: PlusConfig, start: dict[str, Any],
              student_config: StudentConfig | None = None) -> PlusStudent:
    """An empty C-DEQ+ student shaped like ``student`` (to load a saved state into); ``start``:
    the matched times (``train_plus``'s ``info["start"]``)."""
    plus = _shaped_like(student, config, student_config)
    reentry = start.get("reentry")
    plus.set_times(float(start["time"]), None if reentry is None else float(reentry["time"]))
    return plus


__all__ = ["PlusConfig", "PlusStudent", "StartTerm", "chain_task_loss", "load_plus",
           "match_start_time", "train_plus"]
