"""Host synchronisations of the hot loops, counted on the CPU, and the compiled one-jump plan's
graph count.

On a GPU every read of a device value by Python (``bool(t)``, ``t.item()``, ``int(t)``,
``t.tolist()``, ``t.nonzero()``, ``torch.equal``, ...) waits for the queued work. This script counts
those reads with a ``TorchFunctionMode`` (every tensor operation passes through it) while:

- one solve: Anderson on a batch of 64 MNIST-preset states (``stride=4, channels=32``: 32 x 7 x 7),
  ``max_iter=30``, ``tol=1e-4`` (samples stop at different iterations), with the solver's
  defaults and with per-sample stopping by masking (``compact=False``, fixed shapes) and one
  check every ``max_iter`` iterations (``check_every=30``);
- distillation steps: the default ``DistillConfig`` (minibatch 64) on recorded MNIST-preset
  trajectories, two epochs of ``--steps`` steps: the reads per optimiser step of the first
  epoch (after its first step) and of the second;
- ``torch._dynamo.explain`` of the one-jump plan (``PlanModule``): the graphs it compiles to.

The teacher is the task's untrained model (seeded): the counts depend on the code's structure,
not on training. Run it against two trees (``PYTHONPATH``) to compare before and after::

    OMP_NUM_THREADS=1 python benchmarks/host_syncs.py --out benchmarks/results/host_syncs.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "numpy",
         "equal", "is_nonzero", "unique", "masked_select", "argwhere"}


class HostReads(TorchFunctionMode):
    """Counts the tensor operations that read device values on the host (:data:`READS`)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            caller = sys._getframe(1).f_code.co_filename
            # the optimiser's step counters live on the CPU whatever the device: not a sync
            where = "optimizer_step_counter" if f"torch{os.sep}optim" in caller else name
            self.counts[where] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """The reads that wait for a device (the optimiser's CPU step counters left out)."""
        return sum(v for k, v in self.counts.items() if k != "optimizer_step_counter")


def _task():
    from cdeq.tasks.images import ImageConfig, MnistTask

    return MnistTask(ImageConfig(dataset="mnist", stride=4, channels=32, train_subset=2000))


def solve_counts(task, options: dict) -> dict:
    from cdeq.solvers import get_solver

    teacher = task.build_model().eval()
    x = task.x_train[:64]
    solver = get_solver("anderson", max_iter=30, tol=1e-4, **options)
    with torch.no_grad():
        u = teacher.inject(x)
        z0 = teacher.initial_state(u)
        with HostReads() as reads:
            res = solver.solve(teacher.cell, z0, u)
    return {"options": options, "reads": reads.total, "by_kind": dict(reads.counts),
            "iterations": int(res.nfe.max()), "stopped_at": sorted(set(res.nfe.tolist()))}


def distill_counts(task, steps: int) -> dict:
    """Reads per optimiser step of two epochs of ``steps`` steps each: the first epoch from its
    second step on (the first one sets up), the second whole."""
    from cdeq.consistency import ConsistencyStudent, DistillConfig, RecordConfig, distill, record
    from cdeq.engine import fit as fit_module

    teacher = task.build_model().eval()
    n = 64 * steps
    cfg = RecordConfig.from_dict({"batch_size": n, "max_samples": n})
    trajectories = record(teacher, task.train_batches(n, shuffle=False), cfg)[:1]
    student = ConsistencyStudent(teacher)
    epochs = [HostReads(), HostReads()]
    seen = {"epoch": -1}
    real_epoch = fit_module._epoch

    def counting_epoch(run, *args, **kwargs):
        seen["epoch"] += 1
        reads, first = epochs[seen["epoch"]], {"step": 0}

        def step(batch, progress):
            first["step"] += 1
            if first["step"] == (2 if seen["epoch"] == 0 else 1):
                reads.__enter__()
            return run(batch, progress)
        try:
            return real_epoch(step, *args, **kwargs)
        finally:
            reads.__exit__(None, None, None)

    fit_module._epoch = counting_epoch
    try:
        distill(student, trajectories, DistillConfig(epochs=2, batch_size=64), task_loss=task.loss)
    finally:
        fit_module._epoch = real_epoch
    out = {}
    for name, reads, counted in (("first_epoch", epochs[0], steps - 1), ("later_epoch", epochs[1], steps)):
        out[name] = {"steps": counted, "reads": reads.total, "reads_per_step": reads.total / counted,
                     "by_kind": dict(reads.counts)}
    return out


def graph_count(task) -> dict:
    import torch._dynamo as dynamo

    from cdeq.consistency import ConsistencyStudent
    from cdeq.hub.compile import PlanModule

    teacher = task.build_model().eval()
    student = ConsistencyStudent(teacher).eval()
    module = PlanModule(student, [("jump", student.start_time)])
    explained = dynamo.explain(module)(task.x_train[:16])
    return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
            "reasons": sorted({str(b.reason).splitlines()[0][:120] for b in explained.break_reasons})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--label", default="", help="what tree this measures (kept in the JSON)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "host_syncs.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = _task()
    solves = [solve_counts(task, {}), solve_counts(task, {"compact": False, "check_every": 30})]
    result = {"label": args.label, "solve": solves, "distill_step": distill_counts(task, args.steps),
              "one_jump_plan": graph_count(task), "torch": torch.__version__,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()}
    lines = ["| measured | host reads | detail |", "|---|---:|---|"]
    for s in solves:
        lines.append(f"| one Anderson solve, {s['options'] or 'defaults'} | {s['reads']} | "
                     f"{s['iterations']} iterations; {s['by_kind']} |")
    for name, d in result["distill_step"].items():
        lines.append(f"| one distillation step, {name.replace('_', ' ')} (mean of {d['steps']}) | "
                     f"{d['reads_per_step']:.2f} | {d['by_kind']} |")
    g = result["one_jump_plan"]
    lines.append(f"| compiled one-jump plan: graphs | {g['graphs']} | {g['graph_breaks']} breaks |")
    table = "\n".join(lines)
    print(table)
    result["table"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
