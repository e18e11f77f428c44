"""The one training loop of cdeq: teacher training, distillation and both baselines use :func:`fit`.

One optimiser step is: ``step_fn(batch, progress)`` (under the caller's autocast, if any: call
:func:`fit` inside :func:`cdeq.engine.precision.autocast` for bf16 mixed precision) gives this
rank's part of the global loss; then, in full precision, backward (through
DistributedDataParallel under torchrun); gradient-norm clipping; AdamW; the learning-rate
schedule (linear warm-up, then cosine decay to 0, from ``torch.optim.lr_scheduler``);
``after_step`` (an EMA update, say). After each epoch: an optional validation score with early
stopping (the best weights are kept), then ``on_epoch_end`` with the optimiser/scheduler state,
which resumes the run bit for bit.

Examples:
    >>> import torch.nn.functional as F
    >>> model = nn.Linear(3, 1)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> def step(batch, progress):
    ...     loss = F.mse_loss(model(batch[0]), batch[1])
    ...     return loss, {"loss": loss.detach()}
    >>> hist = fit(model, step, lambda epoch, gen: [(x, y)], OptimConfig(lr=0.1), epochs=3,
    ...            steps_per_epoch=1)
    >>> len(hist["loss"]), hist["steps"][-1]
    (3, 3)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .config import Config, check_int, check_positive
from .precision import caller_autocast, clock, full_precision
from .progress import progress

logger = logging.getLogger(__name__)

StepFn = Callable[[Any, float], tuple[Tensor | None, dict[str, Any]]]
"""``(batch, progress in [0, 1]) -> (loss, stats)``: ``loss`` is this rank's part of the global loss
(the parts sum over ranks to the loss of the global batch; the whole loss in one process), or
``None`` when this rank computes nothing of the batch (another rank owns it: it then adds a zero
gradient); ``stats`` are scalars with the same names on every rank, also this rank's parts of
global values (summed over ranks, then averaged over the epoch's steps); a ``samples`` entry is
summed instead (the epoch's training samples)."""
BatchFn = Callable[[int, torch.Generator], Iterable[Any]]
"""``(epoch, generator) -> batches``; the generator (and the global RNG) are seeded per epoch."""


@dataclasses.dataclass
class OptimConfig(Config):
    """The optimiser loop shared by every trained model (AdamW, warm-up + cosine, clipping).

    Attributes:
        lr, weight_decay: AdamW's learning rate and decoupled weight decay.
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr`` over this many steps; the
            cosine decay to 0 runs over the remaining steps.
        grad_clip: clip the global gradient norm to this (0: no clipping).

    Mixed precision is no setting of the loop: :func:`fit` autocasts each step as its caller does
    (a run: its ``precision``).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0

    def validate(self) -> None:
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_positive("grad_clip", self.grad_clip, allow_zero=True)


def build_optimizer(params: Sequence[nn.Parameter], config: OptimConfig, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over ``params`` and its schedule: ``SequentialLR(LinearLR, CosineAnnealingLR)`` (the
    cosine alone without warm-up), stepped once per optimiser step over ``total_steps``."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warm = min(config.warmup_steps, max(0, total_steps - 1))
    cosine = CosineAnnealingLR(opt, T_max=max(1, total_steps - warm), eta_min=0.0)
    if warm == 0:
        return opt, cosine
    linear = LinearLR(opt, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm)
    return opt, SequentialLR(opt, [linear, cosine], milestones=[warm])


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a module with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class LayerCalls:
    """Counts the forward calls of ``modules`` (or, with ``kind``, of every module of that class,
    copies made inside the block included: an EMA target, an unrolled network) and the rows
    (leading dimension of the first tensor argument: samples, or a graph's nodes) they processed,
    while the ``with`` block runs; calls inside :meth:`paused` are not counted.

    Examples:
        >>> lin = nn.Linear(2, 2)
        >>> with LayerCalls(lin) as count:
        ...     _ = lin(torch.zeros(5, 2)); _ = lin(torch.zeros(3, 2))
        >>> count.as_dict()
        {'layer_calls': 2, 'layer_call_rows': 8}
        >>> with LayerCalls(kind=nn.Linear) as count:
        ...     _ = nn.Linear(2, 2)(torch.zeros(4, 2))
        >>> count.as_dict()
        {'layer_calls': 1, 'layer_call_rows': 4}
    """

    def __init__(self, *modules: nn.Module, kind: type | None = None) -> None:
        self.modules, self.kind = modules, kind
        self.calls, self.rows, self._handles, self._paused = 0, 0, [], False

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if self._paused or (self.kind is not None and not isinstance(module, self.kind)):
            return
        self.calls += 1
        first = next((a for a in args if isinstance(a, Tensor)), None)
        self.rows += int(first.shape[0]) if first is not None and first.dim() > 0 else 1

    def __enter__(self) -> LayerCalls:
        if self.kind is not None:
            self._handles = [nn.modules.module.register_module_forward_pre_hook(self._hook)]
        self._handles += [m.register_forward_pre_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def paused(self) -> Any:
        """A context in which calls are not counted (a validation pass inside a training run)."""
        import contextlib

        @contextlib.contextmanager
        def pause():
            before, self._paused = self._paused, True
            try:
                yield
            finally:
                self._paused = before
        return pause()

    def as_dict(self) -> dict[str, int]:
        return {"layer_calls": self.calls, "layer_call_rows": self.rows}

    def across_ranks(self) -> dict[str, int]:
        """:meth:`as_dict` for the whole torchrun job (every rank must call it; one process: the
        same): the rows every rank processed, summed, and the calls of the busiest rank (the ranks
        of a data-parallel stage step together, each calling the layer on its own rows)."""
        every = distributed.gather_list(self.as_dict())
        return {"layer_calls": max(c["layer_calls"] for c in every),
                "layer_call_rows": sum(c["layer_call_rows"] for c in every)}


class _Step(nn.Module):
    """``model`` and its loss as one module, so that DDP sees every forward. A rank with nothing
    to compute (``loss`` ``None``) returns a zero that touches every trained parameter, so that
    its gradients (zero) join DDP's average like any other rank's."""

    def __init__(self, model: nn.Module, step_fn: StepFn, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.model = model
        self.step_fn = step_fn
        self._params = list(params)

    def forward(self, batch: Any, progress_: float) -> tuple[Tensor, dict[str, Any]]:
        loss, stats = self.step_fn(batch, progress_)
        if loss is None:
            loss = torch.stack([p.reshape(-1)[:1].sum() for p in self._params]).sum() * 0.0
        return loss, stats


def _wrap(model: nn.Module, step_fn: StepFn, params: Sequence[nn.Parameter]) -> Callable:
    """``step_fn`` as a DistributedDataParallel module (under torchrun) that averages the gradients
    over ranks (bucketed, overlapped with backward). Parameters of ``model`` outside ``params`` (a
    frozen teacher inside a student) are left out of DDP's reduction.

    Uneven shares (a last partial batch, a graph every rank computes whole) need no hand-written
    reduction: each rank's loss is already weighted by its share of the global batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    module = _Step(model, step_fn, params)
    keep = {id(p) for p in params}
    ignore = [f"model.{n}" for n, p in model.named_parameters() if id(p) not in keep]
    DDP._set_params_and_buffers_to_ignore_for_model(module, ignore)
    # find_unused_parameters: a loss may leave some trainable parameters out in a step (the head
    # when the task weight is 0); buffers are not broadcast (one-process runs do not share them)
    return DDP(module, broadcast_buffers=False, find_unused_parameters=True)


class _Stopper:
    """Early stopping on a validation score (lower is better) that keeps the best weights."""

    def __init__(self, model: nn.Module, patience: int, min_delta: float, state: dict | None) -> None:
        self.model, self.patience, self.min_delta = model, patience, min_delta
        state = state or {}
        self.best = state.get("best", float("inf"))
        self.best_epoch = state.get("best_epoch", -1)
        self.wait = state.get("wait", 0)
        self.best_state = state.get("best_state")

    def update(self, epoch: int, score: float) -> bool:
        """Record epoch ``epoch``'s score; True when training should stop."""
        if score < self.best - self.min_delta or self.best_state is None:
            self.best, self.best_epoch, self.wait = score, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.wait += 1
        return self.patience > 0 and self.wait >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "best_state": self.best_state}

    def restore(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


@dataclasses.dataclass
class Hooks:
    """Optional parts of a :func:`fit` run.

    Attributes:
        on_epoch_start: ``(epoch)`` after the model is put in training mode (to keep a frozen part
            in eval mode, say).
        on_epoch_end: ``(epoch, state)`` after each epoch; ``state`` resumes the run (a checkpoint).
        after_step: called after each optimiser step (an EMA update).
        extra_state: ``() -> dict`` merged into ``state`` (the EMA target).
        validate: ``() -> score`` (lower is better) after each epoch: the best epoch's weights are
            kept, and with ``patience > 0`` training stops after that many epochs without an
            improvement of more than ``min_delta``.
    """

    on_epoch_start: Callable[[int], None] | None = None
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None
    after_step: Callable[[], None] | None = None
    extra_state: Callable[[], dict[str, Any]] | None = None
    validate: Callable[[], float] | None = None
    patience: int = 0
    min_delta: float = 0.0


def fit(model: nn.Module, step_fn: StepFn, batches: BatchFn, config: OptimConfig, *, epochs: int,
        steps_per_epoch: int, params: Sequence[nn.Parameter] | None = None, max_steps: int = 0,
        seed: int = 0, name: str = "train", hint: str = "lower the learning rate",
        hooks: Hooks | None = None, start_epoch: int = 0, state: dict | None = None,
        sync: bool = True, log_level: int = logging.INFO) -> dict[str, list]:
    """Train ``params`` (default: ``model``'s parameters with ``requires_grad``) for ``epochs`` epochs
    of ``batches(epoch, gen)``, at most ``max_steps`` optimiser steps in all (0: no limit).

    Returns the history: per epoch the mean of each stat, ``samples``, cumulative ``steps`` and
    ``epoch_time`` (s); with ``hooks.validate``, ``valid`` and the chosen ``best_epoch``; and
    ``stopped``, why training ended: ``"plateau"`` (``hooks.patience`` epochs without a validation
    improvement), ``"max_steps"`` or ``"max_epochs"``. A run resumed
    from ``state`` (what ``on_epoch_end`` received after epoch ``start_epoch - 1``) continues it.
    ``sync=False`` trains this process alone even under torchrun (a stage only rank 0 runs).
    Each epoch's summary is logged (this module's logger) at ``log_level``. Each step runs under
    the caller's autocast (bf16 mixed precision: call ``fit`` inside
    :func:`cdeq.engine.precision.autocast`); backward, the optimiser, the hooks and validation run
    in full precision.
    """
    hooks = hooks or Hooks()
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    total = max(1, steps_per_epoch * epochs if not max_steps else min(max_steps, steps_per_epoch * epochs))
    opt, sched = build_optimizer(params, config, total)
    history: dict[str, list] = {"steps": [], "epoch_time": []}
    stopper = _Stopper(model, hooks.patience, hooks.min_delta, (state or {}).get("stopping"))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = {k: list(v) for k, v in state.get("history", history).items()}
    sync = sync and distributed.is_distributed()
    run = _wrap(model, step_fn, params) if sync else step_fn
    device = model_device(model)
    gen = torch.Generator()
    # a checkpoint written before the loop counted steps: full epochs of steps_per_epoch
    step = history["steps"][-1] if history.get("steps") else start_epoch * steps_per_epoch
    stopped = hooks.patience > 0 and stopper.wait >= hooks.patience  # resumed after the stop
    reason = "plateau" if stopped else "max_epochs"
    step_context = caller_autocast(device)  # the steps autocast as the caller does; the rest not
    with full_precision(device):
        for epoch in range(start_epoch, 0 if stopped else epochs):
            if max_steps and step >= max_steps:
                break
            gen.manual_seed(seed * 1000 + epoch)
            torch.manual_seed(seed * 1000 + epoch)  # the global RNG too: a resumed epoch = a fresh one
            t0 = clock(device)
            model.train()
            if hooks.on_epoch_start is not None:
                hooks.on_epoch_start(epoch)
            sums, step = _epoch(run, opt, sched, params, config, batches(epoch, gen), device, step, total,
                                max_steps, hooks, name, f"epoch {epoch + 1}/{epochs}", hint, sync,
                                step_context, seed * 1000 + epoch)
            _record(history, sums, step, clock(device) - t0)
            stop = False
            if hooks.validate is not None:
                model.eval()
                score = torch.tensor(float(hooks.validate()), dtype=torch.float64, device=device)
                if sync:  # one score for every rank, so that all stop at the same epoch
                    score = distributed.all_reduce_sum(score) / distributed.world_size()
                history.setdefault("valid", []).append(float(score))
                stop = stopper.update(epoch, history["valid"][-1])
                history["best_epoch"] = [stopper.best_epoch]
            logger.log(log_level, "%s epoch %d: %s%s", name, epoch + 1, _summary(history),
                       f", stopped early (best epoch {stopper.best_epoch + 1})" if stop else "")
            if hooks.on_epoch_end is not None:
                hooks.on_epoch_end(epoch, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                           "history": history, "stopping": stopper.state(),
                                           **(hooks.extra_state() if hooks.extra_state else {})})
            if stop:
                reason = "plateau"
                break
        if max_steps and step >= max_steps and reason == "max_epochs":
            reason = "max_steps"
        history["stopped"] = [reason]
        if hooks.validate is not None:
            stopper.restore()
        model.eval()
    return history


def _epoch(run: Callable, opt: torch.optim.Optimizer, sched: Any, params: list[nn.Parameter],
           config: OptimConfig, batches: Iterable[Any], device: torch.device, step: int, total: int,
           max_steps: int, hooks: Hooks, name: str, desc: str, hint: str, sync: bool,
           step_context: Callable[[], Any], epoch_seed: int) -> tuple[dict[str, float], int]:
    """One epoch of optimiser steps, each ``run`` under ``step_context()``; returns the summed
    stats (with ``count``) and the step.

    The global RNG (dropout, say) is seeded before each step from ``epoch_seed`` and the step's
    index in the epoch, so that the rank that owns a step draws what one process draws there,
    whichever steps it computed before.

    The stats stay on the device, summed, and reach the host (summed over ranks: one collective)
    every :data:`CHECK_EVERY` steps and at the end of the epoch, where a non-finite loss is
    reported with its step; so a step waits on the host only when a progress bar shows the loss.
    """
    sums: dict[str, float] = {"count": 0.0}
    # DDP averages the gradients over ranks, and each rank's loss is its part of the global loss:
    # scaled by the world size, the average is the gradient of the global loss
    scale = float(distributed.world_size()) if sync else 1.0
    bar = progress(batches, desc=f"{name} {desc}")
    shown = not bar.disable
    acc = _Stats(device)
    for i, batch in enumerate(bar):
        if max_steps and step >= max_steps:
            break
        torch.manual_seed(epoch_seed * 100_003 + i)
        with step_context():  # the caller's autocast, if any
            loss, stats = run(batch, min(1.0, step / total))
        if loss is None:  # one process never has an empty part; sync=False trains alone
            raise ValueError(f"{name}: the step computed nothing on this process (an empty part of "
                             "a batch outside a process group)")
        acc.add(loss.detach(), stats, step)
        opt.zero_grad(set_to_none=True)
        (loss * scale if scale != 1.0 else loss).backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        sched.step()
        if hooks.after_step is not None:
            hooks.after_step()
        step += 1
        if shown or acc.count % CHECK_EVERY == 0:
            acc.flush(sums, sync, name, desc, hint)
            if shown and "loss" in sums:
                bar.set_postfix(loss=f"{sums['loss'] / max(1.0, sums['count']):.4f}")
    acc.flush(sums, sync, name, desc, hint)
    return sums, step


CHECK_EVERY = 50
"""Optimiser steps between two host reads of the running stats (the non-finite loss check)."""


class _Stats:
    """The running stats of an epoch on the device: one tensor of sums per stat name, and the
    first step whose loss was not finite."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.values, self.names, self.count, self.pending = device, None, None, 0, 0
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, loss: Tensor, stats: dict[str, Any], step: int) -> None:
        names = sorted(stats)
        if self.names is None:
            self.names = names
        elif names != self.names:
            raise ValueError(f"the step's stats changed names ({self.names} -> {names})")
        row = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64, device=self.device)
                           .detach().reshape(()) for k in names]) if names else None
        if row is not None:
            self.values = row if self.values is None else self.values + row
        bad = ~torch.isfinite(loss).reshape(())
        first = (self.first_bad < 0) & bad
        self.first_bad = torch.where(first, torch.as_tensor(step, device=self.device), self.first_bad)
        self.bad_loss = torch.where(first, loss.double().reshape(()), self.bad_loss)
        self.count += 1
        self.pending += 1

    def flush(self, sums: dict[str, float], sync: bool, name: str, desc: str, hint: str) -> None:
        """Add the pending sums to ``sums`` (one host read; summed over ranks when ``sync``) and
        raise on a non-finite loss of any rank."""
        if not self.pending:
            return
        names = self.names or []
        parts = [self.values if self.values is not None else torch.zeros(0, dtype=torch.float64,
                                                                         device=self.device),
                 self.first_bad.double().reshape(1), self.bad_loss.reshape(1)]
        flat = torch.cat(parts)
        if sync:  # every rank's sums, and the latest first non-finite step of any rank
            flat = torch.cat([distributed.all_reduce_sum(flat[:-2].clone()),
                              _max_over_ranks(flat[-2:])])
        host = flat.tolist()
        first_bad, bad_loss = int(host[-2]), host[-1]
        if first_bad >= 0:
            raise FloatingPointError(f"{name} loss became {bad_loss} at step {first_bad} ({desc}); "
                                     f"{hint}")
        for k, v in zip(names, host[:-2], strict=True):
            sums[k] = sums.get(k, 0.0) + v
        sums["count"] += self.pending
        self.values, self.pending = None, 0


def _max_over_ranks(t: Tensor) -> Tensor:
    from torch import distributed as dist

    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def _summary(history: dict[str, list]) -> str:
    """The last epoch's line: the mean stats, then samples and seconds."""
    skip = ("steps", "best_epoch", "samples", "epoch_time", "stopped")
    parts = [f"{k} {v[-1]:.4f}" for k, v in history.items() if k not in skip]
    if "samples" in history:
        parts.append(f"{history['samples'][-1]} samples")
    return ", ".join(parts + [f"{history['epoch_time'][-1]:.1f}s"])


def _record(history: dict[str, list], sums: dict[str, float], step: int, seconds: float) -> None:
    count = max(1.0, sums.pop("count"))
    for k, v in sums.items():
        history.setdefault(k, []).append(round(v) if k == "samples" else v / count)
    history.setdefault("steps", []).append(step)
    history.setdefault("epoch_time", []).append(seconds)


__all__ = ["Hooks", "LayerCalls", "OptimConfig", "build_optimizer", "fit", "model_device"]


def budget_steps(samples: int, batch_size: int, steps_per_epoch: int) -> tuple[int, int]:
    """``(steps, epochs)`` for a budget of ``samples`` training samples in batches of ``batch_size``
    over epochs of ``steps_per_epoch`` steps (at least one step)."""
    if samples < 1:
        raise ValueError(f"samples={samples!r}: a training budget needs at least one sample (in a run, "
                         "give baselines.samples, or distil the student first: its distillation "
                         "samples set the budget)")
    steps = max(1, math.ceil(samples / batch_size))
    return steps, math.ceil(steps / max(1, steps_per_epoch))


def training_work(history: dict[str, list], layer_calls: int) -> dict[str, Any]:
    """A training run's work for the files' metadata: optimiser steps and samples, and the forward
    layer calls per training sample."""
    return {"steps": int(history["steps"][-1]), "samples": int(sum(history["samples"])),
            "epochs": len(history["steps"]), "layer_calls_per_sample": layer_calls}


def batch_rows(y: Any) -> int:
    """Training samples in a batch: the leading dimension of ``y`` (one for a graph's labels)."""
    return int(y.shape[0]) if isinstance(y, Tensor) and y.dim() > 0 else 1
