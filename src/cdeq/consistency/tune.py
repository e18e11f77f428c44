"""C-DEQ tuned: a distilled student whose short plans are trained end to end on the task.

Distillation holds every jump to the teacher's fixed point, so at few calls the student can only
be as good a classifier as ``h(z*)``. Explicit networks fine-tuned from the same DEQ (the anytime
unrolled network) leave ``z*`` and beat it. Tuning frees the student's plans of ``1 .. max_k``
calls in the same way: starting from the distilled weights, the plan of ``k`` jumps

    z_1 = F(z_0, tau_1, u),  z_i = F(z_{i-1}, tau_i, u)   (i = 2 .. k)

is trained on the task loss after each of its ``max_k`` jumps, averaged (the anytime network's
objective), over the whole training split. ``tau_1`` is the student's start time and ``tau_i`` the
schedule's time of iterate ``i - 1`` (small times, where ``c_out`` is near one, so each jump is a
whole conditioned layer call; each position has its own FiLM row). The cell, head, time
conditioning and, with ``train_injection`` (the default, as the unrolled networks do), a copy of
the input injection are trained; the teacher is not touched.

It is one model for every budget: the plans of ``1 .. max_k`` calls are the tuned chains (each
kept only where it scores better than the shorter one on validation data), and every larger
budget hands over to the teacher's own solver, from the start state or from a tuned state,
chosen on validation data with the error to ``z*`` not rising from the hand-over on
(:func:`cdeq.consistency.search.select_plans` with ``fixed``). Its error to ``z*`` at the tuned
budgets is free to rise; it is reported at every budget.

Example:
    >>> tuned = tuned_student(student, TuneConfig())                        # doctest: +SKIP
    >>> tune(tuned, batches, steps_per_epoch, TuneConfig(), F.cross_entropy, samples=50_000)  # doctest: +SKIP
    >>> select_plans(tuned, val_batches, loss=F.cross_entropy, fixed=tuned_plans(tuned))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..engine import distributed
from ..engine.config import Config, ConfigError, check_bool, check_int
from ..engine.fit import Hooks, OptimConfig, batch_rows, budget_steps, fit, model_device
from .plans import Plan
from .student import ConsistencyStudent

logger = logging.getLogger(__name__)

__all__ = ["TuneConfig", "handover_warning", "tune", "tune_times", "tuned_plans", "tuned_student"]

Batches = Callable[[int, torch.Generator], Iterable[tuple[Any, Any]]]
"""``(epoch, generator) -> (x, y)`` training batches (the whole training split, shuffled)."""


@dataclasses.dataclass
class TuneConfig(Config):
    """How C-DEQ tuned is trained (stage ``tune``).

    Attributes:
        enabled: build and evaluate C-DEQ tuned in ``cdeq run`` (stage ``tune``).
        max_k: the plans of ``1 .. max_k`` jumps are tuned end to end (one model for all of
            them); larger budgets hand over to the teacher's solver.
        samples: training samples of the tuning (optimiser steps x ``batch_size``); 0: twice
            the C-DEQ student's distillation (so the tuned model's work, distillation included,
            is about C-DEQ+'s).
        batch_size: the minibatch (of the training split).
        optim: the optimiser loop (by default the unrolled networks' own).
        train_injection: tune a copy of the input injection too (the unrolled networks do).
        times: the jump times ``tau_1 .. tau_max_k`` (``()``: the start time, then the
            schedule's times of iterates ``1 .. max_k - 1``).
    """

    enabled: bool = True
    max_k: int = 4
    samples: int = 0
    batch_size: int = 32
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, grad_clip=1.0))
    train_injection: bool = True
    times: tuple = ()

    def validate(self) -> None:
        check_bool("enabled", self.enabled)
        check_int("max_k", self.max_k, minimum=1)
        check_int("samples", self.samples, minimum=0)
        check_int("batch_size", self.batch_size, minimum=1)
        check_bool("train_injection", self.train_injection)
        if self.times and (len(self.times) != self.max_k or any(
                isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0 for t in self.times)):
            raise ConfigError(f"times={self.times!r} is not valid; give max_k={self.max_k} positive "
                              "times, or [] for the default")


def handover_warning(config: TuneConfig, max_nfe: int) -> str | None:
    """Why C-DEQ tuned would never hand over to the teacher's solver: its tuned plans cover every
    budget of the plan search (``max_k >= max_nfe``, the search's ``max_nfe``); ``None`` when some
    budget hands over."""
    if config.max_k < max_nfe:
        return None
    return (f"tune.max_k ({config.max_k}) >= plans.max_nfe ({max_nfe}): C-DEQ tuned's plans are its "
            "tuned jumps at every budget, none hands over to the teacher's solver; raise "
            "plans.max_nfe above tune.max_k (or lower tune.max_k) for hand-over plans")


def tuned_student(student: ConsistencyStudent, config: TuneConfig) -> ConsistencyStudent:
    """A copy of the distilled ``student`` to tune (its own injection with ``train_injection``);
    ``student`` is left as it is."""
    shaped = dataclasses.replace(student.config,
                                 train_injection=student.config.train_injection or config.train_injection)
    tuned = ConsistencyStudent(student.teacher, student.schedule, shaped).to(model_device(student))
    missing, unexpected = tuned.load_state_dict(student.state_dict(), strict=False)
    if unexpected or any(not k.startswith("injection.") for k in missing):
        raise RuntimeError(f"the distilled student's state does not fit the tuned one: missing "
                           f"{missing}, unexpected {unexpected}")  # only an added injection
    return tuned


def tune_times(student: ConsistencyStudent, config: TuneConfig, last: int) -> list[float]:
    """The jump times ``tau_1 .. tau_max_k`` (module docstring); ``last``: the equilibrium index
    the schedule's times refer to."""
    if config.times:
        return [float(t) for t in config.times]
    later = student.schedule.index_time(torch.arange(1, config.max_k, dtype=torch.float64), last)
    return [float(student.start_time)] + [float(t) for t in later]


def tuned_plans(times: list[float]) -> dict[int, Plan]:
    """``{k: [("jump", tau_1), ..., ("jump", tau_k)]}`` for ``k = 1 .. len(times)``."""
    return {k: [("jump", t) for t in times[:k]] for k in range(1, len(times) + 1)}


def chain_loss(student: ConsistencyStudent, x: Any, y: Any, times: list[float],
               task_loss: Callable[[Tensor, Any], Tensor]) -> Tensor:
    """The task loss after each jump of the chain at ``times`` from the start state, averaged."""
    u = student.inject(x)
    z = student.initial_state(u)
    losses = []
    for i, t in enumerate(times):
        z = student.F(z, t, u, zero_state=i == 0 and student.zero_start)
        losses.append(task_loss(student.head(z), y))
    return torch.stack(losses).mean()


def tune(student: ConsistencyStudent, batches: Batches, steps_per_epoch: int, config: TuneConfig,
         task_loss: Callable[[Tensor, Any], Tensor], samples: int, times: list[float], seed: int = 0
         ) -> dict[str, Any]:
    """Train ``student`` (a :func:`tuned_student`) in place on the chain loss at ``times`` for
    ``samples`` training samples (``ceil(samples / batch_size)`` optimiser steps over epochs of
    ``steps_per_epoch`` batches; under torchrun each rank computes its part of every batch).
    Returns the :func:`cdeq.engine.fit.fit` history."""
    steps, epochs = budget_steps(samples, config.batch_size, steps_per_epoch)

    def step(batch: distributed.Part, progress_: float) -> tuple[Tensor | None, dict[str, Any]]:
        if batch.empty:  # another rank owns this (unsplittable) batch
            return None, {"loss": 0.0, "samples": 0}
        loss = chain_loss(student, batch.x, batch.y, times, task_loss) * batch.share
        return loss, {"loss": loss.detach(), "samples": batch_rows(batch.y)}

    def start(epoch: int) -> None:
        student.teacher.eval()  # the frozen teacher inside the student runs without dropout

    history = fit(student, step, lambda epoch, gen: distributed.parts(batches(epoch, gen)),
                  config.optim, epochs=epochs, steps_per_epoch=steps_per_epoch,
                  params=student.trainable_parameters(), max_steps=steps, seed=seed, name="tuning",
                  hooks=Hooks(on_epoch_start=start), hint="lower tune.optim.lr",
                  log_level=logging.DEBUG)
    losses = history["loss"]
    logger.info("tuning (plans of 1..%d jumps at times %s): %d steps (%d epochs), task loss %.4f -> "
                "%.4f", len(times), ", ".join(f"{t:.4g}" for t in times), steps, len(losses),
                losses[0], losses[-1])
    student.eval()
    return history
