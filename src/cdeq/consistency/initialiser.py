"""A learned initial state ``h(u) ~ z*``: a small network of the input injection, no layer call.

C-DEQ+ (:mod:`cdeq.consistency.plus`) starts the student's jumps from it; the learned-initialiser
baseline (:mod:`cdeq.run.baselines`, as in HyperDEQ / Skip-DEQ) runs solver steps from it. Both
fit it the same way: :func:`train_learned_init`, the relative squared error to the recorded ``z*``.

Examples:
    >>> init = LearnedInit.for_teacher(teacher, hidden=32)                 # doctest: +SKIP
    >>> train_learned_init(init, teacher, trajectories, samples=20_000)    # doctest: +SKIP
    >>> z0 = init.init_state(teacher, teacher.inject(x))                   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_structure, tree_unflatten

from ..deq.model import DEQModel
from ..engine import distributed
from ..engine.fit import OptimConfig, budget_steps, fit, model_device, training_work
from ..engine.precision import to_device
from ..engine.tree import batch_size as rows_of
from ..engine.tree import leaves, relative, squared_norms, tree_map
from ..solvers.loop import take_rows
from .conditioning import ChannelMLP, injected_parts
from .trajectory import TrajectoryBatch

logger = logging.getLogger(__name__)

__all__ = ["LearnedInit", "injection_tensor", "train_learned_init"]


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
    it costs no layer call.

    For a structured state (``channels`` one per part, ``channel_dim`` one per part or one for
    all) it holds one such network per part in ``parts``, each reading the injection's part at the
    same place (the injection must then have the state's structure)."""

    def __init__(self, channels: int | Sequence[int], channel_dim: int | Sequence[int],
                 hidden: int = 128, conv: bool = True) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.parts: nn.ModuleList | None = None
        if not isinstance(channels, int):
            dims = [channel_dim] * len(channels) if isinstance(channel_dim, int) else list(channel_dim)
            self.parts = nn.ModuleList(LearnedInit(int(c), int(d), hidden, conv)
                                       for c, d in zip(channels, dims, strict=True))
            return
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels) if (
            conv and channel_dim == 1) else None
        c_in = 2 * channels if self.conv is not None else channels
        self.mlp = ChannelMLP(c_in, hidden, channels, channel_dim)
        # ChannelMLP zeroes its last layer (h(u) = 0 = the cold start at initialisation); a small
        # random last layer lets the first steps move the hidden layer too.
        nn.init.normal_(self.mlp.net[-1].weight, 0, 1e-3)

    @classmethod
    def for_teacher(cls, teacher: DEQModel, hidden: int = 128, conv: bool = True) -> LearnedInit:
        """An initialiser for ``teacher``'s state (its ``state_layout``: the cell's ``channels``
        and ``channel_dim``, or those read off the state)."""
        return cls(*teacher.state_layout(), hidden, conv)

    def forward(self, u: Tensor) -> Tensor:
        h = u
        if self.conv is not None and u.dim() == 4:
            h = torch.cat([u, self.conv(u)], dim=1)
        return self.mlp(h)

    def init_state(self, teacher: DEQModel, u: Any) -> Any:
        """``h(u)`` for the teacher's injection ``u`` (any structure holding the state-shaped tensor;
        for a structured state, ``u`` of the state's structure)."""
        if self.parts is None:
            shape = tuple(teacher.initial_state(u).shape)  # any cell: its state_shape, or u's shape
            return self(injection_tensor(u, shape)).reshape(shape)
        z0 = teacher.initial_state(u)
        us = injected_parts(u, z0)
        if any(v is None for v in us) or len(us) != len(self.parts):
            raise TypeError("the learned initialiser of a structured state needs an injection of the "
                            "state's structure, each part shaped like the state's part")
        out = [net(v).reshape(v.shape) for net, v in zip(self.parts, us, strict=True)]
        return tree_unflatten(out, tree_structure(z0))


def _rel_sq(z: Any, ref: Any) -> Tensor:
    """The squared relative error ``(B,)`` (:func:`cdeq.engine.tree.relative` of squared norms)."""
    return relative(squared_norms(tree_map(torch.sub, z, ref)), squared_norms(ref))


def _init_data(teacher: DEQModel, trajectories: Iterable[TrajectoryBatch], max_residual: float
               ) -> list[tuple[Any, Any, int]]:
    """``(u, z*, n)`` of each recorded batch's converged samples (residual <= ``max_residual``)."""
    data = []
    with torch.no_grad():
        for batch in trajectories:
            batch = to_device(batch, model_device(teacher))  # read to the CPU
            keep = batch.star_residual <= max_residual
            if not bool(keep.any()):
                continue
            idx = keep.nonzero().flatten()
            u = teacher.inject(batch.x)
            data.append((take_rows(u, idx, batch.batch_size),
                         tree_map(lambda t, idx=idx: t[idx].float(), batch.z_star), int(idx.numel())))
    if not data:
        raise ValueError("no recorded sample converged below max_residual: nothing to fit the "
                         "learned initialiser to")
    return data


def train_learned_init(init: LearnedInit, teacher: DEQModel, trajectories: Iterable[TrajectoryBatch],
                       samples: int, *, batch_size: int = 64, optim: OptimConfig | None = None,
                       max_residual: float = 1e-2, seed: int = 0) -> dict[str, Any]:
    """Fit ``init`` to the recorded ``z*`` (relative squared error) for ``samples`` training samples
    (``ceil(samples / batch_size)`` optimiser steps of ``optim``, by default Adam at 2e-3 without
    weight decay or clipping); recorded samples whose ``z*`` residual is above ``max_residual``
    are left out. Returns ``{"losses": per-epoch means, "work": steps/samples/epochs,
    "train_time_s"}``."""
    optim = optim or OptimConfig(lr=2e-3, weight_decay=0.0, grad_clip=0.0)
    teacher.eval()
    data = _init_data(teacher, trajectories, max_residual)
    size = batch_size
    per_epoch = sum(math.ceil(n / size) for _, _, n in data)
    steps, epochs = budget_steps(samples, size, per_epoch)

    def batches(epoch: int, gen: torch.Generator):
        j = 0
        for i in torch.randperm(len(data), generator=gen, device=gen.device).tolist():
            u, z_star, n = data[i]
            for idx in torch.randperm(n, generator=gen, device=gen.device).split(size):
                idx = idx.to(leaves(z_star)[0].device)
                z_rows = tree_map(lambda t, idx=idx: t[idx], z_star)
                yield distributed.part(take_rows(u, idx, n), z_rows, j)  # this rank's rows
                j += 1

    def step(batch: distributed.Part, progress_: float) -> tuple[Tensor | None, dict[str, Any]]:
        if batch.empty:
            return None, {"loss": 0.0, "samples": 0}
        u, z_star = batch.x, batch.y
        loss = _rel_sq(init.init_state(teacher, u), z_star).mean() * batch.share
        return loss, {"loss": loss.detach(), "samples": rows_of(z_star)}

    history = fit(init, step, batches, optim, epochs=epochs, steps_per_epoch=per_epoch,
                  max_steps=steps, seed=seed, name="learned initialiser",
                  log_level=logging.DEBUG,
                  hint="lower the initialiser's learning rate")
    losses = history["loss"]
    logger.info("learned initialiser: %d steps (%d epochs) in %.0fs, relative squared error "
                "%.4f -> %.4f (relative error %.3f)", steps, len(losses),
                sum(history["epoch_time"]), losses[0], losses[-1], math.sqrt(losses[-1]))
    return {"losses": losses, "work": training_work(history, 0), "train_time_s": sum(history["epoch_time"])}


