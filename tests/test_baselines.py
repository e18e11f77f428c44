"""Baselines: the learned initialiser and the directly trained k-step network."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdeq import DEQModel
from cdeq.consistency import RecordConfig, record
from cdeq.deq.layer import SolverSpec
from cdeq.engine.config import ConfigError
from cdeq.run.baselines import (
    BaselineConfig,
    LearnedInit,
    UnrolledNet,
    anytime_method,
    learned_init_method,
    task_loss,
    train_learned_init,
    train_unrolled,
    unrolled_method,
)
from cdeq.run.stages import Run, RunConfig
from cdeq.solvers import get_solver
from cdeq.tasks.base import Task


class Cell(nn.Module):
    """A contractive layer ``tanh(W z + u)`` with ``|W| = 0.6``; counts its calls."""

    channels, channel_dim = 16, -1

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16, bias=False)
        with torch.no_grad():
            self.lin.weight.mul_(0.6 / torch.linalg.matrix_norm(self.lin.weight, ord=2))
        self.calls = 0

    def state_shape(self, u):
        return u.shape

    def forward(self, z, u):
        self.calls += 1
        return torch.tanh(self.lin(z) + u)


class ToyTask(Task):
    """Four Gaussian blobs in 8 dimensions."""

    name = "toy"

    def __init__(self) -> None:
        super().__init__(None)
        g = torch.Generator().manual_seed(0)
        centres = 1.5 * torch.randn(4, 8, generator=g)
        self.y = torch.randint(0, 4, (512,), generator=g)
        self.x = centres[self.y] + torch.randn(512, 8, generator=g)

    def train_batches(self, batch_size, shuffle=True, generator=None):
        order = torch.randperm(384, generator=generator) if shuffle else torch.arange(384)
        for s in range(0, 384, batch_size):
            idx = order[s : s + batch_size]
            yield self.x[idx], self.y[idx]

    def test_batches(self, batch_size):
        for s in range(384, 512, batch_size):
            yield self.x[s : s + batch_size], self.y[s : s + batch_size]

    def loss(self, logits, y):
        return F.cross_entropy(logits, y)

    def metric_sum(self, logits, y):
        return float((logits.argmax(-1) == y).sum()), int(y.numel())


def _model():
    torch.manual_seed(0)
    return DEQModel(nn.Linear(8, 16), Cell(), nn.Linear(16, 4), solver="anderson").eval()


def _rel(z, ref):
    return float(((z - ref).norm(dim=1) / ref.norm(dim=1)).mean())


def test_learned_init_fits_z_star_and_helps_the_truncated_solver():
    task, model = ToyTask(), _model()
    cfg = RecordConfig(solver=SolverSpec(name="anderson", max_iter=40, tol=1e-6), batch_size=128)
    trajectories = record(model, task.train_batches(128, shuffle=False), cfg)
    bcfg = BaselineConfig.from_dict({"init_hidden": 32, "init_optim": {"lr": 1e-2}})
    init = LearnedInit.for_teacher(model, bcfg.init_hidden, bcfg.init_conv)
    info = train_learned_init(init, model, trajectories, 60 * 384, batch_size=bcfg.init_batch_size,
                              optim=bcfg.init_optim)
    # 60 epochs of the 384 recorded samples in minibatches of 64: 6 steps each
    assert info["work"] == {"steps": 360, "samples": 60 * 384, "epochs": 60, "layer_calls_per_sample": 0}
    assert info["losses"][-1] < 0.3 * info["losses"][0]
    x = task.x[384:]
    with torch.no_grad():
        u = model.inject(x)
        z_star = get_solver("anderson", max_iter=60, tol=1e-7).solve(model.cell, torch.zeros_like(u), u).z
        fn = learned_init_method(init, model, {1: "picard", 2: "anderson"})
        for k in (1, 2):
            cold = get_solver("picard", max_iter=k, tol=0.0).solve(model.cell, torch.zeros_like(u), u).z
            logits, warm = fn(x, k)
            assert logits.shape == (128, 4)
            assert _rel(warm, z_star) < 0.5 * _rel(cold, z_star)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_unrolled_costs_exactly_k_layer_calls(k):
    net = UnrolledNet(_model(), k)
    net.cell.calls = 0
    logits, z = net(torch.randn(5, 8))
    assert net.cell.calls == k and logits.shape == (5, 4) and z.shape == (5, 16)
    fn = unrolled_method({k: net})
    net.cell.calls = 0
    assert fn(torch.randn(5, 8), k) is not None and net.cell.calls == k
    assert fn(torch.randn(5, 8), k + 1) is None


def test_unrolled_fine_tuning_lowers_the_task_loss():
    task, teacher = ToyTask(), _model()
    net = UnrolledNet(teacher, 2)
    before = task_loss(net, task, task.train_batches(128, shuffle=False))
    teacher_params = [p.clone() for p in teacher.parameters()]
    cfg = BaselineConfig.from_dict({"unrolled_optim": {"lr": 1e-2}, "unrolled_batch_size": 32})
    info = train_unrolled(net, task, cfg, samples=5 * 384)
    after = task_loss(net, task, task.train_batches(128, shuffle=False))
    assert info["work"]["epochs"] == 5 and after < 0.7 * before
    # the teacher itself is left untouched (the network trains copies)
    assert all(torch.equal(a, b) for a, b in zip(teacher_params, teacher.parameters(), strict=True))


def test_baseline_config_is_validated():
    with pytest.raises(ConfigError, match="unrolled_k"):
        BaselineConfig.from_dict({"unrolled_k": [1]})
    with pytest.raises(ConfigError, match="unrolled_ks"):
        BaselineConfig.from_dict({"unrolled_ks": [0, 2]})
    with pytest.raises(ConfigError, match="samples"):
        BaselineConfig(samples=-1)
    with pytest.raises(ConfigError, match="unknown key 'init_time_s'"):
        BaselineConfig.from_dict({"init_time_s": 10.0})
    with pytest.raises(ConfigError, match="lr"):
        BaselineConfig.from_dict({"unrolled_optim": {"lr": 0}})
    assert RunConfig.from_dict({"baselines": {"enabled": False}}).baselines.enabled is False


def test_runs_written_before_the_baselines_section_still_open(tmp_path):
    cfg = RunConfig()
    Run(tmp_path, cfg)
    old = json.loads((tmp_path / "config.json").read_text())
    del old["baselines"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    Run(tmp_path, cfg)  # same configuration: no "another configuration" error


@pytest.mark.parametrize("samples, steps", [(1, 1), (32, 1), (33, 2), (1000, 32)])
def test_the_budget_is_work_not_time(samples, steps):
    """``samples`` training samples in batches of 32 over 12 steps per epoch: exact step counts, and
    the samples seen are those steps' batches (every batch here is full)."""
    task, teacher = ToyTask(), _model()
    cfg = BaselineConfig(unrolled_batch_size=32)
    info = train_unrolled(UnrolledNet(teacher, 1), task, cfg, samples=samples)
    assert info["work"]["steps"] == steps and info["work"]["samples"] == 32 * steps
    assert info["work"]["epochs"] == -(-steps // 12)
    again = train_unrolled(UnrolledNet(teacher, 1), task, cfg, samples=samples)
    assert again["losses"] == info["losses"]  # the same budget and seed: the same run, bit for bit


def test_a_baseline_without_a_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="baselines.samples"):
        train_unrolled(UnrolledNet(_model(), 1), ToyTask(), BaselineConfig(), samples=0)


def test_anytime_network_is_supervised_at_every_step_and_serves_every_budget():
    task, teacher = ToyTask(), _model()
    net = UnrolledNet(teacher, 4, anytime=True)
    x, y = task.x[:64], task.y[:64]
    with torch.no_grad():  # the training loss is the mean of the task loss after each step
        expected = sum(F.cross_entropy(net(x, k)[0], y) for k in range(1, 5)) / 4
        assert torch.allclose(net.training_loss(task, x, y), expected)
    fn = anytime_method(net)
    for k in (1, 2, 3, 4):
        net.cell.calls = 0
        logits, z = fn(x, k)
        assert net.cell.calls == k and logits.shape == (64, 4)
    assert fn(x, 5) is None
    batches = list(task.train_batches(128, shuffle=False))
    before = [task_loss(lambda x, k=k: net(x, k), task, batches) for k in range(1, 5)]
    cfg = BaselineConfig.from_dict({"unrolled_optim": {"lr": 1e-2}})
    train_unrolled(net, task, cfg, samples=5 * 384)
    after = [task_loss(lambda x, k=k: net(x, k), task, batches) for k in range(1, 5)]
    assert all(a < 0.8 * b for a, b in zip(after, before, strict=True)), (before, after)
