"""Resumable, atomic runs: a run killed with SIGKILL mid-stage resumes to the same result, and a
damaged checkpoint is a clear error naming the file (never silently wrong weights).

Tolerance: the resumed teacher / student must equal the uninterrupted one within 1e-4 (max abs
difference of every weight). Both runs use one thread; the reference runs in this process, so
only the thread pool of the reductions could differ (in practice the weights come out bitwise
equal).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cdeq.cli import _overrides, main
from cdeq.engine.io import CorruptFileError, load_checkpoint, load_tensors, save_checkpoint
from cdeq.run.stages import Run, build_config

TOL = 1e-4
TEACHER = ["teacher.epochs=4", "task_config.train_subset=128", "task_config.test_subset=16"]
REST = ["record.max_samples=128", "record.batch_size=64", "distill.epochs=3", "plans.max_nfe=2",
        "evaluate.budgets=[1,2]"]
SETTINGS = TEACHER + REST


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """`cdeq train` killed by SIGKILL after its first epoch checkpoint, then resumed."""
    out = tmp_path_factory.mktemp("resume") / "run"
    cmd = [sys.executable, "-m", "cdeq.cli", "train", "digits", "--quick", "--out", str(out),
           "--set", *SETTINGS]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "teacher.ckpt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert ckpt.exists() and not (out / "teacher.safetensors").exists()
    killed_epoch = load_checkpoint(ckpt)["epoch"]
    assert killed_epoch < 3  # killed mid-stage, not after the last epoch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # resume in this process (the same files a new `cdeq train --out` would read)
        Run(out).train()
    finally:
        torch.set_num_threads(before)
    assert f"resuming teacher training after epoch {killed_epoch + 1}\n" in (out / "log.txt").read_text()
    return out


def test_sigkilled_teacher_training_resumes_to_the_same_weights(killed_and_resumed, tmp_path, one_thread):
    ref = Run(tmp_path / "ref", build_config("digits", _overrides(SETTINGS), quick=True))
    ref.train()
    resumed, meta = load_tensors(killed_and_resumed / "teacher.safetensors", kind="teacher")
    expected, _ = load_tensors(tmp_path / "ref" / "teacher.safetensors", kind="teacher")
    assert _max_diff(resumed, expected) <= TOL
    # the training time covers the epochs before the kill too, not only the resumed ones
    history = load_checkpoint(killed_and_resumed / "teacher.ckpt")["state"]["history"]
    assert len(history["epoch_time"]) == 4 and len(history["loss"]) == 4
    assert meta["train_time_s"] == pytest.approx(sum(history["epoch_time"]))


def test_interrupted_distillation_resumes_to_the_same_student(killed_and_resumed, tmp_path, one_thread,
                                                             monkeypatch):
    run = Run(killed_and_resumed)
    run.record()
    for name in ("a", "b"):  # two copies of teacher + trajectories: one interrupted, one not
        shutil.copytree(killed_and_resumed, tmp_path / name,
                        ignore=shutil.ignore_patterns("student*", "*.ckpt", "log.txt"))
    Run(tmp_path / "a").distill()

    interrupted = Run(tmp_path / "b")
    real_save = Run.write_checkpoint

    def save_then_die(self, name, payload):  # the process "dies" right after epoch 1's checkpoint
        real_save(self, name, payload)
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "write_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        interrupted.distill()
    monkeypatch.setattr(Run, "write_checkpoint", real_save)
    assert load_checkpoint(tmp_path / "b" / "student.ckpt")["epoch"] == 0
    Run(tmp_path / "b").distill()
    assert "resuming distillation after epoch 1" in (tmp_path / "b" / "log.txt").read_text()
    a, meta_a = load_tensors(tmp_path / "a" / "student.safetensors", kind="student")
    b, meta_b = load_tensors(tmp_path / "b" / "student.safetensors", kind="student")
    assert _max_diff(a, b) <= TOL
    assert meta_a["plans"] == meta_b["plans"]
    # the work of the epoch before the interruption is counted once, as in the uninterrupted run
    work_a, work_b = meta_a["work"]["distill"], meta_b["work"]["distill"]
    for key in ("samples", "layer_calls", "layer_call_rows", "distributed"):
        assert work_b[key] == work_a[key], key
    history = load_checkpoint(tmp_path / "b" / "student.ckpt")["state"]["history"]
    assert len(history["epoch_time"]) == 3
    assert meta_b["train_time_s"] == pytest.approx(sum(history["epoch_time"]))


def test_recording_skips_existing_shards(killed_and_resumed, tmp_path, one_thread):
    shutil.copytree(killed_and_resumed, tmp_path / "r",
                    ignore=shutil.ignore_patterns("student*", "trajectories", "log.txt"))
    run = Run(tmp_path / "r")
    store = run.record()
    manifest = store.manifest()
    assert len(store) >= 2
    first, last = store.shard_dir(0) / "z_star.npy", store.shard_dir(len(store) - 1)
    stamp = first.stat().st_mtime_ns
    expected = np.load(last / "z_star.npy")
    work = json.loads((store.root / "work.json").read_text())
    (store.root / "manifest.json").unlink()  # as if killed before the last shard and the manifest
    shutil.rmtree(last)
    again = run.record()
    assert first.stat().st_mtime_ns == stamp  # kept, not recomputed
    assert again.manifest() == manifest
    assert float(np.abs(np.load(last / "z_star.npy") - expected).max()) <= TOL
    # the recording's work counts the kept shards too: the uninterrupted recording's layer calls
    resumed = json.loads((store.root / "work.json").read_text())
    assert work["layer_calls"] > 0 and work["layer_call_rows"] > 0
    assert {k: resumed[k] for k in ("layer_calls", "layer_call_rows", "samples")} == {
        k: work[k] for k in ("layer_calls", "layer_call_rows", "samples")}


# --- damaged checkpoints -------------------------------------------------------------------------
def _ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "teacher.ckpt"
    save_checkpoint(path, {"epoch": 3, "model": {"w": torch.arange(100.0)}})
    return path


def test_checkpoint_roundtrip(tmp_path):
    data = load_checkpoint(_ckpt(tmp_path))
    assert data["epoch"] == 3 and torch.equal(data["model"]["w"], torch.arange(100.0))


@pytest.mark.parametrize("damage", ["truncate", "flip", "version", "foreign", "empty"])
def test_damaged_checkpoint_names_the_file(tmp_path, damage):
    path = _ckpt(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-20] ^= 0xFF
    elif damage == "version":
        data[8:12] = (99).to_bytes(4, "little")
    elif damage == "foreign":
        buf = __import__("io").BytesIO()
        torch.save({"epoch": 1}, buf)
        data = bytearray(buf.getvalue())
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=str(path).replace(".", r"\.")):
        load_checkpoint(path)


def test_pipeline_refuses_a_corrupt_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = build_config("digits", _overrides(SETTINGS), quick=True)
    Run(out, cfg)  # writes config.json
    (out / "teacher.ckpt").write_bytes(b"CDEQCKPT" + b"\x01\x00\x00\x00" + b"0" * 64 + b"junk")
    assert main(["train", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "teacher.ckpt" in err and "checksum" in err


# --- `cdeq run` repairs what it would skip: damaged outputs set aside, missing shards recorded ------
QUICK = ["teacher.epochs=1", "task_config.train_subset=128", "task_config.test_subset=32",
         "record.batch_size=64", "distill.epochs=1", "plans.max_nfe=2", "evaluate.budgets=[1,2]",
         "baselines.enabled=false", "threads=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "digits", "--quick", "--out", str(out), "--set", *QUICK]) == 0
    return out


def _rerun(finished: Path, tmp_path: Path, damage) -> tuple[Path, str]:
    """Copy the finished run, damage it, run `cdeq run` on it; returns the copy and its new log."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "log.txt").write_text("")
    damage(run)
    assert main(["run", "digits", "--quick", "--out", str(run), "--set", *QUICK]) == 0
    return run, (run / "log.txt").read_text()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name, stage", [("student", "distillation"), ("teacher", "training")])
