"""What one student call costs against one teacher layer call, per task cell, old and new design.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/student_cost.py \
        --out benchmarks/results/student_cost.json

For each task's cell at its preset's model size (random weights from the task's ``build_model``;
``--sizes quick`` for the quick presets), on a batch of ``--batch`` inputs (images, text; a graph
is its whole graph):

- **FLOPs** (:mod:`cdeq.run.cost`, through :func:`cdeq.run.evaluate.measure_flops`, the report's
  ``cost.layer_calls["cdeq"]["1"]``): a 1-call student prediction less the shared injection and
  head, divided by one teacher layer call;
- **time** (:func:`cdeq.run.cost.time_methods`: one thread, warm-up, methods interleaved, ``--repeats``
  rounds; median and interquartile range): the student's 1-call plan's jump from ``z_0`` against
  one teacher layer call from the same ``z_0``, the injection and head left out of both; with
  ``--block N`` each timed sample is ``N`` calls in a row (as a serving loop makes them), and
  the figures are per call. The ratio is of the medians.

Two students: ``old`` (the previous design, reproduced here verbatim as :class:`LegacyStudent`:
a per-sample time MLP, separate FiLM, skip and scaling ops, the 64-wide correction MLP) and
``new`` (the library's default :class:`~cdeq.consistency.student.ConsistencyStudent`). The
machine may be shared: only the ratios, measured side by side in one process, mean anything.
With ``--compare RUN [RUN ...]`` it instead reads finished runs (the same teacher, different
students) and writes each student's **validation** metric and relative error to ``z*`` at 1, 2
and 4 NFE (selection never looks at the test split)::

    python benchmarks/student_cost.py --compare runs/old runs/new --out benchmarks/results/student_digits.json

MNIST and CIFAR-10 are built on random stand-in images of their shape (the data do not enter
the cost); digits, Tiny Shakespeare, Cora and Facebook read their data from the shared folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cdeq.consistency.conditioning import _broadcast, _per_sample
from cdeq.consistency.student import ConsistencyStudent, StudentConfig
from cdeq.deq.model import DEQModel
from cdeq.run.cost import time_methods
from cdeq.run.evaluate import EvalConfig, measure_flops, predictors
from cdeq.run.stages import build_config
from cdeq.tasks import TASKS

STAND_IN = {"mnist": (1, 28, 28, 10), "cifar10": (3, 32, 32, 10)}
TASK_NAMES = ("digits", "mnist", "cifar10", "shakespeare", "cora", "facebook")


class LegacyStudent(ConsistencyStudent):
    """The previous student's arithmetic, for comparison: the time embedding per sample, FiLM,
    the correction MLP on ``[h, z]``, then ``c_skip z + c_out G`` with a boundary ``where``."""

    def F(self, z: Tensor, t: Tensor | float, u: Any, zero_state: bool = False) -> Tensor:
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        if t.dim() == 0:
            t = t.expand(z.shape[0])
        c_skip, c_out = self.schedule.scalings(t)
        at_boundary = c_out == 0
        if bool(at_boundary.all()):
            return z
        gamma_in, beta_in, gamma_out, beta_out = self.time_embed(t).chunk(4, dim=1)
        cd = self.channel_dim
        z_in = z * (1 + _broadcast(gamma_in, z, cd)) + _broadcast(beta_in, z, cd)
        h = self.cell(z_in, u)
        h = h * (1 + _broadcast(gamma_out, h, cd)) + _broadcast(beta_out, h, cd)
        if self.correction is not None:
            h = h + self.correction(torch.cat([h, z], dim=cd))
        out = _per_sample(c_skip, z) * z + _per_sample(c_out, z) * h
        return torch.where(_per_sample(at_boundary, z), z, out)


OLD = StudentConfig(correction_hidden=64, input_mix=False)


def build_cell_model(name: str, quick: bool, folder: Path, overrides: dict | None = None
                     ) -> tuple[DEQModel, Any]:
    """``(teacher with random weights, its task)`` at the task preset's model size (with the
    ``task_config`` ``overrides``, e.g. ``{"scales": 3}``); MNIST and CIFAR-10 on random stand-in
    images of their shape written into ``folder``."""
    task_config = {**build_config(name, {}, quick=quick).task_config, **(overrides or {})}
    cls = TASKS[name]
    if name in STAND_IN:
        c, h, w, classes = STAND_IN[name]
        rng = np.random.default_rng(0)
        path = folder / f"{name}.npz"
        np.savez(path, x_train=rng.random((64, h, w, c), dtype=np.float32),
                 y_train=np.arange(64) % classes, x_test=rng.random((300, h, w, c), dtype=np.float32),
                 y_test=np.arange(300) % classes)
        task_config.update(dataset="npz", data=str(path), train_subset=0, test_subset=0)
        cls = TASKS["images"]
    task = cls(cls.Config.from_dict(task_config))
    model = task.build_model().eval()
    return model, task


def example_input(task: Any, batch: int) -> Any:
    """A test batch's input (``batch`` images or windows; a graph's whole graph)."""
    return next(iter(task.test_batches(batch)))[0]


def students(teacher: DEQModel, seed: int = 0) -> dict[str, ConsistencyStudent]:
    """The old and the new student of ``teacher``, every weight drawn at random (so no zero
    initialisation lets an op vanish)."""
    out = {"old": LegacyStudent(teacher, config=OLD), "new": ConsistencyStudent(teacher)}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in out.values():
            for module in (s.time_embed, s.correction):
                for p in module.parameters() if module is not None else []:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            s.eval()
    return out


def layer_calls(teacher: DEQModel, student: ConsistencyStudent, x: Any) -> float:
    """The report's ``cost.layer_calls["cdeq"]["1"]`` for ``student`` on batch ``x``."""
    config = EvalConfig(budgets=(1,), solvers=("picard",), exact_max_iter=1)
    preds = predictors(teacher, student, config, [1], None, x)
    return measure_flops(teacher, preds, x)["layer_calls"]["cdeq"]["1"]


