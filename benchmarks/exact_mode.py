"""Exact mode: how close must a warm start be for the teacher solver to need half the NFE?

Usage (after a finished run, e.g. ``cdeq demo --out runs/demo``)::

    python benchmarks/exact_mode.py --run runs/demo --out benchmarks/results/exact_mode_digits.json

On held-out batches the exact-mode solver (the run's ``evaluate.exact_solver`` at
``evaluate.exact_tol``) is started from

- ``z_0`` (the cold start the exact mode is compared against);
- the student's plans with 1, 2, 3 and 4 NFE (the exact mode itself);
- the teacher solver's own iterate after ``n`` NFE (a restart: what the teacher's trajectory buys);
- an oracle ``z* + e * ||z*|| * d / ||d||`` where ``d`` is the student's 1-NFE error direction, for
  relative errors ``e`` from 0.3 down to 0.001: a student as good as ``e``, costing 1 NFE.

For each start it prints the relative error to ``z*``, the NFE spent before the solver, the solver's
NFE to tolerance and the total against the cold start. The student's plans are also costed in
layer-call equivalents (FLOPs, :mod:`cdeq.run.cost`: a student call is dearer than a layer call), and
the cold and warm exact solves are timed on one batch, interleaved, with
:func:`cdeq.run.cost.time_methods` (one thread, 20 repeats). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from cdeq.consistency.plans import plan_nfe
from cdeq.engine.tree import relative_error
from cdeq.run.cost import count_flops, time_methods
from cdeq.run.stages import Run
from cdeq.solvers import get_solver


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run directory")
    parser.add_argument("--out", default="benchmarks/results/exact_mode.json")
    parser.add_argument("--batches", type=int, default=4, help="held-out batches of 256")
    args = parser.parse_args()

    run = Run(args.run)
    ev = run.config.evaluate
    teacher = run.teacher()
    student = run.student(teacher)
    reference = teacher.deq.eval_solver  # the converged teacher (teacher.eval_solver)
    solver = get_solver(ev.exact_solver, max_iter=ev.exact_max_iter, tol=ev.exact_tol)
    truncated = get_solver(ev.exact_solver, max_iter=64, tol=0.0)
    rows: dict[str, dict[str, list[Tensor]]] = {}

    def add(name: str, before: int, z: Tensor, z_ref: Tensor, u: object) -> None:
        res = solver.solve(teacher.cell, z, u)
        row = rows.setdefault(name, {"before": [], "error": [], "solver": [], "converged": []})
        row["before"].append(torch.full((z.shape[0],), float(before)))
        row["error"].append(relative_error(z, z_ref))
        row["solver"].append(res.nfe.float())
        row["converged"].append(res.converged.float())

    for b, (x, _) in enumerate(run.task.test_batches(256)):
        if b >= args.batches:
            break
        u = teacher.inject(x)
        z0 = teacher.initial_state(u)
        z_ref = reference.solve(teacher.cell, z0, u).z
        add("cold start z_0", 0, z0, z_ref, u)
        u_s, u_t = student.teacher_inputs(x)
        for k in (1, 2, 3, 4):
            plan = student.plan_for(k)
            add(f"student plan, {plan_nfe(plan)} NFE", plan_nfe(plan), student._run_plan(u_s, plan, u_t),
                z_ref, u_t)
        for n in (1, 2, 4, 8, 12):
            add(f"teacher iterate {n}", n, truncated.solve(teacher.cell, z0, u, max_iter=n).z, z_ref, u)
        d = student._run_plan(u_s, student.plan_for(1), u_t) - z_ref
        scale = z_ref.reshape(len(d), -1).norm(dim=1) / d.reshape(len(d), -1).norm(dim=1).clamp_min(1e-12)
        for e in (0.3, 0.1, 0.03, 0.01, 0.003, 0.001):
            z = z_ref + e * scale.reshape(-1, *[1] * (d.dim() - 1)) * d
            add(f"oracle, error {e:g}", 1, z, z_ref, u)

    summary = {}
    cold = torch.cat(rows["cold start z_0"]["solver"]).mean().item()
    print(f"{ev.exact_solver} to rel. residual {ev.exact_tol:g} on {run.task.describe()['task']} "
          f"(held-out, {len(torch.cat(rows['cold start z_0']['solver']))} samples)")
    heads = ("rel.err", "before", "solver", "total", "speedup", "conv.")
    print(f"{'start':26s} " + " ".join(f"{h:>7s}" for h in heads))
    for name, row in rows.items():
        r = {k: torch.cat(v).mean().item() for k, v in row.items()}
        total = r["before"] + r["solver"]
        r.update(total=total, speedup=cold / total)
        summary[name] = r
        print(f"{name:26s} {r['error']:7.4f} {r['before']:7.1f} {r['solver']:7.2f} {total:7.2f} "
              f"{r['speedup']:6.2f}x {r['converged']:7.3f}")
    out = {"run": str(run.dir), "task": run.task.describe()["task"], "solver": ev.exact_solver,
           "tol": ev.exact_tol, "cold_nfe": cold, "starts": summary,
           **_cost_of_plans(run, teacher, student, solver)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


def _cost_of_plans(run: Run, teacher: object, student: object, solver: object) -> dict:
    """Layer-call equivalents of each warm-start plan, and interleaved times of the exact solves."""
    x = next(iter(run.task.test_batches(256)))[0]
    u = teacher.inject(x)
    z0 = teacher.initial_state(u)
    layer = count_flops(lambda: teacher.cell(z0, u)).total
    u_s, u_t = student.teacher_inputs(x)
    calls, fns = {}, {"cold start z_0": lambda: solver.solve(teacher.cell, z0, u)}
    for k in (1, 2, 4):
        plan = student.plan_for(k)
        calls[str(k)] = count_flops(lambda plan=plan: student._run_plan(u_s, plan, u_t)).total / layer
        fns[f"student plan {k}"] = lambda plan=plan: student.solve_exact(x, solver, plan)
    timing = time_methods(fns, repeats=20, warmup=2, threads=1)
    for name, t in timing.items():
        print(f"{name:26s} {t['median_ms']:8.1f} ms (IQR {t['iqr_ms']:.1f})")
    return {"plan_layer_calls": calls, "timing": {"threads": 1, "batch_size": int(z0.shape[0]),
                                                  "repeats": 20, **timing}}


if __name__ == "__main__":
    main()
