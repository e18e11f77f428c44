"""Teacher trajectories: recording from the training split, and shard storage on disk.

A record of one batch holds, for ``B`` samples and ``L`` recorded iterates:

- ``iterates``: ``(B, L, ...)`` the teacher solver's iterates ``z_k`` at ``index`` (``index[0] = 0``
  is the start ``z_0``),
- ``z_star``: ``(B, ...)`` the solver's solution (the distillation target),
- ``residual``: ``(B, L)`` relative residual of each recorded iterate and ``star_residual`` ``(B,)``
  that of the solution (samples that did not converge can be weighted down),
- ``x`` and ``y``: the inputs and labels (any nested structure of tensors).

A structured state (a tuple, list or dict of tensors) gives ``iterates`` and ``z_star`` of that
structure, each part shaped as above; every part is stored (entries ``iterates.<part>`` and
``z_star.<part>``) and read back in its structure.

Shards are safetensors files ``shard_00000.safetensors`` (one per recorded batch) with a
``manifest.json`` listing them and the state's parts (name, per-sample shape, the model's dtype and
the stored one); recording skips shards that already exist, so a killed run resumes where it
stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..deq.model import DEQModel
from ..engine import distributed
from ..engine.batches import as_pair
from ..engine.checks import check_finite_inputs, check_labels  # noqa: F401 (check_labels: distill imports it here)
from ..engine.config import Config, ConfigError, check_choice, check_int
from ..engine.fit import model_device
from ..engine.io import (
    CorruptFileError,
    flatten,
    load_tensors,
    read_json,
    safetensors_damage,
    save_tensors,
    unflatten,
    write_json,
)
from ..engine.precision import to_device
from ..engine.progress import progress
from ..engine.tree import Layout, leaves, tree_map
from ..solvers import SolverSpec

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class RecordConfig(Config):
    """How trajectories are recorded.

    Attributes:
        solver: the teacher solver whose path is recorded (run to ``max_iter`` or tolerance).
        indices: iterate indices to keep (``()``: 0-8, then 12, 16, 24, ... below ``max_iter``).
        batch_size: samples per recorded batch (= per shard).
        dtype: storage precision of the iterates (``float32``, ``float16``, ``bfloat16``).
        max_samples: record at most this many training samples (0: all).
        mode: ``stored`` (on disk), ``online`` (each sample's ``z*`` in memory, the iterates a
            distillation step needs regenerated: :mod:`cdeq.consistency.online`) or ``auto``:
            ``stored`` when the projected store is at most ``max_store_bytes``.
        format: the stored layout: ``arrays`` (per-sample arrays: :mod:`cdeq.consistency.arrays`)
            or ``shards`` (one safetensors file per recorded batch, as earlier versions wrote).
        keep: iterates kept per sample in ``arrays`` (the start and ``keep - 1`` others drawn per
            sample; 0: every recorded iterate).
        shuffle: record an indexable training set in a seeded random order (with
            ``max_samples``: a random subset), written to the store first.
        max_store_bytes: ``mode=auto``'s limit on the projected store.
        cache_bytes: resident memory the readers of a stored ``arrays`` store may hold.
    """

    solver: SolverSpec = dataclasses.field(
        default_factory=lambda: SolverSpec(name="anderson", max_iter=40, tol=1e-5))
    indices: tuple = ()
    batch_size: int = 256
    dtype: str = "float32"
    max_samples: int = 0
    mode: str = "auto"
    format: str = "arrays"
    keep: int = 0
    shuffle: bool = False
    max_store_bytes: int = 8 << 30
    cache_bytes: int = 256 << 20

    def validate(self) -> None:
        check_int("batch_size", self.batch_size, minimum=1)
        check_choice("mode", self.mode, ["auto", "stored", "online"])
        check_choice("format", self.format, ["arrays", "shards"])
        check_int("keep", self.keep, minimum=0)
        check_int("max_store_bytes", self.max_store_bytes, minimum=0)
        check_int("cache_bytes", self.cache_bytes, minimum=0)
        check_choice("dtype", self.dtype, list(DTYPES))
        check_int("max_samples", self.max_samples, minimum=0)
        bad = [i for i in self.indices if not isinstance(i, int) or not 0 <= i < self.solver.max_iter]
        if bad:
            raise ConfigError(f"record indices {bad} are not valid; each must be an integer in "
                              f"[0, {self.solver.max_iter - 1}] (solver.max_iter)")

    def iterate_indices(self) -> list[int]:
        """The iterate indices to keep, sorted, ``0`` included."""
        if self.indices:
            return sorted(set(self.indices) | {0})
        out, k = list(range(9)), 12
        while k < self.solver.max_iter:
            out.append(k)
            k = int(k * 1.5)
        return [i for i in out if i < self.solver.max_iter]


@dataclasses.dataclass
class TrajectoryBatch:
    """One recorded batch (see the module docstring for shapes).

    Per-sample arrays (:mod:`cdeq.consistency.arrays`) add: ``points`` ``(B, P)``, each sample's
    own iterate indices (then ``iterates`` and ``residual`` are at those points, and ``index`` is
    their union); ``iterates`` ``None`` where they are regenerated (the online source); and, for a
    minibatch of which this rank read only its rows, ``part = (lo, hi, n)`` (its rows of the global
    minibatch of ``n``) with ``global_star_residual`` ``(n,)``.
    """

    x: Any
    y: Any
    iterates: Any
    z_star: Any
    residual: Tensor
    star_residual: Tensor
    index: list[int]
    last: int  # the index of the equilibrium (= solver max_iter)
    points: Tensor | None = None
    part: tuple[int, int, int] | None = None
    global_star_residual: Tensor | None = None

    def to(self, dtype: torch.dtype) -> TrajectoryBatch:
        """Every part of the iterates and ``z*`` in ``dtype``."""
        its = None if self.iterates is None else tree_map(lambda t: t.to(dtype), self.iterates)
        return dataclasses.replace(self, iterates=its,
                                   z_star=tree_map(lambda t: t.to(dtype), self.z_star))

    @property
    def batch_size(self) -> int:
        return int(leaves(self.z_star)[0].shape[0])

    @property
    def num_points(self) -> int:
        """``L``, the recorded iterates per sample."""
        if self.points is not None:
            return int(self.points.shape[1])
        return int(leaves(self.iterates)[0].shape[1])

    def grid(self) -> Tensor:
        """``(B, L)`` the iterate index of each sample's recorded points."""
        if self.points is not None:
            return self.points
        return torch.tensor(self.index, device=self.residual.device).expand(self.batch_size, -1)

    def pin_memory(self) -> TrajectoryBatch:
        """The batch with every tensor in it (structures included) in page-locked memory: what a
        ``torch.utils.data.DataLoader`` with ``pin_memory=True`` calls on each batch it yields, so
        that the copy to the GPU can overlap the step (needs CUDA)."""
        def pin(value: Any) -> Any:
            return value.pin_memory() if isinstance(value, Tensor) else value

        return dataclasses.replace(self, **{f.name: tree_map(pin, getattr(self, f.name))
                                            for f in dataclasses.fields(self)})

    def take(self, rows: Tensor) -> TrajectoryBatch:
        """Rows ``rows`` of the batch."""
        from ..solvers.loop import take_rows

        n, rows = self.batch_size, rows.to(self.residual.device)
        return dataclasses.replace(
            self, x=take_rows(self.x, rows, n), y=take_rows(self.y, rows, n),
            iterates=None if self.iterates is None else tree_map(lambda t: t[rows], self.iterates),
            z_star=tree_map(lambda t: t[rows], self.z_star), residual=self.residual[rows],
            star_residual=self.star_residual[rows],
            points=None if self.points is None else self.points[rows])


