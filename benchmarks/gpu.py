"""Inference latency of C-DEQ against truncated solvers and the converged teacher, on a GPU or CPU.

Two models: a CIFAR-10-size convolutional DEQ (``cdeq.tasks.images``: input ``(B, 3, 32, 32)``,
injection of stride 2, 32 channels) and the text task's causal transformer block
(``cdeq.tasks.text``: 65 symbols, ``d_model`` 128, 4 heads, 64 tokens). Weights are random unless
``--run DIR`` names a finished image run, whose teacher, student and selected plans are used
instead: an untrained student costs the same time per call as a trained one, so the latency
figures hold, but no accuracy is measured here (the output says which weights were timed).

Rows, each ``x -> logits`` at batch 1 and 256 (``--batches``):

- ``cdeq@k`` for k in 1, 2, 4: the student's plan for k layer calls, eager and compiled
  (:func:`cdeq.hub.compile.compile_plan`: ``mode="reduce-overhead"`` on CUDA);
- ``picard@k``, ``anderson@k``: the teacher's solver truncated at k calls (``tol=0``, no host
  synchronisation inside: ``check_every=k``);
- ``teacher``: Anderson run to ``tol`` (max 30 calls) with ``check_every`` 1 and 8 (the
  synchronisation the per-sample stopping costs).

Timing: ``--warmup`` calls, then ``--repeats`` timed calls (CUDA events on CUDA, ``perf_counter``
on CPU); the median is reported with the 10th/90th percentiles. Throughput is images/s or
tokens/s at the median. Peak memory is ``torch.cuda.max_memory_allocated`` per row (CUDA only).

Usage::

    python benchmarks/gpu.py                              # full size, --device auto
    python benchmarks/gpu.py --device cpu --tiny          # tiny models, seconds (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cdeq.consistency import ConsistencyStudent
from cdeq.deq import DEQModel
from cdeq.engine.precision import autocast, resolve_device
from cdeq.hub.compile import PlanModule, compile_plan
from cdeq.solvers import get_solver
from cdeq.tasks.images import ConvDEQCell, ConvInjection, PoolHead
from cdeq.tasks.text import CausalTransformerCell, LMHead, TextInjection

BUDGETS = (1, 2, 4)


# --- models ------------------------------------------------------------------------------------
def image_model(tiny: bool) -> tuple[DEQModel, Callable[[int], torch.Tensor], int]:
    """A CIFAR-10-size conv DEQ (random weights), an input maker, and units per sample (1 image)."""
    channels, size = (8, 16) if tiny else (32, 32)
    model = DEQModel(ConvInjection(3, channels, 2), ConvDEQCell(channels), PoolHead(channels, 10))
    return model, lambda b: torch.randn(b, 3, size, size), 1


def text_model(tiny: bool) -> tuple[DEQModel, Callable[[int], torch.Tensor], int]:
    """The text task's transformer-block DEQ (random weights); units per sample: ``seq_len`` tokens."""
    vocab, d, heads, seq = (65, 16, 2, 8) if tiny else (65, 128, 4, 64)
    model = DEQModel(TextInjection(vocab, d, seq), CausalTransformerCell(d, heads), LMHead(d, vocab))
    return model, lambda b: torch.randint(0, vocab, (b, seq)), seq


def untrained_student(model: DEQModel) -> ConsistencyStudent:
    """A student with plans of 1, 2 and 4 calls (jump, step, jump, step): the cost of a plan is
    its number of layer calls, whatever the trained plan's times are."""
    student = ConsistencyStudent(model)
    t = student.schedule.t_min
    student.plans = {1: [("jump", t)], 2: [("jump", t), ("step",)],
                     4: [("jump", t), ("step",), ("jump", student.schedule.T / 2), ("step",)]}
    return student


def load_run(run_dir: str) -> tuple[DEQModel, ConsistencyStudent, Callable[[int], torch.Tensor], int]:
    """Teacher, student and an input maker (test-shaped random images) from a finished image run."""
    from cdeq.run.stages import Run

    run = Run(Path(run_dir))
    teacher, student = run.teacher(), run.student()
    x, _ = next(iter(run.task.test_batches(1)))
    return teacher, student, lambda b: torch.randn(b, *x.shape[1:]), 1


# --- timing ------------------------------------------------------------------------------------
def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """Median and 10th/90th percentile seconds of ``fn()``, and peak memory on CUDA."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return {"median_s": statistics.median(times), "p10_s": q[0], "p90_s": q[-1],
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}


def solver_fn(teacher: DEQModel, x: torch.Tensor, name: str, **options: Any) -> Callable[[], Any]:
    """``x -> logits`` through ``name`` with ``options``; ``run.calls`` collects each call's NFE."""
    solver = get_solver(name, on_nonfinite="ignore", **options)
    calls = []

    @torch.no_grad()
    def run() -> torch.Tensor:
        u = teacher.inject(x)
        res = solver.solve(teacher.cell, teacher.initial_state(u), u)
        calls.append(res.nfe)
        return teacher.head(res.z)

    run.calls = calls  # type: ignore[attr-defined]
    return run


