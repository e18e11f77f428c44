"""The cost counter against hand counts, the timing harness, the teacher-accuracy cost, and the
one-run-per-solver truncation against separate runs."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cdeq import get_solver
from cdeq.consistency.schedule import ScheduleConfig, TimeSchedule
from cdeq.consistency.student import ConsistencyStudent, StudentConfig
from cdeq.deq import DEQModel
from cdeq.run.cost import count_flops, teacher_accuracy_cost, time_methods
from cdeq.run.evaluate import EvalConfig, measure_flops, predictors, truncated_states


class ConvCell(nn.Module):
    """``relu(conv3x3(z) + u)``: a layer simple enough to count by hand."""

    channels, channel_dim = 4, 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        nn.init.normal_(self.conv.weight, 0, 0.05)

    def state_shape(self, u):
        return tuple(u.shape)

    def forward(self, z, u):
        return torch.relu(self.conv(z) + u)


def test_conv_layer_count_matches_hand_count():
    b, c, h, w = 3, 4, 5, 5
    z, u = torch.randn(b, c, h, w), torch.randn(b, c, h, w)
    got = count_flops(lambda: ConvCell()(z, u))
    assert got.dense == 2 * b * c * h * w * c * 9  # one multiply-add per weight per output
    assert got.elementwise == 2 * b * c * h * w  # the add and the relu
    assert got.sparse == 0


def test_dense_products_agree_with_flop_counter_mode():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(2, 3, 8, 8)
    with FlopCounterMode(display=False) as ref:
        net(x)
    got = count_flops(lambda: net(x))
    assert got.dense == ref.get_total_flops()
    assert got.elementwise == 2 * 8 * 6 * 6 + 2 * 5  # the two bias adds FlopCounterMode leaves out


def test_sparse_product_counts_nonzeros_not_the_dense_shape():
    n, d = 50, 6
    idx = torch.randint(0, n, (2, 120))
    adj = torch.sparse_coo_tensor(idx, torch.ones(120), (n, n)).coalesce()
    nnz = adj._nnz()
    weight = torch.randn(d, d)
    h = torch.randn(n, d)
    for a in (adj, adj.to_sparse_csr()):
        got = count_flops(lambda a=a: torch.relu(a @ h @ weight + h))
        assert got.sparse == 2 * nnz * d
        assert got.dense == 2 * n * d * d
        assert got.elementwise == 2 * n * d


def test_anderson_arithmetic_is_counted():
    f = ConvCell()
    u = torch.randn(2, 4, 5, 5)
    z0 = torch.zeros_like(u)
    layer = count_flops(lambda: f(z0, u)).total
    picard = count_flops(lambda: get_solver("picard", max_iter=4, tol=0.0).solve(f, z0, u)).total
    anderson = count_flops(lambda: get_solver("anderson", max_iter=4, tol=0.0).solve(f, z0, u)).total
    assert picard >= 4 * layer
    assert anderson > picard  # Gram rows, mixing and the small solves


def _tiny(correction_hidden=8):
    torch.manual_seed(0)
    teacher = DEQModel(nn.Conv2d(1, 4, 3, padding=1), ConvCell(),
                       nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 3)), solver="anderson")
    student = ConsistencyStudent(teacher, TimeSchedule(ScheduleConfig()),
                                 StudentConfig(time_features=4, time_hidden=6,
                                               correction_hidden=correction_hidden))
    return teacher, student


def _student_extra(teacher, student, x):
    """The student's 1-call FLOPs per sample beyond the injection, head and one layer call."""
    preds = predictors(teacher, student, EvalConfig(budgets=(1,), solvers=("picard",)), [1], None, x)
    got = measure_flops(teacher, preds, x)
    extra = got["flops"]["cdeq"]["1"] - (got["injection_flops"] + got["head_flops"]
                                         + got["layer_call_flops"])
    return extra, got


def test_student_count_includes_time_embedding_and_correction():
    b, c, hw = 2, 4, 25
    x = torch.randn(b, 1, 5, 5)
    # time MLP: Linear(5 -> 6) + SiLU + Linear(6 -> 5c: FiLM scales and shifts, input mix), biases
    time_mlp = 2 * 5 * 6 + 6 + 6 + 2 * 6 * 20 + 20
    # correction: 1x1 convs (2c -> 8 -> c) with biases and a SiLU, at every position
    correction = hw * (2 * 2 * c * 8 + 8 + 8 + 2 * 8 * c + c)
    teacher, student = _tiny(8)
    extra, full = _student_extra(teacher, student, x)
    assert extra >= time_mlp + correction  # the corrected student embeds the time per sample
    assert full["layer_calls"]["cdeq"]["1"] > 1.0 + correction / full["layer_call_flops"]
    # one layer call plus the loop's own residual and best-iterate arithmetic, large beside a 4-channel cell
    assert 1.0 < full["layer_calls"]["picard"]["1"] < 1.1
    assert b == full["batch_size"]
    # the default student: per state element one multiply-add for the input mix and one for the
    # folded output affine; the plan's one time is embedded once per batch, then read from a table
    teacher, student = _tiny(0)
    cold, _ = _student_extra(teacher, student, x)
    warm, _ = _student_extra(teacher, student, x)
    fourier = 1 + 1 + 1 + 2 + 2 + 2  # clamp, log, / 4, * freqs, sin, cos
    film = 2 * c + 2 * c  # 1 + gamma (in and out), c_out * (scale_out, shift_out)
    assert cold == pytest.approx(2 * c * hw + (time_mlp + fourier + film) / b)
    assert warm == 2 * c * hw


