"""Files cdeq writes: the mode the umask gives (issue 11.5), and the OS lock on a run directory
(issue 11.3): a second writer refuses naming the holder's PID, the lock goes with the process
(SIGKILL included), and reading a run needs no lock."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdeq.cli import main
from cdeq.engine.io import BusyError, acquire_lock, atomic_write_text, hold_lock, release_lock, save_tensors
from cdeq.run.stages import Run, build_config


@pytest.fixture
def umask():
    """Set the process umask for a test and restore it."""
    before = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write_text(tmp_path / "a.json", "{}")
    save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(3)}, kind="x")
    with open(tmp_path / "plain.txt", "w") as fh:  # what open() gives: the reference
        fh.write("")
    expected = 0o666 & ~mask
    assert _mode(tmp_path / "plain.txt") == expected
    assert _mode(tmp_path / "a.json") == expected and _mode(tmp_path / "t.safetensors") == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_a_save_pretrained_directory_respects_the_umask(tmp_path, umask):
    from cdeq.consistency import ConsistencyStudent
    from cdeq.hub import save_pretrained
    from cdeq.tasks import TASKS

    umask(0o022)
    task = TASKS["digits"](TASKS["digits"].Config.from_dict({"channels": 8, "train_subset": 128,
                                                            "test_subset": 32}))
    out = save_pretrained(ConsistencyStudent(task.build_model()), tmp_path / "pre", "digits",
                          task.config.__dict__)
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert {_mode(p) for p in out.iterdir()} == {0o644}
    assert _mode(out) == 0o755


# --- the lock ------------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _hold(run: Path) -> subprocess.Popen:
    """Another process that holds the lock of the run directory ``run`` until killed."""
    code = ("import sys, time; from cdeq.engine.io import acquire_lock; acquire_lock(sys.argv[1]); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run / ".lock")], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def holder(tmp_path):
    """``(run, proc)``: ``proc`` holds the lock of the empty directory ``run`` (killed at the end)."""
    run = tmp_path / "run"
    run.mkdir()
    proc = _hold(run)
    yield run, proc
    proc.kill()
    proc.wait()


def test_a_second_writer_refuses_naming_the_holder(holder, capsys, monkeypatch):
    run, proc = holder
    monkeypatch.setattr(Run, "run_all", lambda self: pytest.fail("ran the stages"))
    assert main(["run", "digits", "--quick", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another cdeq process (PID {proc.pid}" in err
    assert not (run / "config.json").exists()  # nothing written by the refused run


def test_the_lock_goes_with_a_sigkilled_process(holder):
    run, proc = holder
    with pytest.raises(BusyError):
        acquire_lock(run / ".lock")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with hold_lock(run / ".lock"):  # free now
        assert (run / ".lock").read_text().strip() == str(os.getpid())
    assert (run / ".lock").read_text() == ""  # released: no stale PID left


def test_the_lock_is_counted_within_one_process(tmp_path):
    path = tmp_path / ".lock"
    acquire_lock(path)
    acquire_lock(path)  # a second Run object of the same process: no deadlock
    release_lock(path)
    code = "import sys; from cdeq.engine.io import acquire_lock; acquire_lock(sys.argv[1])"
    busy = subprocess.run([sys.executable, "-c", code, str(path)], env=_env(), capture_output=True,
                          text=True)
    assert busy.returncode != 0 and f"PID {os.getpid()}" in busy.stderr  # still held once
    release_lock(path)
    assert subprocess.run([sys.executable, "-c", code, str(path)], env=_env()).returncode == 0


def test_reading_a_run_needs_no_lock_but_its_stages_do(tmp_path):
    out = tmp_path / "run"
    with Run(out, build_config("digits", {}, quick=True)):
        pass  # config.json written, lock dropped
    proc = _hold(out)
    try:
        run = Run(out)  # reading config.json: no lock
        assert run.config.task == "digits"
        for stage in (run.train, run.record, run.evaluate):
            with pytest.raises(BusyError, match=f"PID {proc.pid}"):
                stage()
    finally:
        proc.kill()
        proc.wait()


def test_a_run_releases_its_lock_when_closed_or_dropped(tmp_path):
    code = "import sys; from cdeq.engine.io import acquire_lock; acquire_lock(sys.argv[1])"

    def free() -> bool:
        return subprocess.run([sys.executable, "-c", code, str(tmp_path / "r" / ".lock")],
                              env=_env(), capture_output=True).returncode == 0

    run = Run(tmp_path / "r", build_config("digits", {}, quick=True))
    assert not free()  # held from writing config.json on
    run.close()
    assert free()
    run = Run(tmp_path / "r", build_config("digits", {}, quick=True))
    assert not free()
    del run
    assert free()


def test_a_saved_module_records_the_threads_its_stage_ran_with(tmp_path):
    """The weights depend on the intra-op thread count, so each file and the report say it."""
    run = Run(tmp_path / "r", build_config("digits", {}, quick=True))
    before = torch.get_num_threads()
    try:
        for name, threads in (("teacher", 2), ("learned_init", 1)):
            torch.set_num_threads(threads)
            run.save_module(name, torch.nn.Linear(2, 2), {"work": {}})
    finally:
        torch.set_num_threads(before)
    assert run.read_meta("teacher") == {"work": {}, "threads": 2}
    assert run.stage_threads() == {"learned_init": 1, "teacher": 2}
    run.close()
