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
   plus the start term (:mod:`cdeq.consistency.distill`). With ``distill.chain_k > 1`` (the
   default, 4) the start term also supervises the task loss after each of ``chain_k`` jumps from
   ``h(u)``: the first at ``t_h``, the rest at a re-entry time matched the same way to the
   residual of one jump's output. The plans are then supervised step by step, as the anytime
   unrolled network is. That chain needs no trajectory: when the recording holds only part of
   the training split (``record.max_samples``), it reads minibatches of the whole training split
   (``distill.chain_data``, :func:`chain_batches`);
4. the multi-step plans (jumps, and teacher steps that re-enter the trajectory) are searched on
   training data like C-DEQ's.

It is one model for every budget, like C-DEQ; each prediction runs ``h`` and its FLOPs count in
the method's cost (:mod:`cdeq.run.cost`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..engine.config import Config, check_bool, check_int
from ..engine.fit import OptimConfig, model_device
from ..engine.precision import to_device
from .conditioning import relative_error
from .distill import DistillConfig, TaskBatches, distill
from .initialiser import LearnedInit, train_learned_init
from .student import ConsistencyStudent
from .trajectory import TrajectoryBatch

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PlusConfig(Config):
    """Attributes:
        enabled: build and evaluate C-DEQ+ in ``cdeq run`` (stage ``plus``).
        init_hidden: width of the initialiser's channel-wise MLP (its cost per prediction).
        init_conv: add a depthwise 3x3 convolution of ``u`` for image states.
        init_epochs: passes over the recorded samples to fit ``h`` to ``z*`` before the joint stage.
        epochs: epochs of the joint distillation of student and ``h`` (0: ``distill.epochs``);
            its other settings are the ``distill`` section's (``start_weight``, ``init_weight``
            and ``chain_k`` included).
        train_injection: give C-DEQ+ its own trainable copy of the input injection, starting
            from the teacher's (as ``student.train_injection`` does for C-DEQ); ``h`` and the
            jumps read it. Teacher steps read the teacher's, so a plan with teacher steps runs
            both injections, and its cost counts the second.
    """

    enabled: bool = True
    init_hidden: int = 32
    init_conv: bool = True
    init_epochs: int = 10
    epochs: int = 0
    train_injection: bool = False

    def validate(self) -> None:
        check_bool("enabled", self.enabled)
        check_bool("train_injection", self.train_injection)
        check_int("init_hidden", self.init_hidden, minimum=1)
        check_int("init_epochs", self.init_epochs, minimum=1)
        check_int("epochs", self.epochs, minimum=0)


def initialiser(student: ConsistencyStudent, config: PlusConfig) -> LearnedInit:
    """A fresh (untrained) initialiser for ``student``'s state, on the student's device."""
    return LearnedInit(student.channels, student.channel_dim, config.init_hidden,
                       config.init_conv).to(model_device(student))


