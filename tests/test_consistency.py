"""The consistency student: boundary condition, schedule, distillation beating the truncated teacher."""

import dataclasses

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
    relative_error,
    select_plans,
)
from cdeq.consistency.plans import TEACHER_HEAD, check_plan, plan_nfe, plan_to_json
from cdeq.consistency.search import _RULE
from cdeq.deq import DEQModel
from cdeq.engine.io import CorruptFileError


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



def rule_search(student, batches, score, higher_is_better, max_nfe, **rule):
    """The plan search with its rule changed (the alternatives ``benchmarks/tie_rule.py``
    compares): the private search function and rule."""
    from cdeq.consistency.search import _select_plans

    return _select_plans(student, batches, score, higher_is_better, 40, PlanSearchConfig(max_nfe=max_nfe),
                         None, dataclasses.replace(_RULE, **rule))

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
    return (logits.argmax(-1) == y).float(), float(nn.functional.cross_entropy(
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
                   task_loss=nn.functional.cross_entropy)
    assert hist["loss"][-1] < hist["loss"][0]
    search = rule_search(student, train, _score, True, 3, tie_within_se=0.0)
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
    # with exact ties, on the plan-search (training) batches more NFE is never worse
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


def test_a_resumed_recording_counts_the_layer_calls_of_every_shard(tmp_path):
    """A recording killed after some shards and resumed reports the layer calls of one recording
    done in one go: the kept shards' calls come from their own files, not from the rerun."""
    from cdeq.consistency.trajectory import record_counted
    from cdeq.engine.fit import LayerCalls

    model, x, y = tiny_problem(n=64)
    cfg = RecordConfig.from_dict({"solver": {"max_iter": 10}, "batch_size": 16})
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]

    def counted(root, data):
        with LayerCalls(model.cell) as calls:
            totals = record_counted(model, data, cfg, TrajectoryStore(root), calls.as_dict)
        return totals, calls.as_dict()

    whole, seen = counted(tmp_path / "whole", batches)
    assert whole == seen and whole["layer_calls"] > 0
    counted(tmp_path / "resumed", batches[:2])  # the run that was killed after two shards
    resumed, rerun = counted(tmp_path / "resumed", batches)
    assert resumed == whole
    assert rerun["layer_calls"] < whole["layer_calls"]  # the rerun itself recorded only two shards


def test_record_config_rejects_bad_indices():
    with pytest.raises(ConfigError, match="record indices"):
        RecordConfig.from_dict({"indices": [0, 99], "solver": {"max_iter": 10}})
    with pytest.raises(ConfigError, match="dtype"):
        RecordConfig(dtype="int8")


# --- the library API ------------------------------------------------------------------------------
def plain_cell(z, u):
    """A parameter-free ``f(z, u)``, as a TorchDEQ user would write it."""
    return torch.tanh(0.5 * z + u)


def test_student_leaves_the_teacher_as_the_caller_built_it():
    model, x, y = tiny_problem(n=64)
    flags = [p.requires_grad for p in model.parameters()]
    student = ConsistencyStudent(model)
    assert [p.requires_grad for p in model.parameters()] == flags == [True] * len(flags)
    own = student.trainable_parameters()
    teacher_ids = {id(p) for p in model.parameters()}
    assert own and not teacher_ids & {id(p) for p in own}
    assert {id(p) for p in own} == {id(p) for n, p in student.named_parameters()
                                    if not n.startswith("teacher.")}
    # a student step through the shared injection and a teacher re-entry step: no teacher grads
    u = student.inject(x)
    z = student._run_plan(u, [("jump", 0.01), ("step",), ("jump", 1.0)])
    nn.functional.cross_entropy(student.head(z), y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in student.cell.parameters())


def test_teacher_step_keeps_the_gradient_with_respect_to_the_state():
    model, x, _ = tiny_problem(n=8)
    student = ConsistencyStudent(model)
    u = model.inject(x).detach()
    z = torch.randn(8, 16, requires_grad=True)
    student._run_plan(u, [("step",)], z0=z).sum().backward()
    z2 = z.detach().requires_grad_()
    model.cell(z2, u).sum().backward()
    assert torch.allclose(z.grad, z2.grad)


