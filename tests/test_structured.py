"""Structured states: a DEQ whose state (and injection) is a tuple, list or dict of tensors.

The solvers iterate such a state as one vector of all its parts, so a structured solve must equal,
bit for bit, the solve of the same map written on the concatenated vector; gradients through the
equilibrium are checked against finite differences; recording stores and restores every part.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import cdeq
from cdeq.consistency.trajectory import RecordConfig, TrajectoryStore, record
from cdeq.deq import DEQ, jacobian_frobenius, spectral_radius
from cdeq.deq.layer import SolverSpec
from cdeq.engine.io import CorruptFileError
from cdeq.engine.tree import Layout, relative_error
from cdeq.solvers import get_solver

D64 = torch.float64


class TwoPartCell(nn.Module):
    """``(a (B, 3), b (B, 2, 4)) -> same``: two resolutions of unequal shapes that read each other."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = D64) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.aa = nn.Parameter(0.3 * torch.randn(3, 3, generator=gen, dtype=dtype))
        self.bb = nn.Parameter(0.3 * torch.randn(4, 4, generator=gen, dtype=dtype))
        self.ba = nn.Parameter(0.3 * torch.randn(8, 3, generator=gen, dtype=dtype))
        self.ab = nn.Parameter(0.3 * torch.randn(3, 8, generator=gen, dtype=dtype))

    def forward(self, z, u):
        a, b = z
        a_new = torch.tanh(a @ self.aa + b.flatten(1) @ self.ba + u[0])
        b_new = torch.tanh(b @ self.bb + (a @ self.ab).reshape(b.shape) + u[1])
        return a_new, b_new


def inputs(batch: int = 5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, generator=gen, dtype=D64),
            torch.randn(batch, 2, 4, generator=gen, dtype=D64))


def packed_map(cell: nn.Module, layout: Layout):
    """The same map on the concatenated ``(B, 3 + 8)`` vector."""
    return lambda z, u: layout.pack(cell(layout.unpack(z), u))


# --- solvers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_a_structured_solve_equals_the_solve_of_the_concatenated_vector(name):
    cell, u = TwoPartCell(), inputs()
    z0 = (torch.zeros(5, 3, dtype=D64), torch.zeros(5, 2, 4, dtype=D64))
    layout = Layout.of(z0)
    solver = get_solver(name, tol=1e-9, max_iter=60)
    res = solver.solve(cell, z0, u, record="all")
    flat = solver.solve(packed_map(cell, layout), layout.pack(z0), u, record="all")
    assert isinstance(res.z, tuple) and res.z[1].shape == (5, 2, 4)
    assert torch.equal(layout.pack(res.z), flat.z)
    for field in ("nfe", "residual", "converged", "trace"):
        assert torch.equal(getattr(res, field), getattr(flat, field))
    assert bool(res.converged.all())
    fz = cell(res.z, u)  # a fixed point of every part
    assert float(relative_error(fz, res.z).max()) < 1e-8
    # the trajectory keeps the structure: (L, B, ...) per part, index 0 the start
    assert res.trajectory[0].shape == (61, 5, 3) and res.trajectory[1].shape == (61, 5, 2, 4)
    assert torch.equal(layout.pack(tuple(t[7] for t in res.trajectory)), flat.trajectory[7])
    assert torch.equal(res.trajectory[1][0], z0[1])


def test_samples_stop_on_their_own_residual_over_all_parts():
    cell, u = TwoPartCell(), inputs()
    u = (u[0] * torch.tensor([0.0, 1, 3, 1, 0], dtype=D64)[:, None], u[1])
    res = get_solver("picard", tol=1e-8, max_iter=80).solve(
        cell, (torch.zeros(5, 3, dtype=D64), torch.zeros(5, 2, 4, dtype=D64)), u)
    assert len(set(res.nfe.tolist())) > 1  # per-sample stopping
    assert bool(res.converged.all())


