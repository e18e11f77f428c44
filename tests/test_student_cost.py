"""A student call costs at most 1.10 teacher layer calls in FLOPs, on every task's cell.

The count is the report's (``cost.layer_calls["cdeq"]["1"]``, :func:`cdeq.run.evaluate.measure_flops`)
for the 1-call plan, at the quick and the full presets' model sizes, random weights everywhere
(the student's time embedding too, so no zero initialisation hides an op). The builders are the
ones of ``benchmarks/student_cost.py``, which also times the calls.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from cdeq.consistency.student import ConsistencyStudent, StudentConfig
from cdeq.tasks.graphs.data import GraphDataError

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "student_cost.py"
_spec = importlib.util.spec_from_file_location("student_cost", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

BATCH = {"digits": 32, "mnist": 16, "cifar10": 16, "shakespeare": 4}  # graphs: the whole graph


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("stand_in")


def _cell(name, quick, folder):
    torch.manual_seed(0)
    try:
        teacher, task = bench.build_cell_model(name, quick, folder)
    except (FileNotFoundError, GraphDataError) as error:  # no shared data folder beside this checkout
        pytest.skip(f"{name}'s data is not available: {error}")
    return teacher, bench.example_input(task, BATCH.get(name, 1))


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
@pytest.mark.parametrize("name", bench.TASK_NAMES)
def test_one_student_call_costs_one_layer_call(name, quick, folder):
    teacher, x = _cell(name, quick, folder)
    student = bench.students(teacher)["new"]
    cold = bench.layer_calls(teacher, student, x)  # the plan's time embedded once for the batch
    warm = bench.layer_calls(teacher, student, x)  # then read from the table
    assert 1.0 <= warm <= cold <= 1.10, (name, quick, cold, warm)


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_one_student_call_costs_one_layer_call_on_the_multiscale_cell(quick, folder):
    """MNIST's multiscale cell (``task_config.scales=3``): a state of three parts, each
    conditioned on its own channels."""
    torch.manual_seed(0)
    teacher, task = bench.build_cell_model("mnist", quick, folder, {"scales": 3})
    x = bench.example_input(task, BATCH["mnist"])
    student = bench.students(teacher)["new"]
    assert isinstance(student.initial_state(student.inject(x)), tuple) and student.channels == (
        task.config.channels,) * 3
    cold = bench.layer_calls(teacher, student, x)
    warm = bench.layer_calls(teacher, student, x)
    assert 1.0 <= warm <= cold <= 1.10, (quick, cold, warm)


def test_one_student_call_costs_one_layer_call_on_the_paper_size_cell(folder):
    """MDEQ-small's cell (``task_config.size=paper``: 4 scales 32/64/128/256 wide) on MNIST-sized
    stand-in images: each part conditioned on its own width."""
    torch.manual_seed(0)
    teacher, task = bench.build_cell_model("mnist", False, folder, {"size": "paper"})
    x = bench.example_input(task, 4)
    student = bench.students(teacher)["new"]
    assert student.channels == (32, 64, 128, 256)
    cold = bench.layer_calls(teacher, student, x)
    warm = bench.layer_calls(teacher, student, x)
    assert 1.0 <= warm <= cold <= 1.10, (cold, warm)


def test_the_old_design_fails_the_bound(folder):
    """The check can fail: the previous student (correction MLP, per-sample time MLP) costs
    several layer calls on the quick Cora cell (10.2 in the quick run's report)."""
    teacher, x = _cell("cora", True, folder)
    assert bench.layer_calls(teacher, bench.students(teacher)["old"], x) > 5.0


def test_new_and_legacy_arithmetic_agree_without_the_correction(folder):
    """The folded jump computes the same function as the unfolded formula it replaces."""
    teacher, x = _cell("digits", True, folder)
    config = StudentConfig(input_mix=False)
    new = ConsistencyStudent(teacher, config=config)
    old = bench.LegacyStudent(teacher, config=config)
    old.load_state_dict(new.state_dict())
    with torch.no_grad():
        for p in new.time_embed.parameters():
            p.add_(0.1 * torch.randn_like(p))
        old.load_state_dict(new.state_dict())
        u = new.inject(x)
        z = torch.randn_like(new.initial_state(u))
        for t in (new.schedule.t_min, 0.7, torch.tensor([0.1, 0.5, 2.0, 5.0] * (x.shape[0] // 4))):
            torch.testing.assert_close(new.F(z, t, u), old.F(z, t, u), rtol=1e-5, atol=1e-5)
        z0 = new.initial_state(u)
        torch.testing.assert_close(new._run_plan(u, new.plans[1]), old.F(z0, new.schedule.t_min, u),
                                   rtol=1e-5, atol=1e-5)


def test_a_student_saved_without_the_input_mix_loads_as_the_same_function(folder):
    teacher, x = _cell("digits", True, folder)
    torch.manual_seed(1)
    before = ConsistencyStudent(teacher, config=StudentConfig(input_mix=False))
    with torch.no_grad():
        for p in before.time_embed.parameters():
            p.add_(0.1 * torch.randn_like(p))
    after = ConsistencyStudent(teacher)  # input_mix on: the saved state lacks the mix rows
    after.load_state_dict(before.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(after.predict(x)[0], before.predict(x)[0])


@pytest.mark.parametrize("name", ["digits", "mnist", "cifar10"])
def test_c_deq_plus_one_call_fits_a_cost_of_one_on_images(name, folder):
    """With the image presets' initialiser, C-DEQ+'s 1-call plan, h(u) included, fits a cost of
    one layer call (within the equal-cost tables' slack), so a k-call plan fits a cost of k."""
    from cdeq.consistency.plus import load_plus
    from cdeq.run.config import build_config
    from cdeq.run.report import COST_SLACK

    teacher, x = _cell(name, False, folder)
    student = load_plus(bench.students(teacher)["new"], build_config(name, {}).plus, {"time": 0.01})
    calls = bench.layer_calls(teacher, student, x)
    assert 1.0 < calls <= COST_SLACK, (name, calls)
