"""Graph data: the :class:`Graph`, its batches, splits and perturbations (readers: :mod:`.readers`).

A :class:`Graph` holds one attributed graph with node labels and split masks:

- ``features``: ``(N, F)`` sparse COO float32 (raw values, e.g. binary bag-of-words),
- ``edge_index``: ``(2, E)`` int64, undirected (both directions stored), no self loops, no
  duplicates,
- ``labels``: ``(N,)`` int64, ``train_mask`` / ``val_mask`` / ``test_mask``: ``(N,)`` bool.

:func:`graph_batch` turns a graph into the ``(x, y)`` batch the graph tasks use:
``x = (features, adjacency)`` with row-normalised features ``(N, F)`` and the symmetrically
normalised adjacency with self loops ``D^-1/2 (A + I) D^-1/2`` ``(N, N)``, both sparse COO;
``y = (labels, mask)``.

Examples:
    >>> g = load_planetoid(data_dir() / "planetoid", "cora")  # doctest: +SKIP
    >>> g.num_nodes, g.num_features, g.num_classes
    (2708, 1433, 7)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Graph",
    "GraphDataError",
    "graph_batch",
    "normalized_adjacency",
    "normalized_features",
    "perturb_graph",
    "random_split",
]


class GraphDataError(ValueError):
    """A graph file or folder is missing or not in the expected format."""


# --- the graph ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Graph:
    """One attributed graph with labels and split masks (shapes in the module docstring)."""

    features: Tensor
    edge_index: Tensor
    labels: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor
    num_classes: int
    name: str = "graph"

    def __post_init__(self) -> None:
        n = self.num_nodes
        if n < 2:
            raise GraphDataError(f"graph {self.name!r} has {n} node(s); at least 2 are needed")
        if self.features.dim() != 2:
            raise GraphDataError(
                f"features of {self.name!r} must be (N, F), got {tuple(self.features.shape)}"
            )
        for key in ("labels", "train_mask", "val_mask", "test_mask"):
            value = getattr(self, key)
            if value.shape != (n,):
                raise GraphDataError(
                    f"{key} of graph {self.name!r} has shape {tuple(value.shape)}; expected ({n},)"
                )
        if self.edge_index.dim() != 2 or self.edge_index.shape[0] != 2:
            raise GraphDataError(f"edge_index must be (2, E), got {tuple(self.edge_index.shape)}")
        if self.edge_index.numel() and (self.edge_index.min() < 0 or self.edge_index.max() >= n):
            raise GraphDataError(f"edge_index of {self.name!r} refers to nodes outside [0, {n})")

    @property
    def num_nodes(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_edges(self) -> int:
        """Directed edge count (each undirected edge counts twice)."""
        return int(self.edge_index.shape[1])

    def subgraph(self, nodes: Tensor) -> Graph:
        """The subgraph induced by ``nodes`` (int64 ids or an ``(N,)`` bool mask), relabelled
        ``0..n-1`` in increasing id order; features, labels and masks follow the nodes."""
        n = self.num_nodes
        keep = nodes if nodes.dtype == torch.bool else mask_of(nodes, n)
        ids = keep.nonzero().squeeze(1)
        new_id = torch.full((n,), -1, dtype=torch.long)
        new_id[ids] = torch.arange(ids.numel())
        src, dst = self.edge_index
        both = keep[src] & keep[dst]
        edge_index = new_id[self.edge_index[:, both]]
        return Graph(
            features=self.features.index_select(0, ids).coalesce(),
            edge_index=edge_index,
            labels=self.labels[ids],
            train_mask=self.train_mask[ids],
            val_mask=self.val_mask[ids],
            test_mask=self.test_mask[ids],
            num_classes=self.num_classes,
            name=self.name,
        )


def mask_of(ids: Tensor, n: int) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ids.long()] = True
    return mask


def clean_edges(edge_index: Tensor, n: int) -> Tensor:
    """Symmetrise, drop self loops and duplicates; returns ``(2, E)`` sorted by (src, dst)."""
    edge_index = edge_index.long()
    src, dst = edge_index
    src, dst = torch.cat([src, dst]), torch.cat([dst, src])
    keep = src != dst
    key = torch.unique(src[keep] * n + dst[keep])
    return torch.stack([key // n, key % n])


def sparse_coo(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A coalesced ``(n, m)`` COO tensor; indices outside ``shape`` raise :class:`GraphDataError`."""
    try:
        out = torch.sparse_coo_tensor(torch.stack([rows.long(), cols.long()]), values.float(), shape,
                                      check_invariants=True)
    except RuntimeError as err:
        raise GraphDataError(f"sparse matrix indices do not fit its shape {shape}: {err}") from err
    return out.coalesce()