def test_dict_and_list_states_keep_their_structure_and_dtypes():
    def f(z, x):
        return {"p": [torch.tanh(0.5 * z["p"][0] + x)], "q": 0.5 * z["q"] + 1}

    z0 = {"p": [torch.zeros(3, 2, dtype=torch.float32)], "q": torch.zeros(3, 4, 1, dtype=D64)}
    res = get_solver("anderson", tol=1e-10, max_iter=50).solve(f, z0, torch.ones(3, 2))
    assert set(res.z) == {"p", "q"} and isinstance(res.z["p"], list)
    assert res.z["p"][0].dtype == torch.float32 and res.z["q"].dtype == D64
    assert torch.allclose(res.z["q"], torch.full((3, 4, 1), 2.0, dtype=D64))


@pytest.mark.parametrize("bad, error, match", [
    (lambda z: (z[0], z[1][:, :1]), ValueError, r"part z\[1\] of shape \(5, 1, 4\).*has shape \(5, 2, 4\)"),
    (lambda z: [z[0], z[1]], ValueError, "structure it was given"),
    (lambda z: (z[0],), ValueError, "structure it was given"),
    (lambda z: (z[0].float(), z[1]), ValueError, r"part z\[0\] as torch.float32.*is torch.float64"),
    (lambda z: (z[0], None), TypeError, r"a NoneType as the part z\[1\]"),
])
def test_a_map_returning_another_structure_shape_or_dtype_names_the_part(bad, error, match):
    z0 = (torch.zeros(5, 3, dtype=D64), torch.zeros(5, 2, 4, dtype=D64))
    with pytest.raises(error, match=match):
        get_solver("anderson").solve(lambda z, u: bad(z), z0)


def test_parts_of_different_batch_sizes_are_refused():
    with pytest.raises(ValueError, match="share their leading"):
        get_solver("picard").solve(lambda z, u: z, (torch.zeros(2, 3), torch.zeros(3, 3)))


# --- backward --------------------------------------------------------------------------------------
def _loss(deq: DEQ, u, w):
    a, b = deq(u)[0]
    return (a * w[0]).sum() + (b.pow(2) * w[1]).sum()


def test_implicit_gradients_match_finite_differences_on_two_parts_of_unequal_shapes():
    cell, u = TwoPartCell(seed=3), inputs(batch=3, seed=4)
    u = tuple(t.clone().requires_grad_() for t in u)
    w = inputs(batch=3, seed=5)
    deq = DEQ(cell, solver={"name": "anderson", "tol": 1e-12, "max_iter": 200},
              backward={"name": "implicit", "tol": 1e-12, "max_iter": 200}).train()
    grads = torch.autograd.grad(_loss(deq, u, w), [u[0], u[1], cell.ab, cell.bb])
    eps = 1e-6
    for got, tensor in zip(grads, [u[0], u[1], cell.ab, cell.bb], strict=True):
        for idx in [(0,) * tensor.dim(), tuple(s - 1 for s in tensor.shape)]:
            with torch.no_grad():
                old = float(tensor[idx])
                tensor[idx] = old + eps
                up = float(_loss(deq, u, w))
                tensor[idx] = old - eps
                down = float(_loss(deq, u, w))
                tensor[idx] = old
            assert abs(float(got[idx]) - (up - down) / (2 * eps)) < 1e-6


@pytest.mark.parametrize("backward", ["implicit", "phantom", "jacobian_free"])
def test_every_backward_gives_the_gradient_of_the_concatenated_vector(backward):
    cell, u = TwoPartCell(seed=6), inputs(batch=4, seed=7)
    layout = Layout.of(u)
    w = inputs(batch=4, seed=8)
    spec = {"name": "anderson", "tol": 1e-12, "max_iter": 100}
    deq = DEQ(cell, solver=spec, backward=backward).train()
    grads = torch.autograd.grad(_loss(deq, u, w), [cell.ab, cell.ba])
    flat = DEQ(packed_map(cell, layout), solver=spec, backward=backward).train()
    z = layout.unpack(flat(u, z0=layout.pack(cdeq.engine.tree.zeros_like(u)))[0])
    ref = torch.autograd.grad((z[0] * w[0]).sum() + (z[1].pow(2) * w[1]).sum(), [cell.ab, cell.ba])
    for g, r in zip(grads, ref, strict=True):
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12)


