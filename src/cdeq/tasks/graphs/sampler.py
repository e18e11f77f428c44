"""Sampled subgraphs of a :class:`~.store.GraphStore`: a CSR neighbour sampler and the batches an
IGNN trains and predicts on.

A batch starts from ``seeds`` (the nodes whose labels it scores). Each hop ``h`` draws up to
``fanouts[h]`` neighbours of every node the previous hop added (all of them when it has fewer; the
draws are with replacement, repeats merged), as GraphSAGE's sampler does. The batch's graph is the
subgraph *induced* by every node reached: all edges among them, not only the sampled ones, so the
implicit layer runs on as much of the neighbourhood as the batch holds.

The adjacency is normalised either with the full graph's degrees (``norm="full"``: the batch's
block of the full ``D^-1/2 (A + I) D^-1/2``, so the subgraph's fixed point is the full graph's with
the states outside the batch set to zero) or with the subgraph's own (``norm="sub"``: the batch is a
graph in its own right). Only the reached nodes' feature rows are read from the store.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .store import GraphStore

__all__ = ["NeighbourSampler", "SubgraphBatch"]

SubgraphBatch = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``((features (n, F), adjacency (n, n) sparse COO), (labels (n,), mask (n,) bool))``; the
``mask`` marks the seeds (the first nodes)."""


def _gather_rows(indptr: np.ndarray, indices: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(row position in nodes, neighbour id)`` of every CSR entry of ``nodes``."""
    starts, ends = indptr[nodes], indptr[nodes + 1]
    lens = ends - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    cols = np.asarray(indices[np.repeat(starts, lens) + offsets], dtype=np.int64)
    return np.repeat(np.arange(len(nodes), dtype=np.int64), lens), cols


class NeighbourSampler:
    """Neighbour sampling and induced subgraphs on a store.

    Args:
        store: the graph.
        fanouts: neighbours drawn per node at each hop (``()``: the seeds alone).
        norm: ``"sub"`` or ``"full"`` (module docstring).
    """

    def __init__(self, store: GraphStore, fanouts: tuple[int, ...], norm: str = "sub") -> None:
        self.store, self.fanouts, self.norm = store, tuple(fanouts), norm
        self.indptr = np.asarray(store.indptr)
        self.degree = np.diff(self.indptr)
        self._slot = np.full(store.num_nodes, -1, dtype=np.int64)  # node -> position, reset after use

    def sample_nodes(self, seeds: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The reached nodes ``(n,)`` int64: the seeds first (in order), then each hop's new nodes."""
        seeds = np.asarray(seeds, dtype=np.int64)
        order = [seeds]
        self._slot[seeds] = 0
        frontier = seeds
        for fanout in self.fanouts:
            if not len(frontier) or fanout <= 0:
                break
            deg = self.degree[frontier]
            few = deg <= fanout
            _, all_nbrs = _gather_rows(self.indptr, self.store.indices, frontier[few])
            many = frontier[~few]
            draws = (rng.random((len(many), fanout)) * deg[~few, None]).astype(np.int64)
            picked = np.asarray(self.store.indices[(self.indptr[many, None] + draws).ravel()], dtype=np.int64)
            cand = np.unique(np.concatenate([all_nbrs, picked]))
            new = cand[self._slot[cand] < 0]
            self._slot[new] = 0
            order.append(new)
            frontier = new
        nodes = np.concatenate(order)
        self._slot[nodes] = -1
        return nodes

    def adjacency(self, nodes: np.ndarray) -> Tensor:
        """The normalised adjacency with self loops of the subgraph induced by ``nodes``:
        ``(n, n)`` coalesced sparse COO float32."""
        n = len(nodes)
        self._slot[nodes] = np.arange(n)
        rows, cols = _gather_rows(self.indptr, self.store.indices, nodes)
        local = self._slot[cols]
        self._slot[nodes] = -1
        keep = local >= 0
        rows, cols = rows[keep], local[keep]
        loops = np.arange(n, dtype=np.int64)
        rows, cols = np.concatenate([rows, loops]), np.concatenate([cols, loops])
        if self.norm == "full":
            deg = self.degree[nodes].astype(np.float64) + 1.0
        else:
            deg = np.bincount(rows, minlength=n).astype(np.float64)
        inv = 1.0 / np.sqrt(deg)
        values = (inv[rows] * inv[cols]).astype(np.float32)
        index = torch.from_numpy(np.stack([rows, cols]))
        return torch.sparse_coo_tensor(index, torch.from_numpy(values), (n, n),
                                       check_invariants=False).coalesce()

    def batch(self, seeds: np.ndarray, rng: np.random.Generator) -> SubgraphBatch:
        """The batch of ``seeds``: the sampled subgraph's features, adjacency, labels and the seed
        mask (module docstring)."""
        return self.build(self.sample_nodes(seeds, rng), len(seeds))

    def build(self, nodes: np.ndarray, seeds: int) -> SubgraphBatch:
        """The batch of the subgraph induced by ``nodes`` whose first ``seeds`` are the seeds."""
        order = np.argsort(nodes)  # read the store in increasing order (sequential pages)
        feats = np.empty((len(nodes), self.store.num_features), dtype=np.float32)
        feats[order] = self.store.features[nodes[order]]
        labels = torch.from_numpy(np.asarray(self.store.labels[nodes], dtype=np.int64))
        mask = torch.zeros(len(nodes), dtype=torch.bool)
        mask[:seeds] = True
        return (torch.from_numpy(feats), self.adjacency(nodes)), (labels, mask)
