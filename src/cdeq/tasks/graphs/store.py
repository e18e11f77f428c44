"""A large graph on disk, read through memory maps: the cached binary form of the OGB reader.

A store folder holds flat binary arrays and a ``meta.json`` written last (a folder without it is
incomplete and never read):

- ``indptr.bin`` ``(N + 1,)`` int64 and ``indices.bin`` ``(nnz,)`` int32: the adjacency as CSR,
  symmetric (every edge in both directions), without self loops or duplicates, each row sorted;
- ``features.bin`` ``(N, F)`` float32 (dense, row-major) and ``labels.bin`` ``(N,)`` int64
  (``-1``: no label);
- ``train.bin``, ``valid.bin``, ``test.bin``: int64 node ids of each split.

:func:`build_csr` turns an edge list of any length into that CSR in chunks (a degree count, a
scatter of each chunk into its rows, then each block of rows sorted and de-duplicated), so the
memory it needs is the CSR itself plus one chunk, never the edge list sorted whole.

Example:
    >>> store = GraphStore(folder)                         # doctest: +SKIP
    >>> store.num_nodes, store.num_features, store.neighbours(0)[:5]   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .data import GraphDataError

__all__ = ["FORMAT", "GraphStore", "StoreWriter", "build_csr", "cache_root"]

FORMAT = 1
SPLITS = ("train", "valid", "test")
CHUNK = 1 << 22  # edges per chunk


def cache_root(given: str = "") -> Path:
    """Where stores go: ``given``, else ``$CDEQ_CACHE/graphs`` or ``~/.cache/cdeq/graphs``."""
    if given:
        return Path(given).expanduser()
    base = os.environ.get("CDEQ_CACHE") or Path.home() / ".cache" / "cdeq"
    return Path(base) / "graphs"


class GraphStore:
    """A store folder opened read-only (memory maps: nothing is read until it is indexed).

    Attributes:
        indptr: ``(N + 1,)`` int64 row pointers.
        indices: ``(nnz,)`` int32 neighbour ids.
        features: ``(N, F)`` float32.
        labels: ``(N,)`` int64 (``-1``: no label).
        splits: ``{"train", "valid", "test"}`` int64 id arrays.
        meta: the contents of ``meta.json``.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise GraphDataError(f"{self.folder} is not a complete graph store (no meta.json)")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        n, f = int(self.meta["num_nodes"]), int(self.meta["num_features"])
        self.indptr = self._map("indptr", np.int64, (n + 1,))
        self.indices = self._map("indices", np.int32, (int(self.meta["nnz"]),))
        self.features = self._map("features", np.float32, (n, f))
        self.labels = self._map("labels", np.int64, (n,))
        self.splits = {s: self._map(s, np.int64, (int(self.meta["splits"][s]),)) for s in SPLITS}

    def _map(self, name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        path = self.folder / f"{name}.bin"
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)

    @property
    def num_nodes(self) -> int:
        return int(self.meta["num_nodes"])

    @property
    def num_features(self) -> int:
        return int(self.meta["num_features"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def nnz(self) -> int:
        """Directed edges (each undirected edge twice)."""
        return int(self.meta["nnz"])

    def degrees(self) -> np.ndarray:
        """``(N,)`` int64 neighbour counts."""
        return np.diff(self.indptr)

    def neighbours(self, node: int) -> np.ndarray:
        return np.asarray(self.indices[self.indptr[node] : self.indptr[node + 1]])


class StoreWriter:
    """Writes a store folder under a temporary name; :meth:`finish` writes ``meta.json`` and renames
    it into place, :meth:`abort` (or an exception inside ``with``) removes it: a reader never sees
    half a store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is not None:
            self.abort()

    def path(self, name: str) -> Path:
        return self.tmp / f"{name}.bin"

    def array(self, name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """A writable memory map ``name.bin`` of ``shape``."""
        if int(np.prod(shape)) == 0:
            self.path(name).touch()
            return np.zeros(shape, dtype=dtype)
        return np.memmap(self.path(name), dtype=dtype, mode="w+", shape=shape)

    def save(self, name: str, values: np.ndarray, dtype: Any) -> None:
        np.ascontiguousarray(values, dtype=dtype).tofile(self.path(name))

    def finish(self, meta: dict[str, Any]) -> GraphStore:
        (self.tmp / "meta.json").write_text(json.dumps({"format": FORMAT, **meta}, indent=1))
        if self.folder.exists():  # another process finished the same store first
            shutil.rmtree(self.tmp)
        else:
            os.replace(self.tmp, self.folder)
        return GraphStore(self.folder)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def build_csr(edge_chunks: Callable[[], Iterator[np.ndarray]], num_nodes: int, writer: StoreWriter,
              block: int = CHUNK) -> int:
    """Write the symmetric CSR of an edge list into ``writer``'s ``indptr`` and ``indices``.

    Args:
        edge_chunks: a function returning a fresh iterator of ``(E_i, 2)`` integer chunks (it is
            read twice); ids must already lie in ``[0, num_nodes)``.
        num_nodes: ``N``.
        block: entries per sort block (memory: a few times ``block`` int64).

    Returns:
        ``nnz``, the directed edges kept (both directions, no self loops, no duplicates).
    """
    n = num_nodes
    deg = np.zeros(n, dtype=np.int64)
    for chunk in edge_chunks():
        src, dst = chunk[:, 0], chunk[:, 1]
        keep = src != dst
        deg += np.bincount(src[keep], minlength=n) + np.bincount(dst[keep], minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(deg, out=indptr[1:])
    raw = writer.array("indices_raw", np.int32, (int(indptr[-1]),))
    fill = indptr[:-1].copy()
    for chunk in edge_chunks():
        src, dst = chunk[:, 0], chunk[:, 1]
        keep = src != dst
        rows = np.concatenate([src[keep], dst[keep]])
        cols = np.concatenate([dst[keep], src[keep]])
        order = np.argsort(rows, kind="stable")
        rows, cols = rows[order], cols[order]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        counts = np.diff(np.r_[starts, len(rows)])
        rank = np.arange(len(rows)) - np.repeat(starts, counts)
        raw[fill[rows] + rank] = cols
        fill[rows[starts]] += counts  # each row once per chunk
    del fill
    # sort each row and drop duplicates, block by block, into the final arrays
    out_ptr = writer.array("indptr", np.int64, (n + 1,))
    out_ptr[0] = 0
    total = 0
    with open(writer.path("indices"), "wb") as fh:
        a = 0
        while a < n:
            b = int(np.searchsorted(indptr, indptr[a] + block, side="right")) - 1
            b = min(max(b, a + 1), n)
            seg = np.asarray(raw[indptr[a] : indptr[b]], dtype=np.int64)
            local = np.repeat(np.arange(b - a, dtype=np.int64), np.diff(indptr[a : b + 1]))
            key = np.unique(local * n + seg)
            rows, cols = key // n, key % n
            out_ptr[a + 1 : b + 1] = total + np.cumsum(np.bincount(rows, minlength=b - a))
            fh.write(cols.astype(np.int32).tobytes())
            total += len(cols)
            a = b
    out_ptr.flush()
    del raw
    writer.path("indices_raw").unlink()
    return total
