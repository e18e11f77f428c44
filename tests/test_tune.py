"""C-DEQ tuned: the distilled student's short plans trained end to end on the task, longer plans
handing over to the teacher's solver; and the teacher's fixed-point correction."""

import copy
import dataclasses
import json
import math

import pytest
import torch
from test_baselines import ToyTask, _model

from cdeq.consistency import ConsistencyStudent, DistillConfig, RecordConfig, distill, record
from cdeq.consistency.plans import plan_nfe
from cdeq.consistency.search import PlanSearchConfig, select_plans
from cdeq.consistency.tune import (
    TuneConfig,
    chain_loss,
    handover_warning,
    tune,
    tune_times,
    tuned_plans,
    tuned_student,
)
from cdeq.engine.config import ConfigError
from cdeq.engine.distributed import parts
from cdeq.run.baselines import BaselineConfig
from cdeq.run.report import COST_SLACK
from cdeq.run.teacher import (
    TeacherConfig,
    _solve_with_iterates,
    _teacher_step,
    configure_teacher,
    stop_warning,
)
from cdeq.solvers import SolverSpec, get_solver


def _rel(z, ref):
    return float(((z - ref).norm(dim=1) / ref.norm(dim=1)).mean())


@pytest.fixture(scope="module")
def distilled():
    task, model = ToyTask(), _model()
    cfg = RecordConfig(solver=SolverSpec(name="picard", max_iter=40, tol=1e-6), batch_size=128)
    trajectories = record(model, task.train_batches(128, shuffle=False), cfg)
    torch.manual_seed(0)
    student = ConsistencyStudent(model)
    distill(student, trajectories, DistillConfig(epochs=4, batch_size=64), task_loss=task.loss)
    return task, model, student


def _tuned(task, student, samples=3000):
    config = TuneConfig(batch_size=32)
    tuned = tuned_student(student, config)
    times = tune_times(tuned, config, last=40)
    torch.manual_seed(0)
    tune(tuned, lambda epoch, gen: task.train_batches(32, shuffle=True, generator=gen), 12, config,
         task.loss, samples, times)
    return tuned, times


def test_tuning_lowers_the_chain_loss_and_leaves_the_distilled_student_and_teacher(distilled):
    task, model, student = distilled
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = next(task.train_batches(384, shuffle=False))
    fresh = tuned_student(student, TuneConfig())
    times = tune_times(fresh, TuneConfig(), last=40)
    with torch.no_grad():
        start = float(chain_loss(fresh, x, y, times, task.loss))
    tuned, _ = _tuned(task, student)
    with torch.no_grad():
        end = float(chain_loss(tuned, x, y, times, task.loss))
    assert end < 0.8 * start
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in teacher.items())
    assert tuned.injection is not None  # its own copy of the injection was tuned (the default)
    assert not torch.equal(tuned.injection.weight, model.injection.weight)


def test_the_tuned_times_start_at_the_start_time_then_walk_the_schedule(distilled):
    _, _, student = distilled
    times = tune_times(student, TuneConfig(max_k=3), last=40)
    assert times[0] == student.start_time and times == sorted(times) and len(times) == 3
    assert times[1] == pytest.approx(float(student.schedule.index_time(torch.tensor(1.0), 40)))
    assert tuned_plans(times) == {1: [("jump", times[0])], 2: [("jump", times[0]), ("jump", times[1])],
                                  3: [("jump", t) for t in times]}
    assert tune_times(student, TuneConfig(max_k=2, times=(0.1, 0.2)), 40) == [0.1, 0.2]
    with pytest.raises(ConfigError, match="times"):
        TuneConfig(max_k=3, times=(0.1,))