@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_one_run_serves_every_budget_exactly(name):
    torch.manual_seed(1)
    f = ConvCell()
    u = torch.randn(6, 4, 5, 5)
    z0 = torch.zeros_like(u)
    budgets = [1, 2, 3, 5, 8]
    solver = get_solver(name, max_iter=max(budgets), tol=0.0)
    shared = truncated_states(solver, f, z0, u, budgets)
    for k in budgets:
        alone = get_solver(name, max_iter=k, tol=0.0).solve(f, z0, u).z
        assert torch.equal(shared[k], alone), (name, k)


def test_a_sample_stopping_early_falls_back_to_separate_runs():
    f = ConvCell()
    u = torch.randn(3, 4, 5, 5)
    u[0] = -10.0  # relu(conv(0) + u) = 0 = z0: an exact fixed point, the sample stops at once
    z0 = torch.zeros_like(u)
    solver = get_solver("anderson", max_iter=4, tol=0.0)
    shared = truncated_states(solver, f, z0, u, [1, 4])
    for k in (1, 4):
        assert torch.equal(shared[k], get_solver("anderson", max_iter=k, tol=0.0).solve(f, z0, u).z)


def test_timing_harness_interleaves_and_reports_spread():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = time_methods(fns, repeats=20, warmup=1, threads=1)
    assert calls.count("a") == calls.count("b") == 21
    assert calls[:4] == ["a", "b", "b", "a"]  # the order rotates
    assert set(out["a"]) == {"median_ms", "iqr_ms", "repeats"} and out["a"]["repeats"] == 20
    assert out["a"]["iqr_ms"] >= 0
    with pytest.raises(ValueError, match="repeats"):
        time_methods(fns, repeats=0)


def _report(valid_cdeq, valid_picard):
    flops = {"cdeq": {"1": 3.0, "2": 6.0}, "picard": {"1": 1.0, "2": 2.0, "4": 4.0}}
    return {
        "metric": "accuracy", "higher_is_better": True,
        "valid": {"teacher": {"metric": 0.90}, "methods": {"cdeq": valid_cdeq, "picard": valid_picard}},
        "methods": {"cdeq": {"1": 0.5, "2": 0.6}, "picard": {"1": 0.1, "2": 0.2, "4": 0.3}},
        "cost": {"flops": flops, "layer_calls": flops},
        "timing": {"threads": 1, "cdeq": {k: {"median_ms": 10 * v} for k, v in flops["cdeq"].items()},
                   "picard": {k: {"median_ms": 10 * v} for k, v in flops["picard"].items()}},
    }


def test_teacher_accuracy_cost_picks_cheapest_within_tolerance_on_validation():
    rep = _report({"1": 0.898, "2": 0.95}, {"1": 0.5, "2": 0.85, "4": 0.899})
    out = teacher_accuracy_cost(rep)
    assert out["tolerance"] == 0.0025
    assert out["cdeq"]["budget"] == 1 and out["cdeq"]["test_metric"] == 0.5  # reported on test
    assert out["best_truncated"]["budget"] == 4
    assert out["speedup_flops"] == pytest.approx(4.0 / 3.0)
    assert out["speedup_time"] == pytest.approx(40.0 / 30.0)
    strict = teacher_accuracy_cost(rep, tolerance=0.0)
    assert strict["cdeq"]["budget"] == 2 and strict["best_truncated"] is None
    assert strict["speedup_flops"] is None


def test_without_timing_drops_every_wall_clock_figure():
    from cdeq.run.cost import without_timing

    rep = _report({"1": 0.898, "2": 0.95}, {"1": 0.5, "2": 0.85, "4": 0.899})
    rep["teacher_accuracy_cost"] = teacher_accuracy_cost(rep)
    rep["latency_ms"] = {"teacher": 3.0}
    stripped = without_timing(rep)
    assert "timing" not in stripped and "latency_ms" not in stripped
    assert "by_time" not in stripped["teacher_accuracy_cost"]
    assert "median_ms" not in stripped["teacher_accuracy_cost"]["cdeq"]
    assert stripped["teacher_accuracy_cost"]["cdeq"]["flops"] == 3.0
    assert stripped["methods"] == rep["methods"]
