"""Multi-process training under ``torchrun`` (gloo on CPU, nccl on GPU), with no user code changes.

``torchrun --nproc_per_node N cdeq run ...`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``...;
:func:`init` starts the process group from them (a no-op without them). Then:

- every rank takes its contiguous slice of each *global* batch (:func:`shard`), so the global
  batch, the data order and the number of optimiser steps are those of a single-process run;
- each rank's loss is weighted by its share of the global batch and the gradients are summed
  across ranks (:func:`all_reduce_grads`), which gives exactly the gradient of the global mean
  loss: every rank then takes the same optimiser step and the weights stay identical;
- only rank 0 writes run files (:func:`is_main`); recording writes shard ``i`` on rank
  ``i % world_size`` and rank 0 writes the manifest after a :func:`barrier`.

See docs/tutorials/multi-process.md for several machines.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch import distributed as dist


def env_requests_distributed() -> bool:
    """True when torchrun's variables ask for more than one process (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init() -> bool:
    """Initialise the default process group from torchrun's variables; True when distributed."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not env_requests_distributed():
        return False
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, the process that writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def _length(obj: Any) -> int | None:
    return int(obj.shape[0]) if isinstance(obj, Tensor) and obj.dim() > 0 else None


def shard(x: Any, y: Any) -> tuple[Any, Any, float]:
    """This rank's contiguous slice of a global batch and its share of the global batch.

    Inputs that are not one tensor with a batch dimension (graphs, nested inputs), or batches
    smaller than the world size, are not split: every rank computes on the whole batch with
    share ``1 / world_size``, which gives the same summed gradient.
    """
    n = _length(x)
    splittable = n is not None and _length(y) == n
    lo, hi, share = split_range(n or 1, splittable)
    if (lo, hi) == (0, n) or not splittable:
        return x, y, share
    return x[lo:hi], y[lo:hi], share


def split_range(n: int, splittable: bool = True) -> tuple[int, int, float]:
    """``(lo, hi, share)``: this rank's rows of a global batch of ``n`` and its share of it.

    Without a process group: all rows, share 1. A batch that cannot be split (or has fewer rows
    than ranks) is computed whole on every rank with share ``1 / world_size``.
    """
    w = world_size()
    if w == 1:
        return 0, n, 1.0
    if not splittable or n < w:
        return 0, n, 1.0 / w
    r = rank()
    lo, hi = r * n // w, (r + 1) * n // w
    return lo, hi, (hi - lo) / n


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (in place); ``t`` itself without a process group."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients over ranks (each rank's loss was already weighted by its share)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def owns_shard(index: int) -> bool:
    """Recording: shard ``index`` (= global batch index) is written by rank ``index % world``."""
    return index % world_size() == rank()