@torch.no_grad()
def record_batch(model: DEQModel, x: Any, y: Any, config: RecordConfig) -> TrajectoryBatch:
    """Run the teacher solver on one batch and keep the chosen iterates."""
    model.eval()
    solver = config.solver.build()
    x, y = to_device((x, y), model_device(model))  # batches where the teacher is
    check_finite_inputs(x, "record")
    try:
        u = model.inject(x)
    except (RuntimeError, TypeError) as err:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        dtype = f", dtype {x.dtype}" if isinstance(x, Tensor) else ""
        raise ValueError(f"record: the model's input injection rejected an input of shape {shape}"
                         f"{dtype}: {str(err).splitlines()[0]}") from err
    idx = config.iterate_indices()
    res = solver.solve(model.cell, model.initial_state(u), u, record=idx)
    traj = res.trajectory  # (L, B, ...) per part
    # residual of z_k is trace[k]; a batch that stopped early repeats the last value
    trace = res.trace
    rows = [trace[min(k, trace.shape[0] - 1)] for k in idx]
    residual = torch.stack(rows, dim=1).float()
    iterates = tree_map(lambda t: t.transpose(0, 1).contiguous(), traj)
    return TrajectoryBatch(x=x, y=y, iterates=iterates, z_star=res.z,
                           residual=residual, star_residual=res.residual.float(), index=idx,
                           last=solver.options.max_iter)