def test_longer_plans_hand_over_to_the_solver_and_the_error_falls_from_there(distilled):
    task, model, student = distilled
    tuned, times = _tuned(task, student)
    tuned = copy.deepcopy(tuned)
    batches = list(task.test_batches(64))[:1]
    log = select_plans(tuned, batches, loss=task.loss, config=PlanSearchConfig(max_nfe=10),
                       fixed=tuned_plans(times))
    for k in range(1, 5):  # the tuned chains, or a shorter one that scored better
        plan = tuned.plans[k]
        assert all(op[0] == "jump" for op in plan) and plan == tuned_plans(times)[len(plan)]
    # at the largest budget the teacher's solver has taken over
    assert any(op[0] == "solve" for op in tuned.plans[10]) and plan_nfe(tuned.plans[10]) <= 10
    errors = [log[str(k)]["relative_error"] for k in range(4, 11)]
    assert errors == sorted(errors, reverse=True)  # never rising from the tuned budgets on
    x = batches[0][0]
    with torch.no_grad():
        u = model.inject(x)
        z_star = get_solver("anderson", max_iter=80, tol=1e-8).solve(model.cell, torch.zeros_like(u), u).z
    assert _rel(tuned.predict(x, nfe=10)[1], z_star) < 0.1


def test_fixed_plans_must_cover_the_budgets_from_one(distilled):
    task, _, student = distilled
    with pytest.raises(ValueError, match="1..K"):
        select_plans(copy.deepcopy(student), list(task.test_batches(64))[:1], loss=task.loss,
                     fixed={2: [("jump", 0.1), ("jump", 0.2)]})


def _teacher(fp):
    model = _model()
    config = TeacherConfig(fp_correction=fp, fp_states=2,
                           train_solver=SolverSpec(name="picard", max_iter=6, tol=0.0))
    configure_teacher(model, config)
    model.train()
    return model, config


def test_the_fixed_point_correction_adds_the_loss_of_sampled_iterates():
    task = ToyTask()
    x, y = next(task.train_batches(64, shuffle=False))
    model, config = _teacher(0.5)
    u = model.inject(x)
    torch.manual_seed(3)
    z, info, iterates = _solve_with_iterates(model, u, 2)
    # the same z* (and graph) as the model's own DEQ call; the iterates are the solver's, detached
    assert torch.allclose(z, model.deq(u)[0])
    assert len(iterates) == 2 and not any(t.requires_grad for t in iterates)
    picks = info.trajectory_index
    assert len(set(picks)) == 2 and all(0 <= i < 6 for i in picks)
    solver = get_solver("picard", max_iter=6, tol=0.0)
    for i, t in zip(picks, iterates, strict=True):
        want = torch.zeros_like(t) if i == 0 else solver.solve(model.cell, torch.zeros_like(t), u,
                                                               max_iter=i).z
        assert torch.allclose(t, want, atol=1e-6)
    # the step's loss: the task loss on z*, plus 0.5 x the mean task loss one layer call after each
    torch.manual_seed(3)
    loss, stats = _teacher_step(task, model, config)(next(parts([(x, y)])), 0.0)
    with torch.no_grad():
        extra = torch.stack([task.loss(model.head(model.cell(t, u)), y) for t in iterates]).mean()
        base = task.loss(model.head(z), y)
    assert float(loss) == pytest.approx(float(base + 0.5 * extra), rel=1e-5)
    # the history logs them apart: "loss" the task loss at z*, "fp" the iterates'
    assert float(stats["loss"]) == pytest.approx(float(base), rel=1e-5)
    assert float(stats["fp"]) == pytest.approx(float(extra), rel=1e-5)
    plain, config0 = _teacher(0.0)
    got = _teacher_step(task, plain, config0)(next(parts([(x, y)])), 0.0)[0]
    assert float(got) == pytest.approx(float(base), rel=1e-5)


def test_a_bad_correction_setting_is_refused():
    with pytest.raises(ConfigError, match="fp_correction"):
        TeacherConfig(fp_correction=-1.0)
    with pytest.raises(ConfigError, match="fp_states"):
        TeacherConfig(fp_states=0)


