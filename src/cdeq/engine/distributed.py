"""Data parallelism under ``torchrun`` (gloo on CPU, nccl on GPU), with no user code changes.

``torchrun --nproc_per_node N cdeq run ...`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``...;
:func:`init` starts the process group from them (a no-op without them). Every stage then computes
this rank's part of each *global* batch, so the batches, their order and the optimiser steps are
those of a one-process run:

- a batch whose input is one tensor with a batch dimension (and labels of the same length) is
  split by rows: rank ``r`` of ``N`` computes rows ``[r n / N, (r + 1) n / N)`` (:func:`part`);
- a batch that cannot be split (one graph, nested inputs) is computed whole by one rank, its
  *owner*: the batch's index modulo ``N`` (shard ownership). Under DDP the other ranks contribute
  a zero gradient to that step (:func:`cdeq.engine.fit.fit`);
- each rank's loss is weighted by its share of the global batch, and DDP averages the gradients,
  which gives the gradient of the global mean loss: every rank takes the same step;
- sums (metrics, counts) are reduced over ranks (:func:`all_reduce_sum`, :func:`all_gather_cat`);
  rank 0 writes files after a :func:`barrier`;
- :class:`Tally` counts the samples each rank computed in a stage (the report's ``distributed``
  section).

See docs/tutorials/multi-process.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch import distributed as dist

from .tree import leaves, tree_map


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
    """The common leading dimension of every leaf of ``obj`` (a tensor or a structure of dense
    tensors); ``None`` when a leaf is not a dense tensor with one, or the leaves disagree."""
    parts = leaves(obj)
    if not parts or not all(isinstance(t, Tensor) and t.layout == torch.strided and t.dim() > 0
                            for t in parts):
        return None
    sizes = {int(t.shape[0]) for t in parts}
    return sizes.pop() if len(sizes) == 1 else None


def splittable(x: Any, y: Any) -> bool:
    """Whether a batch can be split by rows: every part of ``x`` (a tensor, or a structure of
    tensors) and of ``y`` (or ``None``) dense with the same leading dimension, at least one row per
    rank. A graph's ``(features, sparse adjacency)`` is not."""
    n = _length(x)
    return n is not None and (y is None or _length(y) == n) and n >= world_size()


def split_range(n: int) -> tuple[int, int]:
    """``(lo, hi)``: this rank's contiguous rows of a batch of ``n`` (all rows in one process)."""
    w, r = world_size(), rank()
    return r * n // w, (r + 1) * n // w


def owner(index: int) -> int:
    """The rank that computes the unsplittable batch (or shard) ``index``."""
    return index % world_size()


@dataclasses.dataclass
class Part:
    """This rank's part of global batch ``index``.

    Attributes:
        x, y: this rank's rows (or the whole batch for its owner; ``None`` on the other ranks).
        share: this rank's share of the batch's rows, in [0, 1]; the shares sum to 1 over ranks.
        rows: ``slice`` of the global batch's rows this rank holds (``None``: whole, or none).
        index: the global batch's index.
    """

    x: Any
    y: Any
    share: float
    rows: slice | None
    index: int

    @property
    def empty(self) -> bool:
        """True when this rank computes nothing of the batch (another rank owns it)."""
        return self.share == 0.0


def part(x: Any, y: Any, index: int) -> Part:
    """This rank's part of global batch ``index`` (``x``, ``y``): its rows of a splittable batch,
    else the whole batch on its owner and nothing elsewhere. One process: the whole batch."""
    if world_size() == 1:
        return Part(x, y, 1.0, None, index)
    if splittable(x, y):
        n = _length(x)
        lo, hi = split_range(n)
        rows = slice(lo, hi)
        return Part(tree_map(lambda t: t[rows], x), None if y is None else tree_map(lambda t: t[rows], y),
                    (hi - lo) / n, rows, index)
    if owner(index) == rank():
        return Part(x, y, 1.0, None, index)
    return Part(None, None, 0.0, None, index)


def parts(batches: Iterable[Any]) -> Iterator[Part]:
    """:func:`part` of each ``(x, y)`` batch (or bare input ``x``) of ``batches``, in order; a rank
    sees every index (empty parts included), so that all ranks take the same steps."""
    from .batches import as_pair

    for i, batch in enumerate(batches):
        x, y = as_pair(batch) if isinstance(batch, (tuple, list, Mapping)) else (batch, None)
        yield part(x, y, i)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks (in place); ``t`` itself without a process group."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_sums(values: Iterable[float]) -> list[float]:
    """Python numbers summed over ranks (one collective, float64)."""
    values = list(values)
    if not is_distributed() or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    return all_reduce_sum(t).tolist()


def all_gather_cat(t: Tensor) -> Tensor:
    """``t`` of every rank (any length along dim 0) concatenated in rank order; ``t`` itself in
    one process."""
    if not is_distributed():
        return t
    parts_: list[Any] = [None] * world_size()
    dist.all_gather_object(parts_, t.detach().cpu())
    return torch.cat(parts_).to(t.device)


def gather_list(value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` (picklable values); ``[value]`` in one process."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


class Tally:
    """Counts the samples this rank computes in each stage, for the report's ``distributed``
    section: ``tally.add("record", 256)``; :meth:`summary` gathers every rank's counts.

    Example:
        >>> t = Tally(); t.add("evaluate", 5); t.summary("evaluate")
        {'world_size': 1, 'samples_per_rank': [5]}
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, stage: str, samples: int) -> None:
        self.counts[stage] = self.counts.get(stage, 0) + int(samples)

    def reset(self, *stages: str) -> None:
        """Start counting ``stages`` from zero."""
        for stage in stages:
            self.counts.pop(stage, None)

    def summary(self, stage: str) -> dict[str, Any]:
        """``{"world_size": N, "samples_per_rank": [...]}`` for ``stage`` (a collective)."""
        return {"world_size": world_size(), "samples_per_rank": gather_list(self.counts.get(stage, 0))}


TALLY = Tally()
"""The process's tally (what the stages of a run add to)."""
