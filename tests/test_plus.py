"""C-DEQ+: the student started from a learned initial state h(u) at a matched time."""

import copy
import dataclasses
import json

import pytest
import torch
from test_baselines import ToyTask, _model

from cdeq.consistency import ConsistencyStudent, DistillConfig, RecordConfig, distill, record
from cdeq.consistency.distill import TermInputs
from cdeq.consistency.plans import check_plan, plan_nfe
from cdeq.consistency.plus import (
    PlusConfig,
    PlusStudent,
    StartTerm,
    load_plus,
    match_start_time,
    train_plus,
)
from cdeq.consistency.search import PlanSearchConfig, select_plans
from cdeq.consistency.student import StudentConfig
from cdeq.deq.layer import SolverSpec
from cdeq.engine.config import ConfigError
from cdeq.run import cost
from cdeq.solvers import get_solver


def _rel(z, ref):
    return float(((z - ref).norm(dim=1) / ref.norm(dim=1)).mean())


@pytest.fixture(scope="module")
def distilled():
    task, model = ToyTask(), _model()
    cfg = RecordConfig(solver=SolverSpec(name="picard", max_iter=40, tol=1e-6), batch_size=128)
    trajectories = record(model, task.train_batches(128, shuffle=False), cfg)
    torch.manual_seed(0)
    student = ConsistencyStudent(model)
    distill(student, trajectories, DistillConfig(epochs=4, batch_size=64, train_head=False),
            task_loss=task.loss)
    return task, model, student, trajectories


def _z_star(model, x):
    with torch.no_grad():
        u = model.inject(x)
        return get_solver("anderson", max_iter=80, tol=1e-8).solve(model.cell, torch.zeros_like(u), u).z


def test_a_plan_starts_with_one_jump_from_h_at_the_start_time():
    model = _model()
    student = PlusStudent(model, init_hidden=8, init_conv=False, start_time=0.5)
    init = student.initialiser
    torch.nn.init.normal_(init.mlp.net[-1].weight)
    assert student.plans == {1: [("jump", 0.5)]} and not student.plans_selected
    x = torch.randn(6, 8)
    student.cell.calls = 0
    _, z = student.predict(x, nfe=1)
    assert student.cell.calls == 1  # h(u) is no layer call
    with torch.no_grad():
        u = model.inject(x)
        h = init.init_state(model, u)
        assert torch.allclose(z, student.F(h, 0.5, u))
        assert not torch.allclose(z, student.F(torch.zeros_like(h), 0.5, u))


@pytest.mark.parametrize("t", [0.0, 5.0, 7.0])
def test_a_start_time_outside_the_schedule_is_refused(t):
    with pytest.raises(ValueError, match="start_time"):
        PlusStudent(_model(), init_hidden=8, init_conv=False, start_time=t)
    student = PlusStudent(_model(), init_hidden=8, init_conv=False)
    with pytest.raises(ValueError, match="reentry_time"):
        student.set_times(0.5, t)


def test_the_plain_student_knows_nothing_of_a_learned_start():
    student = ConsistencyStudent(_model())
    assert student.zero_start and student.trained_times == ()
    assert student.start_time == student.schedule.t_min
    assert not any(hasattr(student, name) for name in ("initialiser", "reentry_time",
                                                      "attach_initialiser"))


