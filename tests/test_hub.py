"""Saving, loading and exporting a distilled student (cdeq.hub)."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from torch import nn

import cdeq
from cdeq import hub
from cdeq.consistency import ConsistencyStudent
from cdeq.engine.config import ConfigError
from cdeq.engine.io import CorruptFileError
from cdeq.tasks import TASKS

TASK_CFG = {"channels": 8, "hidden_mult": 1, "train_subset": 64, "test_subset": 16}


@pytest.fixture(scope="module")
def student_and_x():
    cls = TASKS["digits"]
    task = cls(cls.Config.from_dict(TASK_CFG))
    student = ConsistencyStudent(task.build_model())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off the zero-initialised time layers so the test means something
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    student.plans = {1: [("jump", 0.01)], 2: [("jump", 0.01), ("step",)]}
    student.eval()
    x, _ = next(iter(task.test_batches(4)))
    return student, x


def test_save_and_load_pretrained_gives_the_same_model(student_and_x, tmp_path):
    student, x = student_and_x
    hub.save_pretrained(student, tmp_path / "m", "digits", TASK_CFG)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["task"] == "digits" and cfg["task_config"] == TASK_CFG
    assert {"schedule", "student", "plans"} <= set(cfg)
    loaded = hub.from_pretrained(tmp_path / "m")
    assert loaded.plans == student.plans
    for nfe in (1, 2):
        assert torch.equal(loaded.predict(x, nfe)[0], student.predict(x, nfe)[0])


def test_a_c_deq_plus_student_saves_and_loads_with_its_start(tmp_path):
    from cdeq.consistency.plus import PlusStudent

    cls = TASKS["digits"]
    task = cls(cls.Config.from_dict(TASK_CFG))
    torch.manual_seed(0)
    plus = PlusStudent(task.build_model(), init_hidden=4, init_conv=False, start_time=0.5,
                       reentry_time=1.5)
    with torch.no_grad():  # a start h(u) that is not zero
        for p in plus.initialiser.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    plus.plans = {1: [("jump", 0.5)], 2: [("jump", 0.5), ("jump", 1.5)]}
    plus.eval()
    x, _ = next(iter(task.test_batches(4)))
    hub.save_pretrained(plus, tmp_path / "m", "digits", TASK_CFG)
    loaded = hub.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, PlusStudent) and loaded.plus_settings() == plus.plus_settings()
    for nfe in (1, 2):
        assert torch.equal(loaded.predict(x, nfe)[1], plus.predict(x, nfe)[1])


def test_from_pretrained_errors_name_the_file(student_and_x, tmp_path):
    student, _ = student_and_x
    with pytest.raises(FileNotFoundError, match="config.json"):
        hub.from_pretrained(tmp_path / "nothing")
    d = hub.save_pretrained(student, tmp_path / "m", "digits", TASK_CFG)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        hub.from_pretrained(d)
    hub.save_pretrained(student, d, "digits", {**TASK_CFG, "channels": 16})  # config vs weights
    cfg = json.loads((d / "config.json").read_text())
    hub.save_pretrained(student, d, "digits", TASK_CFG)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match") as err:
        hub.from_pretrained(d)
    assert "size mismatch" in str(err.value)  # the whole state_dict message, not its first line


def test_one_step_wrapper_equals_predict(student_and_x):
    student, x = student_and_x
    with torch.no_grad():
        assert torch.allclose(hub.OneStepStudent(student)(x), student.predict(x, 1)[0], atol=1e-6)


def test_export_matches_eager_and_has_a_dynamic_batch(student_and_x, tmp_path):
    student, x = student_and_x
    path, method = hub.export_one_step(student, x, tmp_path / "student.pt2")
    assert method in ("torch.export", "torchscript") and path.exists()
    module = hub.load_exported(path)
    with torch.no_grad():
        assert torch.allclose(module(x), student.predict(x, 1)[0], atol=1e-5)
        if method == "torch.export":  # the batch dimension was exported as dynamic
            x7 = torch.randn(7, *x.shape[1:])
            assert torch.allclose(module(x7), student.predict(x7, 1)[0], atol=1e-5)


def test_torchscript_fallback(student_and_x, tmp_path, monkeypatch):
    student, x = student_and_x

    def broken(*args, **kwargs):
        raise RuntimeError("export not supported here")

    monkeypatch.setattr(torch.export, "export", broken)
    with pytest.warns(UserWarning, match="falling back to TorchScript"):
        path, method = hub.export_one_step(student, x, tmp_path / "student.pt")
    assert method == "torchscript"
    with torch.no_grad():
        assert torch.allclose(hub.load_exported(path)(x), student.predict(x, 1)[0], atol=1e-5)


@pytest.mark.skipif(os.environ.get("CDEQ_TEST_COMPILE") != "1",
                    reason="torch.compile of the one-step student works but takes ~2 min on a loaded "
                           "2-core CPU (inductor C++ build); set CDEQ_TEST_COMPILE=1 to run it")
def test_torch_compile_of_the_inference_path(student_and_x):
    student, x = student_and_x
    compiled = torch.compile(hub.OneStepStudent(student))
    with torch.no_grad():
        assert torch.allclose(compiled(x), student.predict(x, 1)[0], atol=1e-5)


def test_cli_export(tmp_path, capsys):
    from cdeq.cli import main

    out = tmp_path / "run"
    tiny = ["teacher.epochs=1", "task_config.train_subset=64", "task_config.test_subset=16",
            "record.max_samples=64", "distill.epochs=1", "plans.max_nfe=1", "evaluate.budgets=[1]"]
    assert main(["train", "digits", "--quick", "--out", str(out), "--set", *tiny]) == 0
    assert main(["record", "--out", str(out)]) == 0
    assert main(["distill", "--out", str(out)]) == 0
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "s.pt2"),
                 "--pretrained", str(tmp_path / "pre")]) == 0
    assert "wrote" in capsys.readouterr().out
    from cdeq.run.stages import Run

    run = Run(out)
    x, _ = next(iter(run.task.test_batches(5)))
    with torch.no_grad():
        ref = run.student().predict(x, 1)[0]
        assert torch.allclose(hub.load_exported(tmp_path / "s.pt2")(x), ref, atol=1e-5)
        assert torch.allclose(hub.from_pretrained(tmp_path / "pre").predict(x, 1)[0], ref, atol=1e-6)
    assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pt2")]) == 2
    with pytest.raises(ConfigError, match=r"run directory.*--pretrained DIR"):
        hub.from_pretrained(out)  # the run itself, not its export


# --- the pipeline object, for a user's own cell ------------------------------------------------


class WideCell(nn.Module):
    """A user cell whose init arguments are kept as attributes."""

    def __init__(self, width: int, scale: float = 0.5) -> None:
        super().__init__()
        self.width, self.scale = width, scale
        self.lin = nn.Linear(width, width)

    def forward(self, z, u):
        return torch.tanh(self.scale * self.lin(z) + u)


@cdeq.saveable
class HiddenArgsCell(nn.Module):
    """Init arguments not kept as attributes: recorded by @cdeq.saveable."""

    def __init__(self, sizes: list, gain: float = 0.5) -> None:
        super().__init__()
        self.lin = nn.Linear(sizes[0], sizes[1])
        self.g = gain

    def forward(self, z, u):
        return torch.tanh(self.g * self.lin(z) + u)


class UnrecordableCell(WideCell):
    def __init__(self, n: int) -> None:
        super().__init__(n)


def user_pipeline(cell, width=6, seed=0):
    torch.manual_seed(seed)
    model = cdeq.DEQModel(nn.Sequential(nn.Linear(3, width), nn.Tanh()), cell,
                          nn.Linear(width, 2, bias=False), solver={"name": "anderson", "max_iter": 25},
                          eval_solver=cdeq.SolverSpec(name="picard", max_iter=40, tol=1e-5))
    x = torch.randn(16, 3)
    model(x)  # seen a state: the student reads its channels off it
    student = cdeq.ConsistencyStudent(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    pipe = cdeq.Pipeline(student).select_plans([x], max_nfe=2)
    return pipe, x


@pytest.mark.parametrize("cell", [WideCell(6, scale=0.4), HiddenArgsCell([6, 6], gain=0.3)])
def test_pipeline_saves_and_loads_a_user_cell(cell, tmp_path):
    pipe, x = user_pipeline(cell)
    out = pipe(x, nfe=2)
    assert out.shape == (16, 2) and torch.equal(out, pipe.student.predict(x, nfe=2)[0])
    pipe.save_pretrained(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["teacher"]["cell"]["class"] == f"{__name__}:{type(cell).__name__}"
    loaded = cdeq.Pipeline.from_pretrained(tmp_path / "p")
    assert type(loaded.teacher.cell) is type(cell) and loaded.plans == pipe.plans
    assert loaded.teacher.deq.eval_solver.name == "picard"
    for nfe in (1, 2):
        assert torch.equal(loaded(x, nfe=nfe), pipe(x, nfe=nfe))
    with torch.no_grad():
        assert torch.equal(loaded.teacher(x)[0], pipe.teacher(x)[0])


def test_pipeline_that_cannot_be_recorded_writes_nothing(tmp_path):
    pipe, _ = user_pipeline(UnrecordableCell(6))
    with pytest.raises(ConfigError, match="saveable"):
        pipe.save_pretrained(tmp_path / "p")
    assert not (tmp_path / "p").exists()
    with pytest.raises(ConfigError, match="unknown task"):
        hub.save_pretrained(pipe.student, tmp_path / "q", task="mine")


def test_from_pretrained_on_a_run_directory_names_the_export_command(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "digits", "teacher": {}, "distill": {}}))
    (run / "student.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"run directory.*cdeq export --model RUN --out FILE "
                                          r"--pretrained DIR"):
        hub.from_pretrained(run)


def test_exported_model_names_the_expected_input_shape(student_and_x, tmp_path):
    student, x = student_and_x
    path, _ = hub.export_one_step(student, x, tmp_path / "s.pt2")
    module = hub.load_exported(path)
    expected = "(B, " + ", ".join(str(d) for d in x.shape[1:])
    with pytest.raises(ValueError, match=re.escape(expected)):
        module(torch.randn(2, 1, 5, 5))
    with pytest.raises(ValueError, match="shape"):
        module(torch.randn(8, 8))


def test_pipeline_is_a_hub_mixin_offline(tmp_path):
    hf = pytest.importorskip("huggingface_hub")
    pipe, x = user_pipeline(WideCell(6))
    assert isinstance(pipe, hf.PyTorchModelHubMixin)
    pipe.save_pretrained(tmp_path / "p")  # through the mixin: it adds a model card
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (tmp_path / "p").iterdir()}
    loaded = cdeq.Pipeline.from_pretrained(str(tmp_path / "p"), local_files_only=True)
    assert torch.equal(loaded(x, nfe=2), pipe(x, nfe=2))


@pytest.mark.parametrize("task", ["digits", None])
def test_pretrained_keeps_the_solvers_the_teacher_config_set(task, tmp_path):
    """A run's TeacherConfig replaces the model's default solvers; a pretrained directory records
    the solvers the teacher ran with and the loaded teacher runs them too (a task's model, rebuilt
    by the task, or a user's modules, rebuilt from their recipe)."""
    from cdeq.run.teacher import TeacherConfig, configure_teacher

    if task is None:
        teacher = user_pipeline(WideCell(6))[0].teacher
    else:
        cls = TASKS[task]
        teacher = cls(cls.Config.from_dict(TASK_CFG)).build_model()
    configure_teacher(teacher, TeacherConfig.from_dict({
        "train_solver": {"name": "broyden", "max_iter": 11, "tol": 3e-3},
        "eval_solver": {"name": "picard", "max_iter": 77, "tol": 2e-5},
        "backward": "phantom", "backward_options": {"steps": 3}}))
    hub.save_pretrained(ConsistencyStudent(teacher), tmp_path / "m", task, TASK_CFG if task else None)
    loaded = hub.from_pretrained(tmp_path / "m").teacher.deq
    assert (loaded.eval_solver.name, loaded.eval_solver.options.max_iter) == ("picard", 77)
    assert loaded.eval_solver.options.tol == 2e-5
    assert (loaded.solver.name, loaded.solver.options.max_iter, loaded.solver.options.tol) == \
        ("broyden", 11, 3e-3)
    assert loaded.backward_strategy.name == "phantom" and loaded.backward_strategy.config.steps == 3


def test_export_reads_out_with_the_teachers_head_when_the_plan_says_so(student_and_x, tmp_path):
    student, x = student_and_x
    student = copy.deepcopy(student)
    student.plans = {1: [("jump", 0.01), ("teacher_head",)]}
    with torch.no_grad():
        expected, z = student.predict(x, 1)
        assert torch.equal(expected, student.teacher.head(z))
        assert not torch.allclose(expected, student.head(z))  # the two heads differ here
        assert torch.allclose(hub.OneStepStudent(student)(x), expected, atol=1e-6)
    path, _ = hub.export_one_step(student, x, tmp_path / "student.pt2")
    with torch.no_grad():
        assert torch.allclose(hub.load_exported(path)(x), expected, atol=1e-5)


def test_one_way_to_predict_and_the_old_names_warn(student_and_x):
    """``pipe(x, nfe=k)`` is the logits of the student's ``predict``, its engine; a given plan runs
    through ``predict`` too; the names of cdeq 0.1 still answer for one release, with a warning."""
    student, x = student_and_x
    pipe = cdeq.Pipeline(student)
    logits, z = student.predict(x, nfe=2)
    assert torch.equal(pipe(x, nfe=2), logits)
    plan = student.plan_for(2)
    assert torch.equal(student.predict(x, plan=plan)[1], z)
    with pytest.raises(ValueError, match="nfe=1 is below the 2 layer calls"):
        student.predict(x, 1, plan=plan)
    with pytest.warns(DeprecationWarning, match="pipe\\(x, nfe\\)"):
        assert torch.equal(pipe.predict(x, nfe=2)[0], logits)
    with pytest.warns(DeprecationWarning, match="predict\\(x, plan=plan\\)"), torch.no_grad():
        assert torch.equal(student.apply_plan(x, plan)[1], z)
    with pytest.warns(DeprecationWarning, match="Pipeline\\(student\\).select_plans"):
        from cdeq import select_plans
    assert select_plans is cdeq.consistency.search.select_plans
    assert "select_plans" not in cdeq.__all__ and not hasattr(cdeq.Pipeline, "apply_plan")
