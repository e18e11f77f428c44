"""Teacher training: a plain loop over a task's batches with the DEQ's backward strategy."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import distributed
from .checks import check_finite_inputs, check_labels
from .config import Config, check_choice, check_int, check_positive
from .deq.layer import SolverSpec
from .deq.regularizers import jacobian_frobenius
from .progress import progress
from .tasks.base import Task


@dataclasses.dataclass
class TeacherConfig(Config):
    """How the teacher DEQ is trained.

    Attributes:
        epochs, batch_size, lr, weight_decay, grad_clip: the optimiser loop (AdamW, cosine decay).
        warmup_steps: linear learning-rate warm-up.
        backward: ``implicit``, ``phantom`` or ``jacobian_free``.
        train_solver / eval_solver: forward solvers in training and evaluation.
        jac_reg: weight of the Hutchinson Jacobian penalty (0 disables it).
        max_steps: stop after this many optimiser steps (0: no limit).
    """

    epochs: int = 8
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    warmup_steps: int = 0
    backward: str = "implicit"
    backward_options: dict = dataclasses.field(default_factory=dict)
    train_solver: SolverSpec = dataclasses.field(
        default_factory=lambda: SolverSpec(name="anderson", max_iter=15, tol=1e-3))
    eval_solver: SolverSpec = dataclasses.field(
        default_factory=lambda: SolverSpec(name="anderson", max_iter=50, tol=1e-4))
    jac_reg: float = 0.0
    max_steps: int = 0

    def validate(self) -> None:
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("grad_clip", self.grad_clip, allow_zero=True)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_choice("backward", self.backward, ["implicit", "phantom", "jacobian_free"])
        check_positive("jac_reg", self.jac_reg, allow_zero=True)
        check_int("max_steps", self.max_steps, minimum=0)


def configure_teacher(model: nn.Module, config: TeacherConfig) -> None:
    """Set the model's DEQ solvers and backward strategy from ``config``."""
    from .deq.backward import get_backward

    model.deq.solver = config.train_solver.build()
    model.deq.eval_solver = config.eval_solver.build()
    model.deq.backward_strategy = get_backward({"name": config.backward, **config.backward_options})


def lr_lambda(total_steps: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    return factor


def train_teacher(
    task: Task,
    model: nn.Module,
    config: TeacherConfig,
    seed: int = 0,
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``task``'s training batches; returns a history dict (per epoch: mean
    ``loss``, mean ``nfe``, ``epoch_time`` in seconds; a resumed run includes the earlier epochs).

    ``on_epoch_end(epoch, state)`` receives the model/optimiser state after each epoch (the
    pipeline uses it to write a checkpoint); ``start_epoch``/``optimizer_state`` resume a run.
    """
    configure_teacher(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = sum(1 for _ in task.train_batches(config.batch_size, shuffle=False))
    if steps_per_epoch == 0:
        raise ValueError(f"the {task.name or type(task).__name__} training split is empty: nothing to "
                         "train the teacher on")
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, config.warmup_steps))
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state["optimizer"])
        sched.load_state_dict(optimizer_state["scheduler"])
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list] = {"loss": [], "nfe": [], "epoch_time": []}
    if optimizer_state is not None and "history" in optimizer_state:  # resumed: keep earlier epochs
        history = {k: list(v) for k, v in optimizer_state["history"].items()}
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, config.epochs):
        gen.manual_seed(seed * 1000 + epoch)
        torch.manual_seed(seed * 1000 + epoch)  # global RNG too (jac_reg probes): resumable
        model.train()
        t0 = time.perf_counter()
        losses, nfes = [], []
        bar = progress(task.train_batches(config.batch_size, shuffle=True, generator=gen),
                       total=steps_per_epoch, desc=f"teacher epoch {epoch + 1}/{config.epochs}")
        for x, y in bar:
            if config.max_steps and step >= config.max_steps:
                break
            x, y, share = distributed.shard(x, y)  # this rank's slice of the global batch
            u = model.inject(x)
            z, info = model.deq(u)
            logits = model.head(z)
            check_finite_inputs(x, "teacher training")  # clear errors for bad data (cheap)
            check_labels(logits, y, "teacher training")
            loss = task.loss(logits, y)
            if config.jac_reg > 0:
                z_in = info.z.detach().requires_grad_()
                loss = loss + config.jac_reg * jacobian_frobenius(model.cell(z_in, u), z_in)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"teacher loss became {loss.item()} at step {step}; lower lr "
                    f"(now {config.lr}) or add jac_reg"
                )
            opt.zero_grad(set_to_none=True)
            (loss * share if share != 1.0 else loss).backward()
            distributed.all_reduce_grads(params)  # sum over ranks = gradient of the global mean
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            nfes.append(info.stats()["nfe"])
            bar.set_postfix(loss=f"{losses[-1]:.3f}", nfe=f"{nfes[-1]:.1f}")
        history["loss"].append(sum(losses) / max(1, len(losses)))
        history["nfe"].append(sum(nfes) / max(1, len(nfes)))
        history["epoch_time"].append(time.perf_counter() - t0)
        log(f"teacher epoch {epoch + 1}: loss {history['loss'][-1]:.4f}, "
            f"train NFE {history['nfe'][-1]:.1f}, {history['epoch_time'][-1]:.1f}s")
        if on_epoch_end is not None:
            on_epoch_end(epoch, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "history": history})
        if config.max_steps and step >= config.max_steps:
            break
    model.eval()
    return history


@torch.no_grad()
def evaluate_model(task: Task, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
    """Converged-teacher metric and mean NFE on the held-out batches."""
    model.eval()
    total, count, nfe, n = 0.0, 0, 0.0, 0
    for x, y in task.test_batches(batch_size):
        logits, info = model(x)
        s, c = task.metric_sum(logits, y)
        total += s
        count += c
        nfe += float(info.nfe.float().sum())
        n += int(info.nfe.numel())
    return {"metric": total / max(1, count), "nfe": nfe / max(1, n)}