class PicardInit(torch.nn.Module):
    """An 'initialiser' returning the teacher's k-th Picard iterate: its residual is that of the
    recorded iterate k."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def init_state(self, teacher, u):
        return get_solver("picard", max_iter=self.k, tol=0.0).solve(teacher.cell, torch.zeros_like(u), u).z


def test_the_start_time_is_the_recorded_point_of_the_nearest_residual(distilled):
    _, model, student, trajectories = distilled
    index = trajectories[0].index
    times = []
    for k in (2, 8):
        got = match_start_time(student, PicardInit(k), trajectories)
        assert got["point_index"] == k, (k, got, index)  # k is a recorded index
        expected = float(student.schedule.times(torch.tensor(k), trajectories[0].last))
        assert got["time"] == pytest.approx(expected)
        times.append(got["time"])
    assert times[0] < times[1]  # a better start sits later on the path


def test_joint_distillation_trains_the_start_jump_and_leaves_c_deq_alone(distilled):
    task, model, student, trajectories = distilled
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = PlusConfig(init_hidden=16, init_conv=False, init_epochs=30, epochs=4)
    torch.manual_seed(0)
    # chain_k = 0: the start term's distance to z* alone (the chain's task loss trades some of it)
    plus, info = train_plus(student, trajectories, dataclasses.replace(config, chain_k=0),
                            DistillConfig(epochs=4, batch_size=64), task.loss)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert info["work"]["joint"]["epochs"] == 4 and info["work"]["init"]["samples"] == 30 * 384
    assert isinstance(plus, PlusStudent) and not isinstance(student, PlusStudent)
    assert plus.reentry_time is None and "reentry" not in info["start"]
    x = task.x[384:]
    z_star = _z_star(model, x)
    with torch.no_grad():
        u = model.inject(x)
        # the C-DEQ student's own jump from the same start (before the joint stage)
        h = plus.initialiser.init_state(model, u)
        untrained = student.F(h, plus.start_time, u)
        _, z_plus = plus.predict(x, nfe=1)
        _, z_cdeq = student.predict(x, nfe=1)
    assert _rel(z_plus, z_star) < 0.8 * _rel(untrained, z_star)
    assert _rel(z_plus, z_star) < _rel(z_cdeq, z_star)
    # a saved state loads into an empty C-DEQ+ student with the same predictions
    empty = load_plus(student, config, info["start"])
    empty.load_state_dict(plus.state_dict())
    with torch.no_grad():
        assert torch.equal(empty.predict(x, nfe=1)[1], z_plus)
    assert empty.reentry_time == plus.reentry_time


def test_c_deq_plus_with_its_own_injection_trains_it_and_counts_both(distilled):
    task, model, student, trajectories = distilled
    teacher_before = {k: v.clone() for k, v in model.state_dict().items()}
    config = PlusConfig(init_hidden=16, init_conv=False, init_epochs=2, epochs=2, chain_k=2)
    own = dataclasses.replace(student.config, train_injection=True)
    torch.manual_seed(0)
    plus, info = train_plus(student, trajectories, config, DistillConfig(epochs=2, batch_size=64),
                            task.loss, student_config=own)
    assert student.injection is None and plus.injection is not None
    assert all(torch.equal(teacher_before[k], v) for k, v in model.state_dict().items())
    moved = [not torch.equal(a, b) for a, b in zip(plus.injection.parameters(),
                                                    model.injection.parameters(), strict=True)]
    assert any(moved)  # the copy was trained, the teacher's was not
    x = task.x[384:]
    with torch.no_grad():
        inj = cost.count_flops(lambda: model.inject(x)).total
        same = load_plus(student, config, info["start"])
        state = {k: v for k, v in plus.state_dict().items() if not k.startswith("injection.")}
        same.load_state_dict(state)
        plans = {1: [("jump", plus.start_time)], 2: [("step",), ("jump", plus.start_time)]}
        plus.plans, same.plans = plans, dict(plans)
        diff = {k: cost.count_flops(lambda k=k: plus.predict(x, nfe=k)).total
                - cost.count_flops(lambda k=k: same.predict(x, nfe=k)).total for k in (1, 2)}
    # h(u) and the jumps read the student's own injection in place of the teacher's; a teacher
    # step needs the teacher's too
    assert diff == {1: 0, 2: inj}
    empty = load_plus(student, config, info["start"], own)
    empty.load_state_dict(plus.state_dict())
    with torch.no_grad():
        empty.plans = dict(plans)
        assert torch.equal(empty.predict(x, nfe=2)[1], plus.predict(x, nfe=2)[1])


def test_the_cost_of_a_c_deq_plus_call_includes_the_initialiser():
    model = _model()
    cold = ConsistencyStudent(model)
    plus = PlusStudent(model, init_hidden=8, init_conv=False, start_time=0.5)
    init = plus.initialiser
    x = torch.randn(10, 8)
    with torch.no_grad():
        u = model.inject(x)
        h_flops = cost.count_flops(lambda: init.init_state(model, u)).total
        diff = (cost.count_flops(lambda: plus.predict(x, nfe=1)).total
                - cost.count_flops(lambda: cold.predict(x, nfe=1)).total)
    # h by hand: two dense layers 16 -> 8 -> 16 (2 FLOPs per multiply-add) and their bias adds
    assert h_flops >= 10 * (2 * 16 * 8 + 2 * 8 * 16 + 8 + 16)
    # from h(u) the jump adds two multiply-adds per state element that the zero start skips
    assert h_flops <= diff <= h_flops + 4 * 10 * 16


def test_a_run_builds_and_reports_c_deq_plus(tmp_path):
    from cdeq.cli import main
    from cdeq.run.stages import Run

    out = tmp_path / "run"
    args = ["teacher.epochs=1", "task_config.train_subset=128", "task_config.test_subset=64",
            "distill.epochs=1", "evaluate.budgets=[1,2]", "plans.max_nfe=2",
            "baselines.enabled=false", "plus.init_epochs=1"]
    assert main(["run", "digits", "--quick", "--out", str(out), "--set", *args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]["cdeq_plus"]) == {"1", "2"}
    calls = report["cost"]["layer_calls"]
    # one C-DEQ+ jump costs one layer call plus h(u)
    assert calls["cdeq_plus"]["1"] > calls["cdeq"]["1"]
    assert report["plans_plus"]["1"][0][0] == "jump"
    assert report["exact_mode_plus"]["cdeq_warm_nfe"] >= 1.0
    meta = Run(out).read_meta("student_plus")
    assert report["plans_plus"]["1"] == meta["plans"]["1"]
    assert meta["work"]["joint"]["epochs"] == 1
    # the chain's re-entry time (plus.chain_k = 4 by default) is matched after the start's and
    # is among the plan search's times
    start = meta["start"]
    assert start["time"] <= start["reentry"]["time"] < 5.0
    assert start["reentry"]["init_residual"] < start["init_residual"]
    assert "| C-DEQ+ |" in (out / "table.md").read_text()


def test_a_solve_operation_is_n_steps_of_the_teachers_solver():
    model = _model()
    student = ConsistencyStudent(model)
    x = torch.randn(6, 8)
    plan = [("jump", student.schedule.t_min), ("solve", 3)]
    assert plan_nfe(plan) == 4
    model.cell.calls = student.cell.calls = 0
    with torch.no_grad():
        u = model.inject(x)
        z = student._run_plan(u, plan)
        assert (student.cell.calls, model.cell.calls) == (1, 3)
        start = student._run_plan(u, plan[:1])
        expected = get_solver("anderson", max_iter=3, tol=0.0).solve(model.cell, start, u).z
    assert torch.allclose(z, expected)
    assert check_plan([["jump", 0.1], ["solve", 2]]) == [("jump", 0.1), ("solve", 2)]
    for bad in (["solve"], ["solve", 0], ["solve", 1.5]):
        with pytest.raises(ConfigError, match="solve"):
            check_plan([bad])


def test_long_plans_hand_over_to_the_solver_and_get_closer_to_z_star(distilled):
    task, model, student, _ = distilled
    student = copy.deepcopy(student)
    batches = [x for x, _ in task.test_batches(64)][:1]  # inputs alone: scored against the teacher
    select_plans(student, batches, config=PlanSearchConfig(max_nfe=8))
    assert student.plans[8][-1][0] == "solve" and plan_nfe(student.plans[8]) <= 8
    x = batches[0]
    z_star = _z_star(model, x)
    errors = [_rel(student.predict(x, nfe=k)[1], z_star) for k in (1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0]


def test_the_chain_term_supervises_the_task_after_each_jump(distilled):
    """With chain_k = 3 the start term adds the task loss after jumps 1, 2 and 3 (averaged); with
    chain_k = 0 only the first jump's, weighted by task_weight."""
    task, model, student, trajectories = distilled
    plus = load_plus(student, PlusConfig(init_hidden=8, init_conv=False),
                     {"time": 0.01, "reentry": {"time": 0.5}})
    mb = trajectories[0]
    weight = torch.full((mb.batch_size,), 1.0 / mb.batch_size)
    u = model.inject(mb.x)
    dcfg = DistillConfig(global_weight=0.0)
    with torch.no_grad():
        term = StartTerm(PlusConfig(init_weight=0.0, chain_k=3))
        got = term(TermInputs(plus, mb, u, weight, 1.0, dcfg, task.loss))
        z = plus.F(plus.initial_state(u), 0.01, u)
        losses = [task.loss(plus.head(z), mb.y)]
        for _ in range(2):
            z = plus.F(z, 0.5, u)
            losses.append(task.loss(plus.head(z), mb.y))
        assert torch.allclose(got, torch.stack(losses).mean())
        term = StartTerm(PlusConfig(init_weight=0.0, chain_k=0))
        inputs = TermInputs(plus, mb, u, weight, 1.0, DistillConfig(global_weight=0.0, task_weight=0.3),
                            task.loss)
        assert torch.allclose(term(inputs), 0.3 * losses[0])


