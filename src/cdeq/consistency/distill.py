"""Consistency distillation: train the student on recorded teacher trajectories.

For a recorded point ``z_n`` at time ``t_n`` and the next recorded point ``z_m`` (``m > n``):

    L = w_g d(F(z_n, t_n), z*) + w_l d(F(z_n, t_n), sg F_ema(z_m, t_m)) + w_task task(h(F(z_n, t_n)), y)
        [+ w_kl KL(h(z*) || h(F(z_n, t_n)))]

``d`` is the squared distance relative to ``|z*|^2`` (so ``sqrt(d)`` is the relative error) or its
pseudo-Huber version; samples whose solution residual exceeds ``max_residual`` drop out of the
consistency terms.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from .. import distributed
from ..config import Config, check_choice, check_int, check_positive, check_range
from ..progress import progress
from .ema import EMA
from .student import ConsistencyStudent
from .trajectory import TrajectoryBatch, check_labels


@dataclasses.dataclass
class DistillConfig(Config):
    """Distillation settings (the OPEN choices of the method are all here).

    Attributes:
        epochs, batch_size, lr, weight_decay, grad_clip: the optimiser loop (AdamW, cosine).
        global_weight, local_weight, task_weight, kl_weight: the loss weights.
        ema_decay: decay of the target network for the local term.
        distance: ``mse`` (relative squared error) or ``huber`` (pseudo-Huber of it).
        pairs: ``uniform`` over recorded points, ``early`` (weights ``1/(n+1)``) or
            ``curriculum`` (target ``m`` moves from the end of the path to ``n+1`` over training).
        max_residual: drop samples whose recorded solution residual is above this.
        train_cell, train_head: fine-tune the copied layer / head, or freeze them.
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    global_weight: float = 0.9
    local_weight: float = 0.1
    task_weight: float = 0.1
    kl_weight: float = 0.0
    ema_decay: float = 0.98
    distance: str = "mse"
    pairs: str = "uniform"
    max_residual: float = 1e-2
    train_cell: bool = True
    train_head: bool = True

    def validate(self) -> None:
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("grad_clip", self.grad_clip, allow_zero=True)
        for name in ("global_weight", "local_weight", "task_weight", "kl_weight"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_range("ema_decay", self.ema_decay, 0.0, 1.0)
        check_choice("distance", self.distance, ["mse", "huber"])
        check_choice("pairs", self.pairs, list(PAIR_SAMPLERS))
        check_positive("max_residual", self.max_residual)


# --- pair sampling strategies -------------------------------------------------------------------
class PairSampler:
    """Draws ``(n, m)`` recorded-point indices with ``n < m <= L``; ``m = L`` is ``z*``."""

    def sample(self, batch: int, num_points: int, progress: float, gen: torch.Generator
               ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class UniformPairs(PairSampler):
    def sample(self, batch, num_points, progress, gen):
        n = torch.randint(0, num_points, (batch,), generator=gen)
        return n, n + 1


class EarlyPairs(PairSampler):
    """Favour early points (the ones inference starts from): ``P(n) ~ 1 / (n + 1)``."""

    def sample(self, batch, num_points, progress, gen):
        w = 1.0 / torch.arange(1, num_points + 1, dtype=torch.float)
        n = torch.multinomial(w, batch, replacement=True, generator=gen)
        return n, n + 1


class CurriculumPairs(PairSampler):
    """Start with long jumps (``m`` at the end) and shrink the gap to one point."""

    def sample(self, batch, num_points, progress, gen):
        n = torch.randint(0, num_points, (batch,), generator=gen)
        gap = torch.clamp(((num_points - n) * (1 - progress)).round().long(), min=1)
        return n, torch.minimum(n + gap, torch.full_like(n, num_points))


PAIR_SAMPLERS: dict[str, type[PairSampler]] = {
    "uniform": UniformPairs, "early": EarlyPairs, "curriculum": CurriculumPairs,
}


# --- losses ---------------------------------------------------------------------------------------
def relative_distance(a: Tensor, b: Tensor, ref: Tensor, kind: str = "mse") -> Tensor:
    """Per-sample ``|a - b|^2 / |ref|^2`` (``mse``) or its pseudo-Huber form, shape ``(B,)``."""
    bsz = a.shape[0]
    d = (a - b).reshape(bsz, -1).pow(2).sum(1) / (ref.reshape(bsz, -1).pow(2).sum(1) + 1e-8)
    if kind == "huber":
        c = 0.03
        d = torch.sqrt(d + c * c) - c
    return d


def _select(points: Tensor, z_star: Tensor, idx: Tensor) -> Tensor:
    """``points (B, L, ...)`` with ``z*`` appended as point ``L``; pick ``idx (B,)``."""
    full = torch.cat([points, z_star[:, None]], dim=1)
    return full[torch.arange(full.shape[0]), idx]


def _times(student: ConsistencyStudent, batch: TrajectoryBatch, idx: Tensor) -> Tensor:
    index = torch.tensor(batch.index + [batch.last])[idx]
    res = torch.cat([batch.residual, batch.star_residual[:, None]], dim=1)
    res = res[torch.arange(res.shape[0]), idx]
    return student.schedule.times(index, batch.last, res)


def _take(batch: TrajectoryBatch, rows: Tensor) -> TrajectoryBatch:
    """Rows ``rows`` of a recorded batch."""
    from ..solvers.base import take_rows

    n = batch.batch_size
    return TrajectoryBatch(
        x=take_rows(batch.x, rows, n), y=take_rows(batch.y, rows, n), iterates=batch.iterates[rows],
        z_star=batch.z_star[rows], residual=batch.residual[rows],
        star_residual=batch.star_residual[rows], index=batch.index, last=batch.last)


def _minibatches(batch: TrajectoryBatch, size: int, gen: torch.Generator):
    """Split a recorded batch into random minibatches (single-example batches pass through)."""
    n = batch.batch_size
    if n <= size:
        yield batch
        return
    perm = torch.randperm(n, generator=gen)
    for start in range(0, n, size):
        yield _take(batch, perm[start : start + size])


def distill(
    student: ConsistencyStudent,
    trajectories: Sequence[TrajectoryBatch] | Any,
    config: DistillConfig,
    task_loss: Callable[[Tensor, Any], Tensor] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    start_epoch: int = 0,
    resume_state: dict | None = None,
) -> dict[str, list]:
    """Train ``student`` in place on recorded ``trajectories``; returns a loss history.

    Args:
        trajectories: a sequence of :class:`TrajectoryBatch` or a :class:`TrajectoryStore`
            (streamed shard by shard, in a random order each epoch).
        task_loss: ``(logits, y) -> loss``; required when ``task_weight > 0``.
        on_epoch_end: called with ``(epoch, state)`` after each epoch (checkpointing).
    """
    if config.task_weight > 0 and task_loss is None:
        raise ValueError("task_weight > 0 needs task_loss=(logits, y) -> loss")
    for p in student.cell.parameters():
        p.requires_grad_(config.train_cell)
    for p in student.head.parameters():
        p.requires_grad_(config.train_head)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    n_batches = len(trajectories)
    if n_batches == 0:
        raise ValueError("no trajectories to distil from: the record stage produced no batch")
    check_trajectory_shapes(student, trajectories[0])
    per_epoch = _steps_per_epoch(trajectories, config.batch_size)
    total = max(1, per_epoch * config.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(1.0, s / total))).item()))
    ema = EMA(student, decay=config.ema_decay)
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        ema.target.load_state_dict(resume_state["ema"])
        ema.steps = resume_state["ema_steps"]
    sampler = PAIR_SAMPLERS[config.pairs]()
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list] = {"loss": [], "global": [], "local": [], "task": [], "epoch_time": []}
    if resume_state is not None and "history" in resume_state:  # resumed: keep earlier epochs
        history = {k: list(v) for k, v in resume_state["history"].items()}
    step = start_epoch * per_epoch
    for epoch in range(start_epoch, config.epochs):
        gen.manual_seed(seed * 1000 + epoch)
        torch.manual_seed(seed * 1000 + epoch)  # global RNG too: a resumed epoch = a fresh one
        student.train()
        student.teacher.eval()  # the frozen teacher (and a shared injection) runs without dropout
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "global": 0.0, "local": 0.0, "task": 0.0}
        count = 0
        order = list(range(n_batches))
        random.Random(seed * 1000 + epoch).shuffle(order)
        bar = progress(order, desc=f"distill epoch {epoch + 1}/{config.epochs}")
        for i in bar:
            for mb in _minibatches(trajectories[i], config.batch_size, gen):
                # Under torchrun every rank draws the same pairs for the global minibatch and computes
                # its own rows; the parts are scaled so that their sum over ranks is the global loss.
                parts = _loss(student, ema, mb, config, sampler, min(1.0, step / total), gen, task_loss)
                if not torch.isfinite(parts["loss"]):
                    raise FloatingPointError(
                        f"distillation loss became {float(parts['loss'].detach())} in epoch {epoch + 1} on "
                        f"trajectory batch {i}; check the recorded trajectories for NaN/inf or lower lr")
                opt.zero_grad(set_to_none=True)
                parts["loss"].backward()
                distributed.all_reduce_grads(params)
                if config.grad_clip > 0:
                    nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                sched.step()
                ema.update(student)
                step += 1
                count += 1
                logged = distributed.all_reduce_sum(torch.stack([parts[k].detach() for k in sums]))
                for k, v in zip(sums, logged.tolist(), strict=True):
                    sums[k] += v
                bar.set_postfix(loss=f"{logged[0].item():.4f}")
        for k in sums:
            history[k].append(sums[k] / max(1, count))
        history["epoch_time"].append(time.perf_counter() - t0)
        log(f"distill epoch {epoch + 1}: loss {history['loss'][-1]:.4f} (global "
            f"{history['global'][-1]:.4f}, local {history['local'][-1]:.4f}, task "
            f"{history['task'][-1]:.4f}), {history['epoch_time'][-1]:.1f}s")
        if on_epoch_end is not None:
            on_epoch_end(epoch, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "ema": ema.target.state_dict(), "ema_steps": ema.steps,
                                 "history": history})
    student.eval()
    return history


