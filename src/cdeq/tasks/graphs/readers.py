"""Graph readers: Planetoid pickles, Facebook Page-Page (MUSAE layout) and saved tensors.

The readers need no scipy and no torch_geometric: Planetoid's pickles are read by a restricted
unpickler that only builds numpy arrays, ``defaultdict``/``list`` and a stand-in for
``scipy.sparse.csr_matrix`` (anything else in the file is refused, so a foreign pickle cannot run
code). A saved ``torch_geometric.data.Data`` is read when torch_geometric is installed.

Examples:
    >>> g = load_planetoid(data_dir() / "planetoid", "cora")  # doctest: +SKIP
    >>> int(g.train_mask.sum()), int(g.val_mask.sum()), int(g.test_mask.sum())
    (140, 500, 1000)
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import Graph, GraphDataError, clean_edges, mask_of, random_split, sparse_coo

__all__ = ["load_facebook", "load_planetoid", "load_saved_graph"]


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise GraphDataError(f"{what}: file {str(path)!r} not found")
    return path


# --- Planetoid ---------------------------------------------------------------------------------
class _SparseMatrixStub:
    """Stands in for ``scipy.sparse.csr_matrix``/``csc_matrix`` while unpickling."""

    kind = "csr"

    def __setstate__(self, state: dict) -> None:
        self.state = state

    def to_torch(self) -> Tensor:
        st = self.state
        shape = tuple(st.get("_shape", st.get("shape", ())))
        if len(shape) != 2 or not all(k in st for k in ("data", "indices", "indptr")):
            raise GraphDataError("a pickled sparse matrix lacks data/indices/indptr/shape")
        indptr = torch.as_tensor(np.asarray(st["indptr"], dtype=np.int64))
        inner = torch.as_tensor(np.asarray(st["indices"], dtype=np.int64))
        data = torch.as_tensor(np.asarray(st["data"], dtype=np.float32))
        outer = torch.repeat_interleave(torch.arange(indptr.numel() - 1), indptr.diff())
        rows, cols = (outer, inner) if self.kind == "csr" else (inner, outer)
        return sparse_coo(rows, cols, data, (int(shape[0]), int(shape[1])))


class _CSCStub(_SparseMatrixStub):
    kind = "csc"


def _numpy_reconstruct() -> Any:
    return np.zeros(1).__reduce__()[0]


def _numpy_scalar() -> Any:
    return np.float64(1.0).__reduce__()[0]


class _PlanetoidUnpickler(pickle.Unpickler):
    """Builds only numpy arrays, plain containers and sparse-matrix stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        if name in ("csr_matrix", "csc_matrix") and module.startswith("scipy.sparse"):
            return _SparseMatrixStub if name == "csr_matrix" else _CSCStub
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return _numpy_reconstruct()
            if name == "scalar":
                return _numpy_scalar()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "collections" and name in ("defaultdict", "OrderedDict"):
            return getattr(collections, name)
        if module in ("__builtin__", "builtins") and name in ("list", "dict", "set", "tuple", "int"):
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a Planetoid file")


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _PlanetoidUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise GraphDataError(f"{str(path)!r} is not a readable Planetoid pickle: {err}") from err


def _planetoid_raw_dir(root: Path, name: str) -> Path:
    for cand in (root / name / "raw", root / name.capitalize() / "raw", root / name.lower() / "raw",
                 root / "raw", root):
        if (cand / f"ind.{name.lower()}.x").is_file():
            return cand
    raise GraphDataError(
        f"no Planetoid files for dataset {name!r} under {str(root)!r}: expected "
        f"ind.{name.lower()}.{{x,tx,allx,y,ty,ally,graph,test.index}} in {str(root)!r}, "
        f"its raw/ folder or {name}/raw/ (the layout torch_geometric's Planetoid uses)"
    )


def _as_features(obj: Any, path: str) -> Tensor:
    if isinstance(obj, _SparseMatrixStub):
        return obj.to_torch()
    if isinstance(obj, np.ndarray) and obj.ndim == 2:
        return torch.as_tensor(obj, dtype=torch.float32).to_sparse().coalesce()
    raise GraphDataError(
        f"{path}: expected a sparse matrix or 2-D array of features, got {type(obj).__name__}"
    )


def _as_labels(obj: Any, path: str) -> np.ndarray:
    if isinstance(obj, _SparseMatrixStub):
        obj = obj.to_torch().to_dense().numpy()
    arr = np.asarray(obj)
    if arr.ndim != 2:
        raise GraphDataError(f"{path}: expected one-hot labels (n, C), got shape {arr.shape}")
    return arr


