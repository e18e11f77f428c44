"""The OGB node-property layout, parsed once into a :class:`~.store.GraphStore`.

A folder as OGB distributes ``ogbn-arxiv`` or ``ogbn-products`` (each file gzipped or not)::

    DIR/raw/num-node-list.csv.gz     one line: N
    DIR/raw/num-edge-list.csv.gz     one line: E
    DIR/raw/edge.csv.gz              E lines "src,dst" (0-based node ids)
    DIR/raw/node-feat.csv.gz         N lines of F numbers
    DIR/raw/node-label.csv.gz        N lines of one class id (empty or nan: unlabelled)
    DIR/split/<name>/train.csv.gz    node ids, one a line (also valid.csv.gz, test.csv.gz)

There is one ``split/<name>/`` folder or ``split`` names the one to use. The files are read in
blocks of lines (``numpy.loadtxt``), checked, and written to the store in the cache; later runs open
the store directly. Edges are made undirected (IGNN's adjacency is symmetric), self loops and
duplicates dropped. Any inconsistency is a :class:`GraphDataError` naming the file: a line that is
not numbers, an edge id outside ``[0, N)``, an edge count that differs from ``num-edge-list``,
features and labels of different lengths, a split id out of range or in two splits.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .data import GraphDataError
from .store import GraphStore, StoreWriter, build_csr, cache_root

__all__ = ["is_ogb_folder", "load_ogb", "ogb_files"]

log = logging.getLogger(__name__)

RAW = ("num-node-list", "num-edge-list", "edge", "node-feat", "node-label")
SPLITS = ("train", "valid", "test")
LINES = 1 << 18  # lines per parsed block


def is_ogb_folder(path: str | Path) -> bool:
    """Whether ``path`` holds ``raw/edge.csv[.gz]`` (OGB's layout)."""
    raw = Path(path) / "raw"
    return (raw / "edge.csv.gz").is_file() or (raw / "edge.csv").is_file()


def _csv(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        if (folder / name).is_file():
            return folder / name
    raise GraphDataError(f"{folder} has no {stem}.csv.gz (or {stem}.csv); the OGB node-property layout "
                         "needs raw/{num-node-list,num-edge-list,edge,node-feat,node-label}.csv.gz and "
                         "split/<name>/{train,valid,test}.csv.gz")


def ogb_files(root: str | Path, split: str = "") -> dict[str, Path]:
    """The files of an OGB folder (``RAW`` names and ``train``/``valid``/``test``), checked to exist.

    Raises:
        GraphDataError: a missing file, no ``split/`` sub-folder, several and ``split`` not given
            (the message lists them), or ``split`` naming none of them.
    """
    root = Path(root)
    if not root.is_dir():
        raise GraphDataError(f"{root} is not a folder; give an OGB dataset folder (raw/, split/)")
    files = {stem: _csv(root / "raw", stem) for stem in RAW}
    split_root = root / "split"
    names = sorted(p.name for p in split_root.iterdir() if p.is_dir()) if split_root.is_dir() else []
    if not names:
        raise GraphDataError(f"{split_root} holds no split folder; OGB's layout has "
                             "split/<name>/{train,valid,test}.csv.gz")
    if split and split not in names:
        raise GraphDataError(f"split={split!r} is not a folder of {split_root}; it has {names}")
    if not split:
        if len(names) > 1:
            raise GraphDataError(f"{split_root} has several splits {names}; name one with "
                                 "task_config.split=NAME")
        split = names[0]
    files.update({s: _csv(split_root / split, s) for s in SPLITS})
    return files


def _open(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _blocks(path: Path, columns: int | None, dtype: Any) -> Iterator[tuple[int, np.ndarray]]:
    """``(first line number, (lines, columns) array)`` blocks of a CSV of numbers (1-based line
    numbers; a header line of non-numbers is refused like any other bad line)."""
    line_no = 1
    try:
        with _open(path) as fh:
            while True:
                lines = fh.readlines(LINES * 16)
                if not lines:
                    return
                try:
                    arr = np.loadtxt(io.BytesIO(b"".join(lines)), dtype=dtype, delimiter=",", ndmin=2)
                except ValueError as err:
                    raise GraphDataError(f"{path}: lines {line_no}-{line_no + len(lines) - 1} are not "
                                         f"rows of numbers ({str(err).splitlines()[0]})") from err
                if columns is not None and arr.shape[1] != columns:
                    raise GraphDataError(f"{path}: line {line_no} has {arr.shape[1]} values, expected "
                                         f"{columns}")
                yield line_no, arr
                line_no += len(lines)
    except (OSError, EOFError) as err:
        raise GraphDataError(f"{path} could not be read ({type(err).__name__}: {err})") from err


def _one_number(path: Path) -> int:
    values = [arr for _, arr in _blocks(path, 1, np.int64)]
    if len(values) != 1 or values[0].shape != (1, 1) or values[0][0, 0] < 0:
        raise GraphDataError(f"{path} must hold one count (one graph), e.g. 169343")
    return int(values[0][0, 0])


def _source_key(files: dict[str, Path]) -> str:
    stats = {k: (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for k, p in sorted(files.items())}
    return hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()[:16]


def load_ogb(root: str | Path, split: str = "", cache: str = "") -> GraphStore:
    """The store of an OGB node-property folder, parsing it first when it is not cached.

    Args:
        root: the dataset folder (``raw/``, ``split/``).
        split: the ``split/`` sub-folder (``""``: the only one).
        cache: the cache folder (:func:`.store.cache_root`).
    """
    root = Path(root)
    files = ogb_files(root, split)
    out = cache_root(cache) / f"{root.resolve().name}-{_source_key(files)}"
    if (out / "meta.json").is_file():
        return GraphStore(out)
    log.info("parsing %s once into %s", root, out)
    with StoreWriter(out) as writer:
        return _parse(root, files, writer)


def _parse(root: Path, files: dict[str, Path], writer: StoreWriter) -> GraphStore:
    n = _one_number(files["num-node-list"])
    e = _one_number(files["num-edge-list"])
    if n < 2:
        raise GraphDataError(f"{files['num-node-list']} says {n} node(s); at least 2 are needed")
    # edges: checked, kept in a temporary int64 file read twice by the CSR builder
    edges = writer.array("edges", np.int64, (e, 2))
    seen = 0
    for line, arr in _blocks(files["edge"], 2, np.int64):
        bad = np.flatnonzero((arr < 0).any(1) | (arr >= n).any(1))
        if len(bad):
            pair = arr[bad[0]]
            wrong = int(pair[(pair < 0) | (pair >= n)][0])
            raise GraphDataError(f"{files['edge']}: line {line + int(bad[0])} has node id {wrong}, "
                                 f"outside [0, {n}) ({files['num-node-list'].name} says {n} nodes)")
        if seen + len(arr) > e:
            raise GraphDataError(f"{files['edge']} has more than {e} edges, the count of "
                                 f"{files['num-edge-list']}")
        edges[seen : seen + len(arr)] = arr
        seen += len(arr)
    if seen != e:
        raise GraphDataError(f"{files['edge']} has {seen} edges but {files['num-edge-list']} says {e}")

    def chunks() -> Iterator[np.ndarray]:
        for a in range(0, e, 1 << 22):
            yield np.asarray(edges[a : a + (1 << 22)])

    nnz = build_csr(chunks, n, writer)
    writer.path("edges").unlink()  # the map stays valid until it is dropped
    # features (dense float32, N rows) and labels (N rows)
    features = None
    rows = 0
    for line, arr in _blocks(files["node-feat"], None, np.float32):
        if features is None:
            features = writer.array("features", np.float32, (n, arr.shape[1]))
        if arr.shape[1] != features.shape[1]:
            raise GraphDataError(f"{files['node-feat']}: line {line} has {arr.shape[1]} values, the "
                                 f"first line {features.shape[1]}")
        if rows + len(arr) > n:
            raise GraphDataError(f"{files['node-feat']} has more than {n} rows, the node count of "
                                 f"{files['num-node-list']}")
        if not np.isfinite(arr).all():
            raise GraphDataError(f"{files['node-feat']}: a feature near line {line} is NaN or inf")
        features[rows : rows + len(arr)] = arr
        rows += len(arr)
    if features is None or rows != n:
        raise GraphDataError(f"{files['node-feat']} has {rows} rows but {files['num-node-list']} says "
                             f"{n} nodes")
    features.flush()
    labels = np.concatenate([arr for _, arr in _blocks(files["node-label"], 1, np.float64)])[:, 0]
    if len(labels) != n:
        raise GraphDataError(f"{files['node-label']} has {len(labels)} labels but {files['node-feat']} "
                             f"has {n} rows of features: labels and features must have the same length")
    known = np.isfinite(labels)
    if (labels[known] < 0).any() or (labels[known] != np.round(labels[known])).any():
        raise GraphDataError(f"{files['node-label']}: labels must be class ids 0..C-1 (or nan)")
    labels = np.where(known, labels, -1).astype(np.int64)
    writer.save("labels", labels, np.int64)
    owner = np.full(n, -1, dtype=np.int8)
    sizes = {}
    for k, s in enumerate(SPLITS):
        ids = np.concatenate([arr[:, 0] for _, arr in _blocks(files[s], 1, np.int64)] or
                             [np.zeros(0, np.int64)])
        bad = np.flatnonzero((ids < 0) | (ids >= n))
        if len(bad):
            raise GraphDataError(f"{files[s]}: line {int(bad[0]) + 1} has node id {int(ids[bad[0]])}, "
                                 f"outside [0, {n})")
        if (labels[ids] < 0).any():
            first = int(ids[labels[ids] < 0][0])
            raise GraphDataError(f"{files[s]} lists node {first}, which has no label in "
                                 f"{files['node-label']}")
        twice = ids[owner[ids] >= 0]
        if len(twice) or len(np.unique(ids)) != len(ids):
            raise GraphDataError(f"{files[s]} lists node {int(twice[0]) if len(twice) else int(ids[0])} "
                                 "that is already in a split (the splits must be disjoint)")
        owner[ids] = k
        writer.save(s, ids, np.int64)
        sizes[s] = len(ids)
    if not sizes["train"]:
        raise GraphDataError(f"{files['train']} lists no node")
    meta = {"source": str(root), "num_nodes": n, "input_edges": e, "nnz": nnz,
            "num_features": int(features.shape[1]), "num_classes": int(labels.max()) + 1,
            "splits": sizes, "files": {k: str(p) for k, p in files.items()}}
    return writer.finish(meta)