def check_trajectory_shapes(student: ConsistencyStudent, batch: TrajectoryBatch) -> None:
    """The recorded states must have the shape of the student's state: a clear error otherwise."""
    with torch.no_grad():
        state = tuple(student.initial_state(student.inject(batch.x)).shape)
    star, its = tuple(batch.z_star.shape), tuple(batch.iterates.shape)
    if star != state or its[:1] + its[2:] != state or its[1] != len(batch.index):
        raise ValueError(
            f"the trajectories do not match the model: z_star has shape {star} and iterates {its}, "
            f"but the student's state for these inputs has shape {state} (iterates should be "
            f"{(state[0], len(batch.index), *state[1:])}); were they recorded with another model?")


def _steps_per_epoch(trajectories: Any, batch_size: int) -> int:
    if isinstance(trajectories, Sequence):
        return sum(max(1, -(-t.batch_size // batch_size)) for t in trajectories)
    manifest = trajectories.manifest()  # a TrajectoryStore: estimate from the sample count
    return max(int(manifest["shards"]), -(-int(manifest["samples"]) // batch_size))


def _loss(student: ConsistencyStudent, ema: EMA, mb: TrajectoryBatch, config: DistillConfig,
          sampler: PairSampler, progress_: float, gen: torch.Generator,
          task_loss: Callable | None) -> dict[str, Tensor]:
    bsz, num_points = mb.batch_size, mb.iterates.shape[1]
    n, m = sampler.sample(bsz, num_points, progress_, gen)  # the same draws on every rank
    keep = (mb.star_residual <= config.max_residual).to(mb.z_star.dtype)
    weight = keep / keep.sum().clamp_min(1.0)  # normalised over the global minibatch
    lo, hi, share = distributed.split_range(bsz, isinstance(mb.x, Tensor) and isinstance(mb.y, Tensor))
    whole = (lo, hi) == (0, bsz)
    if not whole:  # this rank's rows
        rows = torch.arange(lo, hi)
        mb = _take(mb, rows)
        n, m, weight = n[rows], m[rows], weight[rows]
    # consistency terms are sums of globally weighted rows; a batch computed whole on every rank
    # (or by one process) counts once in total
    weight = weight * (share if whole else 1.0)
    z_n = _select(mb.iterates, mb.z_star, n)
    t_n = _times(student, mb, n).to(z_n.dtype)
    u = student.inject(mb.x)
    out = student.F(z_n, t_n, u)
    zero = out.new_zeros(())
    parts = {"global": zero, "local": zero, "task": zero}
    if config.global_weight > 0:
        parts["global"] = (relative_distance(out, mb.z_star, mb.z_star, config.distance) * weight).sum()
    if config.local_weight > 0:
        with torch.no_grad():
            z_m = _select(mb.iterates, mb.z_star, m)
            t_m = _times(student, mb, m).to(z_m.dtype)
            target = ema.target.F(z_m, t_m, ema.target.inject(mb.x))
        parts["local"] = (relative_distance(out, target, mb.z_star, config.distance) * weight).sum()
    if config.task_weight > 0 or config.kl_weight > 0:
        logits = student.head(out)
        task = out.new_zeros(())
        if config.task_weight > 0:
            check_labels(logits, mb.y, "distill")
            task = config.task_weight * share * task_loss(logits, mb.y)
        if config.kl_weight > 0:
            with torch.no_grad():
                ref = student.teacher.head(mb.z_star)
            task = task + config.kl_weight * share * F_.kl_div(
                F_.log_softmax(logits, -1), F_.log_softmax(ref, -1), log_target=True,
                reduction="batchmean")
        parts["task"] = task
    parts["loss"] = (config.global_weight * parts["global"] + config.local_weight * parts["local"]
                     + parts["task"])
    return parts