class TrajectoryStore:
    """A folder of trajectory shards with a manifest."""

    MANIFEST = "manifest.json"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def shard_path(self, i: int) -> Path:
        """The file of shard ``i`` (one recorded batch)."""
        return self.root / f"shard_{i:05d}.safetensors"

    def write(self, i: int, batch: TrajectoryBatch, dtype: str = "float32") -> None:
        """Write ``batch`` as shard ``i``, its iterates and ``z*`` stored in ``dtype``
        (``float32``, ``float16`` or ``bfloat16``), atomically and checksummed."""
        stored = batch.to(DTYPES[dtype])
        tensors: dict[str, Tensor] = {"residual": batch.residual, "star_residual": batch.star_residual}
        spec = {"x": flatten(batch.x, "x", tensors), "y": flatten(batch.y, "y", tensors)}
        if isinstance(batch.z_star, Tensor):  # a tensor state: the entries as they always were
            tensors.update(iterates=stored.iterates, z_star=stored.z_star)
        else:
            spec.update(iterates=flatten(stored.iterates, "iterates", tensors),
                        z_star=flatten(stored.z_star, "z_star", tensors))
        meta = {"spec": spec, "index": batch.index, "last": batch.last}
        save_tensors(self.shard_path(i), tensors, kind="trajectory", meta=meta)

    def read(self, i: int, dtype: torch.dtype = torch.float32) -> TrajectoryBatch:
        """Shard ``i`` as a :class:`TrajectoryBatch`, its iterates and ``z*`` converted to ``dtype``.

        Raises:
            FileNotFoundError: the shard is missing (the message names the command that records it).
            CorruptFileError: the shard is damaged or not a trajectory shard.
        """
        path = self.shard_path(i)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing, though {self.root / self.MANIFEST} lists {len(self)} shards: "
                f"`cdeq run` on {self.root.parent} (or `cdeq record --out {self.root.parent}`) "
                "records it again")
        tensors, meta = load_tensors(path, kind="trajectory")
        try:
            spec = meta["spec"]
            states = {name: unflatten(spec[name], tensors) if name in spec else tensors[name]
                      for name in ("iterates", "z_star")}
            return TrajectoryBatch(
                x=unflatten(spec["x"], tensors), y=unflatten(spec["y"], tensors),
                iterates=tree_map(lambda t: t.to(dtype), states["iterates"]),
                z_star=tree_map(lambda t: t.to(dtype), states["z_star"]),
                residual=tensors["residual"], star_residual=tensors["star_residual"],
                index=list(meta["index"]), last=int(meta["last"]))
        except KeyError as err:
            raise CorruptFileError(f"{path} lacks the entry {err}") from err

    def manifest(self) -> dict[str, Any]:
        """The store's ``manifest.json`` (shard count and recording settings)."""
        path = self.root / self.MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"no trajectories at {self.root} (missing {self.MANIFEST}); "
                                    "run the record stage first")
        manifest = read_json(path)
        if not isinstance(manifest, dict):
            raise CorruptFileError(f"{path} is not a trajectory manifest (a JSON object)")
        return manifest

    def __len__(self) -> int:
        return int(self.manifest()["shards"])

    def check(self) -> tuple[list[Path], list[tuple[Path, str]]]:
        """``(missing, damaged)``: the shards the manifest lists that are not on disk, and those
        whose size does not match their header (truncated), with the reason. Reads headers only;
        a flipped bit inside a shard is found by its checksum when it is read."""
        shards = self.manifest().get("shards")
        if not isinstance(shards, int) or shards < 0:
            raise CorruptFileError(f"{self.root / self.MANIFEST} does not say how many shards "
                                   f"there are (shards={shards!r})")
        missing, damaged = [], []
        for i in range(shards):
            path = self.shard_path(i)
            if not path.exists():
                missing.append(path)
            elif (why := safetensors_damage(path)) is not None:
                damaged.append((path, why))
        return missing, damaged

    def fits_in_memory(self, limit_bytes: int = 2 << 30) -> bool:
        """Whether all shards, read back as float32, stay under ``limit_bytes``."""
        on_disk = sum(p.stat().st_size for p in self.root.glob("shard_*.safetensors"))
        widen = 2 if self.manifest().get("dtype") in ("float16", "bfloat16") else 1
        return on_disk * widen <= limit_bytes

    def __getitem__(self, i: int) -> TrajectoryBatch:
        if not 0 <= i < len(self):
            raise IndexError(f"shard {i} is out of range (the store has {len(self)})")
        return self.read(i)

    def __iter__(self) -> Iterator[TrajectoryBatch]:
        for i in range(len(self)):
            yield self.read(i)