def load_planetoid(root: str | Path, name: str) -> Graph:
    """Read a Planetoid dataset (``ind.<name>.*`` files) with its public split.

    Nodes are ordered as torch_geometric orders them; the split is the first ``len(y)`` nodes
    for training, the next 500 for validation and ``test.index`` for test. Test ids missing from
    the file (Citeseer's isolated nodes) get zero features and label 0, as in torch_geometric.
    """
    root = Path(root)
    if not root.exists():
        raise GraphDataError(f"Planetoid folder {str(root)!r} does not exist")
    raw = _planetoid_raw_dir(root, name)
    prefix = f"ind.{name.lower()}"
    objs = {}
    for key in ("x", "tx", "allx", "y", "ty", "ally", "graph"):
        objs[key] = _unpickle(_require_file(raw / f"{prefix}.{key}", f"Planetoid {name}"))
    index_path = _require_file(raw / f"{prefix}.test.index", f"Planetoid {name}")
    try:
        test_index = torch.tensor([int(line) for line in index_path.read_text().split()], dtype=torch.long)
    except ValueError as err:
        raise GraphDataError(f"{str(index_path)!r} must hold one integer per line: {err}") from err

    tx = _as_features(objs["tx"], f"{prefix}.tx")
    allx = _as_features(objs["allx"], f"{prefix}.allx")
    ty = _as_labels(objs["ty"], f"{prefix}.ty")
    ally = _as_labels(objs["ally"], f"{prefix}.ally")
    n_train = len(_as_labels(objs["y"], f"{prefix}.y"))
    if tx.shape[1] != allx.shape[1] or len(ty) != tx.shape[0] or len(ally) != allx.shape[0]:
        raise GraphDataError(f"Planetoid {name}: x/tx/allx/y/ty/ally sizes do not agree")
    sorted_test = test_index.sort().values
    lo, hi = int(sorted_test[0]), int(sorted_test[-1])
    if hi - lo + 1 > tx.shape[0]:  # Citeseer: isolated test nodes are missing from tx/ty
        slot = sorted_test - lo
        txi = tx.indices()
        tx = sparse_coo(slot[txi[0]], txi[1], tx.values(), (hi - lo + 1, tx.shape[1]))
        ty_full = np.zeros((hi - lo + 1, ty.shape[1]), dtype=ty.dtype)
        ty_full[slot.numpy()] = ty
        ty = ty_full
    n = allx.shape[0] + tx.shape[0]
    txi = tx.indices()
    rows = torch.cat([allx.indices()[0], txi[0] + allx.shape[0]])
    cols = torch.cat([allx.indices()[1], txi[1]])
    values = torch.cat([allx.values(), tx.values()])
    labels = torch.as_tensor(np.vstack([ally, ty]).argmax(1), dtype=torch.long)
    # torch_geometric's reordering: x[test_index] = x[sorted_test_index]
    perm = torch.arange(n)
    perm[test_index] = sorted_test
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n)
    features = sparse_coo(inverse[rows], cols, values, (n, tx.shape[1]))
    labels = labels[perm]

    graph = objs["graph"]
    if not isinstance(graph, dict):
        raise GraphDataError(f"{prefix}.graph must be a dict of adjacency lists, got {type(graph).__name__}")
    src = [int(k) for k, nbrs in graph.items() for _ in nbrs]
    dst = [int(v) for nbrs in graph.values() for v in nbrs]
    edges = torch.tensor([src, dst], dtype=torch.long).reshape(2, -1)
    if edges.numel() and int(edges.max()) >= n:
        raise GraphDataError(f"{prefix}.graph refers to node {int(edges.max())} but there are {n} nodes")
    val_ids = torch.arange(n_train, min(n_train + 500, n))
    return Graph(
        features=features,
        edge_index=clean_edges(edges, n),
        labels=labels,
        train_mask=mask_of(torch.arange(n_train), n),
        val_mask=mask_of(val_ids, n),
        test_mask=mask_of(sorted_test, n),
        num_classes=int(labels.max()) + 1,
        name=name.lower(),
    )


