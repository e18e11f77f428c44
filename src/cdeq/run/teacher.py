"""Teacher training: :func:`cdeq.engine.fit.fit` over a task's batches with the DEQ's backward strategy,
trained to its plateau: it stops when the validation loss has not improved for ``patience``
epochs (the best epoch's weights are kept), and the history says why it stopped (``"plateau"``,
``"max_epochs"`` or ``"max_steps"``; :func:`stop_warning` says what each means for a user).

Fixed-point correction (``fp_correction`` > 0; as TorchDEQ's ``fp_correction`` and DEQ-Flow's
sparse fixed-point correction): besides the task loss on ``z*``, the task loss of ``fp_states``
iterates of the training solver, drawn at random from ``0 .. max_iter - 1`` each step, each
carried one differentiable layer call (``f(z_i, u)``, the iterate itself detached), averaged and
weighted by ``fp_correction``. The iterate ``z_0`` (zeros) gives the one-call network's loss.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..deq.backward import BACKWARDS
from ..deq.regularizers import jacobian_frobenius
from ..engine import distributed
from ..engine.checks import check_finite_inputs, check_labels
from ..engine.config import Config, check_choice, check_int, check_positive
from ..engine.fit import Hooks, LayerCalls, OptimConfig, batch_rows, fit, model_device
from ..engine.tree import tree_map
from ..solvers import SolverSpec
from ..tasks.base import Task, on_device

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TeacherConfig(Config):
    """How the teacher DEQ is trained.

    Attributes:
        epochs: the most epochs; early stopping may end training sooner.
        batch_size: the global training batch.
        optim: the optimiser loop (:class:`cdeq.engine.fit.OptimConfig`).
        patience, min_delta: stop after ``patience`` epochs whose validation loss did not improve on
            the best by more than ``min_delta`` (patience 0: run every epoch); the best epoch's
            weights are kept either way.
        valid_batch_size: batch size of the validation passes.
        backward: a registered backward strategy (``implicit``, ``phantom``, ``jacobian_free``).
        train_solver: the forward solver in training.
        eval_solver: the teacher's converged solver, the one place for it: the model's eval mode
            (validation while training, the plan search's ``z*``, the teacher's ``solve`` plan
            steps) and the report's converged teacher (its metric and NFE, and the ``z*`` every
            relative error is measured against). Its default is tight (``tol`` 1e-5) so that the
            report's errors to ``z*`` mean something near the equilibrium.
        jac_reg: weight of the Hutchinson Jacobian penalty (0 disables it).
        max_steps: stop after this many optimiser steps (0: no limit).
        fp_correction: weight of the fixed-point correction (module docstring; 0 disables it).
            On by default, chosen on validation data (docs/decisions/fixed-point-correction.md).
        fp_states: iterates of the training solver the correction draws per step.
    """

    epochs: int = 40
    batch_size: int = 32
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=3e-3, weight_decay=1e-4, grad_clip=1.0))
    patience: int = 3
    min_delta: float = 0.0
    valid_batch_size: int = 256
    backward: str = "implicit"
    backward_options: dict = dataclasses.field(default_factory=dict)
    train_solver: SolverSpec = dataclasses.field(
        default_factory=lambda: SolverSpec(name="anderson", max_iter=15, tol=1e-3))
    eval_solver: SolverSpec = dataclasses.field(
        default_factory=lambda: SolverSpec(name="anderson", max_iter=100, tol=1e-5))
    jac_reg: float = 0.0
    max_steps: int = 0
    fp_correction: float = 0.5
    fp_states: int = 2

    def validate(self) -> None:
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("patience", self.patience, minimum=0)
        check_positive("min_delta", self.min_delta, allow_zero=True)
        check_int("valid_batch_size", self.valid_batch_size, minimum=1)
        check_choice("backward", self.backward, sorted(BACKWARDS))
        check_positive("jac_reg", self.jac_reg, allow_zero=True)
        check_int("max_steps", self.max_steps, minimum=0)
        check_positive("fp_correction", self.fp_correction, allow_zero=True)
        check_int("fp_states", self.fp_states, minimum=1)


def configure_teacher(model: nn.Module, config: TeacherConfig) -> None:
    """Set the model's DEQ solvers and backward strategy from ``config``."""
    from ..deq.backward import get_backward

    backward = {"name": config.backward, **config.backward_options}
    model.deq.solver = config.train_solver.build()
    model.deq.eval_solver = config.eval_solver.build()
    model.deq.backward_strategy = get_backward(backward)
    if isinstance(getattr(model, "deq_kwargs", None), dict):  # what saving the model records
        model.deq_kwargs.update(solver=config.train_solver, eval_solver=config.eval_solver,
                                backward=backward)


