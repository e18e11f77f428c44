"""Bad input gets a clear error or warning: NaN/inf, wrong dtype or shape, empty data, labels out
of range, a teacher that does not converge, trajectories that do not match the model."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from torch import nn

import cdeq
from cdeq.cli import main
from cdeq.consistency import ConsistencyStudent, DistillConfig, RecordConfig, distill, record
from cdeq.consistency.trajectory import UnconvergedWarning, residual_summary, warn_unconverged
from cdeq.deq.layer import SolverSpec
from cdeq.run.stages import Run, RunConfig
from cdeq.run.teacher import TeacherConfig, train_teacher
from cdeq.tasks import TASKS
from cdeq.tasks.base import Task

D_IN, CLASSES = 6, 3


class Cell(nn.Module):
    channel_dim = -1

    def __init__(self, channels: int, scale: float = 0.5) -> None:
        super().__init__()
        self.channels = channels
        self.lin = nn.Linear(channels, channels)
        with torch.no_grad():  # spectral norm ~ scale: contractive for scale < 1
            self.lin.weight.copy_(scale * torch.linalg.qr(torch.randn(channels, channels))[0])

    def state_shape(self, u):
        return u.shape

    def forward(self, z, u):
        return torch.tanh(self.lin(z) + u) if self.lin.weight.abs().max() < 10 else self.lin(z) + u


def toy_model(channels: int = 8, scale: float = 0.5, seed: int = 0) -> cdeq.DEQModel:
    torch.manual_seed(seed)
    return cdeq.DEQModel(nn.Linear(D_IN, channels), Cell(channels, scale), nn.Linear(channels, CLASSES),
                         solver="anderson")


def batches(n: int = 2, size: int = 8, bad: str = ""):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(size, D_IN, generator=gen)
        y = torch.randint(0, CLASSES, (size,), generator=gen)
        if bad == "nan":
            x[1, 2] = float("nan")
        elif bad == "inf":
            x[0, 0] = float("inf")
        elif bad == "labels":
            y[3] = CLASSES + 4
        out.append((x, y))
    return out


RCFG = RecordConfig(solver=SolverSpec(name="anderson", max_iter=12, tol=1e-6), batch_size=8)


# --- recording ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_inputs_are_refused(bad):
    with pytest.raises(ValueError, match="NaN/inf"):
        record(toy_model(), batches(bad=bad), RCFG)


def test_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"rejected an input of shape \(8, 5\)"):
        record(toy_model(), [(torch.randn(8, D_IN - 1), torch.zeros(8, dtype=torch.long))], RCFG)


def test_wrong_dtype_is_a_clear_error():
    x = torch.randint(0, 5, (8, D_IN))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        record(toy_model(), [(x, torch.zeros(8, dtype=torch.long))], RCFG)


def test_empty_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        record(toy_model(), [], RCFG)


def test_unconverged_teacher_warns_with_fraction_and_residual():
    model = toy_model(scale=3.0)  # expansive and linear: the solver cannot converge
    trajs = record(model, batches(), RecordConfig(solver=SolverSpec(name="picard", max_iter=4, tol=1e-8)))
    summary = residual_summary(trajs, 1e-2)
    assert summary["unconverged_fraction"] == 1.0
    with pytest.warns(UnconvergedWarning, match=r"100\.0% of the recorded teacher samples did not "
                                                r"converge .*max residual"):
        assert warn_unconverged(summary, 1e-2)
    good = residual_summary(record(toy_model(), batches(), RCFG), 1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_unconverged(good, 1e-2)


# --- distillation -------------------------------------------------------------------------------
def test_trajectories_of_another_model_are_refused():
    trajs = record(toy_model(channels=16), batches(), RCFG)
    student = ConsistencyStudent(toy_model(channels=8))
    with pytest.raises(ValueError, match=r"z_star has shape \(8, 16\).*state .* has shape \(8, 8\)"):
        distill(student, trajs, DistillConfig(epochs=1), task_loss=nn.functional.cross_entropy)


def test_labels_out_of_range_in_distillation():
    trajs = record(toy_model(), batches(bad="labels"), RCFG)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 2\].*values in \[\d, 7\]"):
        distill(ConsistencyStudent(toy_model()), trajs, DistillConfig(epochs=1),
                task_loss=nn.functional.cross_entropy)


def test_non_finite_trajectories_stop_distillation():
    trajs = record(toy_model(), batches(), RCFG)
    for t in trajs:
        t.iterates[:, 1:] = float("nan")
        t.z_star[:] = float("nan")
    with pytest.raises(FloatingPointError, match="distillation loss became nan"):
        distill(ConsistencyStudent(toy_model()), trajs, DistillConfig(epochs=1),
                task_loss=nn.functional.cross_entropy)


def test_no_trajectories():
    with pytest.raises(ValueError, match="no trajectories"):
        distill(ConsistencyStudent(toy_model()), [], DistillConfig(epochs=1),
                task_loss=nn.functional.cross_entropy)


# --- teacher training and the pipeline through a toy task -------------------------------------------
class ToyTask(Task):
    name = "toy-bad-input"
    data: list = []

    def build_model(self):
        return toy_model()

    def train_batches(self, batch_size, shuffle=True, generator=None):
        return iter(list(self.data))

    def test_batches(self, batch_size):
        return iter(list(self.data))

    def loss(self, logits, y):
        return nn.functional.cross_entropy(logits, y)

    def metric_sum(self, logits, y):
        return float((logits.argmax(-1) == y).sum()), int(y.numel())


@pytest.mark.parametrize("bad, error, match", [
    ("empty", ValueError, "training split is empty"),
    ("nan", ValueError, "NaN/inf"),
    ("labels", ValueError, r"labels must be class indices in \[0, 2\]"),
])
def test_teacher_training_refuses_bad_data(monkeypatch, bad, error, match):
    monkeypatch.setattr(ToyTask, "data", [] if bad == "empty" else batches(bad=bad))
    task = ToyTask(ToyTask.Config())
    with pytest.raises(error, match=match):
        train_teacher(task, task.build_model(), TeacherConfig(epochs=1))


def test_record_stage_warns_when_the_teacher_did_not_converge(monkeypatch, tmp_path):
    monkeypatch.setitem(TASKS, ToyTask.name, ToyTask)
    monkeypatch.setattr(ToyTask, "data", batches())
    monkeypatch.setattr(ToyTask, "build_model", lambda self: toy_model(scale=3.0))
    cfg = RunConfig.from_dict({"task": ToyTask.name,
                               "record": {"solver": {"name": "picard", "max_iter": 3, "tol": 1e-9}}})
    run = Run(tmp_path, cfg)
    run.save_module("teacher", run.task.build_model(), {})
    with pytest.warns(UnconvergedWarning, match="did not converge"):
        run.record()


# --- the command line: bad configuration values, --out, a failed start, mismatched files ----------
def _no_stages(monkeypatch) -> list:
    """Replace the stages of `cdeq run` by a no-op (these tests check what happens before them)."""
    calls: list = []
    monkeypatch.setattr(Run, "run_all", lambda self: calls.append(self.dir) or {})
    return calls


@pytest.mark.parametrize("setting, key, form", [
    ("teacher.train_solver=foo", r"teacher\.train_solver='foo'", "a mapping of SolverSpec settings"),
    ("teacher=3", "teacher=3", "a mapping of TeacherConfig settings"),
    ("teacher.eval_solver.max_iter=many", r"teacher\.eval_solver\.max_iter='many'", "an integer"),
    ("baselines.enabled=1", r"baselines\.enabled=1", "true or false"),
    ("evaluate.budgets=4", r"evaluate\.budgets=4", "a list"),
    ("task_config=3", "task_config=3", "a mapping"),
])
def test_bad_configuration_values_give_rc_2_and_leave_nothing(tmp_path, capsys, monkeypatch, setting,
                                                              key, form):
    out = tmp_path / "x1"
    calls = _no_stages(monkeypatch)
    assert main(["run", "digits", "--quick", "--out", str(out), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdeq: error: ") and "Traceback" not in err
    assert re.search(key, err) and form in err
    assert not (out / "config.json").exists()
    # the corrected retry is not blocked by the failed start
    assert main(["run", "digits", "--quick", "--out", str(out)]) == 0 and calls == [out]
    assert (out / "config.json").exists()


def test_set_conflicts_and_malformed_pairs_are_config_errors(capsys):
    assert main(["run", "digits", "--set", "teacher=3", "teacher.epochs=2"]) == 2
    assert "an earlier --set gave teacher the value 3" in capsys.readouterr().err
    for pair in ("teacher.epochs", "=3", "teacher..epochs=3"):
        assert main(["run", "digits", "--set", pair]) == 2
        assert "write KEY=VALUE" in capsys.readouterr().err


def test_data_that_fails_leaves_no_config_behind(tmp_path, capsys, monkeypatch):
    _no_stages(monkeypatch)
    out = tmp_path / "r"
    assert main(["run", "images", "--data", str(tmp_path / "nope.npz"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (out / "config.json").exists()


def test_a_start_that_left_no_output_does_not_block_another_configuration(tmp_path, capsys, monkeypatch):
    calls = _no_stages(monkeypatch)
    out = tmp_path / "r"
    assert main(["run", "digits", "--quick", "--out", str(out), "--set", "seed=1"]) == 0
    assert main(["run", "digits", "--quick", "--out", str(out), "--set", "seed=2"]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 2 and len(calls) == 2
    assert "replacing the configuration of an earlier start" in (out / "log.txt").read_text()
    (out / "teacher.ckpt").write_bytes(b"an epoch checkpoint")  # now a stage has left a file
    assert main(["run", "digits", "--quick", "--out", str(out), "--set", "seed=3"]) == 2
    err = capsys.readouterr().err
    assert "another configuration (differing in seed: 2 -> 3" in err and "teacher.ckpt" in err


@pytest.mark.parametrize("command", [["run", "digits", "--quick"], ["train", "digits", "--quick"]])
def test_out_naming_an_existing_file_is_a_clear_error(tmp_path, capsys, command):
    path = tmp_path / "f"
    path.write_text("")
    assert main([*command, "--out", str(path)]) == 2
    assert f"--out {path} is an existing file, not a directory" in capsys.readouterr().err
    assert main([*command, "--out", str(path / "sub")]) == 2
    assert f"cannot create the run directory {path / 'sub'}" in capsys.readouterr().err


def test_a_state_dict_mismatch_keeps_every_line_of_the_message(tmp_path):
    from cdeq.engine.io import save_tensors
    from cdeq.run.stages import build_config

    run = Run(tmp_path, build_config("digits", {}, quick=True))
    other = build_config("digits", {"task_config": {"channels": 16}}, quick=True)
    state = TASKS["digits"](TASKS["digits"].Config.from_dict(other.task_config)).build_model().state_dict()
    state.pop(sorted(state)[-1])  # a missing key, an unexpected key, and channels 16 for 8
    state["stray.weight"] = torch.zeros(2)
    save_tensors(tmp_path / "teacher.safetensors", state, kind="teacher")
    with pytest.raises(cdeq.ConfigError) as err:
        run.teacher()
    message = str(err.value)
    assert "teacher.safetensors does not match the model built from config.json" in message
    assert "Missing key(s)" in message and "Unexpected key(s)" in message and '"stray.weight"' in message
    assert "size mismatch for" in message and "torch.Size([16" in message
    assert f"cdeq train --out {tmp_path}" in message  # how to recover
