"""Ablations of the method's open choices on one teacher and one set of recorded trajectories.

Usage (after a finished run, e.g. ``cdeq demo --out runs/demo``)::

    python benchmarks/ablations.py --run runs/demo --out benchmarks/results/ablations_digits.json

Every variant distils a fresh student from the same teacher and trajectories with one setting
changed from the run's configuration, chooses its plans on training data, and is evaluated at
budgets 1, 2 and 4 on the validation split (where the defaults are chosen) and on the test split
(reported only). Each variant's 1-NFE call is costed in layer-call equivalents (FLOPs) and timed
against the others, interleaved, by :func:`cdeq.run.cost.time_methods` (one thread). Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from cdeq.consistency import (
    ConsistencyStudent,
    DistillConfig,
    PlanSearchConfig,
    ScheduleConfig,
    StudentConfig,
    TimeSchedule,
    distill,
    select_plans,
)
from cdeq.engine.io import read_json
from cdeq.run.cost import time_methods
from cdeq.run.evaluate import EvalConfig, evaluate
from cdeq.run.stages import Run

VARIANTS: dict[str, dict] = {
    "run config": {},
    "residual-based time": {"schedule": {"kind": "residual"}},
    "EDM scalings": {"schedule": {"scaling": "edm"}},
    "frozen layer (train_cell=false)": {"distill": {"train_cell": False}},
    "global only": {"distill": {"local_weight": 0.0, "task_weight": 0.0}},
    "no task loss": {"distill": {"task_weight": 0.0}},
    "task-heavy (task_weight=1)": {"distill": {"task_weight": 1.0}},
    "early pairs": {"distill": {"pairs": "early"}},
    "curriculum pairs": {"distill": {"pairs": "curriculum"}},
    "no correction MLP": {"student": {"correction_hidden": 0}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run directory")
    parser.add_argument("--out", default="benchmarks/results/ablations.json")
    parser.add_argument("--epochs", type=int, default=0, help="distillation epochs (0: the run's)")
    parser.add_argument("--only", nargs="*", help="variant names to run")
    args = parser.parse_args()

    run = Run(args.run)
    cfg = run.config
    teacher = run.teacher()
    trajectories = run.trajectories()
    last = int(read_json(run.dir / "trajectories" / "manifest.json")["last"])
    eval_cfg = EvalConfig.from_dict({**cfg.evaluate.to_dict(), "budgets": [1, 2, 4],
                                     "solvers": ["picard", "anderson"], "latency_repeats": 1,
                                     "timing_budgets": [1]})
    results: dict[str, Any] = {}
    students: dict[str, ConsistencyStudent] = {}
    for name, change in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(cfg.seed)
        sched = ScheduleConfig.from_dict({**cfg.schedule.to_dict(), **change.get("schedule", {})})
        scfg = StudentConfig.from_dict({**cfg.student.to_dict(), **change.get("student", {})})
        dcfg = DistillConfig.from_dict({**cfg.distill.to_dict(), **change.get("distill", {})})
        if args.epochs:
            dcfg = dcfg.replace(epochs=args.epochs)
        student = ConsistencyStudent(teacher, TimeSchedule(sched), scfg)
        t0 = time.perf_counter()
        distill(student, trajectories, dcfg, task_loss=run.task.loss, seed=cfg.seed)
        train_s = time.perf_counter() - t0
        select_plans(student, run.task.selection_batches(cfg.evaluate.batch_size), run._score,
                     run.task.higher_is_better, last, PlanSearchConfig(max_nfe=4, batches=cfg.plans.batches))
        rep = evaluate(run.task, teacher, student, eval_cfg)
        results[name] = {"change": change, "train_s": train_s, "metric": rep["methods"]["cdeq"],
                         "valid_metric": rep["valid"]["methods"]["cdeq"],
                         "relative_error": rep["relative_error"]["cdeq"],
                         "layer_calls_at_1": rep["cost"]["layer_calls"]["cdeq"]["1"],
                         "exact_speedup": rep["exact_mode"]["speedup"]}
        students[name] = student
        base = rep
        print(f"{name:34s} valid " + " ".join(f"k={k}: {v:.4f}" for k, v in
                                               rep["valid"]["methods"]["cdeq"].items())
              + f"  err@1 {rep['relative_error']['cdeq']['1']:.3f}  calls@1 "
              f"{results[name]['layer_calls_at_1']:.2f}  ({train_s:.0f}s)", flush=True)
    x = next(iter(run.task.test_batches(eval_cfg.latency_batch)))[0]
    timed = time_methods({name: (lambda s=s: s.predict(x, nfe=1)) for name, s in students.items()},
                         repeats=20, warmup=2, threads=1)
    for name, t in timed.items():
        results[name]["time_at_1"] = t
    out = {"run": str(run.dir), "task": base["task"], "metric": base["metric"],
           "teacher": base["teacher"]["metric"], "valid_teacher": base["valid"]["teacher"]["metric"],
           "truncated": {s: base["methods"][s] for s in ("picard", "anderson")},
           "valid_truncated": {s: base["valid"]["methods"][s] for s in ("picard", "anderson")},
           "timing": {"threads": 1, "batch_size": len(x) if hasattr(x, "__len__") else 1,
                      "repeats": 20, "interleaved": True},
           "variants": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nteacher {out['teacher']:.4f}; truncated picard {out['truncated']['picard']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
