"""Saving, loading and exporting a distilled student (cdeq.hub)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cdeq import hub
from cdeq.consistency import ConsistencyStudent
from cdeq.io import CorruptFileError
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
    with pytest.raises(ValueError, match="does not match"):
        hub.from_pretrained(d)


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
    from cdeq.pipeline import Run

    run = Run(out)
    x, _ = next(iter(run.task.test_batches(5)))
    with torch.no_grad():
        ref = run.student().predict(x, 1)[0]
        assert torch.allclose(hub.load_exported(tmp_path / "s.pt2")(x), ref, atol=1e-5)
        assert torch.allclose(hub.from_pretrained(tmp_path / "pre").predict(x, 1)[0], ref, atol=1e-6)
    assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pt2")]) == 2