def test_the_chain_can_read_a_training_batch_instead_of_the_recorded_one(distilled):
    """Given a training batch, the chain's task loss is computed on it (the distance terms stay
    on the recorded minibatch)."""
    task, model, student, trajectories = distilled
    plus = load_plus(student, PlusConfig(init_hidden=8, init_conv=False),
                     {"time": 0.01, "reentry": {"time": 0.5}})
    mb = trajectories[0]
    weight = torch.full((mb.batch_size,), 1.0 / mb.batch_size)
    x, y = task.x[:40], task.y[:40]
    config = PlusConfig(init_weight=0.0, chain_k=2)
    inputs = TermInputs(plus, mb, model.inject(mb.x), weight, 1.0, DistillConfig(global_weight=0.0),
                        task.loss)
    with torch.no_grad():
        term = StartTerm(config, lambda gen: iter([(x, y)]))
        got = term(inputs)
        assert term.samples == 40
        u = model.inject(x)
        z1 = plus.F(plus.initial_state(u), 0.01, u)
        z2 = plus.F(z1, 0.5, u)
        want = (task.loss(plus.head(z1), y) + task.loss(plus.head(z2), y)) / 2
        assert torch.allclose(got, want)
        on_recorded = StartTerm(config)(inputs)
        assert not torch.allclose(got, on_recorded)


