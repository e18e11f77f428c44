"""Baselines a user would pick instead of C-DEQ, trained from the same teacher and data, each with
the student's training work (the same optimiser samples, steps x batch, as its distillation):

- **Learned initialiser** (as in HyperDEQ / Skip-DEQ): a small network ``h(u)`` predicts ``z*``
  from the input injection ``u`` (no layer call), trained on the recorded training trajectories'
  ``z*`` with the relative squared error. At budget ``k`` the teacher solver runs ``k`` steps from
  ``h(u)``: ``k`` NFE. The solver (Picard or Anderson) is chosen per budget on the selection
  (validation) batches, never on the test split.
- **Unrolled k-step network**: the teacher's layer applied ``k`` times from ``z_0`` with shared
  weights and the teacher's head, fine-tuned from the teacher on the task loss. Budget ``k`` uses
  the network trained for ``k`` (exactly ``k`` NFE); other budgets report nothing.
- **Anytime unrolled network**: one such network trained for every ``k <= anytime_k`` together
  (the task loss after each step, averaged); budget ``k`` stops after ``k`` steps. Like C-DEQ it
  is one model for every budget.

All are wired into :func:`cdeq.run.evaluate.evaluate` through :func:`learned_init_method`,
:func:`unrolled_method` and :func:`anytime_method` (``extra_methods``); the pipeline's
``baselines`` stage trains them (:func:`train_baselines`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..consistency.initialiser import LearnedInit, train_learned_init
from ..deq.model import DEQModel
from ..engine import distributed
from ..engine.config import Config, ConfigError, check_bool, check_int, check_positive
from ..engine.fit import OptimConfig, batch_rows, budget_steps, fit, model_device, training_work
from ..engine.precision import to_device
from ..solvers import get_solver
from ..tasks.base import Task, on_device

logger = logging.getLogger(__name__)

INIT_SOLVERS = ("picard", "anderson")


@dataclasses.dataclass
class BaselineConfig(Config):
    """The baselines of a run: the learned initialiser and the unrolled networks.

    Attributes:
        enabled: train and evaluate the baselines in ``cdeq run``.
        samples: training samples (optimiser steps x batch) of each baseline; 0: the student's
            distillation samples, read from ``student.safetensors``.
        init_hidden: width of the learned initialiser's channel-wise MLP.
        init_conv: add a depthwise 3x3 convolution of ``u`` for image states ``(B, C, H, W)``.
        init_batch_size, init_optim: the initialiser's minibatch and optimiser loop.
        init_select_batches: selection (validation) batches used to pick Picard or Anderson per budget.
        unrolled_ks: the ``k`` of the directly trained ``k``-step networks.
        anytime_k: the anytime network is trained for every ``k <= anytime_k`` (0: no anytime net).
        unrolled_batch_size, unrolled_optim: the unrolled networks' minibatch and optimiser loop.
        max_residual: recorded samples whose ``z*`` residual is above this are left out.
    """

    enabled: bool = True
    samples: int = 0
    init_hidden: int = 128
    init_conv: bool = True
    init_batch_size: int = 64
    init_optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=2e-3, weight_decay=0.0, grad_clip=0.0))
    init_select_batches: int = 4
    unrolled_ks: tuple = (1, 2, 4)
    anytime_k: int = 4
    unrolled_batch_size: int = 32
    unrolled_optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, grad_clip=1.0))
    max_residual: float = 1e-2

    def validate(self) -> None:
        check_bool("enabled", self.enabled)
        check_int("samples", self.samples, minimum=0)
        check_int("init_hidden", self.init_hidden, minimum=1)
        check_int("init_batch_size", self.init_batch_size, minimum=1)
        check_int("init_select_batches", self.init_select_batches, minimum=1)
        if not self.unrolled_ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                                       for k in self.unrolled_ks):
            raise ConfigError(f"unrolled_ks={self.unrolled_ks!r} is not valid; give positive integers")
        check_int("anytime_k", self.anytime_k, minimum=0)
        check_int("unrolled_batch_size", self.unrolled_batch_size, minimum=1)
        check_positive("max_residual", self.max_residual)


def unrolled_nets(config: BaselineConfig) -> list[tuple[str, int, bool]]:
    """``(file name, k, anytime)`` of every unrolled network the configuration asks for."""
    nets = [(f"unrolled_k{k}", k, False) for k in config.unrolled_ks]
    return nets + ([("unrolled_any_k", config.anytime_k, True)] if config.anytime_k else [])


@torch.no_grad()
def select_init_solvers(init: LearnedInit, teacher: DEQModel, task: Task, batches: Iterable[Any],
                        budgets: Sequence[int], max_batches: int) -> dict[int, str]:
    """For each budget, the solver (Picard or Anderson) whose ``k`` steps from ``h(u)`` give the lower
    task loss on training ``batches``."""
    loss = {(s, k): 0.0 for s in INIT_SOLVERS for k in budgets}
    for p in distributed.parts(batches):  # each rank its part of every batch
        if p.index >= max_batches:
            break
        if p.empty:
            continue
        x, y = to_device((p.x, p.y), model_device(teacher))
        u = teacher.inject(x)
        z0 = init.init_state(teacher, u)
        for s in INIT_SOLVERS:
            solver = get_solver(s, max_iter=max(budgets), tol=0.0)
            for k in budgets:
                z = solver.solve(teacher.cell, z0, u, max_iter=k).z
                loss[(s, k)] += p.share * float(task.loss(teacher.head(z), y))
    loss = dict(zip(loss, distributed.reduce_sums(loss.values()), strict=True))
    return {k: min(INIT_SOLVERS, key=lambda s, k=k: (loss[(s, k)], s != "anderson")) for k in budgets}


def learned_init_method(init: LearnedInit, teacher: DEQModel, solvers: dict[int, str]
                        ) -> Callable[[Any, int], tuple[Tensor, Tensor]]:
    """``(x, k) -> (logits, z)``: ``k`` steps of the chosen solver from ``h(u)`` (``k`` NFE)."""
    init.eval()

    @torch.no_grad()
    def fn(x: Any, k: int) -> tuple[Tensor, Tensor]:
        u = teacher.inject(x)
        solver = get_solver(solvers.get(k, solvers.get(str(k), "anderson")), max_iter=k, tol=0.0)
        z = solver.solve(teacher.cell, init.init_state(teacher, u), u).z
        return teacher.head(z), z

    return fn


# --- the directly trained k-step networks -------------------------------------------------------
class UnrolledNet(nn.Module):
    """The teacher's injection, layer (applied ``k`` times from ``z_0``, shared weights) and head,
    as trainable copies; one forward costs exactly ``k`` layer calls. With ``anytime`` it is trained
    on the task loss after every step ``1..k`` and evaluated at any ``k' <= k``."""

    def __init__(self, teacher: DEQModel, k: int, anytime: bool = False) -> None:
        super().__init__()
        self.k, self.anytime = int(k), bool(anytime)
        self.injection = copy.deepcopy(teacher.injection)
        self.cell = copy.deepcopy(teacher.cell)
        self.head = copy.deepcopy(teacher.head)
        # zeros of the teacher's state shape (its state_shape argument, a structure too): no parameters
        self._initial_state = teacher.initial_state
        for p in self.parameters():
            p.requires_grad_(True)

    def states(self, x: Any, k: int | None = None) -> list[Tensor]:
        """The states after each of the first ``k`` (default ``self.k``) layer calls."""
        u = self.injection(x)
        z = self._initial_state(u)
        out = []
        for _ in range(self.k if k is None else k):
            z = self.cell(z, u)
            out.append(z)
        return out

    def forward(self, x: Any, k: int | None = None) -> tuple[Tensor, Tensor]:
        """``(logits, z)`` after ``k`` layer calls (default ``self.k``)."""
        z = self.states(x, k)[-1]
        return self.head(z), z

    def training_loss(self, task: Task, x: Any, y: Any) -> Tensor:
        """The task loss at ``k`` steps, or (anytime) its mean over steps ``1..k``."""
        if not self.anytime:
            return task.loss(self(x)[0], y)
        losses = [task.loss(self.head(z), y) for z in self.states(x)]
        return torch.stack(losses).mean()