def _teacher_step(task: Task, model: nn.Module, config: TeacherConfig) -> Callable:
    def step(batch: distributed.Part, progress_: float) -> tuple[Tensor | None, dict[str, Any]]:
        if batch.empty:  # another rank owns this (unsplittable) batch: the same stats, zero
            return None, {"loss": 0.0, "nfe": 0.0, "samples": 0,
                          **({"fp": 0.0} if config.fp_correction > 0 else {})}
        x, y, share = batch.x, batch.y, batch.share  # this rank's part of the global batch
        u = model.inject(x)
        if config.fp_correction > 0:
            z, info, iterates = _solve_with_iterates(model, u, config.fp_states)
        else:
            z, info = model.deq(u, model.initial_state(u))  # the model's state shape (a structure too)
        logits = model.head(z)
        check_finite_inputs(x, "teacher training")  # clear errors for bad data (cheap)
        check_labels(logits, y, "teacher training")
        loss = task.loss(logits, y)
        if config.jac_reg > 0:
            z_in = info.z.detach().requires_grad_()
            loss = loss + config.jac_reg * jacobian_frobenius(model.cell(z_in, u), z_in)
        rows = batch_rows(y)
        distributed.TALLY.add("train", rows)
        stats = {"loss": loss.detach() * share, "nfe": info.stats()["nfe"] * share, "samples": rows}
        if config.fp_correction > 0:  # logged apart: "loss" stays the task loss at z*
            corrected = torch.stack([task.loss(model.head(model.deq.f(z_i, u)), y)
                                     for z_i in iterates]).mean()
            loss = loss + config.fp_correction * corrected
            stats["fp"] = corrected.detach() * share
        return loss * share, stats

    return step


def _solve_with_iterates(model: nn.Module, u: Any, n: int) -> tuple[Tensor, Any, list[Tensor]]:
    """``model.deq(u)`` (``z*`` with the backward strategy's graph, the solver's result) and ``n``
    distinct iterates of its training solver drawn at random (global RNG), detached, each
    ``(B, ...)`` (or the state's structure); a sample that stopped early repeats its last
    iterate."""
    limit = int(model.deq.solver.options.max_iter)
    picks = sorted(torch.randperm(limit)[: min(n, limit)].tolist())
    info = model.deq.solve(u, model.initial_state(u), record=picks)
    z = model.deq.backward_strategy.attach(model.deq.f, info.z, u)
    return z, info, [tree_map(lambda t, i=i: t[i].detach(), info.trajectory) for i in range(len(picks))]


