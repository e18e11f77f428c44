"""Jacobian regularisation and stability diagnostics of a DEQ layer at a point."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.tree import Layout, leaves


def jacobian_frobenius(f_out: Any, z_in: Any, samples: int = 1,
                       create_graph: bool = True) -> Tensor:
    """Hutchinson estimate of ``|J|_F^2 / dim`` per batch, ``J = d f_out / d z_in``.

    ``f_out`` must have been computed from ``z_in`` (which requires grad). For a structured state
    (tuples, lists or dicts of tensors) ``J`` is the Jacobian of all output parts with respect to
    all input parts, and ``dim`` the output's total size. Returns a scalar; with ``create_graph``
    it can be added to a loss (the usual DEQ Jacobian penalty).
    """
    if isinstance(f_out, Tensor) and isinstance(z_in, Tensor):
        if not z_in.requires_grad:
            raise ValueError("z_in must require grad and f_out must be computed from it")
        total = f_out.new_zeros(())
        for _ in range(samples):
            v = torch.randn_like(f_out)
            (vjp,) = torch.autograd.grad(f_out, z_in, v, retain_graph=True, create_graph=create_graph)
            total = total + vjp.pow(2).sum() / f_out.numel()
        return total / samples
    outs, ins = leaves(f_out), leaves(z_in)
    if not all(t.requires_grad for t in ins):
        raise ValueError("every part of z_in must require grad and f_out must be computed from it")
    size = sum(t.numel() for t in outs)
    total = outs[0].new_zeros(())
    for _ in range(samples):
        vs = [torch.randn_like(t) for t in outs]
        vjps = torch.autograd.grad(outs, ins, vs, retain_graph=True, create_graph=create_graph,
                                   allow_unused=True)
        total = total + sum(g.pow(2).sum() for g in vjps if g is not None) / size
    return total / samples


def spectral_radius(f: Callable[[Any, Any], Any], z: Any, x: Any = None,
                    iters: int = 20) -> Tensor:
    """Power-method estimate of the spectral radius of ``J_f(z)`` per sample, shape ``(B,)``.

    Iterates ``v <- J^T v / |J^T v|`` with vector-Jacobian products; ``J^T`` has the spectrum
    of ``J``. Values near or above 1 mean the Picard iteration will not contract. A structured
    state is treated as one vector of all its parts.
    """
    if not isinstance(z, Tensor):
        layout = Layout.of(z)

        def packed(flat: Tensor, x: Any) -> Tensor:
            return layout.pack(f(layout.unpack(flat), x))

        return spectral_radius(packed, layout.pack(z), x, iters)
    z_in = z.detach().requires_grad_()
    with torch.enable_grad():
        out = f(z_in, x)
    batch = z.shape[0]
    v = torch.randn_like(z_in)
    v = v / v.reshape(batch, -1).norm(dim=1).reshape(batch, *[1] * (z.dim() - 1))
    norm = torch.zeros(batch, dtype=z.dtype, device=z.device)
    for _ in range(iters):
        (w,) = torch.autograd.grad(out, z_in, v, retain_graph=True)
        norm = w.reshape(batch, -1).norm(dim=1)
        v = w / norm.clamp_min(1e-30).reshape(batch, *[1] * (z.dim() - 1))
    return norm.detach()


def apply_weight_norm(module: nn.Module, kind: str = "weight") -> nn.Module:
    """Reparametrise every ``nn.Linear``/``nn.Conv*`` weight in ``module``.

    ``kind``: ``"weight"`` (weight normalisation, as MDEQ uses) or ``"spectral"`` (spectral
    normalisation: largest singular value scaled to 1, which bounds the Lipschitz constant).
    """
    from torch.nn.utils import parametrizations

    if kind not in ("weight", "spectral"):
        raise ValueError(f"kind={kind!r} is not valid; use 'weight' or 'spectral'")
    wrap = parametrizations.weight_norm if kind == "weight" else parametrizations.spectral_norm
    for child in list(module.modules()):
        if isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            wrap(child, name="weight")
    return module