def train_unrolled(net: UnrolledNet, task: Task, config: BaselineConfig, samples: int, seed: int = 0
                   ) -> dict[str, Any]:
    """Fine-tune ``net`` on the task loss (training split) for ``samples`` training samples
    (``ceil(samples / unrolled_batch_size)`` optimiser steps). Returns ``{"losses": per-epoch
    means, "work": steps/samples/epochs, "train_time_s"}``."""
    task = on_device(task, model_device(net))  # batches where the network is
    size = config.unrolled_batch_size
    per_epoch = max(1, sum(1 for _ in task.train_batches(size, shuffle=False)))
    steps, epochs = budget_steps(samples, size, per_epoch)

    def step(batch: distributed.Part, progress_: float) -> tuple[Tensor | None, dict[str, Any]]:
        if batch.empty:  # another rank owns this (unsplittable) batch
            return None, {"loss": 0.0, "samples": 0}
        loss = net.training_loss(task, batch.x, batch.y) * batch.share
        return loss, {"loss": loss.detach(), "samples": batch_rows(batch.y)}

    name = f"unrolled {'anytime k<=' if net.anytime else 'k='}{net.k}"
    history = fit(net, step, lambda epoch, gen: distributed.parts(
                      task.train_batches(size, shuffle=True, generator=gen)),
                  config.unrolled_optim, epochs=epochs, steps_per_epoch=per_epoch, max_steps=steps,
                  seed=seed, name=name, log_level=logging.DEBUG,
                  hint="lower baselines.unrolled_optim.lr")
    losses = history["loss"]
    logger.info("%s: %d steps (%d epochs) in %.0fs, task loss %.4f -> %.4f", name, steps,
                len(losses), sum(history["epoch_time"]), losses[0], losses[-1])
    return {"losses": losses, "work": training_work(history, net.k),
            "train_time_s": sum(history["epoch_time"])}