def _coo(indices: Tensor, values: Tensor, shape: Any) -> Tensor:
    """A coalesced COO tensor from indices known to be valid."""
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=False).coalesce()


# --- batches -----------------------------------------------------------------------------------
def normalized_adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
    """``D^-1/2 (A + I) D^-1/2`` as a coalesced ``(N, N)`` COO float32 tensor.

    ``edge_index`` must be undirected (both directions present), as :class:`Graph` stores it. The
    result is symmetric, its entries are non-negative and its Perron-Frobenius eigenvalue is 1.
    """
    loops = torch.arange(num_nodes)
    src = torch.cat([edge_index[0], loops])
    dst = torch.cat([edge_index[1], loops])
    deg = torch.bincount(src, minlength=num_nodes).float()
    inv_sqrt = deg.pow(-0.5)
    values = inv_sqrt[src] * inv_sqrt[dst]
    return _coo(torch.stack([src, dst]), values, (num_nodes, num_nodes))


def normalized_features(features: Tensor, normalize: bool = True) -> Tensor:
    """Features as coalesced COO float32, each row scaled to sum 1 when ``normalize`` (rows of
    zeros stay zero)."""
    features = features.coalesce().float()
    if normalize:
        rows = features.indices()[0]
        sums = torch.zeros(features.shape[0]).index_add_(0, rows, features.values())
        scale = torch.where(sums != 0, 1.0 / sums, torch.zeros_like(sums))
        features = _coo(features.indices(), features.values() * scale[rows], features.shape)
    return features


def graph_batch(graph: Graph, mask: Tensor, normalize_features: bool = True
                ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((features (N, F), adjacency (N, N)), (labels (N,), mask (N,)))``.

    Both matrices are coalesced sparse COO tensors (storable by :func:`cdeq.engine.io.flatten`); the
    model's injection turns them into CSR for fast products.
    """
    x = (normalized_features(graph.features, normalize_features),
         normalized_adjacency(graph.edge_index, graph.num_nodes))
    return x, (graph.labels, mask)


# --- splits and perturbations ------------------------------------------------------------------
def random_split(num_nodes: int, seed: int = 0, train_frac: float = 0.1, val_frac: float = 0.1
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded random ``(train, val, test)`` masks: ``train_frac`` / ``val_frac`` / the rest."""
    if not (train_frac > 0 and val_frac >= 0 and train_frac + val_frac < 1):
        raise GraphDataError(
            f"train_frac={train_frac} and val_frac={val_frac} must be > 0 and >= 0 with a sum below 1"
        )
    perm = torch.randperm(num_nodes, generator=torch.Generator().manual_seed(seed))
    n_train = max(1, round(train_frac * num_nodes))
    n_val = round(val_frac * num_nodes)
    masks = []
    for part in (perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]):
        masks.append(mask_of(part, num_nodes))
    return masks[0], masks[1], masks[2]


def perturb_graph(graph: Graph, generator: torch.Generator, node_keep: float = 0.9,
                  edge_drop: float = 0.1, feature_drop: float = 0.1) -> Graph:
    """A random variant: the subgraph on a ``node_keep`` fraction of the nodes, with each
    undirected edge dropped with probability ``edge_drop`` and each non-zero feature with
    probability ``feature_drop``."""
    g = graph
    if node_keep < 1:
        n_keep = max(2, round(node_keep * g.num_nodes))
        ids = torch.randperm(g.num_nodes, generator=generator)[:n_keep].sort().values
        g = g.subgraph(ids)
    edge_index = g.edge_index
    if edge_drop > 0 and edge_index.numel():
        src, dst = edge_index
        upper = edge_index[:, src < dst]
        keep = torch.rand(upper.shape[1], generator=generator) >= edge_drop
        upper = upper[:, keep]
        edge_index = torch.cat([upper, upper.flip(0)], dim=1)
    features = g.features.coalesce()
    if feature_drop > 0 and features._nnz():
        keep = torch.rand(features._nnz(), generator=generator) >= feature_drop
        features = _coo(features.indices()[:, keep], features.values()[keep], features.shape)
    return dataclasses.replace(g, features=features, edge_index=edge_index)