# --- Facebook Page-Page (MUSAE layout) ---------------------------------------------------------
def load_facebook(folder: str | Path, seed: int = 0, train_frac: float = 0.1, val_frac: float = 0.1) -> Graph:
    """Read Facebook Page-Page from ``edges.csv`` (``id_1,id_2``), ``features.json``
    (``{"node": [feature ids]}``) and ``new_target.csv`` (``id,target``), with a seeded random
    ``train_frac`` / ``val_frac`` / rest split. Any MUSAE-layout folder works the same way."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GraphDataError(f"Facebook folder {str(folder)!r} does not exist")
    edges_path = _require_file(folder / "edges.csv", "Facebook Page-Page")
    feats_path = _require_file(folder / "features.json", "Facebook Page-Page")
    target_path = _require_file(folder / "new_target.csv", "Facebook Page-Page")
    try:
        targets = np.loadtxt(target_path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
        edges = np.loadtxt(edges_path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise GraphDataError(f"Facebook csv files must hold integer columns after a header: {err}") from err
    if targets.shape[1] != 2 or edges.shape[1] != 2:
        raise GraphDataError("new_target.csv must have columns id,target and edges.csv id_1,id_2")
    n = int(targets[:, 0].max()) + 1
    labels = torch.full((n,), -1, dtype=torch.long)
    labels[torch.as_tensor(targets[:, 0])] = torch.as_tensor(targets[:, 1])
    if (labels < 0).any():
        raise GraphDataError(f"new_target.csv does not give a label to every node id in [0, {n})")
    try:
        feats = json.loads(feats_path.read_text())
    except json.JSONDecodeError as err:
        raise GraphDataError(f"{str(feats_path)!r} is not valid JSON: {err}") from err
    if not isinstance(feats, dict):
        raise GraphDataError(f"{str(feats_path)!r} must map node ids to lists of feature ids")
    rows = [int(k) for k, v in feats.items() for _ in v]
    cols = [int(c) for v in feats.values() for c in v]
    if rows and max(rows) >= n:
        raise GraphDataError(f"features.json has node {max(rows)} but labels cover {n} nodes")
    rows_t, cols_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    num_features = int(cols_t.max()) + 1 if cols else 1
    features = sparse_coo(rows_t, cols_t, torch.ones(len(rows)), (n, num_features))
    edge_index = torch.as_tensor(edges.T.copy())
    if edge_index.numel() and (int(edge_index.max()) >= n or int(edge_index.min()) < 0):
        raise GraphDataError(f"edges.csv refers to nodes outside [0, {n})")
    train, val, test = random_split(n, seed, train_frac, val_frac)
    return Graph(features=features, edge_index=clean_edges(edge_index, n), labels=labels,
                 train_mask=train, val_mask=val, test_mask=test,
                 num_classes=int(labels.max()) + 1, name=folder.name or "facebook")


# --- a saved graph (torch.save of a dict, or a torch_geometric Data) ---------------------------
def load_saved_graph(path: str | Path, seed: int = 0, train_frac: float = 0.1,
                     val_frac: float = 0.1) -> Graph:
    """Read a graph saved with ``torch.save``: a dict or a ``torch_geometric.data.Data`` with
    ``x`` ``(N, F)`` (dense or sparse), ``edge_index`` ``(2, E)``, ``y`` ``(N,)`` and optionally
    ``train_mask``/``val_mask``/``test_mask`` (a seeded random split otherwise). Loaded with
    ``weights_only=True``; a ``Data`` object needs torch_geometric installed."""
    path = Path(path)
    _require_file(path, "saved graph")
    # torch_geometric registers its Data classes as safe globals for weights_only loading
    with contextlib.suppress(ImportError):
        import torch_geometric  # noqa: F401
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here is a format problem for the user
        raise GraphDataError(
            f"could not read {str(path)!r} as a saved graph ({type(err).__name__}: {err}). Save a dict "
            "of tensors (x, edge_index, y[, train_mask, val_mask, test_mask]), or install "
            "torch_geometric to read a Data object"
        ) from err
    if isinstance(obj, (tuple, list)) and obj and not isinstance(obj[0], Tensor):
        obj = obj[0]  # InMemoryDataset-style (data, slices)
    get = obj.get if isinstance(obj, dict) else (lambda key, default=None: getattr(obj, key, default))
    missing = [k for k in ("x", "edge_index", "y") if get(k) is None]
    if missing:
        raise GraphDataError(f"saved graph {str(path)!r} lacks {missing}; it needs x, edge_index and y")
    x, edge_index, y = get("x"), get("edge_index"), get("y")
    if not all(isinstance(t, Tensor) for t in (x, edge_index, y)):
        raise GraphDataError(f"x, edge_index and y in {str(path)!r} must be tensors")
    features = (x.coalesce() if x.layout == torch.sparse_coo else x.to_dense().to_sparse()).float().coalesce()
    y = y.long().reshape(-1)
    n = y.numel()
    masks = [get(k) for k in ("train_mask", "val_mask", "test_mask")]
    if all(isinstance(m, Tensor) for m in masks):
        masks = [m.bool().reshape(-1) if m.dim() == 1 else m.bool()[:, 0] for m in masks]
    else:
        masks = list(random_split(n, seed, train_frac, val_frac))
    return Graph(features=features, edge_index=clean_edges(edge_index, n), labels=y,
                 train_mask=masks[0], val_mask=masks[1], test_mask=masks[2],
                 num_classes=int(y.max()) + 1, name=path.stem)
