"""A TorchDEQ user's DEQ through record -> distill -> plans -> predict, unchanged.

A cell written for ``torchdeq.get_deq`` is a plain ``f(z, x)``; ``cdeq.DEQModel`` takes it with the
model's encoder and decoder, sharing their weights. With torchdeq installed the teacher is trained
by torchdeq itself; without it, the same path runs with a parameter-free function as the cell.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cdeq

W = 0.6 * torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3)))[0]


class Cell(nn.Module):
    """``f(z, x) = tanh(A z + x)``, written as for TorchDEQ: no attributes cdeq needs."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.d = d
        self.lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(W)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def plain_cell(z, x):
    """The same layer as a plain function (fixed weights)."""
    return torch.tanh(z @ W.T + x)


def data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :4] - x[:, 4:]).argmax(-1)
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, n, 64)]


def train_with_torchdeq(enc, cell, dec, batches):
    from torchdeq import get_deq

    deq = get_deq(f_solver="anderson", f_max_iter=30, f_tol=1e-5)
    params = [*enc.parameters(), *cell.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        for x, y in batches:
            u = enc(x)
            z_out, _ = deq(lambda z, u=u: cell(z, u), torch.zeros(x.shape[0], 16))
            loss = F.cross_entropy(dec(z_out[-1]), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        x = batches[0][0]
        u = enc(x)
        z_out, _ = deq(lambda z: cell(z, u), torch.zeros(x.shape[0], 16))
    return dec(z_out[-1]).detach()


def distil_and_check(teacher, batches, tmp_path, check_save=True):
    flags = [p.requires_grad for p in teacher.parameters()]
    trajs = cdeq.record(teacher, batches, cdeq.RecordConfig.from_dict(
        {"solver": {"name": "anderson", "max_iter": 30, "tol": 1e-6}, "batch_size": 64}))
    student = cdeq.ConsistencyStudent(teacher)
    hist = cdeq.distill(student, trajs, cdeq.DistillConfig.from_dict({"epochs": 8, "optim": {"lr": 3e-3}}),
                        task_loss=F.cross_entropy)
    assert hist["loss"][-1] < hist["loss"][0]
    assert [p.requires_grad for p in teacher.parameters()] == flags
    pipe = cdeq.Pipeline(student).select_plans(batches, loss=F.cross_entropy, max_nfe=3)
    x = batches[0][0]
    with torch.no_grad():
        z_star = teacher.deq.solve(teacher.inject(x)).z
        z1 = pipe.student.predict(x, nfe=1)[1]
        z_trunc = cdeq.get_solver("picard", max_iter=1, tol=0).solve(
            teacher.cell, torch.zeros_like(z_star), teacher.inject(x)).z

    def err(z):
        return float(((z - z_star).norm(dim=1) / z_star.norm(dim=1)).mean())

    assert err(z1) < err(z_trunc)  # one student call lands nearer z* than one teacher step
    assert pipe(x, nfe=3).shape == (64, 4)
    if check_save:
        pipe.save_pretrained(tmp_path / "p")
        loaded = cdeq.Pipeline.from_pretrained(tmp_path / "p")
        assert torch.equal(loaded(x, nfe=3), pipe(x, nfe=3))
    return pipe


@pytest.mark.skipif(importlib.util.find_spec("torchdeq") is None, reason="torchdeq (bench extra) absent")
def test_a_torchdeq_trained_model_distils(tmp_path):
    torch.manual_seed(0)
    batches = data()
    enc, cell, dec = nn.Linear(8, 16), Cell(), nn.Linear(16, 4)
    torchdeq_logits = train_with_torchdeq(enc, cell, dec, batches)
    teacher = cdeq.DEQModel(enc, cell, dec, solver="anderson", max_iter=40, tol=1e-6).eval()
    assert teacher.cell is cell  # shared, not copied
    with torch.no_grad():
        assert torch.allclose(teacher(batches[0][0])[0], torchdeq_logits, atol=1e-3)
    distil_and_check(teacher, batches, tmp_path)


def test_a_plain_function_cell_distils(tmp_path):
    torch.manual_seed(0)
    batches = data()
    enc, dec = nn.Linear(8, 16), nn.Linear(16, 4)
    teacher = cdeq.DEQModel(enc, plain_cell, dec, solver="anderson", max_iter=40, tol=1e-6)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    for _ in range(3):
        for x, y in batches:
            loss = F.cross_entropy(teacher(x)[0], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    teacher.eval()
    pipe = distil_and_check(teacher, batches, tmp_path)
    assert pipe.student.cell.fn is plain_cell  # a function has no weights to copy


class PairCell(nn.Module):
    """TorchDEQ's multi-equilibrium form, ``deq(f, (a0, b0))``: a pair of states of unequal widths,
    written as one ``f((a, b), x)``; TorchDEQ calls it through ``lambda a, b: cell((a, b), u)``."""

    def __init__(self) -> None:
        super().__init__()
        self.aa, self.bb, self.ab = nn.Linear(16, 16), nn.Linear(6, 6), nn.Linear(16, 6)
        with torch.no_grad():
            for lin in (self.aa, self.bb, self.ab):
                lin.weight.mul_(0.8)

    def forward(self, z, x):
        a, b = z
        return torch.tanh(self.aa(a) + x), torch.tanh(self.bb(b) + self.ab(a))


class PairHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(22, 4)

    def forward(self, z):
        return self.fc(torch.cat(list(z), dim=1))


@pytest.mark.skipif(importlib.util.find_spec("torchdeq") is None, reason="torchdeq (bench extra) absent")
def test_a_torchdeq_multi_equilibrium_model_converts_and_distils(tmp_path):
    from torchdeq import get_deq

    torch.manual_seed(0)
    batches = data()
    enc, cell, dec = nn.Linear(8, 16), PairCell(), PairHead()
    deq = get_deq(f_solver="anderson", f_max_iter=40, f_tol=1e-6)
    opt = torch.optim.Adam([*enc.parameters(), *cell.parameters(), *dec.parameters()], lr=1e-2)

    def start(x):
        return torch.zeros(x.shape[0], 16), torch.zeros(x.shape[0], 6)

    for _ in range(3):  # trained by TorchDEQ itself
        for x, y in batches:
            u = enc(x)
            z_out, _ = deq(lambda a, b, u=u: cell((a, b), u), start(x))
            loss = F.cross_entropy(dec(z_out[-1]), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    teacher = cdeq.DEQModel(enc, cell, dec, solver="anderson", max_iter=60, tol=1e-7,
                            state_shape=((16,), (6,))).eval()
    x = batches[0][0]
    with torch.no_grad():
        u = enc(x)
        theirs = get_deq(f_solver="anderson", f_max_iter=100, f_tol=1e-8)(
            lambda a, b: cell((a, b), u), start(x))[0][-1]
        ours = teacher.deq.solve(u, teacher.initial_state(u)).z
        assert isinstance(ours, tuple) and len(ours) == 2
        for mine, other in zip(ours, theirs, strict=True):  # the same equilibrium, part by part
            assert torch.allclose(mine, other, atol=1e-5)
    trajs = cdeq.record(teacher, batches, cdeq.RecordConfig.from_dict(
        {"solver": {"name": "anderson", "max_iter": 30, "tol": 1e-6}, "batch_size": 64}))
    student = cdeq.ConsistencyStudent(teacher)
    cdeq.distill(student, trajs, cdeq.DistillConfig.from_dict({"epochs": 8, "optim": {"lr": 3e-3}}),
                 task_loss=F.cross_entropy)
    pipe = cdeq.Pipeline(student).select_plans(batches, loss=F.cross_entropy, max_nfe=3)
    with torch.no_grad():
        z1 = cdeq.get_solver("picard", max_iter=1, tol=0).solve(teacher.cell, teacher.initial_state(u), u).z
        err = cdeq.engine.tree.relative_error
        assert float(err(pipe.predict(x, nfe=1)[1], ours).mean()) < float(err(z1, ours).mean())
    pipe.save_pretrained(tmp_path / "pair")
    assert torch.equal(cdeq.Pipeline.from_pretrained(tmp_path / "pair")(x, nfe=3), pipe(x, nfe=3))
