"""The one training loop (cdeq.engine.fit): its schedule, resume, early stopping, clipping, bf16 autocast,
and the distillation pieces built on it (pair samplers, the student's trainable parameters)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toys import ToyTask

from cdeq.consistency import ConsistencyStudent, DistillConfig, RecordConfig, distill, record
from cdeq.consistency.distill import trainable_parameters
from cdeq.consistency.pairs import PAIR_SAMPLERS, PairSampler, get_pair_sampler, register_pair_sampler
from cdeq.engine.config import ConfigError
from cdeq.engine.fit import Hooks, LayerCalls, OptimConfig, build_optimizer, fit
from cdeq.run.teacher import TeacherConfig, train_teacher, validation_loss

X = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))


def _regression():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    y = X @ torch.tensor([[1.0], [-2.0], [0.5]])

    def step(batch, progress):
        x, t = batch
        loss = F.mse_loss(model(x), t)
        return loss, {"loss": loss.detach(), "samples": x.shape[0]}

    def batches(epoch, gen):
        order = torch.randperm(64, generator=gen)
        for s in range(0, 64, 16):
            yield X[order[s:s + 16]], y[order[s:s + 16]]

    return model, step, batches


def _lrs(config: OptimConfig, total: int) -> list[float]:
    opt, sched = build_optimizer([nn.Parameter(torch.zeros(1))], config, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_is_linear_warmup_then_cosine_to_zero():
    lr, warm, total = 0.1, 4, 20
    got = _lrs(OptimConfig(lr=lr, warmup_steps=warm), total)
    for i in range(warm):
        assert got[i] == pytest.approx(lr * (1 / warm + (1 - 1 / warm) * i / warm), rel=1e-9)
    for i in range(warm, total):
        assert got[i] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (i - warm) / (total - warm))),
                                       rel=1e-6, abs=1e-12)
    plain = _lrs(OptimConfig(lr=lr), 10)
    assert plain[0] == lr and plain[5] == pytest.approx(lr / 2)


def test_optim_config_is_validated():
    with pytest.raises(ConfigError, match="unknown key 'precision'"):
        OptimConfig.from_dict({"precision": "bf16"})  # the caller's autocast: cdeq.engine.precision
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        TeacherConfig.from_dict({"lr": 0.1})  # moved to teacher.optim.lr
    assert TeacherConfig.from_dict({"optim": {"lr": 0.1}}).optim.weight_decay == 1e-4


def test_resumed_fit_is_bit_identical():
    model, step, batches = _regression()
    start = copy.deepcopy(model.state_dict())
    saved = {}

    def keep(epoch, state):
        saved[epoch] = (copy.deepcopy(model.state_dict()), copy.deepcopy(state))

    cfg = OptimConfig(lr=0.05, warmup_steps=3)
    full = fit(model, step, batches, cfg, epochs=4, steps_per_epoch=4, seed=3,
               hooks=Hooks(on_epoch_end=keep))
    reference = copy.deepcopy(model.state_dict())
    model.load_state_dict(saved[1][0])
    resumed = fit(model, step, batches, cfg, epochs=4, steps_per_epoch=4, seed=3, start_epoch=2,
                  state=saved[1][1])
    assert all(torch.equal(reference[k], model.state_dict()[k]) for k in reference)
    assert resumed["loss"] == full["loss"] and resumed["steps"] == [4, 8, 12, 16]
    assert full["samples"] == [64] * 4
    assert not torch.equal(start["weight"], reference["weight"])


def test_early_stopping_keeps_the_best_weights():
    model, step, batches = _regression()
    scores = iter([3.0, 2.0, 2.5, 2.4, 1.0])
    weights = {}
    hooks = Hooks(validate=lambda: next(scores), patience=2, min_delta=0.0,
                  on_epoch_end=lambda e, s: weights.setdefault(e, copy.deepcopy(model.state_dict())))
    history = fit(model, step, batches, OptimConfig(lr=0.05), epochs=5, steps_per_epoch=4,
                  hooks=hooks)
    assert history["valid"] == [3.0, 2.0, 2.5, 2.4]  # two epochs without improvement: stopped
    assert history["best_epoch"] == [1]
    assert all(torch.equal(weights[1][k], v) for k, v in model.state_dict().items())
    # resumed from the checkpoint of the epoch that stopped: no more training, the best weights
    states = {}
    hooks = Hooks(validate=lambda: 0.0, patience=2,
                  on_epoch_end=lambda e, s: states.setdefault(e, copy.deepcopy(s)))
    # stops after epoch 2 (two epochs no better than the first)
    fit(model, step, batches, OptimConfig(lr=0.05), epochs=5, steps_per_epoch=4, hooks=hooks)
    assert sorted(states) == [0, 1, 2]
    again = fit(model, step, batches, OptimConfig(lr=0.05), epochs=5, steps_per_epoch=4,
                hooks=Hooks(validate=lambda: 0.0, patience=2), start_epoch=3, state=states[2])
    assert again["steps"] == [4, 8, 12]
    assert all(torch.equal(states[2]["stopping"]["best_state"][k], v) for k, v in model.state_dict().items())


def test_gradients_are_clipped_and_the_callers_bf16_autocasts_the_forward_alone():
    from cdeq.engine.precision import autocast

    model, _, batches = _regression()
    dtypes, hooked = [], []

    def step(batch, progress):
        x, t = batch
        out = model(100 * x)
        dtypes.append(out.dtype)
        return F.mse_loss(out.float(), t), {}

    def norm():
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        assert float(total) <= 0.01 * (1 + 1e-5)
        hooked.append(torch.is_autocast_enabled("cpu"))

    def validate():
        hooked.append(torch.is_autocast_enabled("cpu"))
        return 0.0

    cfg = OptimConfig(lr=0.01, grad_clip=0.01)
    with autocast("bf16", "cpu"):
        fit(model, step, batches, cfg, epochs=1, steps_per_epoch=4,
            hooks=Hooks(after_step=norm, validate=validate))
    assert dtypes == [torch.bfloat16] * 4 and model.weight.dtype == torch.float32
    assert hooked == [False] * 5  # the optimiser's side and validation run in full precision
    fit(model, step, batches, cfg, epochs=1, steps_per_epoch=4)
    assert dtypes[4:] == [torch.float32] * 4


def test_layer_calls_count_calls_and_rows():
    lin = nn.Linear(2, 2)
    with LayerCalls(lin) as count:
        lin(torch.zeros(5, 2))
        lin(torch.zeros(3, 2))
    lin(torch.zeros(4, 2))  # outside the block: not counted
    assert count.as_dict() == {"layer_calls": 2, "layer_call_rows": 8}


# --- pair samplers -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["uniform", {"name": "uniform", "gap": 3}, "early",
                                  {"name": "early", "power": 2.0}, "curriculum",
                                  {"name": "curriculum", "final_gap": 2}])
def test_pair_samplers_draw_valid_pairs(spec):
    sampler = get_pair_sampler(spec)
    gen = torch.Generator().manual_seed(0)
    for progress in (0.0, 0.5, 1.0):
        n, m = sampler.sample(500, 6, progress, gen)
        assert n.shape == m.shape == (500,)
        assert bool((n >= 0).all() and (n < 6).all() and (m > n).all() and (m <= 6).all())


def test_pair_sampler_options_come_from_their_fields():
    with pytest.raises(ConfigError, match=r"unknown key 'gapp'.*allowed keys: \['gap'\]"):
        get_pair_sampler({"name": "uniform", "gapp": 2})
    with pytest.raises(ConfigError, match="choose from"):
        DistillConfig(pairs="nearest")
    assert get_pair_sampler({"name": "uniform", "gap": 3}).gap == 3


def test_a_registered_pair_sampler_is_usable_by_name():
    @register_pair_sampler("last-only")
    @dataclasses.dataclass
    class LastOnly(PairSampler):
        def sample(self, batch, num_points, progress, gen):
            return torch.full((batch,), num_points - 1), torch.full((batch,), num_points)

    try:
        assert isinstance(DistillConfig(pairs="last-only").pairs, str)
        n, m = get_pair_sampler("last-only").sample(4, 5, 0.0, torch.Generator())
        assert n.tolist() == [4] * 4 and m.tolist() == [5] * 4
    finally:
        del PAIR_SAMPLERS["last-only"]


# --- distillation's parameters, teacher training's validation -------------------------------------
def test_teacher_keeps_the_weights_of_its_best_validation_epoch():
    task = ToyTask()
    model = task.build_model()
    cfg = TeacherConfig.from_dict({"epochs": 6, "batch_size": 16, "patience": 2,
                                   "optim": {"lr": 0.3}})  # a large lr: the validation loss wanders
    history = train_teacher(task, model, cfg)
    best = history["best_epoch"][0]
    assert history["valid"][best] == min(history["valid"])
    assert validation_loss(task, model, 256) == pytest.approx(history["valid"][best], abs=1e-6)
    assert len(history["valid"]) == len(history["loss"]) <= 6


class _OwnParameters(ConsistencyStudent):
    """A student as the library API will have it: the teacher is not frozen behind the caller's
    back, and ``trainable_parameters`` leaves it out."""

    def trainable_parameters(self):
        teacher = {id(p) for p in self.teacher.parameters()}
        return [p for p in self.parameters() if id(p) not in teacher]


def test_distillation_trains_the_student_only_and_leaves_the_teacher_untouched():
    task = ToyTask()
    teacher = task.build_model()
    trajectories = record(teacher, task.train_batches(32, shuffle=False),
                          RecordConfig.from_dict({"solver": {"max_iter": 10}}))
    student = _OwnParameters(teacher)
    for p in teacher.parameters():
        p.requires_grad_(True)  # the caller's module as they left it
    before = copy.deepcopy(teacher.state_dict())
    own = trainable_parameters(student)
    assert {id(p) for p in own}.isdisjoint({id(p) for p in teacher.parameters()}) and own
    cell_before = student.cell.lin.weight.detach().clone()
    distill(student, trajectories, DistillConfig.from_dict({"epochs": 1, "batch_size": 16}),
            task_loss=task.loss)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(cell_before, student.cell.lin.weight)
    # a module without the method: its parameters that require gradients
    plain = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    plain[1].requires_grad_(False)
    assert trainable_parameters(plain) == list(plain[0].parameters())


def test_a_task_without_validation_trains_every_epoch(caplog):
    class NoValidation(ToyTask):
        def validation_batches(self, batch_size):
            raise NotImplementedError

    task = NoValidation()
    model = task.build_model()
    with caplog.at_level("WARNING"):
        history = train_teacher(task, model, TeacherConfig.from_dict({"epochs": 2, "batch_size": 32}))
    assert len(history["loss"]) == 2 and "valid" not in history
    assert "no validation split" in caplog.text


def test_teacher_config_accepts_every_registered_backward():
    """The allowed backward names come from the registry, not a copy of it."""
    from cdeq.deq.backward import BACKWARDS, BackwardStrategy, register_backward
    from cdeq.run.teacher import TeacherConfig

    with pytest.raises(ConfigError, match=r"backward='mine' is not valid.*'implicit'"):
        TeacherConfig(backward="mine")

    @register_backward
    class Mine(BackwardStrategy):
        name = "mine"

        def attach(self, f, z_star, x):
            return f(z_star.detach(), x)

    try:
        assert TeacherConfig(backward="mine").backward == "mine"
    finally:
        del BACKWARDS["mine"]