@torch.no_grad()
def task_loss(model: Callable[[Any], tuple[Tensor, Tensor]], task: Task, batches: Iterable[Any],
              max_batches: int = 0) -> float:
    """Mean task loss of ``model(x) -> (logits, z)`` over ``batches``."""
    total, n = 0.0, 0
    for b, (x, y) in enumerate(batches):
        if max_batches and b >= max_batches:
            break
        total += float(task.loss(model(x)[0], y))
        n += 1
    return total / max(1, n)


def unrolled_method(nets: dict[int, UnrolledNet]) -> Callable[[Any, int], tuple[Tensor, Tensor] | None]:
    """``(x, k) -> (logits, z)`` with the ``k``-step network, or ``None`` for other budgets."""
    for net in nets.values():
        net.eval()

    @torch.no_grad()
    def fn(x: Any, k: int) -> tuple[Tensor, Tensor] | None:
        net = nets.get(k)
        return None if net is None else net(x)

    return fn


def anytime_method(net: UnrolledNet) -> Callable[[Any, int], tuple[Tensor, Tensor] | None]:
    """``(x, k) -> (logits, z)`` after ``k`` steps of the anytime network; ``None`` beyond its ``k``."""
    net.eval()

    @torch.no_grad()
    def fn(x: Any, k: int) -> tuple[Tensor, Tensor] | None:
        return net(x, k) if 1 <= k <= net.k else None

    return fn


__all__ = ["BaselineConfig", "LearnedInit", "UnrolledNet", "anytime_method", "learned_init_method",
           "select_init_solvers", "task_loss", "train_learned_init", "train_unrolled", "unrolled_method"]