def loop_iterations(nfe_max: int, check_every: int, limit: int) -> int:
    """Iterations the solve loop runs when its last sample stops after ``nfe_max`` calls."""
    return min(limit, -(-nfe_max // check_every) * check_every)


def rows_for(task: str, teacher: DEQModel, student: ConsistencyStudent, make_x: Callable,
             units: int, batch: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    x = make_x(batch).to(device)
    cases: list[tuple[str, int | None, Callable[[], Any], dict]] = []
    for k in BUDGETS:
        plan = PlanModule(student, student.plan_for(k)).eval()
        cases.append((f"cdeq@{k} eager", k, lambda p=plan: p(x), {}))
        if args.compile:
            fast = compile_plan(student, k, example=x, backend=args.compile_backend,
                                atol=args.compile_atol, rtol=args.compile_atol)
            cases.append((f"cdeq@{k} compiled", k, lambda f=fast: f(x),
                          {"backend": args.compile_backend}))
    for name in ("picard", "anderson"):
        for k in BUDGETS:
            cases.append((f"{name}@{k}", k, solver_fn(teacher, x, name, max_iter=k, tol=0.0,
                                                       check_every=k), {}))
    for every in (1, 8):
        fn = solver_fn(teacher, x, "anderson", max_iter=30, tol=args.tol, check_every=every)
        cases.append((f"teacher (anderson tol={args.tol}, check_every={every})", None, fn,
                      {"check_every": every}))
    for every in (1, 30):  # equal work (30 calls each): the cost of the per-iteration check alone
        fn = solver_fn(teacher, x, "anderson", max_iter=30, tol=0.0, check_every=every)
        cases.append((f"anderson@30 check_every={every}", 30, fn, {"check_every": every}))
    rows = []
    for label, nfe, fn, extra in cases:
        with autocast(args.precision, device):
            timing = time_call(fn, device, args.warmup, args.repeats)
        calls = getattr(fn, "calls", None)
        if nfe is None and calls:
            nfe = float(torch.stack(calls).float().mean())
        if "check_every" in extra:  # solver loop iterations per second
            its = loop_iterations(int(calls[-1].max()), extra["check_every"], 30)
            extra["iterations_per_s"] = its / timing["median_s"]
        rows.append({"task": task, "batch": batch, "row": label, "nfe": nfe, **timing, **extra,
                     "throughput_per_s": batch * units / timing["median_s"],
                     "unit": "images" if units == 1 else "tokens"})
        print(f"  {task:<6} B={batch:<4} {label:<44} {1000 * timing['median_s']:9.3f} ms", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| task | batch | row | NFE | median ms | p10-p90 ms | throughput | solver it/s | peak MiB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.1f}"
        nfe = "-" if r["nfe"] is None else f"{r['nfe']:.3g}"
        lines.append(f"| {r['task']} | {r['batch']} | {r['row']} | {nfe} | {1000 * r['median_s']:.3f} "
                     f"| {1000 * r['p10_s']:.3f}-{1000 * r['p90_s']:.3f} "
                     f"| {r['throughput_per_s']:.4g} {r['unit']}/s "
                     f"| {r['iterations_per_s']:.4g} | {mem} |" if "iterations_per_s" in r else
                     f"| {r['throughput_per_s']:.4g} {r['unit']}/s | - | {mem} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--tiny", action="store_true", help="tiny models and few repeats: seconds")
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--warmup", type=int, default=None, help="default 10 (tiny: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="default 50 (tiny: 3)")
    parser.add_argument("--tasks", default="image,text")
    parser.add_argument("--run", default="", help="a finished image run directory to time instead")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; tiny on CPU: eager)")
    parser.add_argument("--compile-atol", type=float, default=None)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 10
    if args.repeats is None:
        args.repeats = 3 if args.tiny else 50
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.tiny and args.device == "cpu" else "inductor"
    if args.compile_atol is None:
        args.compile_atol = 2e-2 if args.precision == "bf16" else 1e-4
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        batches = sorted({min(b, 4) for b in batches})
    rows: list[dict] = []
    sources = {}
    for task in args.tasks.split(","):
        if task == "image" and args.run:
            teacher, student, make_x, units = load_run(args.run)
            sources[task] = f"trained run {args.run}"
        else:
            teacher, make_x, units = (image_model if task == "image" else text_model)(args.tiny)
            student = untrained_student(teacher)
            sources[task] = "random weights, untrained student (latency only; no accuracy)"
        teacher.to(device).eval()
        student.to(device).eval()
        for batch in batches:
            rows.extend(rows_for(task, teacher, student, make_x, units, batch, args, device))
    out = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "precision": args.precision, "tiny": args.tiny,
        "warmup": args.warmup, "repeats": args.repeats, "weights": sources,
        "timer": "CUDA events" if device.type == "cuda" else "time.perf_counter",
        "rows": rows,
    }
    out["table"] = table(rows)
    print(f"device: {out['device']}; weights: {sources}")
    print(out["table"])
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