def record(
    model: DEQModel,
    batches: Iterable[tuple[Any, Any]],
    config: RecordConfig,
    store: TrajectoryStore | None = None,
    total: int | None = None,
    on_recorded: Callable[[int], None] | None = None,
) -> list[TrajectoryBatch] | TrajectoryStore:
    """Record teacher trajectories for ``batches`` (training data only).

    Args:
        model: the trained teacher (set to eval mode); batches go to its device.
        batches: ``(x, y)`` training batches; ``y`` is kept for the task loss of distillation.
        config: the recording solver, the iterates kept, the storage precision and a sample cap.
        store: write one shard per batch there (existing shards are kept: an interrupted
            recording resumes) instead of keeping the batches in memory.
        total: the number of batches, for the progress bar.
        on_recorded: called as ``on_recorded(i)`` after batch ``i`` is recorded and before its
            shard is written (a skipped shard gets no call).

    Returns:
        The store, or the list of :class:`TrajectoryBatch` in memory: per batch the iterates
        ``(B, L, ...)`` at ``config.iterate_indices()`` (each part so for a structured state),
        the solution ``z_star`` ``(B, ...)`` and the relative residuals ``(B, L)`` and ``(B,)``.

    Under torchrun with a ``store``, shard ``i`` is recorded and written by rank ``i % N`` alone
    (:func:`cdeq.engine.distributed.owner`); rank 0 writes the manifest after a barrier. In memory,
    every rank records every batch (each needs them all).
    """
    out: list[TrajectoryBatch] = []
    seen = 0
    count = 0
    state: list[dict[str, Any]] | None = None  # the recorded state's parts, for the manifest
    for batch in progress(batches, total=total, desc="record"):
        x, y = as_pair(batch)
        if config.max_samples and seen >= config.max_samples:
            break
        n = _batch_len(y)
        seen += n
        mine = store is None or distributed.owner(count) == distributed.rank()
        if not mine or (store is not None and store.shard_path(count).exists()):
            count += 1
            continue
        batch = record_batch(model, x, y, config)
        if state is None:
            state = _state_parts(batch, config.dtype)
        distributed.TALLY.add("record", batch.batch_size)
        if on_recorded is not None:
            on_recorded(count)
        if store is not None:
            store.write(count, batch, config.dtype)
        else:
            out.append(batch.to(DTYPES[config.dtype]))
        count += 1
    if count == 0:
        raise ValueError("record got no batches: the training data is empty")
    if store is not None:
        distributed.barrier()  # every rank's shards are written
        if distributed.is_main():
            if state is None:  # rank 0 recorded no shard now (a resumed recording)
                state = _state_parts(store.read(0), config.dtype)
            write_json(store.root / TrajectoryStore.MANIFEST,
                       {"shards": count, "samples": seen, "indices": config.iterate_indices(),
                        "last": config.solver.max_iter, "dtype": config.dtype, "state": state})
        distributed.barrier()  # the manifest is there for every rank
        return store
    return out


def _state_parts(batch: TrajectoryBatch, dtype: str) -> list[dict[str, Any]]:
    """The manifest's description of the recorded state: each part's name (``""`` for a tensor
    state), per-sample shape, dtype and stored dtype."""
    return [{**part, "stored": dtype} for part in Layout.of(batch.z_star).describe()]


