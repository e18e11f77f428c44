"""The same configuration and seed give the same report, bit for bit, apart from timing fields: the
baselines are budgeted by training work (samples), not wall time, and every loop is seeded.

A quick run's report is also compared with one stored in ``tests/data/quick_digits_report.json``,
so that a change meant to keep behaviour (a move, a refactor) is checked to. A change of a default
that changes the report regenerates it, saying so in its commit::

    OMP_NUM_THREADS=1 PYTHONPATH=src python tests/test_reproducible.py --write
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from cdeq.cli import main
from cdeq.run.baselines import BaselineConfig
from cdeq.run.report import without_timing


def test_timing_keys_are_recognised():
    report = {"latency_ms": {"cdeq": 1.0}, "train_time_s": 3, "timing": {}, "median_ms": 2,
              "methods": {"cdeq": {"1": 0.5}}, "train_work": {"cdeq": {"steps": 8}}}
    assert without_timing(report) == {"methods": {"cdeq": {"1": 0.5}},
                                      "train_work": {"cdeq": {"steps": 8}}}


@pytest.mark.slow
def test_two_identical_quick_runs_give_the_same_report(tmp_path, capsys):
    reports = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["run", "digits", "--quick", "--out", str(out), "--set", "threads=1"]) == 0
        reports.append(json.loads((out / "report.json").read_text()))
    capsys.readouterr()
    a, b = (without_timing(r) for r in reports)
    assert "learned_init" in a["methods"] and "unrolled_any_k" in a["methods"]
    # the budget: C-DEQ's distillation plus the larger of C-DEQ+'s fit of h and joint stage and
    # C-DEQ tuned's tuning (the most trained cdeq model's samples)
    plus, tuned = a["train_work"]["cdeq_plus"], a["train_work"]["cdeq_tuned"]
    budget = a["train_work"]["cdeq"]["distill"]["samples"] + max(
        plus["init"]["samples"] + plus["joint"]["samples"], tuned["tune"]["samples"])
    # the budget in optimiser steps of init_batch_size (the last minibatch of an epoch may be short)
    assert a["train_work"]["learned_init"]["steps"] == math.ceil(budget / BaselineConfig().init_batch_size)
    assert a == b
    # the weights depend on the thread count, so the report says what each stage trained with
    assert a["train_threads"] == {name: 1 for name in (
        "teacher", "student", "student_plus", "student_tuned", "learned_init", "unrolled_k1",
        "unrolled_k2", "unrolled_k4", "unrolled_any_k")}
    assert a["train_work"]["unrolled_any_k"]["samples"] == a["train_work"]["unrolled_k1"]["samples"]
    # and the same as the stored report: the code changed since it was made changed no behaviour
    ref = json.loads(STORED.read_text())
    if (ref["torch"], ref["cpu_capability"]) != (torch.__version__, torch.backends.cpu.get_cpu_capability()):
        pytest.skip(f"the stored report was made with torch {ref['torch']} on {ref['cpu_capability']}; "
                    "other kernels sum in another order")
    assert stored_form(a) == ref["report"]


STORED = Path(__file__).parent / "data" / "quick_digits_report.json"
COMMAND = ["run", "digits", "--quick", "--set", "threads=1"]


def stored_form(report: dict) -> dict:
    """A report (timing fields removed) as the stored one keeps it: without the text naming the
    module that counts FLOPs (a move is no change of behaviour)."""
    report = json.loads(json.dumps(report))
    report["cost"].pop("counted", None)
    return report


def write_stored(why: str) -> None:
    """Make a quick run and store its report (timing fields removed) with what made it."""
    with tempfile.TemporaryDirectory() as tmp:
        assert main([*COMMAND[:3], "--out", tmp, *COMMAND[3:]]) == 0
        report = json.loads((Path(tmp) / "report.json").read_text())
    STORED.write_text(json.dumps({
        "made_by": f"cdeq {' '.join(COMMAND)} ({why})", "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "report": stored_form(without_timing(report))}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__" and sys.argv[1:2] == ["--write"]:
    write_stored(" ".join(sys.argv[2:]) or "written by tests/test_reproducible.py --write")
