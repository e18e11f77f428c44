"""The IGNN fixed point on a whole :class:`~.store.GraphStore`, computed in node chunks, and the
distance from the sampled-subgraph fixed points to it.

The full graph's normalised adjacency ``D^-1/2 (A + I) D^-1/2`` is never built: each Picard step
``Z <- phi(A Z W^T + U)`` runs over blocks of ``chunk`` rows, building that block of ``A`` from the
store's CSR (memory: three ``(N, d)`` states and one block). The injection ``U = A^h (X Omega) + b``
is computed the same way. The IGNN cell is a contraction (``||W||_inf <= kappa < 1``), so the
iteration converges from zero.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...deq.model import DEQModel
from ...engine.tree import relative_error
from .store import GraphStore

__all__ = ["full_fixed_point", "full_rows", "subgraph_gap"]


def full_rows(store: GraphStore, a: int, b: int, inv_sqrt: np.ndarray) -> Tensor:
    """Rows ``a:b`` of ``D^-1/2 A D^-1/2`` (without the self loops) as a ``(b - a, N)`` sparse CSR."""
    ptr = np.asarray(store.indptr[a : b + 1])
    cols = np.asarray(store.indices[ptr[0] : ptr[-1]], dtype=np.int64)
    rows = np.repeat(np.arange(a, b), np.diff(ptr))
    values = (inv_sqrt[rows] * inv_sqrt[cols]).astype(np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(torch.from_numpy(ptr - ptr[0]), torch.from_numpy(cols),
                                       torch.from_numpy(values), (b - a, store.num_nodes),
                                       check_invariants=False)


def _propagate(store: GraphStore, h: Tensor, chunk: int, inv_sqrt: np.ndarray, out: Tensor) -> Tensor:
    """``out = D^-1/2 (A + I) D^-1/2 h`` for ``h`` ``(N, k)``, block by block."""
    self_w = torch.from_numpy((inv_sqrt**2).astype(np.float32))[:, None]
    for a in range(0, store.num_nodes, chunk):
        b = min(a + chunk, store.num_nodes)
        out[a:b] = full_rows(store, a, b, inv_sqrt) @ h + self_w[a:b] * h[a:b]
    return out


@torch.no_grad()
def full_fixed_point(model: DEQModel, store: GraphStore, chunk: int = 65536, tol: float = 1e-4,
                     max_iter: int = 200) -> tuple[Tensor, dict[str, Any]]:
    """``(Z* (N, d), info)``: the teacher's fixed point on the whole graph (full-degree
    normalisation), by Picard steps to relative residual ``tol``; ``info`` has ``iterations`` and
    ``residual``. ``model`` is an IGNN (:class:`~.model.GraphInjection`, :class:`~.model.IGNNCell`)."""
    inj, cell = model.injection, model.cell
    n = store.num_nodes
    inv_sqrt = 1.0 / np.sqrt(store.degrees().astype(np.float64) + 1.0)
    weight = cell.weight.detach()
    d = weight.shape[0]
    h = torch.empty(n, d)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        h[a:b] = torch.from_numpy(np.array(store.features[a:b])) @ inj.weight
    u = torch.empty(n, d)
    for _ in range(inj.hops):
        u = _propagate(store, h, chunk, inv_sqrt, u)
        h, u = u, h
    u = h + inj.bias
    z, az = torch.zeros(n, d), torch.empty(n, d)
    act = torch.relu if cell.activation == "relu" else torch.tanh
    residual, steps = float("inf"), 0
    while steps < max_iter and residual >= tol:
        _propagate(store, z, chunk, inv_sqrt, az)
        new = act(az @ weight.t() + u)
        residual = float(torch.linalg.vector_norm(new - z) / (torch.linalg.vector_norm(new) + 1e-12))
        z, steps = new, steps + 1
    return z, {"iterations": steps, "residual": residual, "tol": tol}


@torch.no_grad()
def subgraph_gap(model: DEQModel, z_full: Tensor, batches: Iterable[tuple[Any, Any, np.ndarray]],
                 solver: Any) -> dict[str, float]:
    """How far the sampled-subgraph fixed points are from the full graph's, on the seeds.

    Args:
        model: the teacher; z_full: its full-graph fixed point ``(N, d)``.
        batches: ``(x, y, nodes)``: a sampled batch and the store ids of its nodes (seeds first,
            ``y[1]`` marking them).
        solver: the solver for the subgraph fixed points (the evaluation's reference).

    Returns:
        ``accuracy_sampled`` and ``accuracy_full`` on the seeds, ``agreement`` (same predicted
        class), ``relative_error`` (mean over seeds of ``||z_sub - z_full|| / ||z_full||``) and
        ``seeds``.
    """
    model.eval()
    correct_s = correct_f = agree = count = 0
    err = 0.0
    for x, (labels, mask), nodes in batches:
        u = model.inject(x)
        z = solver.solve(model.cell, model.initial_state(u), u).z[0][mask]
        ref = z_full[torch.from_numpy(nodes[: int(mask.sum())])]
        pred_s = model.head(z[None])[0].argmax(-1)
        pred_f = model.head(ref[None])[0].argmax(-1)
        y = labels[mask]
        correct_s += int((pred_s == y).sum())
        correct_f += int((pred_f == y).sum())
        agree += int((pred_s == pred_f).sum())
        err += float(relative_error(z, ref).sum())
        count += len(y)
    count = max(count, 1)
    return {"accuracy_sampled": correct_s / count, "accuracy_full": correct_f / count,
            "agreement": agree / count, "relative_error": err / count, "seeds": count}