def test_a_run_tunes_reports_and_recommends(tmp_path):
    from cdeq.cli import main
    from cdeq.run.stages import Run

    out = tmp_path / "run"
    args = ["teacher.epochs=3", "teacher.patience=1", "task_config.train_subset=128",
            "task_config.test_subset=64", "distill.epochs=1", "evaluate.budgets=[1,2,6]",
            "plans.max_nfe=6", "tune.max_k=2", "baselines.unrolled_ks=[1]", "baselines.anytime_k=2",
            "plus.enabled=false", "teacher.fp_correction=0.5"]
    assert main(["run", "digits", "--quick", "--out", str(out), "--set", *args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]["cdeq_tuned"]) == {"1", "2", "6"}
    assert report["teacher"]["stopped"] in ("plateau", "max_epochs")
    assert report["teacher"]["epochs"] <= 3 and report["teacher"]["best_epoch"] < report["teacher"]["epochs"]
    assert any(op[0] == "solve" for op in report["plans_tuned"]["6"])
    meta = Run(out).read_meta("student_tuned")
    assert meta["work"]["tune"]["samples"] >= 1 and len(meta["times"]) == 2
    # every method's total work counts the teacher's training it starts from
    work = report["train_work"]
    teacher = work["teacher"]
    assert teacher["layer_call_rows"] > teacher["samples"] > 0
    for name in ("cdeq", "cdeq_tuned", "unrolled_k1", "unrolled_any_k", "learned_init"):
        assert work[name]["total"]["samples"] > teacher["samples"]
        assert work[name]["total"]["layer_calls"] > teacher["layer_call_rows"]
    assert work["cdeq_tuned"]["total"]["samples"] == (
        teacher["samples"] + work["cdeq"]["distill"]["samples"] + work["cdeq_tuned"]["tune"]["samples"])
    assert work["unrolled_k1"]["total"]["layer_calls"] == (
        teacher["layer_call_rows"] + work["unrolled_k1"]["samples"])
    # the baselines get the work of the most trained cdeq model (here C-DEQ tuned)
    tuned = work["cdeq"]["distill"]["samples"] + work["cdeq_tuned"]["tune"]["samples"]
    assert work["unrolled_k1"]["steps"] == math.ceil(tuned / BaselineConfig().unrolled_batch_size)
    rec = report["recommend"]
    for c in ("1", "2", "3", "4"):
        pick = rec["costs"][c]
        valid = report["valid"]["methods"]
        fits = [(n, k) for n, per in valid.items() for k in per
                if report["cost"]["layer_calls"][n][k] <= int(c) * COST_SLACK]
        assert valid[pick["method"]][str(pick["budget"])] == max(valid[n][k] for n, k in fits)
        assert pick["cdeq"] == (pick["method"] in ("cdeq", "cdeq_plus", "cdeq_tuned"))
    table = (out / "table.md").read_text()
    assert "| C-DEQ tuned |" in table and "Recommendation" in table
    picks = [p for p in [*rec["costs"].values(), rec["teacher_accuracy"]] if p]
    assert ("not a cdeq model" in table) == any(not p["cdeq"] for p in picks)


def test_tuned_plans_that_leave_no_budget_to_the_solver_are_warned_of():
    assert handover_warning(TuneConfig(max_k=2), 6) is None
    for max_nfe in (2, 1):
        text = handover_warning(TuneConfig(max_k=2), max_nfe)
        assert "tune.max_k (2)" in text and f"plans.max_nfe ({max_nfe})" in text


def test_the_teacher_stop_warning_names_the_setting_that_stopped_it():
    """Why the teacher stopped, said for each reason: the plateau (nothing to say), max_steps
    (raise teacher.max_steps, not epochs), max_epochs with a validation split (raise
    teacher.epochs), no validation split (no plateau to reach), or early stopping off."""
    cfg = TeacherConfig(epochs=5, max_steps=7)
    valid = {"valid": [1.0, 0.9]}
    assert stop_warning({**valid, "stopped": ["plateau"]}, cfg) is None
    steps = stop_warning({**valid, "stopped": ["max_steps"]}, cfg)
    assert "teacher.max_steps (7" in steps and "teacher.epochs" not in steps
    assert "raise teacher.epochs (now 5)" in stop_warning({**valid, "stopped": ["max_epochs"]}, cfg)
    alone = stop_warning({"stopped": ["max_epochs"]}, cfg)
    assert "no validation split" in alone and "raise" not in alone
    assert stop_warning({**valid, "stopped": ["max_epochs"]}, TeacherConfig(patience=0)) is None


def test_tuning_config_is_validated():
    for bad in ({"max_k": 0}, {"samples": -1}, {"train_injection": 1}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            TuneConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="max_k"):  # a replaced value is validated too
        dataclasses.replace(TuneConfig(), max_k=0)