def validation_loss(task: Task, model: nn.Module, batch_size: int) -> float:
    """Mean task loss of the converged ``model`` over ``task.validation_batches`` (eval solver),
    each rank computing its part of every batch under torchrun (the same value on every rank)."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for p in distributed.parts(task.validation_batches(batch_size)):
            n += 1
            if not p.empty:
                logits, _ = model(p.x)
                total += p.share * float(task.loss(logits, p.y))
    if n == 0:
        raise ValueError(f"the {task.name or type(task).__name__} validation split is empty: nothing "
                         "to stop the teacher's training on")
    return distributed.reduce_sums([total])[0] / n


def _has_validation(task: Task, batch_size: int) -> bool:
    try:
        task.validation_batches(batch_size)
    except NotImplementedError:
        return False
    return True


def train_teacher(
    task: Task,
    model: nn.Module,
    config: TeacherConfig,
    seed: int = 0,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``task``'s training batches until the validation loss stops improving
    (at most ``config.epochs``); the best epoch's weights are kept. Returns the history (per epoch:
    mean ``loss``, mean ``nfe``, ``samples``, cumulative ``steps``, ``epoch_time`` in seconds,
    ``valid`` loss; ``best_epoch``; ``stopped``: ``"plateau"`` or ``"max_epochs"``; a resumed run
    includes the earlier epochs) and ``layer_calls``: the forward layer calls of the training
    passes and the rows they processed (:class:`cdeq.engine.fit.LayerCalls`; validation passes left
    out; a resumed run counts the epochs this call ran).

    ``on_epoch_end(epoch, state)`` receives the optimiser state after each epoch (the pipeline
    writes it with the weights to a checkpoint); ``start_epoch``/``optimizer_state`` resume a run.
    """
    configure_teacher(model, config)
    task = on_device(task, model_device(model))  # batches where the model is
    steps_per_epoch = sum(1 for _ in task.train_batches(config.batch_size, shuffle=False))
    if steps_per_epoch == 0:
        raise ValueError(f"the {task.name or type(task).__name__} training split is empty: nothing to "
                         "train the teacher on")
    calls = LayerCalls(kind=type(model.cell))

    def validate() -> float:
        with calls.paused():  # training work counts the training passes only
            return validation_loss(task, model, config.valid_batch_size)

    hooks = Hooks(on_epoch_end=on_epoch_end, patience=config.patience, min_delta=config.min_delta,
                  validate=validate)
    if not _has_validation(task, config.valid_batch_size):
        hooks.validate = None
        logger.warning("%s has no validation split (validation_batches is not implemented): the "
                       "teacher trains all %d epochs and keeps the last weights",
                       task.name or type(task).__name__, config.epochs)
    with calls:
        history = fit(model, _teacher_step(task, model, config),
                      lambda epoch, gen: distributed.parts(
                          task.train_batches(config.batch_size, shuffle=True, generator=gen)),
                      config.optim, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                      max_steps=config.max_steps, seed=seed, name="teacher", hooks=hooks,
                      hint=f"lower optim.lr (now {config.optim.lr}) or add jac_reg",
                      start_epoch=start_epoch, state=optimizer_state)
    history["layer_calls"] = [calls.across_ranks()]
    model.eval()
    return history


def stop_warning(history: dict[str, Any], config: TeacherConfig) -> str | None:
    """What to tell a user about why the teacher's training ended (``history["stopped"]``, from
    :func:`train_teacher`), or ``None`` when it reached its validation plateau (or early stopping
    was off: ``patience`` 0)."""
    stopped = history["stopped"][-1]
    if stopped == "plateau":
        return None
    if stopped == "max_steps":
        return (f"the teacher stopped at teacher.max_steps ({config.max_steps} optimiser steps) "
                "before its validation plateau; raise teacher.max_steps (0: no limit) to train it "
                "to the plateau")
    if "valid" not in history:
        return (f"the task has no validation split: the teacher trained all {config.epochs} epochs "
                "(teacher.epochs) and keeps the last weights; there is no plateau to stop at")
    if config.patience == 0:
        return None  # early stopping off: every epoch was asked for
    return (f"the teacher stopped at max_epochs before its validation plateau; raise "
            f"teacher.epochs (now {config.epochs})")


@torch.no_grad()
def evaluate_model(task: Task, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
    """Converged-teacher metric and mean NFE on the held-out batches (each rank its part)."""
    task = on_device(task, model_device(model))
    model.eval()
    total, count, nfe, n = 0.0, 0, 0.0, 0
    for p in distributed.parts(task.test_batches(batch_size)):
        if p.empty:
            continue
        logits, info = model(p.x)
        s, c = task.metric_sum(logits, p.y)
        total += s
        count += c
        nfe += float(info.nfe.float().sum())
        n += int(info.nfe.numel())
    total, count, nfe, n = distributed.reduce_sums([total, count, nfe, n])
    return {"metric": total / max(1, count), "nfe": nfe / max(1, n)}
