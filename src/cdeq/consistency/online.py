"""Recording into per-sample arrays, the online source, and the sizing of a store.

- :func:`record_arrays` records a teacher's trajectories into a
  :class:`~cdeq.consistency.arrays.TrajectoryArrays`: the lean stored mode (``keep`` iterates per
  sample on disk) or the online source (``keep = 0``, in memory: each sample's ``z*`` and its
  residuals, once). Its input is an indexable data set (samples are then kept by index, in a
  seeded order written in the manifest first, so that a resumed recording records the same
  samples) or any iterable of ``(x, y)`` batches (a resumed recording then checks that each
  batch it skips is the one recorded before).
- :func:`regenerate` gives the iterates a minibatch's pairs need, solving each sample only as
  far as its latest needed iterate (the online mode's distillation).
- :func:`projected_bytes` sizes a store from the model's state (``cdeq run`` chooses the mode
  from it: :func:`choose_mode`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..deq.model import DEQModel
from ..engine import distributed
from ..engine.batches import as_pair
from ..engine.fit import model_device
from ..engine.io import read_json, write_json
from ..engine.precision import to_device
from ..engine.progress import progress
from ..engine.tree import tree_map
from ..solvers.loop import take_rows
from .arrays import TrajectoryArrays, bytes_per_sample, take_items
from .trajectory import RecordConfig, TrajectoryBatch, record_batch

logger = logging.getLogger(__name__)
ORDER = "order.json"


def _indexable(source: Any) -> bool:
    return hasattr(source, "__getitem__") and hasattr(source, "__len__") and not isinstance(
        source, (list, tuple))


def _batches(source: Any, config: RecordConfig, seed: int, arrays: TrajectoryArrays
             ) -> Iterator[tuple[Any, Any, Tensor | None]]:
    """``(x, y, ids)`` of each batch to record: from an indexable data set in the seeded order
    (written to ``order.json`` first, checked on resume), else the source's own batches."""
    if not _indexable(source):
        seen = 0
        for batch in source:
            if config.max_samples and seen >= config.max_samples:
                return
            x, y = as_pair(batch)
            seen += int(y.shape[0]) if isinstance(y, Tensor) and y.dim() else 1
            yield x, y, None
        return
    n = len(source)
    order = _order(source, config, seed)
    if arrays.root is not None:
        path = arrays.root / ORDER
        if path.exists() and read_json(path) != order:
            raise ValueError(f"{path} says the interrupted recording drew its samples as "
                             f"{read_json(path)}, not {order}: record into a new folder, or resume "
                             "with the same data set and settings")
        if distributed.is_main() and not path.exists():
            arrays.root.mkdir(parents=True, exist_ok=True)
            write_json(path, order)
    perm = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if config.shuffle
            else torch.arange(n))
    if config.max_samples:
        perm = perm[: config.max_samples]
    for s in range(0, len(perm), config.batch_size):
        ids = perm[s : s + config.batch_size]
        x, y = take_items(source, ids.numpy())
        yield x, y, ids


def _order(source: Any, config: RecordConfig, seed: int) -> dict[str, Any]:
    """How the samples of an indexable data set are drawn (kept in ``order.json`` and the
    manifest): the same order again on resume."""
    return {"n": len(source), "shuffle": bool(config.shuffle), "seed": int(seed),
            "max_samples": int(config.max_samples), "batch_size": int(config.batch_size)}


def _fingerprint(x: Any, y: Any) -> str:
    """A short hash of a batch's labels and inputs (which batch a shard was recorded from)."""
    h = hashlib.sha256()
    for t in (y, x):
        parts = t if isinstance(t, (tuple, list)) else (t,)
        for p in parts:
            if isinstance(p, Tensor) and p.layout == torch.strided:
                h.update(p.detach().cpu().contiguous().numpy().tobytes()[: 1 << 16])
    return h.hexdigest()[:16]