@torch.no_grad()
def match_start_time(student: ConsistencyStudent, init: LearnedInit,
                     trajectories: Iterable[TrajectoryBatch]) -> dict[str, Any]:
    """The time ``t_h`` of the start ``h(u)``: that of the recorded point (equilibrium excluded)
    whose median relative residual is nearest in log to the median residual of ``h(u)``.

    Returns ``{"time", "init_residual", "point_index", "point_residual"}`` (medians over the
    recorded samples)."""
    teacher = student.teacher
    h_res, rec_res, rec_times = [], [], []
    index: list[int] = []
    for batch in trajectories:
        batch = to_device(batch, model_device(student))
        u_s, u = student.teacher_inputs(batch.x)
        z = init.init_state(teacher, u_s)  # h reads the student's injection
        h_res.append(relative_error(z, teacher.cell(z, u)).float())  # the residual
        idx = torch.tensor(batch.index, device=batch.residual.device).expand_as(batch.residual)
        rec_res.append(batch.residual.float())
        rec_times.append(student.schedule.times(idx, batch.last, batch.residual).float())
        index = list(batch.index)
    if not h_res:
        raise ValueError("no recorded trajectories to match the initialiser's start time on")
    r_h = float(torch.cat(h_res).median())
    residual = torch.cat(rec_res).median(dim=0).values  # (L,) per recorded point
    times = torch.cat(rec_times).median(dim=0).values
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
               log: Callable[[str], None] | None = None, task_batches: TaskBatches | None = None
               ) -> tuple[ConsistencyStudent, dict[str, Any]]:
    """C-DEQ+ from the distilled ``student`` (left unchanged): a new student with an initialiser,
    trained as the module docstring says (plans not yet selected); ``task_batches``: the chain's
    training batches (:func:`chain_batches`), on the student's device. Returns ``(student_plus,
    info)``; ``info`` holds the matched start, the training work and the training time."""
    log = log or logger.info
    plus = _shaped_like(student, config.train_injection)
    missing, unexpected = plus.load_state_dict(student.state_dict(), strict=False)
    if unexpected or any(not k.startswith("injection.") for k in missing):
        raise RuntimeError(f"the C-DEQ student's state does not fit C-DEQ+: missing {missing}, "
                           f"unexpected {unexpected}")  # only an added injection may be missing
    init = initialiser(student, config)
    fitted = train_learned_init(init, student.teacher, trajectories,
                                config.init_epochs * _recorded_samples(trajectories),
                                optim=OptimConfig(lr=2e-3, weight_decay=0.0, grad_clip=0.0,
                                                  precision=distill_config.optim.precision),
                                max_residual=distill_config.max_residual, seed=seed, log=log)
    start = match_start_time(plus, init, trajectories)
    log(f"C-DEQ+: h(u) has median relative residual {start['init_residual']:.3g}, nearest the "
        f"recorded iterate {start['point_index']} ({start['point_residual']:.3g}); start time "
        f"{start['time']:.4g}")
    plus.attach_initialiser(init, start["time"])
    if distill_config.chain_k > 1:  # the time of a jump from a jump's output, matched the same way
        reentry = match_start_time(plus, _Jumped(plus), trajectories)
        plus.reentry_time = reentry["time"]
        start["reentry"] = reentry
        log(f"C-DEQ+: one jump from h(u) has median residual {reentry['init_residual']:.3g}; "
            f"re-entry time {reentry['time']:.4g}")
    epochs = config.epochs or distill_config.epochs
    history = distill(plus, trajectories, dataclasses.replace(distill_config, epochs=epochs),
                      task_loss=task_loss, seed=seed, log=log, task_batches=task_batches)
    work = {"init": fitted["work"], "joint": {"steps": history["steps"][-1],
                                              "samples": sum(history["samples"]),
                                              "epochs": len(history["steps"])}}
    return plus, {"start": start, "work": work,
                  "train_time_s": fitted["train_time_s"] + sum(history["epoch_time"])}


def _shaped_like(student: ConsistencyStudent, train_injection: bool = False) -> ConsistencyStudent:
    """A new student on ``student``'s teacher, schedule, settings and device (fresh weights; its
    own copy of the teacher's injection when ``student`` has one or ``train_injection``)."""
    config = dataclasses.replace(student.config,
                                 train_injection=student.config.train_injection or train_injection)
    return ConsistencyStudent(student.teacher, student.schedule, config).to(model_device(student))


class _Jumped:
    """The estimate after one jump from ``h(u)``, as an 'initialiser' to match a time to."""

    def __init__(self, student: ConsistencyStudent) -> None:
        self.student = student

    def init_state(self, teacher: Any, u: Any) -> Tensor:
        s = self.student
        return s.F(s.initial_state(u), s.start_time, u)


def load_plus(student: ConsistencyStudent, config: PlusConfig, start: dict[str, Any]
              ) -> ConsistencyStudent:
    """An empty C-DEQ+ student shaped like ``student`` (to load a saved state into); ``start``:
    the matched times (``train_plus``'s ``info["start"]``)."""
    plus = _shaped_like(student, config.train_injection)
    plus.attach_initialiser(initialiser(student, config), float(start["time"]))
    if "reentry" in start:
        plus.reentry_time = float(start["reentry"]["time"])
    return plus


__all__ = ["PlusConfig", "initialiser", "load_plus", "match_start_time", "train_plus"]
