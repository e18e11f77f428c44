"""The implicit GNN (IGNN, Gu et al. 2020) as a DEQ: injection, equilibrium cell and node head.

Nodes are rows. For a graph with ``N`` nodes and hidden size ``d``:

- input ``x = (features, adjacency)``: ``(N, F)`` sparse (or dense) features and the normalised
  adjacency ``A`` ``(N, N)`` (sparse COO or CSR, symmetric, non-negative);
- injection: ``U = A^h (dropout(X) @ Omega) + b``, shape ``(1, N, d)`` (``h = inject_hops``), and
  ``u = (U, A)`` with ``A`` as CSR: the adjacency travels inside ``u`` so one model serves any
  graph (its leading dimension is ``N``, never the batch size 1, so a solver's row selection
  leaves it alone);
- cell: ``f(Z, u) = phi(A Z W^T + U)`` on states ``(B, N, d)`` (``B = 1``: one graph per batch);
  this is IGNN's ``phi(W Z A + b(U))`` written with nodes as rows;
- head: node-wise logits ``(1, N, C)``.

Well-posedness. IGNN keeps ``lambda_pf(|W|) * lambda_pf(A) < 1`` by projecting ``W`` onto the
ball ``||W||_inf <= kappa / lambda_pf(A)``. The normalised adjacency has ``lambda_pf(A) = 1``, so
the cell holds a free matrix ``V`` and uses ``W = c(V)`` with ``||c(V)||_inf <= kappa < 1`` for
every ``V`` (a parametrisation: any optimiser loop, ``train_teacher`` included, keeps it). With a
non-expansive ``phi`` (ReLU, tanh) the map is then a contraction of rate at most ``kappa`` in a
weighted max-norm, and Picard iteration converges from any start.
``c`` is ``"scale"`` (divide each row of ``V`` by ``max(1, ||V_i||_1 / kappa)``: every entry keeps
a gradient) or ``"project"`` (IGNN's Euclidean projection of each row onto the l1 ball).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IGNNCell", "GraphInjection", "NodeHead", "constrain_inf_norm", "spmm"]


class _SymmetricSpMM(torch.autograd.Function):
    """``A @ H`` for a symmetric sparse ``A``; the backward reuses ``A`` as its own transpose
    (a CSR transpose-product is an order of magnitude slower on CPU)."""

    @staticmethod
    def forward(ctx: Any, adj: Tensor, h: Tensor) -> Tensor:
        ctx.adj = adj
        return adj @ h

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, _SymmetricSpMM.apply(ctx.adj, grad)


def spmm(adj: Tensor, h: Tensor) -> Tensor:
    """``adj @ h`` for a symmetric ``(N, N)`` adjacency (sparse or dense) and ``h`` ``(N, k)``."""
    if adj.layout == torch.strided:
        return adj @ h
    return _SymmetricSpMM.apply(adj, h)


def _project_rows_l1(v: Tensor, radius: float) -> Tensor:
    """Euclidean projection of each row of ``v`` onto ``{w: ||w||_1 <= radius}`` (Duchi et al.)."""
    a = v.abs()
    inside = a.sum(dim=1, keepdim=True) <= radius
    u = a.sort(dim=1, descending=True).values
    css = u.cumsum(dim=1) - radius
    j = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    cond = u - css / j > 0
    rho = cond.to(v.dtype).cumsum(dim=1).argmax(dim=1, keepdim=True)  # last True index
    theta = css.gather(1, rho) / (rho + 1).to(v.dtype)
    projected = v.sign() * (a - theta).clamp_min(0)
    return torch.where(inside, v, projected)


def constrain_inf_norm(v: Tensor, kappa: float, mode: str = "scale") -> Tensor:
    """A matrix ``W`` with ``||W||_inf = max_i sum_j |W_ij| <= kappa``, from a free ``v`` ``(d, d)``."""
    if mode == "scale":
        row = v.abs().sum(dim=1, keepdim=True)
        return v * (kappa / row.clamp_min(1e-12)).clamp(max=1.0)
    if mode == "project":
        return _project_rows_l1(v, kappa)
    raise ValueError(f"w_constraint={mode!r} is not valid; use 'scale' or 'project'")


def to_csr(t: Tensor) -> Tensor:
    """A sparse COO matrix as CSR (the fast layout for products on CPU); others unchanged."""
    if t.layout != torch.sparse_coo:
        return t
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return t.coalesce().to_sparse_csr()


def _sparse_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if not training or p == 0:
        return x
    if x.layout == torch.sparse_csr:
        values = F.dropout(x.values(), p, True)
        return torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), values, x.shape,
                                       check_invariants=False)
    if x.layout == torch.sparse_coo:
        x = x.coalesce()
        return torch.sparse_coo_tensor(x.indices(), F.dropout(x.values(), p, True), x.shape,
                                       check_invariants=False)
    return F.dropout(x, p, True)


class GraphInjection(nn.Module):
    """``x = (features (N, F), adjacency (N, N)) -> u = (U (1, N, d), adjacency as CSR)``.

    ``U = A^hops (dropout(X) @ Omega) + b``; ``X`` and ``A`` may be sparse (COO or CSR) or dense.
    Dropout applies in training mode while ``Omega`` is trainable (not when frozen).
    """

    def __init__(self, in_features: int, hidden: int, dropout: float = 0.5, hops: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        nn.init.xavier_uniform_(self.weight)
        self.dropout = dropout
        self.hops = hops

    def forward(self, x: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        if not isinstance(x, (tuple, list)) or len(x) != 2:
            raise TypeError("a graph input must be a pair (features (N, F), adjacency (N, N))")
        feats, adj = to_csr(x[0]), to_csr(x[1])
        if feats.dim() != 2 or feats.shape[0] != adj.shape[0] or adj.shape != (adj.shape[0], adj.shape[0]):
            raise ValueError(
                f"features {tuple(feats.shape)} and adjacency {tuple(adj.shape)} disagree on N"
            )
        # Dropout regularises Omega; a frozen injection (a C-DEQ student reusing the teacher's,
        # whose z* was recorded without dropout) only gets noise from it, so it is skipped.
        train = self.training and self.weight.requires_grad
        h = _sparse_dropout(feats, self.dropout, train) @ self.weight
        for _ in range(self.hops):
            h = spmm(adj, h)
        return (h + self.bias).unsqueeze(0), adj


class IGNNCell(nn.Module):
    """``f(Z, (U, A)) = phi(A Z W^T + U)`` with ``||W||_inf <= kappa`` (see the module docstring).

    States are ``(B, N, d)``; ``channels = d``, ``channel_dim = -1``.
    """

    channel_dim = -1

    def __init__(self, hidden: int, kappa: float = 0.9, constraint: str = "scale",
                 activation: str = "relu", init: str = "random") -> None:
        super().__init__()
        if not 0 < kappa < 1:
            raise ValueError(f"kappa={kappa} is not valid; it must lie in (0, 1) for a contraction")
        if init not in ("random", "identity"):
            raise ValueError(f"init={init!r} is not valid; use 'random' or 'identity'")
        if activation not in ("relu", "tanh"):
            raise ValueError(f"activation={activation!r} is not valid; use 'relu' or 'tanh'")
        constrain_inf_norm(torch.zeros(1, 1), kappa, constraint)  # validates the mode
        self.channels = hidden
        self.kappa = kappa
        self.constraint = constraint
        self.activation = activation
        self.weight_raw = nn.Parameter(torch.empty(hidden, hidden))
        bound = 1.0 / math.sqrt(hidden)
        nn.init.uniform_(self.weight_raw, -bound, bound)
        if init == "identity":  # W ~ kappa I: APPNP-like propagation from the start
            with torch.no_grad():
                noise = self.weight_raw / self.weight_raw.abs().sum(dim=1, keepdim=True)
                self.weight_raw.copy_(kappa * (0.9 * torch.eye(hidden) + 0.1 * noise))

    @property
    def weight(self) -> Tensor:
        """The constrained ``W`` ``(d, d)``, ``||W||_inf <= kappa``."""
        return constrain_inf_norm(self.weight_raw, self.kappa, self.constraint)

    def state_shape(self, u: tuple[Tensor, Tensor]) -> tuple[int, ...]:
        return tuple(u[0].shape)

    def forward(self, z: Tensor, u: tuple[Tensor, Tensor]) -> Tensor:
        inj, adj = u
        b, n, d = z.shape
        az = spmm(adj, z.transpose(0, 1).reshape(n, b * d)).reshape(n, b, d).transpose(0, 1)
        out = az @ self.weight.t() + inj
        return torch.relu(out) if self.activation == "relu" else torch.tanh(out)

    def extra_repr(self) -> str:
        return f"hidden={self.channels}, kappa={self.kappa}, constraint={self.constraint!r}, " \
               f"activation={self.activation!r}"


class NodeHead(nn.Module):
    """Node-wise classifier ``(B, N, d) -> (B, N, C)``: dropout, then a linear layer or a
    one-hidden-layer MLP (``hidden > 0``)."""

    def __init__(self, channels: int, num_classes: int, hidden: int = 0, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden > 0:
            layers += [nn.Linear(channels, hidden), nn.ReLU(), nn.Dropout(dropout)]
            channels = hidden
        layers.append(nn.Linear(channels, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
