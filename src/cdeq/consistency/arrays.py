"""Trajectories as per-sample arrays: the lean stored format and the online source's ``z*``.

A :class:`TrajectoryArrays` holds, for ``N`` recorded samples (rows), in shards of rows:

- ``z_star`` ``(N, D)`` float32: the solution (the distillation target), ``star_residual`` ``(N,)``;
- ``points`` ``(N, P)`` int16: the iterate indices kept for each sample (its own subset of the
  recording grid, ``0`` always among them), ``residual`` ``(N, P)`` their relative residuals;
- ``iterates`` ``(N, K, D)``: the kept iterates (``K = P``, bfloat16 by default), or none at all
  (``keep = 0``: the online source, which regenerates the iterates a minibatch needs);
- the inputs: ``ids`` ``(N,)`` int64, the samples' indices in an indexable data set, so the
  inputs are not copied; or the input and label rows ``x`` ``(N, ...)``, ``y`` ``(N, ...)``; or,
  for a batch whose input cannot be split by rows (a graph), the whole input of each shard
  (``whole``; then a shard is one minibatch).

On disk (the lean stored mode) a shard is a folder of ``.npy`` files read through memory maps, with
the SHA-256 of each file in its ``meta.json``: checked when written and by :meth:`verify`, not on
every read. In memory (the online source) the same arrays live in RAM.

:meth:`TrajectoryArrays.loader` yields minibatches drawn across all shards (one seeded permutation
of every sample per epoch), through a ``torch.utils.data.DataLoader`` (workers, pinned memory);
under torchrun each rank reads only its rows of each global minibatch. The reader's memory maps
are dropped after ``cache_bytes`` read, which bounds the resident memory they hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import mmap
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..engine import distributed
from ..engine.io import (
    CorruptFileError,
    flatten,
    load_tensors,
    read_json,
    save_tensors,
    unflatten,
    write_json,
)
from ..engine.tree import Layout
from .trajectory import TrajectoryBatch

logger = logging.getLogger(__name__)

FORMAT = "arrays"
MANIFEST = "manifest.json"
_NUMPY = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
          "bfloat16": (np.uint16, torch.bfloat16)}  # bfloat16 kept as its 16 bits


def _to_numpy(t: Tensor, dtype: str) -> np.ndarray:
    t = t.detach().cpu().to(_NUMPY[dtype][1]).contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()


def _tensor(a: np.ndarray) -> Tensor:
    """``a`` as a tensor of its own memory: a read-only memory-mapped view is copied, so that no
    tensor aliases the mapped file (PyTorch's tensors are writable)."""
    return torch.from_numpy(np.require(a, requirements=["C_CONTIGUOUS", "WRITEABLE"]))


def _to_torch(a: np.ndarray, dtype: str) -> Tensor:
    t = _tensor(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def bytes_per_sample(state_numel: int, points: int, keep: int, dtype: str, input_bytes: int = 0
                     ) -> int:
    """Bytes one recorded sample takes in this format: ``z*`` (float32), ``keep`` iterates in
    ``dtype``, ``points`` indices and residuals, its residual, and ``input_bytes`` of inputs (8 for
    a data-set index). What :func:`cdeq.consistency.online.projected_bytes` sizes stores with."""
    width = np.dtype(_NUMPY[dtype][0]).itemsize
    return state_numel * 4 + keep * state_numel * width + points * (2 + 4) + 4 + input_bytes


@dataclasses.dataclass
class Shard:
    """One shard's arrays (memory maps or in-memory arrays) and its metadata."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    whole: Any = None  # the shard's whole input and labels (x, y) when they cannot be split
    maps: list[Any] = dataclasses.field(default_factory=list)  # the memory maps (on disk)

    def row_bytes(self, iterates: bool = True) -> int:
        """Bytes of one row of every array (``iterates``: the iterates' too)."""
        if not hasattr(self, "_row_bytes"):
            sizes = {name: a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
                     for name, a in self.arrays.items()}
            self._row_bytes = (sum(sizes.values()), sum(sizes.values()) - sizes.get("iterates", 0))
        return self._row_bytes[0 if iterates else 1]

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])


class TrajectoryArrays:
    """Per-sample trajectory arrays, in memory (``root=None``) or in a folder (module docstring).

    Args:
        root: the folder (the lean stored mode), or ``None`` (in memory: the online source).
        items: the indexable data set the samples' ``ids`` refer to (``items[i] -> (x, y)``, or
            ``items.take(ids) -> (x, y)`` batched); needed to read a store recorded by index.
        cache_bytes: drop the memory maps after this many bytes read (bounds their resident
            memory; 0: never).
    """

    MANIFEST = MANIFEST

    def __init__(self, root: str | Path | None = None, items: Any = None, cache_bytes: int = 256 << 20
                 ) -> None:
        self.root = None if root is None else Path(root)
        self.items = items
        self.cache_bytes = int(cache_bytes)
        self._shards: dict[int, Shard] = {}  # in memory: the shards; on disk: open memory maps
        self._read_since_drop = 0
        self._manifest: dict[str, Any] | None = None

    # --- writing ------------------------------------------------------------------------------
    def shard_dir(self, i: int) -> Path:
        """Shard ``i``'s folder (stored trajectories only)."""
        if self.root is None:
            raise ValueError("these trajectories are held in memory (the online source): they have "
                             "no shard folders to check or verify")
        return self.root / f"shard_{i:05d}"

    def has_shard(self, i: int) -> bool:
        if self.root is None:
            return i in self._shards
        return (self.shard_dir(i) / "meta.json").exists()

    def write(self, i: int, batch: TrajectoryBatch, keep: int, dtype: str, seed: int,
              ids: Tensor | None = None, extra: dict[str, Any] | None = None) -> None:
        """Keep shard ``i`` from a recorded batch (``batch.iterates`` ``(B, L, ...)`` on the
        recording grid ``batch.index``): ``keep`` of its points per sample (``0`` always among
        them; drawn with ``seed`` and ``i``), or none (``keep=0``), in ``dtype``."""
        b = batch.batch_size
        layout = Layout.of(batch.z_star)
        grid = torch.tensor(batch.index, dtype=torch.long)
        residual = batch.residual.float().cpu()
        arrays: dict[str, np.ndarray] = {
            "z_star": _to_numpy(layout.pack(batch.z_star).float(), "float32"),
            "star_residual": _to_numpy(batch.star_residual.float(), "float32"),
        }
        if keep:
            pos = choose_points(b, len(batch.index), keep, seed * 1_000_003 + i)  # (B, K)
            iterates = _pack_points(layout, batch.iterates, b).cpu()  # (B, L, D)
            arrays["iterates"] = _to_numpy(iterates[torch.arange(b)[:, None], pos], dtype)
        else:
            pos = torch.arange(len(batch.index)).expand(b, -1)  # every grid point's residual
        arrays["points"] = grid[pos].to(torch.int16).numpy()
        arrays["residual"] = residual[torch.arange(b)[:, None], pos].numpy()
        meta: dict[str, Any] = {"rows": b, "keep": keep, "dtype": dtype, "last": batch.last,
                                "layout": _describe(layout), **(extra or {})}
        whole = None
        if ids is not None:
            arrays["ids"] = ids.to(torch.long).cpu().numpy()
            meta["inputs"] = "ids"
        elif _rows_input(batch.x, batch.y, b):
            arrays["x"] = batch.x.detach().cpu().numpy()
            arrays["y"] = batch.y.detach().cpu().numpy()
            meta["inputs"] = "rows"
        else:
            meta["inputs"] = "whole"
            whole = (batch.x, batch.y)
        if self.root is None:
            self._shards[i] = Shard(arrays, meta, whole)
            return
        self._write_folder(i, arrays, meta, whole)

    def _write_folder(self, i: int, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                      whole: Any) -> None:
        final = self.shard_dir(i)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sums: dict[str, str] = {}
        for name, a in arrays.items():
            np.save(tmp / f"{name}.npy", a)
            sums[f"{name}.npy"] = _sha256(tmp / f"{name}.npy")
        if whole is not None:
            tensors: dict[str, Tensor] = {}
            spec = {"x": flatten(whole[0], "x", tensors), "y": flatten(whole[1], "y", tensors)}
            save_tensors(tmp / "inputs.safetensors", {k: v.detach().cpu() for k, v in tensors.items()},
                         kind="trajectory_inputs", meta={"spec": spec})
            sums["inputs.safetensors"] = _sha256(tmp / "inputs.safetensors")
        sizes = {name: (tmp / name).stat().st_size for name in sums}
        for name, a in arrays.items():  # verified when written: read back, compared
            back = np.load(tmp / f"{name}.npy", mmap_mode="r")
            if back.shape != a.shape or not np.array_equal(np.asarray(back), a, equal_nan=True):
                raise CorruptFileError(f"{tmp / name}.npy did not read back as written")
        meta = {**meta, "sha256": sums, "bytes": sizes}
        write_json(tmp / "meta.json", meta)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def finish(self, manifest: dict[str, Any]) -> None:
        """Write the manifest (rank 0, after every rank's shards): ``manifest`` plus the shards'
        row counts and the format."""
        shards = int(manifest["shards"])
        metas = [self._meta(i) for i in range(shards)]
        rows = [m["rows"] for m in metas]
        parts = _layout(metas[0]["layout"]).describe()  # as the shards' manifest lists them
        self._manifest = {**manifest, "format": FORMAT, "rows": rows, "samples": int(sum(rows)),
                          "by_rows": all(m["inputs"] != "whole" for m in metas),
                          "layout": metas[0]["layout"],
                          "state": [{**p, "stored": manifest.get("dtype", "float32")} for p in parts]}
        if self.root is not None and distributed.is_main():
            write_json(self.root / MANIFEST, self._manifest)

    # --- reading ------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            if self.root is None:
                raise FileNotFoundError("the in-memory trajectories are not recorded yet")
            path = self.root / MANIFEST
            if not path.exists():
                raise FileNotFoundError(f"no trajectories at {self.root} (missing {MANIFEST}); run "
                                        "the record stage first")
            self._manifest = read_json(path)
        return self._manifest

    def __len__(self) -> int:
        """The number of shards."""
        return int(self.manifest()["shards"])

    @property
    def samples(self) -> int:
        return int(self.manifest()["samples"])

    @property
    def keep(self) -> int:
        """Iterates kept per sample (0: none, they are regenerated: the online source)."""
        return int(self.manifest().get("keep", 0))

    def _meta(self, i: int) -> dict[str, Any]:
        if self.root is None:
            return self._shards[i].meta
        return read_json(self.shard_dir(i) / "meta.json")

    def shard(self, i: int) -> Shard:
        """Shard ``i`` (its memory maps opened on first use)."""
        if i not in self._shards:
            if self.root is None:
                raise IndexError(f"shard {i} was not recorded")
            folder = self.shard_dir(i)
            if not (folder / "meta.json").exists():
                raise FileNotFoundError(
                    f"{folder} is missing, though {self.root / MANIFEST} lists {len(self)} shards: "
                    f"`cdeq run` on {self.root.parent} (or `cdeq record --out {self.root.parent}`) "
                    "records it again")
            meta = read_json(folder / "meta.json")
            maps = {p.stem: np.load(p, mmap_mode="r") for p in sorted(folder.glob("*.npy"))}
            arrays = {k: np.asarray(m) for k, m in maps.items()}  # plain views: faster indexing
            whole = None
            if meta.get("inputs") == "whole":
                tensors, extra = load_tensors(folder / "inputs.safetensors", kind="trajectory_inputs")
                whole = (unflatten(extra["spec"]["x"], tensors), unflatten(extra["spec"]["y"], tensors))
            self._shards[i] = Shard(arrays, meta, whole, list(maps.values()))
        return self._shards[i]

    def _count(self, nbytes: int) -> None:
        """Release the memory maps' resident pages (``madvise(MADV_DONTNEED)``: the files stay
        mapped, re-read from the page cache when touched again) once about ``cache_bytes`` were
        mapped in since the last release."""
        if self.root is None or not self.cache_bytes:
            return
        self._read_since_drop += nbytes
        if self._read_since_drop < self.cache_bytes:
            return
        for shard in self._shards.values():
            for m in shard.maps:
                view = getattr(m, "_mmap", None)
                if view is not None and hasattr(view, "madvise"):
                    view.madvise(mmap.MADV_DONTNEED)
        self._read_since_drop = 0

    def verify(self) -> list[tuple[Path, str]]:
        """Recompute every file's SHA-256; returns the damaged files with the reason (on demand:
        reads every byte)."""
        bad = []
        for i in range(len(self)):
            folder = self.shard_dir(i)
            try:
                meta = read_json(folder / "meta.json")
            except (FileNotFoundError, CorruptFileError, json.JSONDecodeError) as err:
                bad.append((folder, f"no readable meta.json ({err})"))
                continue
            for name, want in meta.get("sha256", {}).items():
                path = folder / name
                if not path.exists():
                    bad.append((path, "missing"))
                elif _sha256(path) != want:
                    bad.append((path, "checksum mismatch"))
        return bad

    def check(self) -> tuple[list[Path], list[tuple[Path, str]]]:
        """``(missing, damaged)`` shards, from the files' presence and sizes (cheap; the
        checksums: :meth:`verify`)."""
        missing, damaged = [], []
        for i in range(len(self)):
            folder = self.shard_dir(i)
            try:
                meta = read_json(folder / "meta.json")
            except FileNotFoundError:
                missing.append(folder)
                continue
            except (CorruptFileError, ValueError) as err:
                damaged.append((folder, f"meta.json is not readable: {err}"))
                continue
            for name, size in meta.get("bytes", {}).items():
                path = folder / name
                if not path.exists():
                    damaged.append((folder, f"{name} is missing"))
                    break
                if path.stat().st_size != size:
                    damaged.append((folder, f"{name} has {path.stat().st_size} bytes, not {size}"))
                    break
        return missing, damaged

    def rows_of(self, i: int, rows: np.ndarray | None = None, iterates: bool = True
                ) -> TrajectoryBatch:
        """A :class:`TrajectoryBatch` of shard ``i``'s ``rows`` (all by default): ``iterates``
        ``(B, K, ...)`` float32 with ``points`` (or ``None`` without kept iterates)."""
        shard = self.shard(i)
        meta = shard.meta
        sel = slice(None) if rows is None else rows
        a = shard.arrays
        layout = _layout(meta["layout"])
        flat = _tensor(a["z_star"][sel])
        its = None
        if iterates and "iterates" in a:
            packed = _to_torch(a["iterates"][sel], meta["dtype"]).float()  # (B, K, D)
            its = _unpack_points(layout, packed)
        points = _tensor(a["points"][sel]).long()
        x, y = self._inputs(shard, sel)
        self._count(flat.shape[0] * (shard.row_bytes(iterates) + _FAULT_AROUND * len(a)))
        return TrajectoryBatch(
            x=x, y=y, iterates=its, z_star=layout.unpack(flat, dtypes=True),
            residual=_tensor(a["residual"][sel]),
            star_residual=_tensor(a["star_residual"][sel]),
            index=sorted(set(points.flatten().tolist())), last=int(meta["last"]), points=points)

    def _inputs(self, shard: Shard, sel: Any) -> tuple[Any, Any]:
        kind = shard.meta["inputs"]
        if kind == "whole":
            return shard.whole
        if kind == "rows":
            return (_tensor(shard.arrays["x"][sel]),
                    _tensor(shard.arrays["y"][sel]))
        if self.items is None:
            raise ValueError("these trajectories were recorded by data-set index: pass the data set "
                             "(items=...) to read their inputs")
        return take_items(self.items, np.asarray(shard.arrays["ids"][sel]))

    def __getitem__(self, i: int) -> TrajectoryBatch:
        if not 0 <= i < len(self):
            raise IndexError(f"shard {i} is out of range (there are {len(self)})")
        return self.rows_of(i)

    def __iter__(self) -> Iterator[TrajectoryBatch]:
        for i in range(len(self)):
            yield self.rows_of(i, iterates=False)

    # --- minibatches --------------------------------------------------------------------------
    @property
    def by_rows(self) -> bool:
        """Whether minibatches may mix samples of several shards (the inputs split by rows)."""
        return self.manifest()["by_rows"]

    def steps_per_epoch(self, batch_size: int) -> int:
        if self.by_rows:
            return max(1, math.ceil(self.samples / batch_size))
        return len(self)

    def loader(self, batch_size: int, seed: int, epoch: int, workers: int = 0, pin_memory: bool = False
               ) -> Iterator[TrajectoryBatch]:
        """One epoch of minibatches: every sample once, in a seeded random order across shards;
        under torchrun each rank reads its rows of each global minibatch (``part`` says which).
        A store whose inputs cannot be split yields its shards whole, in a seeded order."""
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        if not self.by_rows:
            for i in torch.randperm(len(self), generator=gen).tolist():
                yield self.rows_of(i)
            return
        starts = np.cumsum([0, *self.manifest()["rows"]])
        order = torch.randperm(self.samples, generator=gen).numpy()
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        dataset = _Rows(self, starts)
        if workers > 0:
            from torch.utils.data import DataLoader

            yield from DataLoader(dataset, batch_size=None, sampler=batches, num_workers=workers,
                                  pin_memory=pin_memory, persistent_workers=False)
        else:
            for idx in batches:
                yield dataset[idx]


class _Rows:
    """Map-style dataset over global minibatches: ``dataset[global indices]`` is this rank's rows
    of that minibatch as one :class:`TrajectoryBatch`, read from the shards' memory maps into one
    array per field (each shard's rows in increasing order)."""

    def __init__(self, arrays: TrajectoryArrays, starts: np.ndarray) -> None:
        self.arrays, self.starts = arrays, starts
        meta = arrays.shard(0).meta
        self.layout, self.dtype, self.last = _layout(meta["layout"]), meta["dtype"], int(meta["last"])
        self.inputs = meta["inputs"]
        star = [arrays.shard(i).arrays["star_residual"] for i in range(len(arrays))]
        self.star = np.concatenate([np.asarray(a) for a in star])  # every sample's: small

    def __getitem__(self, idx: np.ndarray) -> TrajectoryBatch:
        n = len(idx)
        # every row of the global minibatch on exactly one rank: with fewer rows than ranks, some
        # ranks hold none (an empty part, which computes nothing of the step)
        lo, hi = distributed.split_range(n)
        mine = np.asarray(idx[lo:hi])
        shard_of = np.searchsorted(self.starts, mine, side="right") - 1
        out = {name: np.empty((len(mine), *a.shape[1:]), dtype=a.dtype)
               for name, a in self.arrays.shard(0).arrays.items()}  # every shard has these arrays
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            rows = mine[sel] - self.starts[s]
            order = np.argsort(rows)
            rows, sel = rows[order], sel[order]
            shard = self.arrays.shard(int(s))
            for name, a in shard.arrays.items():
                out[name][sel] = a[rows]
            self.arrays._count(len(rows) * (shard.row_bytes() + _FAULT_AROUND * len(shard.arrays)))
        t = {k: torch.from_numpy(v) for k, v in out.items()}
        its = None
        if "iterates" in t:
            its = _unpack_points(self.layout, _to_torch(out["iterates"], self.dtype).float())
        if self.inputs == "ids":
            x, y = take_items(self.arrays.items, out["ids"])
        else:
            x, y = t["x"], t["y"]
        points = t["points"].long()
        return TrajectoryBatch(
            x=x, y=y, iterates=its, z_star=self.layout.unpack(t["z_star"], dtypes=True),
            residual=t["residual"], star_residual=t["star_residual"],
            index=sorted(set(points.flatten().tolist())), last=self.last, points=points,
            part=(lo, hi, n), global_star_residual=torch.from_numpy(self.star[idx]))


_FAULT_AROUND = 256 << 10
"""Bytes counted for each row read from a memory map beyond the row itself: the pages the
kernel maps in around a faulting read (fault-around, read-ahead); measured so that the resident
memory of the maps stays near ``cache_bytes`` (``benchmarks/scale.py``)."""


def _describe(layout: Layout) -> dict[str, Any]:
    """A state's layout as JSON data (its pytree structure, part shapes and dtypes)."""
    return {"spec": None if layout.single else pytree.treespec_dumps(layout.spec),
            "names": layout.names, "shapes": [list(s) for s in layout.shapes],
            "dtypes": [str(d).removeprefix("torch.") for d in layout.dtypes]}


def _layout(data: dict[str, Any]) -> Layout:
    spec = None if data["spec"] is None else pytree.treespec_loads(data["spec"])
    return Layout(spec, list(data["names"]), [tuple(s) for s in data["shapes"]],
                  [getattr(torch, d) for d in data["dtypes"]])


def _pack_points(layout: Layout, iterates: Any, b: int) -> Tensor:
    """``(B, L, D)``: each point's state packed (the iterates' parts are ``(B, L, ...)``)."""
    parts = layout.leaves(iterates)
    length = parts[0].shape[1]
    return torch.cat([p.reshape(b, length, -1).float() for p in parts], dim=2)


def _unpack_points(layout: Layout, packed: Tensor) -> Any:
    """The iterates' structure, parts ``(B, K, ...)``, from ``(B, K, D)``."""
    b, k = packed.shape[:2]
    state = layout.unpack(packed.reshape(b * k, packed.shape[2]), dtypes=True)
    return layout.map(lambda t: t.reshape(b, k, *t.shape[1:]), state)


def take_items(items: Any, ids: np.ndarray) -> tuple[Any, Any]:
    """``(x, y)`` of the samples ``ids`` of an indexable data set: ``items.take(ids)`` when it has
    it (batched), else ``items[i]`` stacked."""
    if hasattr(items, "take"):
        return items.take(_tensor(np.asarray(ids, dtype=np.int64)))
    if len(ids) == 0:  # an empty part of a minibatch: no rows, shaped as a sample
        x, y = items[0]
        return torch.as_tensor(x)[None][:0], torch.as_tensor(y)[None][:0]
    xs, ys = zip(*(items[int(i)] for i in ids), strict=True)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.stack([torch.as_tensor(y) for y in ys])


def choose_points(batch: int, length: int, keep: int, seed: int) -> Tensor:
    """``(batch, min(keep, length))`` sorted positions on a grid of ``length`` points, per sample:
    ``0`` and ``keep - 1`` others drawn without replacement (seeded)."""
    keep = min(keep, length)
    gen = torch.Generator().manual_seed(seed)
    if keep == length:
        return torch.arange(length).expand(batch, -1)
    scores = torch.rand(batch, length - 1, generator=gen)
    others = scores.topk(keep - 1, dim=1).indices + 1
    return torch.cat([torch.zeros(batch, 1, dtype=torch.long), others.sort(dim=1).values], dim=1)


def _rows_input(x: Any, y: Any, b: int) -> bool:
    return (isinstance(x, Tensor) and x.layout == torch.strided and x.dim() > 0 and x.shape[0] == b
            and isinstance(y, Tensor) and y.dim() > 0 and y.shape[0] == b)