def test_jacobian_regulariser_and_spectral_radius_treat_the_parts_as_one_vector():
    cell, u = TwoPartCell(seed=9), inputs(batch=2, seed=10)
    layout = Layout.of(u)
    z = get_solver("anderson", tol=1e-10).solve(cell, cdeq.engine.tree.zeros_like(u), u).z
    flat = layout.pack(z)
    jac = torch.autograd.functional.jacobian(lambda v: packed_map(cell, layout)(v, u), flat)  # (B, n, B, n)
    exact = jac.pow(2).sum() / flat.numel()
    z_in = tuple(t.detach().requires_grad_() for t in z)
    torch.manual_seed(0)
    got = jacobian_frobenius(cell(z_in, u), z_in, samples=4000, create_graph=False)
    assert abs(float(got) / float(exact) - 1) < 0.05  # Hutchinson's estimate of |J|_F^2 / dim
    torch.manual_seed(1)
    rho = spectral_radius(cell, z, u, iters=60)
    per_sample = torch.stack([torch.linalg.eigvals(jac[i, :, i]).abs().max() for i in range(2)])
    assert torch.allclose(rho, per_sample, rtol=1e-3)


# --- initial state -------------------------------------------------------------------------------
def test_initial_state_zeros_like_the_injection_or_shaped_per_part():
    cell, u = TwoPartCell(), inputs(batch=2)
    model = cdeq.DEQModel(nn.Identity(), cell, lambda z: z[0])
    z0 = model.initial_state(u)
    assert isinstance(z0, tuple) and z0[1].shape == (2, 2, 4) and not z0[1].any()
    shaped = cdeq.DEQModel(nn.Identity(), cell, lambda z: z[0], state_shape=((3,), (2, 4)))
    assert [t.shape for t in shaped.initial_state(u)] == [(2, 3), (2, 2, 4)]
    assert shaped.state_layout() == ((3, 4), (-1, -1))  # channels read off each part

    class Declared(TwoPartCell):
        def state_shape(self, u):
            return {"a": (u[0].shape[0], 3)}

    assert DEQ(Declared()).initial_state(u)["a"].shape == (2, 3)
    with pytest.raises(ValueError, match="state_shape"):
        cdeq.DEQModel(nn.Identity(), cell, lambda z: z[0], state_shape=((3,), "wide"))


# --- recording ---------------------------------------------------------------------------------------
def _teacher() -> cdeq.DEQModel:
    return cdeq.DEQModel(nn.Identity(), TwoPartCell(dtype=torch.float32), lambda z: z[0]).eval()


def _batches():
    gen = torch.Generator().manual_seed(2)
    return [((torch.randn(4, 3, generator=gen), torch.randn(4, 2, 4, generator=gen)),
             torch.zeros(4, dtype=torch.long)) for _ in range(3)]


def test_recording_stores_every_part_and_the_manifest_names_them(tmp_path):
    config = RecordConfig(solver=SolverSpec(name="anderson", max_iter=20, tol=1e-6), indices=(0, 1, 3))
    store = record(_teacher(), _batches(), config, store=TrajectoryStore(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["state"] == [
        {"name": "[0]", "shape": [3], "dtype": "float32", "stored": "float32"},
        {"name": "[1]", "shape": [2, 4], "dtype": "float32", "stored": "float32"}]
    batch = store[1]
    memory = record(_teacher(), _batches(), config)[1]
    assert isinstance(batch.z_star, tuple) and batch.iterates[1].shape == (4, 3, 2, 4)
    for stored, kept in zip(batch.iterates + batch.z_star, memory.iterates + memory.z_star, strict=True):
        assert torch.equal(stored, kept)
    # checksummed: a flipped byte is found on reading
    path = store.shard_path(0)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        store.read(0)


def test_a_resumed_recording_keeps_the_shards_it_has(tmp_path):
    config = RecordConfig(solver=SolverSpec(name="anderson", max_iter=20, tol=1e-6), dtype="bfloat16")
    store = TrajectoryStore(tmp_path)
    record(_teacher(), _batches()[:2], config, store=store)
    before = store.shard_path(1).stat().st_mtime_ns
    record(_teacher(), _batches(), config, store=store)
    assert store.shard_path(1).stat().st_mtime_ns == before and len(store) == 3
    assert json.loads((tmp_path / "manifest.json").read_text())["state"][1]["stored"] == "bfloat16"
    assert store[2].z_star[1].dtype == torch.float32  # read back as float32 by default