@torch.no_grad()
def solve_batch(model: DEQModel, x: Any, y: Any, config: RecordConfig, iterates: bool
                ) -> TrajectoryBatch:
    """One batch's trajectory: with ``iterates`` the recorded grid (:func:`record_batch`), without
    them ``z*`` and the residuals at the grid points alone (the online source keeps no iterate)."""
    if iterates:
        return record_batch(model, x, y, config)
    model.eval()
    solver = config.solver.build()
    x, y = to_device((x, y), model_device(model))
    u = model.inject(x)
    idx = config.iterate_indices()
    res = solver.solve(model.cell, model.initial_state(u), u)
    rows = [res.trace[min(k, res.trace.shape[0] - 1)] for k in idx]
    return TrajectoryBatch(x=x, y=y, iterates=None, z_star=res.z,
                           residual=torch.stack(rows, dim=1).float(),
                           star_residual=res.residual.float(), index=idx,
                           last=solver.options.max_iter)


def record_arrays(model: DEQModel, source: Any, config: RecordConfig, arrays: TrajectoryArrays,
                  keep: int | None = None, seed: int = 0,
                  on_recorded: Callable[[int], None] | None = None) -> TrajectoryArrays:
    """Record ``source`` (an indexable data set, or an iterable of ``(x, y)`` batches) into
    ``arrays`` with ``keep`` iterates per sample (default: ``config.keep``, or every recorded
    iterate when that is 0; ``keep=0``: none, the online source).

    On disk, shards already written are kept (a resumed recording) and each rank records the
    shards it owns (``i % N``); in memory under torchrun every rank then receives the others'
    shards. ``on_recorded(i)`` runs after batch ``i`` is solved, before its shard is kept.
    """
    if keep is None:
        keep = min(config.keep, len(config.iterate_indices())) or len(config.iterate_indices())
    settings = _settings(config, keep)
    count = 0
    for x, y, ids in progress(_batches(source, config, seed, arrays), desc="record"):
        i, count = count, count + 1
        if distributed.owner(i) != distributed.rank():
            continue
        mark = _fingerprint(x, y)
        if arrays.has_shard(i):
            meta = arrays._meta(i)
            recorded = meta.get("fingerprint")
            if recorded is not None and recorded != mark:
                raise ValueError(
                    f"batch {i} differs from the one recorded before the interruption (shard "
                    f"{_where(arrays, i)}): the loader yields its batches in another order; "
                    "record from the data set itself (a seeded order) or a loader without shuffling")
            _check_settings(arrays, i, meta, settings)
            continue
        batch = solve_batch(model, x, y, config, iterates=keep > 0)
        distributed.TALLY.add("record", batch.batch_size)
        if on_recorded is not None:
            on_recorded(i)
        arrays.write(i, to_device(batch, torch.device("cpu")), keep, config.dtype, seed, ids,
                     extra={"fingerprint": mark, "solver": settings["solver"],
                            "indices": settings["indices"]})
    if count == 0:
        raise ValueError("record got no batches: the training data is empty")
    if arrays.root is None and distributed.is_distributed():  # every rank needs every sample
        mine = {i: s for i, s in arrays._shards.items()}
        for other in distributed.gather_list(mine):
            arrays._shards.update(other)
    distributed.barrier()
    order = _order(source, config, seed) if _indexable(source) else None
    arrays.finish({"shards": count, "indices": config.iterate_indices(),
                   "last": config.solver.max_iter, "dtype": config.dtype, "keep": keep,
                   "solver": config.solver.to_dict(), "order": order,
                   "inputs": "ids" if order is not None else "batches"})
    distributed.barrier()
    return arrays


_SETTINGS = {"keep": "record.keep", "dtype": "record.dtype", "last": "record.solver.max_iter",
             "solver": "record.solver", "indices": "record.indices"}
"""A shard's recording settings (its ``meta.json`` keys) and the configuration keys they come from."""


def _settings(config: RecordConfig, keep: int) -> dict[str, Any]:
    """The recording settings a shard's meta keeps (:data:`_SETTINGS`), as JSON data."""
    return {"keep": keep, "dtype": config.dtype, "last": config.solver.max_iter,
            "solver": json.loads(json.dumps(config.solver.to_dict())),
            "indices": [int(i) for i in config.iterate_indices()]}


def _where(arrays: TrajectoryArrays, i: int) -> str:
    return f"shard {i}" if arrays.root is None else str(arrays.shard_dir(i))