def _repeat(fn: Any, n: int) -> None:
    """``n`` calls of ``fn`` in a row, each result dropped before the next call."""
    for _ in range(n):
        fn()


def measure(name: str, quick: bool, batch: int, repeats: int, folder: Path, block: int = 1
            ) -> dict[str, Any]:
    teacher, task = build_cell_model(name, quick, folder)
    x = example_input(task, batch)
    arms = students(teacher)
    with torch.no_grad():
        u = teacher.inject(x)
        z0 = teacher.initial_state(u)
        flops = {k: layer_calls(teacher, s, x) for k, s in arms.items()}
        fns = {"layer": lambda: teacher.cell(z0, u)}
        for k, s in arms.items():  # the 1-call plan's jump from the given z_0, as the layer's call
            t = s.plans[1][0][1]
            fns[k] = lambda s=s, t=t: s.F(z0, t, u, zero_state=True)
        blocks = {k: (lambda f=f: _repeat(f, block)) for k, f in fns.items()}
        timing = time_methods(blocks, repeats=repeats, warmup=3, threads=1)
        timing = {k: {**v, "median_ms": v["median_ms"] / block, "iqr_ms": v["iqr_ms"] / block,
                      "block": block} for k, v in timing.items()}
    layer_ms = timing["layer"]["median_ms"]
    return {
        "task": name, "state_shape": list(z0.shape), "batch": int(z0.shape[0]),
        "flops_ratio": flops,
        "time_ratio": {k: timing[k]["median_ms"] / layer_ms for k in arms},
        "timing_ms": timing,
    }


def compare(runs: list[str], budgets: tuple[int, ...] = (1, 2, 4)) -> list[dict[str, Any]]:
    """Validation metric and error to ``z*`` of each finished run's student at ``budgets``."""
    from cdeq.run.evaluate import _sweep
    from cdeq.run.stages import Run

    rows = []
    for path in runs:
        run = Run(path)
        teacher = run.teacher()
        student = run.student(teacher)
        config = EvalConfig(budgets=budgets, solvers=("picard",))
        with torch.no_grad():
            got = _sweep(run.task, teacher, student, config, run.task.validation_batches(256),
                         None, "valid")
        rows.append({"run": str(path), "student": dataclasses.asdict(run.config.student),
                     "teacher_valid": got["teacher"]["metric"],
                     "cdeq": got["methods"]["cdeq"], "cdeq_rel_error": got["relative_error"]["cdeq"],
                     "picard": got["methods"]["picard"],
                     "picard_rel_error": got["relative_error"]["picard"],
                     "plans": {str(k): [list(op) for op in student.plan_for(k)] for k in budgets}})
        r = rows[-1]
        print(f"{path}: " + "  ".join(f"{k} NFE acc {r['cdeq'][str(k)]:.4f} err "
                                      f"{r['cdeq_rel_error'][str(k)]:.3f}" for k in budgets), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/student_cost.json")
    parser.add_argument("--sizes", choices=["full", "quick"], default="full")
    parser.add_argument("--tasks", nargs="*", default=list(TASK_NAMES))
    parser.add_argument("--batch", type=int, default=256, help="images and text windows per batch")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--block", type=int, default=1, help="calls per timed sample")
    parser.add_argument("--compare", nargs="*", default=None, help="finished run directories")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.compare:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {"split": "valid", "seeds": 1, "runs": compare(args.compare)}
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks:
            rows.append(measure(name, args.sizes == "quick", args.batch, args.repeats, Path(tmp),
                                args.block))
            r = rows[-1]
            print(f"{name:12s} state {str(tuple(r['state_shape'])):20s} "
                  f"FLOPs old {r['flops_ratio']['old']:6.2f}  new {r['flops_ratio']['new']:5.3f}   "
                  f"time old {r['time_ratio']['old']:5.2f}  new {r['time_ratio']['new']:5.3f}   "
                  f"(layer {r['timing_ms']['layer']['median_ms']:.2f} ms, IQR "
                  f"{r['timing_ms']['layer']['iqr_ms']:.2f})", flush=True)
    result = {
        "sizes": args.sizes, "threads": 1, "repeats": args.repeats, "block": args.block,
        "interleaved": True,
        "batch": args.batch, "torch": torch.__version__,
        "note": "ratios of medians measured side by side in one process; the machine may be shared",
        "max_flops_ratio_new": max(r["flops_ratio"]["new"] for r in rows),
        "max_time_ratio_new": max(r["time_ratio"]["new"] for r in rows),
        "median_time_ratio_new": statistics.median(r["time_ratio"]["new"] for r in rows),
        "cells": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
