"""A run killed with SIGKILL at random moments, and rerun after each kill, ends with the report
and the weights of a run never interrupted (issue 11, "Also").

``cdeq run digits --quick`` with ``threads=1`` (on 128 training images) runs in a subprocess; it
is killed N = 5 times, each
time after a random share of the uninterrupted run's wall time (``CDEQ_KILL_SEED`` replays a
choice of moments), and rerun. The reports are compared with the timing fields left out
(``latency_ms``, ``train_time_s`` and any key naming a time). Baselines are disabled
(``baselines.enabled=false``): their training budget is the student's wall time today, which makes
their rows differ between two identical runs until the budget is counted in work.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdeq.engine.io import load_tensors
from cdeq.run.report import without_timing

KILLS = 5
SETTINGS = ["threads=1", "baselines.enabled=false",  # the quick preset on less data: shorter reruns
            "task_config.train_subset=128", "task_config.test_subset=64", "record.batch_size=64",
            "evaluate.budgets=[1,2]", "plans.max_nfe=2"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "cdeq.cli", "run", "digits", "--quick", "--out", str(out),
            "--set", *SETTINGS]


def test_without_timing_drops_only_timing_fields():
    report = {"methods": {"cdeq": {"1": 0.5}}, "latency_ms": {"cdeq@1": 3.0}, "train_time_s": {},
              "exact_mode": {"anderson_nfe": 14.0, "solve_time_s": 1.0}, "timing": {"x": 1}}
    assert without_timing(report) == {"methods": {"cdeq": {"1": 0.5}},
                                      "exact_mode": {"anderson_nfe": 14.0}}


@pytest.mark.slow
def test_a_run_killed_at_random_moments_ends_as_an_uninterrupted_one(tmp_path):
    seed = int(os.environ.get("CDEQ_KILL_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    subprocess.run(_cmd(ref), env=_env(), check=True, capture_output=True)
    duration = time.monotonic() - t0

    out, moments, attempts = tmp_path / "killed", [], 0
    while len(moments) < KILLS and attempts < 4 * KILLS:
        attempts += 1
        proc = subprocess.Popen(_cmd(out), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        moment = rng.uniform(0.1, 1.0) * duration
        try:
            proc.wait(timeout=moment)  # finished first: rerun, kill the next one
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            moments.append(round(moment, 2))
        proc.stderr.close()
    where = f"CDEQ_KILL_SEED={seed}, killed after {moments} s of a {duration:.1f} s run"
    assert len(moments) == KILLS, where
    final = subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True)
    assert final.returncode == 0, (where, final.stderr[-2000:])

    report = json.loads((out / "report.json").read_text())
    expected = json.loads((ref / "report.json").read_text())
    assert without_timing(report) == without_timing(expected), where
    for name in ("teacher", "student"):
        got, _ = load_tensors(out / f"{name}.safetensors", kind=name)
        want, _ = load_tensors(ref / f"{name}.safetensors", kind=name)
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got), (name, where)
    assert not list(out.glob("**/*.corrupt-*")), where  # atomic writes: a kill damages nothing