def _check_settings(arrays: TrajectoryArrays, i: int, meta: dict[str, Any],
                    settings: dict[str, Any]) -> None:
    """A kept shard must have been recorded with the current settings (a resumed recording would
    mix, say, bfloat16 and float16 shards otherwise); a shard of an earlier version that lacks a
    key is not checked on it."""
    for key, name in _SETTINGS.items():
        if key in meta and meta[key] != settings[key]:
            folder = f" or delete {arrays.root} to record again" if arrays.root is not None else ""
            raise ValueError(
                f"{_where(arrays, i)} was recorded with {name}={meta[key]!r} ({key} in its "
                f"meta.json), but this recording has {name}={settings[key]!r}: restore the setting to "
                f"resume the interrupted recording{folder}")


@torch.no_grad()
def regenerate(teacher: DEQModel, points: Tensor, u: Any, solver: Any) -> Any:
    """The teacher's iterates at iterate indices ``points`` ``(B, J)`` of each sample: a state of
    the teacher's structure whose parts are ``(B, J, ...)``. The solver runs from the start on
    each sample only as far as its latest needed iterate: samples are grouped by that depth, one
    solve per depth (``max_iter`` the depth plus one). ``u``: the teacher's injection of the
    batch."""
    b = points.shape[0]
    z0 = teacher.initial_state(u)
    out = tree_map(lambda t: t.new_zeros((b, points.shape[1], *t.shape[1:])), z0)
    depth = points.max(dim=1).values  # per sample, the last iterate it needs
    for d in sorted(set(depth.tolist())):
        rows = (depth == d).nonzero().squeeze(1)
        start = tree_map(lambda t, rows=rows: t[rows], z0)
        if d == 0:
            frames = {0: start}
        else:
            wanted = sorted(set(points[rows].flatten().tolist()))
            res = solver.solve(teacher.cell, start, take_rows(u, rows, b), record=wanted,
                               max_iter=d + 1)
            frames = {k: tree_map(lambda t, j=j: t[j], res.trajectory) for j, k in enumerate(wanted)}
        for j in range(points.shape[1]):
            want = points[rows, j]
            for k in want.unique().tolist():
                local = (want == k).nonzero().squeeze(1)
                dest = rows[local]

                def put(o: Tensor, f: Tensor, dest: Tensor = dest, local: Tensor = local,
                        j: int = j) -> Tensor:
                    o[dest, j] = f[local].to(o.dtype)
                    return o
                tree_map(put, out, frames[k])
    return out


def projected_bytes(state_numel: int, samples: int, config: RecordConfig, input_bytes: int = 0
                    ) -> dict[str, int]:
    """Bytes of a recording of ``samples`` samples whose state has ``state_numel`` entries, per
    format: ``shards`` (every recorded iterate and ``z*`` in ``config.dtype``, the inputs copied:
    ``input_bytes`` per sample), ``arrays`` (``config.keep`` iterates in ``config.dtype``, ``z*``
    in float32, inputs by index) and ``online`` (``z*`` and the residuals, in memory)."""
    points = len(config.iterate_indices())
    keep = min(config.keep, points) or points
    width = {"float32": 4, "float16": 2, "bfloat16": 2}[config.dtype]
    shards = samples * ((points + 1) * state_numel * width + (points + 1) * 4 + input_bytes)
    arrays = samples * bytes_per_sample(state_numel, keep, keep, config.dtype, 8)
    online = samples * bytes_per_sample(state_numel, points, 0, config.dtype, 8)
    return {"shards": int(shards), "arrays": int(arrays), "online": int(online)}


def choose_mode(config: RecordConfig, state_numel: int, samples: int, input_bytes: int = 0
                ) -> tuple[str, dict[str, int]]:
    """``(mode, projected bytes)``: ``config.mode``, or for ``auto`` ``stored`` when the stored
    arrays' projected size is at most ``config.max_store_bytes``, else ``online``."""
    sizes = projected_bytes(state_numel, samples, config, input_bytes)
    mode = config.mode
    if mode == "auto":
        mode = "stored" if sizes["arrays"] <= config.max_store_bytes else "online"
    return mode, sizes


__all__ = ["choose_mode", "projected_bytes", "record_arrays", "regenerate", "solve_batch"]