def test_distill_leaves_the_teacher_weights_unchanged():
    model, x, y = tiny_problem(n=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trajs = record(model, [(x, y)], RecordConfig.from_dict({"solver": {"max_iter": 20}}))
    student = ConsistencyStudent(model)
    distill(student, trajs, DistillConfig.from_dict({"epochs": 2, "batch_size": 64, "optim": {"lr": 1e-2}}),
            task_loss=nn.functional.cross_entropy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_predict_refuses_multi_step_without_selected_plans():
    model, x, y = tiny_problem(n=64)
    student = ConsistencyStudent(model)
    assert student.predict(x, nfe=1)[0].shape == (64, 4)
    with pytest.raises(ValueError, match=r"select_plans\(val_batches"):
        student.predict(x, nfe=4)
    log = select_plans(student, [(x, y)], loss=nn.functional.cross_entropy,
                       config=PlanSearchConfig(max_nfe=3))
    assert set(log) == {"1", "2", "3"} and student.plans_selected
    assert student.predict(x, nfe=4)[0].shape == (64, 4)  # the selected 3-NFE plan
    assert len(student.plan_for(4)) <= 3
    losses = [log[k]["loss"] for k in ("1", "2", "3")]
    assert losses == sorted(losses, reverse=True)  # on the search batches, more NFE is never worse


def test_plans_selected_without_labels_track_the_teacher():
    model, x, _ = tiny_problem(n=64)
    student = ConsistencyStudent(model)
    # inputs alone: scored against the converged teacher
    log = select_plans(student, [x], config=PlanSearchConfig(max_nfe=2))
    assert log["2"]["metric"] <= log["1"]["metric"]
    with pytest.raises(ValueError, match=r"\(x, y\) batches"):
        select_plans(student, [x], loss=nn.functional.cross_entropy)


def test_deq_model_takes_any_cell_and_infers_the_state():
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    model = DEQModel(nn.Linear(3, 8), plain_cell, nn.Linear(8, 2))
    with pytest.raises(ValueError, match="channels=C"):
        model.state_layout()  # nothing seen yet and nothing declared
    logits, info = model(x)
    assert logits.shape == (5, 2) and bool(info.converged.all())
    assert model.state_layout() == (8, -1)
    assert ConsistencyStudent(model).predict(x)[0].shape == (5, 2)
    # a state of its own shape, and a 4-d state read as (B, C, H, W)
    wide = DEQModel(nn.Identity(), lambda z, u: torch.tanh(0.5 * z + u.sum(-1, keepdim=True)),
                    nn.Flatten(), state_shape=(6,))
    assert wide.state_layout() == (6, -1) and wide(x)[0].shape == (5, 6)
    conv = DEQModel(nn.Conv2d(1, 4, 3, padding=1), plain_cell, nn.Flatten())
    assert conv.state_layout(torch.randn(2, 1, 5, 5)) == (4, 1)
    with pytest.raises(ValueError, match="state_shape"):
        DEQModel(nn.Identity(), plain_cell, nn.Identity(), state_shape=(0,))


def test_plan_search_never_lets_the_error_to_z_star_rise():
    """A score that rewards leaving the equilibrium (logits far from the converged teacher's)
    picks plans whose error to z* rises when the rule is off; with ``error_must_not_rise`` (the
    default) it never rises. Ties with the teacher are off: they alone would undo that score."""
    torch.manual_seed(0)
    model, x, _ = tiny_problem(n=64)
    student = ConsistencyStudent(model)
    with torch.no_grad():
        for p in student.time_embed.parameters():  # an undistilled student with wild jumps
            p.normal_(0, 0.3)
        converged = model.head(model.deq.solve(model.inject(x)).z)
    batches = [(x, converged)]

    def far(logits, ref):  # higher is better: the distance to the converged teacher's logits
        return (logits - ref).norm(dim=-1), 0.0

    def errors(rule: bool) -> list[float]:
        log = rule_search(student, batches, far, True, 4, error_must_not_rise=rule,
                          tie_with_teacher=False)
        with torch.no_grad():
            u = model.inject(x)
            z_star = model.deq.solve(u).z
            measured = []
            u_s, u_t = student.teacher_inputs(x)
            for k in range(1, 5):
                z = student._run_plan(u_s, student.plan_for(k), u_t)
                measured.append(float(relative_error(z, z_star).mean()))
        assert [log[str(k)]["relative_error"] for k in range(1, 5)] == pytest.approx(measured, rel=1e-4)
        return measured

    free = errors(False)
    assert any(b > a for a, b in zip(free, free[1:], strict=False))  # the rule has something to stop
    kept = errors(True)
    assert all(b <= a for a, b in zip(kept, kept[1:], strict=False))


def test_plan_search_tie_break_by_the_error_to_z_star():
    """Every plan scores the same metric; the loss rewards leaving z*. Breaking ties by the loss
    picks plans far from z*, by the error (the search's rule) the closest."""
    torch.manual_seed(0)
    model, x, _ = tiny_problem(n=64)
    student = ConsistencyStudent(model)
    with torch.no_grad():
        converged = model.head(model.deq.solve(model.inject(x)).z)

    def flat(logits, ref):  # the same metric for every plan; the loss is lower far from the teacher
        return torch.zeros(logits.shape[0]), -float((logits - ref).norm(dim=-1).sum())

    def errors(tie_break: str) -> list[float]:
        log = rule_search(student, [(x, converged)], flat, True, 4, error_must_not_rise=False,
                          tie_break=tie_break)
        return [log[str(k)]["relative_error"] for k in range(1, 5)]

    by_loss, by_error = errors("loss"), errors("error")
    assert all(e <= f for e, f in zip(by_error, by_loss, strict=True))
    assert by_error[-1] < by_loss[-1]


def test_a_gain_below_its_standard_error_is_a_tie():
    """Hand count: ``a`` trails ``ref`` on one item of four by 1, a mean of 0.25 with standard
    error std([0, 0, 1, 0]) / 2 = 0.25; a gain of exactly one standard error is not a tie."""
    from cdeq.consistency.search import _Scored, _trails

    def scored(items):
        return _Scored([], [], float(sum(items)) / len(items), 0.0, 0.0, torch.tensor(items))

    ref, a = scored([1.0, 1.0, 1.0, 1.0]), scored([1.0, 1.0, 0.0, 1.0])
    assert _trails(a, ref, True, 1.0)
    assert not _trails(a, ref, True, 1.01)
    assert not _trails(ref, a, True, 5.0)  # ahead never trails
    assert not _trails(ref, a, False, 1.01) and _trails(ref, a, False, 1.0)  # lower is better


def test_plan_search_counts_noise_as_a_tie_and_takes_the_plan_nearest_z_star():
    """The metric is noise of each item's logits (no plan is really better); with a wide tie
    margin every plan ties and the search chooses as if the metrics were equal: by the error to z*,
    then the loss. With no margin the noise picks."""
    torch.manual_seed(0)
    model, x, _ = tiny_problem(n=64)
    student = ConsistencyStudent(model)
    with torch.no_grad():
        converged = model.head(model.deq.solve(model.inject(x)).z)

    def noise(logits, ref):  # pseudo-random per item and plan, mean near 0, spread 1
        return torch.sin(1e4 * logits.sum(-1)), -float((logits - ref).norm(dim=-1).sum())

    def flat(logits, ref):
        return torch.zeros(logits.shape[0]), -float((logits - ref).norm(dim=-1).sum())

    def search(fn, within_se: float) -> list:
        return rule_search(student, [(x, converged)], fn, True, 5, error_must_not_rise=False,
                           tie_break="error", tie_within_se=within_se)

    tied, equal, by_noise = search(noise, 1e9), search(flat, 0.0), search(noise, 0.0)
    assert [tied[str(k)]["plan"] for k in range(1, 6)] == [equal[str(k)]["plan"] for k in range(1, 6)]
    assert [tied[str(k)]["plan"] for k in range(1, 6)] != [by_noise[str(k)]["plan"] for k in range(1, 6)]
    assert tied["5"]["relative_error"] < by_noise["5"]["relative_error"]


def test_a_plan_as_good_as_the_converged_teacher_ties_with_any_earlier_gain():
    """The metric rewards leaving z* (each item's distance from the converged logits), so the
    converged teacher scores 0, below every plan. Without ``tie_with_teacher`` the search keeps
    plans that gained metric by leaving z*; with it (the search's rule) every plan ties with the teacher
    and the search chooses as if the metrics were equal: by the error to z*."""
    torch.manual_seed(0)
    model, x, _ = tiny_problem(n=64)
    student = ConsistencyStudent(model)
    with torch.no_grad():
        converged = model.head(model.deq.solve(model.inject(x)).z)

    def away(logits, ref):  # higher is better: the distance from the converged teacher's logits
        d = (logits - ref).norm(dim=-1)
        return d, -float(d.sum())

    def flat(logits, ref):
        return torch.zeros(logits.shape[0]), 0.0

    def errors(fn, **kw) -> list[float]:
        log = rule_search(student, [(x, converged)], fn, True, 5, **kw)
        return [log[str(k)]["relative_error"] for k in range(1, 6)]

    kept, with_teacher = errors(away, tie_with_teacher=False), errors(away)
    assert with_teacher == errors(flat, tie_within_se=0.0)
    assert with_teacher[-1] < kept[-1]
    assert with_teacher == errors(away, **dataclasses.asdict(_RULE))  # the rule ties with the teacher


def accuracy(logits, y):
    hit = (logits.argmax(-1) == y).float()
    return hit, -float(nn.functional.cross_entropy(logits, y, reduction="sum"))


def test_the_search_reads_plans_that_reach_z_star_with_the_teachers_head():
    """The student's head is made worse than the teacher's (its rows permuted), so near ``z*``
    only the teacher's head gets the converged labels. With ``teacher_head`` (the search's rule) the
    chosen plans are read out by the teacher's head and score as the teacher at 12 calls; without
    it the plans reach as near ``z*`` but score with the worse head."""
    torch.manual_seed(0)
    model, x, y = tiny_problem(n=128)
    student = ConsistencyStudent(model)
    with torch.no_grad():
        student.head.weight.copy_(student.head.weight.roll(1, dims=0))
        student.head.bias.copy_(student.head.bias.roll(1, dims=0))
    log = select_plans(student, [(x, y)], accuracy, True, last=40, config=PlanSearchConfig(max_nfe=12))
    top = student.plan_for(12)
    assert top[-1] == TEACHER_HEAD and log["12"]["metric"] == 1.0
    logits, z = student.predict(x, nfe=12)
    assert torch.equal(logits, model.head(z))  # the teacher's head reads the state
    assert plan_nfe(top) == 12 and log["12"]["relative_error"] < 0.02
    without = rule_search(student, [(x, y)], accuracy, True, 12, teacher_head=False)
    assert all(TEACHER_HEAD not in p for p in student.plans.values())
    assert without["12"]["metric"] < 0.5 and without["12"]["relative_error"] < 0.02


def test_a_plan_is_checked_when_set_and_the_teacher_head_only_ends_one():
    model, x, _ = tiny_problem(n=8)
    student = ConsistencyStudent(model)
    plan = [("jump", student.start_time), TEACHER_HEAD]
    student.plans = {1: plan}
    assert plan_nfe(plan) == 1 and check_plan(plan_to_json(plan)) == plan
    logits, z = student.predict(x, nfe=1)
    assert torch.equal(logits, model.head(z))
    with pytest.raises(ConfigError, match="last operation"):
        student.plans = {1: [TEACHER_HEAD, ("jump", student.start_time)]}
    with pytest.raises(ConfigError, match="not valid"):
        student.plans = {1: [("jump", "late")]}


def test_the_teacher_margin_decides_whether_a_plan_below_the_teacher_ties():
    """Of two candidates, ``b`` scores best (90 of 100 items) and ``c`` is nearer ``z*`` but one
    item below the converged teacher (80), within one standard error of it. With
    ``teacher_within_se=1`` ``c`` ties with the teacher and wins on the error; with the search's
    margin 0 it trails the teacher and the better-scoring ``b`` is kept."""
    from cdeq.consistency.search import _choose, _Scored

    def scored(ones: list[int], err: float) -> _Scored:
        items = torch.zeros(100)
        items[ones] = 1.0
        return _Scored([("jump", 1.0)], [], float(items.mean()), 0.0, err, items)

    teacher = scored(list(range(80)), 0.0)
    b = scored(list(range(90)), 0.5)
    c = scored(list(range(2, 80)) + [85], 0.1)
    kept, _ = _choose([b, c], b, dataclasses.replace(_RULE, teacher_within_se=1.0), True, [teacher])
    assert kept is c
    kept, _ = _choose([b, c], b, _RULE, True, [teacher])
    assert kept is b


def test_the_search_rule_is_no_setting():
    """The alternatives to the search's rule are not configuration: a plan-search section naming
    one is refused; a saved run's configuration holding the rule's own value still reads, another
    value is an error that names the fixed rule."""
    from cdeq.run.config import RunConfig, build_config

    with pytest.raises(ConfigError, match="unknown key 'tie_break'"):
        PlanSearchConfig.from_dict({"tie_break": "loss"})
    old = {"plans": {"tie_within_se": 1.0, "tie_break": "error", "tie_with_teacher": True,
                     "teacher_within_se": 0.0, "teacher_head": True, "error_must_not_rise": True}}
    assert RunConfig.from_dict(old).plans == PlanSearchConfig()
    with pytest.raises(ConfigError, match="plans.tie_break='loss' is no longer a setting: .*fixed"):
        build_config("digits", {"plans": {"tie_break": "loss"}})
