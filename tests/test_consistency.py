"""The consistency student: boundary condition, schedule, distillation beating the truncated teacher."""

import pytest
import torch
from torch import nn

from cdeq import ConfigError, get_solver
from cdeq.consistency import (
    ConsistencyStudent,
    DistillConfig,
    PlanSearchConfig,
    RecordConfig,
    ScheduleConfig,
    TimeSchedule,
    TrajectoryStore,
    distill,
    record,
    relative_distance,
    select_plans,
)
from cdeq.deq import DEQModel
from cdeq.io import CorruptFileError


class MLPCell(nn.Module):
    """``z -> tanh(W z + u)`` with ``|W|_2 = 0.9``: slow enough that 1-2 Picard steps fall short."""

    channels = 16
    channel_dim = -1

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(d, d))
            self.lin.weight.copy_(0.9 * q)

    def state_shape(self, u):
        return tuple(u.shape)

    def forward(self, z, u):
        return torch.tanh(self.lin(z) + u)


def tiny_problem(n=512, d=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    torch.manual_seed(seed)
    model = DEQModel(nn.Linear(8, d), MLPCell(d), nn.Linear(d, classes), solver="anderson",
                     max_iter=60, tol=1e-6)
    with torch.no_grad():
        z = model.deq.solve(model.inject(x)).z
        y = model.head(z).argmax(-1)  # labels the converged teacher gets right by construction
    return model, x, y


@pytest.mark.parametrize("scaling", ["linear", "edm"])
def test_boundary_condition_is_exact(scaling):
    torch.manual_seed(0)
    model, x, _ = tiny_problem(n=8)
    student = ConsistencyStudent(model, TimeSchedule(ScheduleConfig(scaling=scaling)))
    with torch.no_grad():  # perturb every weight so the identity is not an accident of init
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    z = torch.randn(8, 16)
    u = student.inject(x)
    out = student.F(z, torch.full((8,), student.schedule.T), u)
    assert torch.equal(out, z)
    # away from T the student does move the state
    assert not torch.allclose(student.F(z, torch.full((8,), 1.0), u), z)


def test_schedule_times():
    s = TimeSchedule(ScheduleConfig())
    t = s.index_time(torch.arange(0, 31), 30)
    assert torch.all(t[1:] > t[:-1])
    assert t[0].item() == pytest.approx(0.002, rel=1e-4) and t[-1].item() == pytest.approx(5.0)
    r = torch.tensor([1.0, 1e-2, 1e-4, 1e-8])
    tr = s.residual_time(r)
    assert tr[0].item() == pytest.approx(0.002) and tr[2].item() == pytest.approx(5.0)
    assert tr[3].item() == pytest.approx(5.0) and 0.002 < tr[1].item() < 5.0
    c_skip, c_out = s.scalings(torch.tensor([5.0]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    with pytest.raises(ConfigError, match="kind"):
        ScheduleConfig(kind="cosine")
    with pytest.raises(ConfigError, match="unknown key"):
        ScheduleConfig.from_dict({"Tmax": 3})


def test_relative_distance():
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.allclose(relative_distance(a, b, a), torch.ones(2))


def _score(logits, y):
    return float((logits.argmax(-1) == y).sum()), y.numel(), float(nn.functional.cross_entropy(
        logits, y, reduction="sum"))


def test_distilled_student_beats_truncated_teacher_at_one_nfe(tmp_path):
    torch.manual_seed(0)
    model, x, y = tiny_problem(n=768)
    train = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    x_te, y_te = x[512:], y[512:]
    cfg = RecordConfig.from_dict({"solver": {"name": "anderson", "max_iter": 40, "tol": 1e-6},
                                  "batch_size": 128})
    store = record(model, train, cfg, store=TrajectoryStore(tmp_path / "traj"))
    assert len(store) == 4
    batch = store[0]
    assert batch.iterates.shape == (128, len(cfg.iterate_indices()), 16)
    # iterate 1 of the recorded Anderson path is one layer call from zero
    with torch.no_grad():
        u = model.inject(batch.x)
        assert torch.allclose(batch.iterates[:, 1], model.cell(torch.zeros(128, 16), u), atol=1e-6)

    student = ConsistencyStudent(model)
    hist = distill(student, list(store), DistillConfig.from_dict(
        {"epochs": 40, "batch_size": 64, "optim": {"lr": 3e-3}}),
                   task_loss=nn.functional.cross_entropy, log=lambda s: None)
    assert hist["loss"][-1] < hist["loss"][0]
    search = select_plans(student, train, _score, True, last=40, config=PlanSearchConfig(max_nfe=3))
    assert set(search) == {"1", "2", "3"}
    with torch.no_grad():
        u = model.inject(x_te)
        z_star = model.deq.solve(u).z
        z_trunc = get_solver("picard", max_iter=1, tol=0).solve(model.cell, torch.zeros_like(z_star), u).z
        _, z_student = student.predict(x_te, nfe=1)

        def err(z):
            return ((z - z_star).norm(dim=1) / z_star.norm(dim=1)).mean().item()

        acc_trunc = (model.head(z_trunc).argmax(-1) == y_te).float().mean().item()
        acc_student = (student.head(z_student).argmax(-1) == y_te).float().mean().item()
    assert err(z_student) < 0.7 * err(z_trunc)
    assert acc_student > acc_trunc
    # on the plan-search (training) batches, more NFE is never worse
    metrics = [search[k]["metric"] for k in ("1", "2", "3")]
    assert metrics == sorted(metrics)


def test_trajectory_store_detects_corruption(tmp_path):
    model, x, y = tiny_problem(n=32)
    cfg = RecordConfig.from_dict({"solver": {"max_iter": 10}, "batch_size": 32})
    store = record(model, [(x, y)], cfg, store=TrajectoryStore(tmp_path))
    path = store.shard_path(0)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        store.read(0)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptFileError, match=str(path.name)):
        store.read(0)


def test_record_resumes_at_first_missing_shard(tmp_path):
    model, x, y = tiny_problem(n=64)
    cfg = RecordConfig.from_dict({"solver": {"max_iter": 10}, "batch_size": 16})
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    store = record(model, batches, cfg, store=TrajectoryStore(tmp_path))
    first = store.shard_path(0).stat().st_mtime_ns
    store.shard_path(2).unlink()
    record(model, batches, cfg, store=TrajectoryStore(tmp_path))
    assert store.shard_path(0).stat().st_mtime_ns == first  # kept, not rewritten
    assert store.shard_path(2).exists() and len(store) == 4


def test_record_config_rejects_bad_indices():
    with pytest.raises(ConfigError, match="record indices"):
        RecordConfig.from_dict({"indices": [0, 99], "solver": {"max_iter": 10}})
    with pytest.raises(ConfigError, match="dtype"):
        RecordConfig(dtype="int8")