class ShardWork:
    """Each recorded shard's share of running counts (``counts()``, e.g. a
    :class:`cdeq.engine.fit.LayerCalls`' ``as_dict``), so that a recording killed and resumed
    counts the work of the shards it kept, not only of those it recorded again.

    Call it as a recording's ``on_recorded(i)`` hook (after shard ``i`` is solved, before it is
    kept): it keeps what ``counts()`` grew by since the last call, in ``folder / "<i>.json"``
    (written by the shard's rank before the shard itself), or with ``folder=None`` (a recording
    held in memory, never resumed) in memory. :meth:`totals` sums every shard's.
    """

    def __init__(self, folder: Path | None, counts: Callable[[], dict[str, int]]) -> None:
        self.folder, self.counts = folder, counts
        self._done: dict[str, int] = {}
        self._mine: dict[int, dict[str, int]] = {}  # in memory: this rank's shards
        if folder is not None:
            if distributed.is_main():
                folder.mkdir(parents=True, exist_ok=True)
            distributed.barrier()

    def __call__(self, i: int) -> None:
        now = self.counts()
        share = {k: v - self._done.get(k, 0) for k, v in now.items()}
        self._done.update(now)
        if self.folder is None:
            self._mine[i] = share
        else:
            write_json(self.folder / f"{i}.json", share)

    def totals(self, shards: int) -> dict[str, int]:
        """The counts summed over shards ``0 .. shards - 1`` (every rank's; a collective)."""
        if self.folder is None:
            every: dict[int, dict[str, int]] = {}
            for part in distributed.gather_list(self._mine):
                every.update(part)
            per = [every.get(i) for i in range(shards)]
        else:
            per = [read_json(self.folder / f"{i}.json") if (self.folder / f"{i}.json").exists()
                   else None for i in range(shards)]
        unknown = [i for i, p in enumerate(per) if p is None]
        if unknown:
            logger.warning("the work of %d recorded shard(s) (%s...) was not kept (recorded by an "
                           "earlier version): the recording's work leaves them out", len(unknown),
                           unknown[:5])
        totals: dict[str, int] = {}
        for p in per:
            for k, v in (p or {}).items():
                totals[k] = totals.get(k, 0) + v
        return totals


def record_counted(model: DEQModel, batches: Iterable[tuple[Any, Any]], config: RecordConfig,
                   store: TrajectoryStore, counts: Callable[[], dict[str, int]]) -> dict[str, int]:
    """:func:`record` into ``store``, keeping each shard's share of the running ``counts()`` (e.g.
    layer calls) in ``store.root / "work" / "<i>.json"`` (:class:`ShardWork`). Returns the totals
    over every shard."""
    work = ShardWork(store.root / "work", counts)
    record(model, batches, config, store=store, on_recorded=work)
    return work.totals(len(store))


def warn_unconverged(summary: dict[str, float], tol: float, threshold: float = 0.05) -> bool:
    """``warnings.warn`` when more than ``threshold`` of the recorded samples did not converge
    (solution residual above ``tol``); returns whether it warned."""
    frac = summary["unconverged_fraction"]
    if frac <= threshold:
        return False
    warnings.warn(f"{100 * frac:.1f}% of the recorded teacher samples did not converge (residual > "
                  f"{tol:g}; max residual {summary['max_residual']:.2e}); they are left out of the "
                  "consistency losses. Train the teacher longer, regularise it (teacher.jac_reg) or "
                  "raise record.solver.max_iter", UnconvergedWarning, stacklevel=2)
    return True


class UnconvergedWarning(RuntimeWarning):
    """The teacher did not converge on part of the recorded samples."""


def _batch_len(y: Any) -> int:
    if isinstance(y, Tensor):
        return int(y.shape[0])
    if isinstance(y, (tuple, list)) and y:
        return _batch_len(y[0])
    return 1


def residual_summary(batches: Iterable[TrajectoryBatch], tol: float) -> dict[str, float]:
    """Fraction of recorded samples whose solution residual is above ``tol``, and its max."""
    total, bad, worst = 0, 0, 0.0
    for b in batches:
        r = b.star_residual
        total += r.numel()
        bad += int((r > tol).sum())
        finite = r[torch.isfinite(r)]
        worst = max(worst, float(finite.max()) if finite.numel() else float("inf"))
    return {"unconverged_fraction": bad / max(1, total), "max_residual": worst}
