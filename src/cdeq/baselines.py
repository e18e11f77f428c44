"""Baselines a user would pick instead of C-DEQ, trained from the same teacher and data.

- **Learned initialiser** (as in HyperDEQ / Skip-DEQ): a small network ``h(u)`` predicts ``z*``
  from the input injection ``u`` (no layer call), trained on the recorded training trajectories'
  ``z*`` with the relative squared error, for a wall-clock budget like the student's distillation.
  At budget ``k`` the teacher solver runs ``k`` steps from ``h(u)``: ``k`` NFE. The solver (Picard
  or Anderson) is chosen per budget on training batches, never on held-out data.
- **Unrolled k-step network**: the teacher's layer applied ``k`` times from ``z_0`` with shared
  weights and the teacher's head, fine-tuned from the teacher on the task loss. Budget ``k`` uses
  the network trained for ``k`` (exactly ``k`` NFE); other budgets report nothing.

Both are wired into :func:`cdeq.evaluate.evaluate` through :func:`learned_init_method` and
:func:`unrolled_method` (``extra_methods``); the pipeline's ``baselines`` stage trains them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .config import Config, ConfigError, check_int, check_positive
from .consistency.student import ChannelMLP
from .consistency.trajectory import TrajectoryBatch
from .deq.model import DEQModel
from .solvers import get_solver
from .solvers.base import take_rows
from .tasks.base import Task

INIT_SOLVERS = ("picard", "anderson")


@dataclasses.dataclass
class BaselineConfig(Config):
    """Attributes:
        enabled: train and evaluate the baselines in ``cdeq run``.
        init_hidden: width of the learned initialiser's channel-wise MLP.
        init_conv: add a depthwise 3x3 convolution of ``u`` for image states ``(B, C, H, W)``.
        init_time_s: wall-clock budget of the initialiser's training (0: the student's
            distillation time, read from ``student.safetensors``).
        init_max_epochs, init_batch_size, init_lr: its optimiser loop (AdamW, cosine over the
            epochs that fit the budget).
        init_select_batches: training batches used to pick Picard or Anderson per budget.
        unrolled_ks: the ``k`` of the directly trained ``k``-step networks.
        unrolled_epochs, unrolled_batch_size, unrolled_lr: their fine-tuning loop (AdamW, cosine).
        unrolled_time_s: wall-clock budget of each network (0: the student's distillation time).
        max_residual: recorded samples whose ``z*`` residual is above this are left out.
    """

    enabled: bool = True
    init_hidden: int = 128
    init_conv: bool = True
    init_time_s: float = 0.0
    init_max_epochs: int = 2000
    init_batch_size: int = 64
    init_lr: float = 2e-3
    init_select_batches: int = 4
    unrolled_ks: tuple = (1, 2, 4)
    unrolled_epochs: int = 100
    unrolled_batch_size: int = 32
    unrolled_lr: float = 1e-3
    unrolled_time_s: float = 0.0
    max_residual: float = 1e-2

    def validate(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"enabled={self.enabled!r} is not valid; give true or false")
        check_int("init_hidden", self.init_hidden, minimum=1)
        check_positive("init_time_s", self.init_time_s, allow_zero=True)
        check_int("init_max_epochs", self.init_max_epochs, minimum=1)
        check_int("init_batch_size", self.init_batch_size, minimum=1)
        check_positive("init_lr", self.init_lr)
        check_int("init_select_batches", self.init_select_batches, minimum=1)
        if not self.unrolled_ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                                       for k in self.unrolled_ks):
            raise ConfigError(f"unrolled_ks={self.unrolled_ks!r} is not valid; give positive integers")
        check_int("unrolled_epochs", self.unrolled_epochs, minimum=1)
        check_int("unrolled_batch_size", self.unrolled_batch_size, minimum=1)
        check_positive("unrolled_lr", self.unrolled_lr)
        check_positive("unrolled_time_s", self.unrolled_time_s, allow_zero=True)
        check_positive("max_residual", self.max_residual)


# --- the learned initialiser -------------------------------------------------------------------
def injection_tensor(u: Any, state_shape: Sequence[int]) -> Tensor:
    """The tensor of ``u`` shaped like the state (``u`` itself, or e.g. the features of a graph's
    ``(features, adjacency)`` pair)."""
    if isinstance(u, Tensor) and tuple(u.shape) == tuple(state_shape):
        return u
    if isinstance(u, (tuple, list)):
        for item in u:
            if isinstance(item, Tensor) and not item.is_sparse and tuple(item.shape) == tuple(state_shape):
                return item
    raise TypeError(f"the learned initialiser needs a tensor in the injection shaped like the state "
                    f"{tuple(state_shape)}")


class LearnedInit(nn.Module):
    """``h(u) -> z_init``: a channel-wise MLP of ``u`` (plus a depthwise 3x3 convolution of ``u`` for
    ``(B, C, H, W)`` states). Generic over tasks through the cell's ``channels``/``channel_dim``;
    it costs no layer call."""

    def __init__(self, channels: int, channel_dim: int, hidden: int = 128, conv: bool = True) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels) if (
            conv and channel_dim == 1) else None
        c_in = 2 * channels if self.conv is not None else channels
        self.mlp = ChannelMLP(c_in, hidden, channels, channel_dim)
        # ChannelMLP zeroes its last layer (h(u) = 0 = the cold start at initialisation); a small
        # random last layer lets the first steps move the hidden layer too.
        nn.init.normal_(self.mlp.net[-1].weight, 0, 1e-3)

    @classmethod
    def for_teacher(cls, teacher: DEQModel, config: BaselineConfig) -> LearnedInit:
        return cls(int(teacher.cell.channels), int(teacher.cell.channel_dim), config.init_hidden,
                   config.init_conv)

    def forward(self, u: Tensor) -> Tensor:
        h = u
        if self.conv is not None and u.dim() == 4:
            h = torch.cat([u, self.conv(u)], dim=1)
        return self.mlp(h)

    def init_state(self, teacher: DEQModel, u: Any) -> Tensor:
        """``h(u)`` for the teacher's injection ``u`` (any structure holding the state-shaped tensor)."""
        shape = tuple(teacher.cell.state_shape(u))
        return self(injection_tensor(u, shape)).reshape(shape)


def _rel_sq(z: Tensor, ref: Tensor) -> Tensor:
    b = z.shape[0]
    return (z - ref).reshape(b, -1).pow(2).sum(1) / (ref.reshape(b, -1).pow(2).sum(1) + 1e-12)


def train_learned_init(init: LearnedInit, teacher: DEQModel, trajectories: Iterable[TrajectoryBatch],
                       config: BaselineConfig, time_s: float, seed: int = 0,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit ``init`` to the recorded ``z*`` (relative squared error) for ``time_s`` seconds of wall time
    (or ``config.init_max_epochs``). Returns ``{"losses": per-epoch means, "epochs", "train_time_s"}``."""
    t0 = time.perf_counter()
    teacher.eval()
    data: list[tuple[Any, Tensor, int]] = []
    with torch.no_grad():
        for batch in trajectories:
            keep = batch.star_residual <= config.max_residual
            if not bool(keep.any()):
                continue
            b = batch.batch_size
            u = teacher.inject(batch.x)
            idx = keep.nonzero().flatten()
            data.append((take_rows(u, idx, b), batch.z_star[idx].float(), int(idx.numel())))
    if not data:
        raise ValueError("no recorded sample converged below max_residual: nothing to fit the "
                         "learned initialiser to")
    opt = torch.optim.AdamW(init.parameters(), lr=config.init_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    # the cosine schedule runs over the wall-clock budget (fraction of time used), not over epochs
    budget = time_s if time_s > 0 else math.inf
    losses: list[float] = []
    epoch = 0
    init.train()
    while epoch < config.init_max_epochs:
        total, count = 0.0, 0
        for i in torch.randperm(len(data), generator=gen).tolist():
            u, z_star, n = data[i]
            for idx in torch.randperm(n, generator=gen).split(config.init_batch_size):
                frac = max(epoch / config.init_max_epochs, (time.perf_counter() - t0) / budget)
                for group in opt.param_groups:
                    group["lr"] = config.init_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
                z = init.init_state(teacher, take_rows(u, idx, n))
                loss = _rel_sq(z, z_star[idx]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * idx.numel()
                count += idx.numel()
        losses.append(total / max(1, count))
        epoch += 1
        if time.perf_counter() - t0 >= budget:
            break
    init.eval()
    elapsed = time.perf_counter() - t0
    log(f"learned initialiser: {epoch} epochs in {elapsed:.0f}s, relative squared error "
        f"{losses[0]:.4f} -> {losses[-1]:.4f} (relative error {math.sqrt(losses[-1]):.3f})")
    return {"losses": losses, "epochs": epoch, "train_time_s": elapsed}


@torch.no_grad()
def select_init_solvers(init: LearnedInit, teacher: DEQModel, task: Task, batches: Iterable[Any],
                        budgets: Sequence[int], max_batches: int) -> dict[int, str]:
    """For each budget, the solver (Picard or Anderson) whose ``k`` steps from ``h(u)`` give the lower
    task loss on training ``batches``."""
    loss = {(s, k): 0.0 for s in INIT_SOLVERS for k in budgets}
    for b, (x, y) in enumerate(batches):
        if b >= max_batches:
            break
        u = teacher.inject(x)
        z0 = init.init_state(teacher, u)
        for s in INIT_SOLVERS:
            solver = get_solver(s, max_iter=max(budgets), tol=0.0)
            for k in budgets:
                z = solver.solve(teacher.cell, z0, u, max_iter=k).z
                loss[(s, k)] += float(task.loss(teacher.head(z), y))
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


# --- the directly trained k-step network --------------------------------------------------------
class UnrolledNet(nn.Module):
    """The teacher's injection, layer (applied ``k`` times from ``z_0``, shared weights) and head,
    as trainable copies; one forward costs exactly ``k`` layer calls."""

    def __init__(self, teacher: DEQModel, k: int) -> None:
        super().__init__()
        self.k = int(k)
        self.injection = copy.deepcopy(teacher.injection)
        self.cell = copy.deepcopy(teacher.cell)
        self.head = copy.deepcopy(teacher.head)
        self._initial_state = teacher.deq.initial_state  # zeros shaped by the cell: no parameters
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, x: Any) -> tuple[Tensor, Tensor]:
        u = self.injection(x)
        z = self._initial_state(u)
        for _ in range(self.k):
            z = self.cell(z, u)
        return self.head(z), z


def train_unrolled(net: UnrolledNet, task: Task, config: BaselineConfig, time_s: float, seed: int = 0,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune ``net`` on the task loss (training split) for ``config.unrolled_epochs`` epochs or
    ``time_s`` seconds of wall time, whichever ends first."""
    t0 = time.perf_counter()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.unrolled_lr, weight_decay=0.0)
    steps_per_epoch = max(1, sum(1 for _ in task.train_batches(config.unrolled_batch_size, shuffle=False)))
    total = steps_per_epoch * config.unrolled_epochs
    budget = time_s if time_s > 0 else math.inf
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    step, epoch, done = 0, 0, False
    net.train()
    while epoch < config.unrolled_epochs and not done:
        gen.manual_seed(seed * 1000 + epoch)
        acc, n = 0.0, 0
        for x, y in task.train_batches(config.unrolled_batch_size, shuffle=True, generator=gen):
            frac = max(step / total, (time.perf_counter() - t0) / budget)
            for group in opt.param_groups:
                group["lr"] = config.unrolled_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            logits, _ = net(x)
            loss = task.loss(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"unrolled k={net.k} loss became {loss.item()}; lower unrolled_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            acc += loss.item()
            n += 1
            if time.perf_counter() - t0 >= budget:
                done = True
                break
        losses.append(acc / max(1, n))
        epoch += 1
    net.eval()
    elapsed = time.perf_counter() - t0
    log(f"unrolled k={net.k}: {step} steps ({epoch} epochs) in {elapsed:.0f}s, task loss "
        f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    return {"losses": losses, "steps": step, "epochs": epoch, "train_time_s": elapsed}


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


__all__ = ["BaselineConfig", "LearnedInit", "UnrolledNet", "injection_tensor", "learned_init_method",
           "select_init_solvers", "task_loss", "train_learned_init", "train_unrolled", "unrolled_method"]