def test_the_joint_stage_draws_one_training_batch_per_step_and_counts_its_samples(distilled):
    from cdeq.run.stages import chain_batches

    task, model, student, trajectories = distilled
    drawn = []

    def batches(gen):
        for x, y in task.train_batches(128, shuffle=True, generator=gen):
            drawn.append(len(y))
            yield x, y

    config = PlusConfig(init_hidden=8, init_conv=False, init_epochs=1, epochs=2)
    dcfg = DistillConfig(epochs=2, batch_size=64)
    plus, info = train_plus(student, trajectories, config, dcfg, task.loss, task_batches=batches)
    joint = info["work"]["joint"]
    assert len(drawn) == joint["steps"] == 2 * 384 // 64  # one per step, over more than one pass
    assert joint["samples"] == 2 * 384 + 128 * len(drawn)
    # which data the chain reads: the setting, or (auto) whether the recording was capped
    capped, whole = RecordConfig(max_samples=100), RecordConfig()
    assert chain_batches(config, dcfg, task, whole) is None
    assert callable(chain_batches(config, dcfg, task, capped))
    recorded = dataclasses.replace(config, chain_data="recorded")
    assert chain_batches(recorded, dcfg, task, capped) is None
    train = dataclasses.replace(config, chain_data="train")
    x, y = next(iter(chain_batches(train, dcfg, task, whole)(torch.Generator())))
    assert len(y) == 64
    with pytest.raises(ConfigError, match="chain_data"):
        PlusConfig(chain_data="all")


def test_an_injection_switch_that_is_not_a_bool_is_refused():
    with pytest.raises(ConfigError, match="train_injection=.* must be true or false"):
        StudentConfig(train_injection=1)