def test_a_damaged_stage_output_is_set_aside_and_its_stage_redone(finished, tmp_path, name, stage):
    run, log = _rerun(finished, tmp_path, lambda d: _truncate(d / f"{name}.safetensors"))
    aside = list(run.glob(f"{name}.safetensors.corrupt-*"))
    size = (finished / f"{name}.safetensors").stat().st_size
    assert len(aside) == 1 and aside[0].stat().st_size == size // 2  # kept for inspection
    assert f"{name}.safetensors is damaged" in log
    assert f"moved it to {aside[0].name} and redoing {stage}" in log
    # redone from the last epoch's checkpoint: the same weights as before the damage
    redone, _ = load_tensors(run / f"{name}.safetensors", kind=name)
    original, _ = load_tensors(finished / f"{name}.safetensors", kind=name)
    assert _max_diff(redone, original) == 0.0
    assert (run / "report.json").exists()


def test_a_damaged_output_names_the_stage_that_redoes_it(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    _truncate(run / "student.safetensors")
    assert main(["evaluate", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "student.safetensors is not a readable safetensors file" in err
    assert f"run `cdeq distill --out {run}` to redo its stage" in err


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_lost_shard_is_reported_and_recorded_again(finished, tmp_path, damage):
    shard = Path("trajectories") / "shard_00001"
    run, log = _rerun(finished, tmp_path, lambda d: shutil.rmtree(d / shard) if damage == "delete"
                      else _truncate(d / shard / "iterates.npy"))
    assert "trajectories/manifest.json lists 2 shards but 1 of them are missing or damaged " \
           "(shard_00001): recording those again" in log
    if damage == "truncate":
        assert "trajectory shard shard_00001 is damaged (iterates.npy has" in log
        assert len(list((run / "trajectories").glob("shard_00001.corrupt-*"))) == 1
    for name in ("iterates.npy", "z_star.npy"):
        assert np.array_equal(np.load(run / shard / name), np.load(finished / shard / name))
    assert "skipping distillation" in log  # the student is whole: not redone


def test_a_missing_shard_read_by_a_stage_says_how_to_record_it(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "student.safetensors").unlink()
    shutil.rmtree(run / "trajectories" / "shard_00000")
    assert main(["distill", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "shard_00000 is missing, though" in err and "lists 2 shards" in err
    assert f"cdeq record --out {run}" in err


def test_cdeq_run_sets_a_damaged_checkpoint_aside(finished, tmp_path):
    def damage(d: Path) -> None:
        (d / "student.safetensors").unlink()
        _truncate(d / "student.ckpt")

    run, log = _rerun(finished, tmp_path, damage)
    assert "student.ckpt is damaged" in log and "the stage starts from its first epoch" in log
    assert len(list(run.glob("student.ckpt.corrupt-*"))) == 1
    redone, _ = load_tensors(run / "student.safetensors", kind="student")
    assert _max_diff(redone, load_tensors(finished / "student.safetensors", kind="student")[0]) == 0.0
