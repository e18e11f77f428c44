"""One teacher training step in cdeq and in TorchDEQ, side by side in one process.

The model is the digits demo's teacher (``cdeq.tasks.images``: ``ConvInjection`` ->
``ConvDEQCell`` -> ``PoolHead``, 32 channels, 8x8 state; ``--dataset mnist`` uses the MNIST
preset's stride-4 injection, a 7x7 state). Both libraries train copies of the same initial weights
on the same batches with AdamW, cross-entropy and gradient clipping at 1; a step is
``zero_grad -> forward -> loss -> backward -> clip -> optimiser step``.

Equal settings (read from TorchDEQ's source, ``torchdeq/solver/anderson.py``, ``torchdeq/grad.py``,
``torchdeq/core.py``):

- Forward and backward solvers: Anderson with memory 6 in both (TorchDEQ's default ``m``; its
  backward solver gets only ``max_iter``, ``tol`` and ``stop_mode`` from ``get_deq``, so its
  backward Anderson always keeps 6). cdeq's forward and adjoint solvers are set to ``memory=6``.
- Residual: relative, ``|f(z)-z| / |f(z)|`` in both (``stop_mode="rel"``).
- Regularisation differs by design and cannot be made identical: TorchDEQ adds ``lam=1e-4`` to the
  Gram matrix, cdeq adds ``1e-4`` times its diagonal (relative).
- Stopping: TorchDEQ stops when the whole batch is under ``tol`` (strictly), cdeq stops each sample
  on its own. TorchDEQ's backward starts from zero, cdeq's from the incoming gradient.
- Implicit backward: cdeq's ``ImplicitBackward`` (a hook on one differentiable cell call, reusing
  its graph for every vector-Jacobian product); TorchDEQ's ``ift=True`` (an ``autograd.Function``
  that calls the cell once more inside backward) and ``hook_ift=True`` (a hook, like cdeq's).

Two regimes:

- ``fixed``: ``tol=0`` in every solver, so each runs exactly its iteration cap (15 forward, 30
  backward): equal forward and backward NFE by construction. This is the speed comparison. Its
  ``floor`` row does the same cell calls and vector-Jacobian products as plain loops with no solver
  bookkeeping: the cost any library pays for this NFE.
- ``teacher``: the demo teacher's tolerances (forward ``1e-3``, backward ``1e-5``); each library
  stops by its own rule and the NFE it spent is reported.

NFE is counted, not assumed: a forward hook on the cell adds ``rows / B`` per call, and a wrapper
around ``torch.autograd.grad`` (which both libraries call for their vector-Jacobian products) adds
``rows / B`` per product. Times are the median and IQR of ``--steps`` steps after ``--warmup``,
the libraries taking turns step by step (the order alternating), one thread. Peak memory is the
peak resident set size (``VmHWM``) minus the resident set size before the first step, measured in a
fresh subprocess per library and regime (3 steps), so one library's pages do not count for another.

Usage::

    python benchmarks/training.py                    # writes benchmarks/results/training.json
    python benchmarks/training.py --steps 5 --warmup 1 --out /tmp/t.json   # smoke test
    python benchmarks/training.py --profile 15       # also cProfile each library's steps
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import importlib.metadata
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdeq.deq.backward import ImplicitBackward
from cdeq.solvers import get_solver
from cdeq.tasks.images import DigitsTask, MnistTask

try:
    from torchdeq import get_deq
except Exception as err:  # pragma: no cover - depends on the environment
    sys.exit(f"benchmarks/training.py needs TorchDEQ (pip install torchdeq): {err}")

MEMORY = 6  # TorchDEQ's Anderson default, which its backward solver always uses
REGIMES = {"fixed": {"f_tol": 0.0, "b_tol": 0.0}, "teacher": {"f_tol": 1e-3, "b_tol": 1e-5}}
LIBS = ("cdeq", "torchdeq-ift", "torchdeq-hook")


class Counter:
    """Counts cell evaluations and vector-Jacobian products per sample, by phase."""

    def __init__(self) -> None:
        self.batch = 1
        self.phase = ""
        self.counts: dict[str, float] = {}

    def add(self, key: str, rows: int) -> None:
        if self.phase:
            name = f"{self.phase}_{key}"
            self.counts[name] = self.counts.get(name, 0.0) + rows / self.batch


COUNTER = Counter()
_autograd_grad = torch.autograd.grad


def _counting_grad(outputs: Any, inputs: Any, grad_outputs: Any = None, **kwargs: Any) -> Any:
    g = grad_outputs[0] if isinstance(grad_outputs, (tuple, list)) else grad_outputs
    if isinstance(g, Tensor) and g.dim() > 0:
        COUNTER.add("vjp", g.shape[0])
    return _autograd_grad(outputs, inputs, grad_outputs, **kwargs)


def build(dataset: str, steps: int, batch_size: int) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """The demo's teacher model and ``steps`` training batches ``((B, C, H, W), (B,))``."""
    if dataset == "digits":
        task = DigitsTask(DigitsTask.Config())
    else:
        task = MnistTask(MnistTask.Config(stride=4, train_subset=batch_size * steps))
    model = task.build_model()
    gen = torch.Generator().manual_seed(0)
    batches: list[tuple[Tensor, Tensor]] = []
    while len(batches) < steps:
        batches += [b for b in task.train_batches(batch_size, generator=gen) if len(b[1]) == batch_size]
    model.cell.register_forward_hook(lambda mod, args, out: COUNTER.add("cell", out.shape[0]))
    return model, batches[:steps]


class CdeqStep:
    """cdeq's DEQModel with the benchmark's solvers and its implicit backward."""

    def __init__(self, model: nn.Module, f_iter: int, b_iter: int, f_tol: float, b_tol: float) -> None:
        self.model = model
        model.deq.solver = get_solver("anderson", max_iter=f_iter, tol=f_tol, memory=MEMORY)
        model.deq.backward_strategy = ImplicitBackward(
            {"name": "anderson", "memory": MEMORY}, max_iter=b_iter, tol=b_tol)

    def __call__(self, x: Tensor) -> Tensor:
        logits, _ = self.model(x)
        return logits


class TorchdeqStep:
    """The same injection, cell and head around ``torchdeq.get_deq``."""

    def __init__(self, model: nn.Module, f_iter: int, b_iter: int, f_tol: float, b_tol: float,
                 hook: bool) -> None:
        self.model = model
        self.deq = get_deq(core="indexing", ift=not hook, hook_ift=hook, f_solver="anderson",
                           b_solver="anderson", f_max_iter=f_iter, b_max_iter=b_iter, f_tol=f_tol,
                           b_tol=b_tol, f_stop_mode="rel", b_stop_mode="rel")
        self.deq.train()

    def __call__(self, x: Tensor) -> Tensor:
        m = self.model
        u = m.injection(x)
        z_out, _ = self.deq(lambda z: m.cell(z, u), torch.zeros_like(u), solver_kwargs={"m": MEMORY})
        return m.head(z_out[-1])


class FloorStep:
    """The NFE work alone: ``f_iter`` cell calls without a graph, one with, ``b_iter``
    vector-Jacobian products in the backward hook (plain iterations, no solver bookkeeping)."""

    def __init__(self, model: nn.Module, f_iter: int, b_iter: int) -> None:
        self.model, self.f_iter, self.b_iter = model, f_iter, b_iter

    def __call__(self, x: Tensor) -> Tensor:
        m = self.model
        u = m.injection(x)
        with torch.no_grad():
            z = torch.zeros_like(u)
            for _ in range(self.f_iter):
                z = m.cell(z, u)
        z_in = z.requires_grad_()
        z_out = m.cell(z_in, u)

        inside = [False]  # the products below pass through this hook again

        def hook(grad: Tensor) -> Tensor:
            if inside[0]:
                return grad
            inside[0], g = True, grad
            for _ in range(self.b_iter):
                g = torch.autograd.grad(z_out, z_in, g, retain_graph=True)[0] + grad
            inside[0] = False
            return g

        z_out.register_hook(hook)
        return m.head(z_out)


def make_steps(base: nn.Module, regime: str, f_iter: int, b_iter: int) -> dict[str, Callable]:
    """One training-step closure per library, each on its own copy of ``base``."""
    tols = REGIMES[regime]
    out: dict[str, Callable] = {}
    for lib in LIBS + (("floor",) if regime == "fixed" else ()):
        model = copy.deepcopy(base).train()
        if lib == "floor":
            fwd: Callable = FloorStep(model, f_iter, b_iter)
        elif lib == "cdeq":
            fwd = CdeqStep(model, f_iter, b_iter, **tols)
        else:
            fwd = TorchdeqStep(model, f_iter, b_iter, **tols, hook=lib.endswith("hook"))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)

        def step(x: Tensor, y: Tensor, fwd: Callable = fwd, model: nn.Module = model,
                 opt: torch.optim.Optimizer = opt) -> float:
            opt.zero_grad(set_to_none=True)
            COUNTER.phase = "forward"
            loss = F.cross_entropy(fwd(x), y)
            COUNTER.phase = "backward"
            loss.backward()
            COUNTER.phase = ""
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss.item()

        out[lib] = step
    return out


def time_regime(base: nn.Module, batches: list, regime: str, args: argparse.Namespace) -> dict:
    """Interleaved timing and NFE of every library in one regime."""
    steps = make_steps(base, regime, args.f_iter, args.b_iter)
    times: dict[str, list[float]] = {lib: [] for lib in steps}
    counts: dict[str, list[dict[str, float]]] = {lib: [] for lib in steps}
    losses: dict[str, float] = {}
    for i, (x, y) in enumerate(batches):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for lib in order:
            COUNTER.batch, COUNTER.counts = x.shape[0], {}
            t0 = time.perf_counter()
            losses[lib] = steps[lib](x, y)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[lib].append(dt)
                counts[lib].append(dict(COUNTER.counts))
    rows = {}
    for lib in steps:
        t = sorted(times[lib])
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        keys = sorted({k for c in counts[lib] for k in c})
        nfe = {k: statistics.mean(c.get(k, 0.0) for c in counts[lib]) for k in keys}
        rows[lib] = {"median_ms": 1e3 * statistics.median(t), "iqr_ms": 1e3 * (q[2] - q[0]),
                     "steps": len(t), "last_loss": losses[lib], **nfe}
    return rows


def profile_regime(base: nn.Module, batches: list, regime: str, args: argparse.Namespace) -> dict:
    """cProfile of each library's steps: the ``--profile`` functions of largest own time."""
    out = {}
    for lib, step in make_steps(base, regime, args.f_iter, args.b_iter).items():
        step(*batches[0])
        prof = cProfile.Profile()
        prof.enable()
        for x, y in batches[1:]:
            step(x, y)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile)
        out[lib] = buf.getvalue()
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def probe_memory(args: argparse.Namespace) -> None:
    """In a fresh process: peak RSS growth over 3 steps of one library (prints one JSON line)."""
    base, batches = build(args.dataset, 3, args.batch_size)
    step = make_steps(base, args.probe_regime, args.f_iter, args.b_iter)[args.probe]
    before = _status_kib("VmRSS")
    for x, y in batches:
        step(x, y)
    print(json.dumps({"peak_rss_delta_mib": (_status_kib("VmHWM") - before) / 1024}))


def measure_memory(lib: str, regime: str, args: argparse.Namespace) -> float | None:
    cmd = [sys.executable, __file__, "--probe", lib, "--probe-regime", regime, "--dataset",
           args.dataset, "--batch-size", str(args.batch_size), "--f-iter", str(args.f_iter),
           "--b-iter", str(args.b_iter), "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"memory probe for {lib} failed: {res.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_delta_mib"]


def print_table(results: dict[str, dict]) -> None:
    cols = ["regime", "library", "median ms", "IQR ms", "x cdeq", "fwd cell", "bwd cell", "bwd VJP",
            "peak MiB"]
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for regime, rows in results.items():
        ref = rows["cdeq"]["median_ms"]
        for lib, r in rows.items():
            mem = r.get("peak_rss_delta_mib")
            print(" | ".join([
                regime, lib, f"{r['median_ms']:.1f}", f"{r['iqr_ms']:.1f}", f"{r['median_ms'] / ref:.2f}",
                f"{r.get('forward_cell', 0.0):.1f}", f"{r.get('backward_cell', 0.0):.1f}",
                f"{r.get('backward_vjp', 0.0):.1f}", "-" if mem is None else f"{mem:.1f}"]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    p.add_argument("--steps", type=int, default=24, help="timed steps per library (>= 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--f-iter", type=int, default=15, help="forward iteration cap (demo: 15)")
    p.add_argument("--b-iter", type=int, default=30, help="backward iteration cap (demo: 30)")
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", type=int, default=0, help="print this many top functions per library")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "training.json"))
    p.add_argument("--probe", choices=LIBS + ("floor",), help=argparse.SUPPRESS)
    p.add_argument("--probe-regime", choices=list(REGIMES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.autograd.grad = _counting_grad  # both libraries look it up at call time
    if args.probe:
        probe_memory(args)
        return
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]
    base, batches = build(args.dataset, args.warmup + args.steps, args.batch_size)
    results: dict[str, dict] = {}
    profiles: dict[str, dict] = {}
    for regime in args.regimes:
        results[regime] = time_regime(base, batches, regime, args)
        for lib in results[regime]:
            results[regime][lib]["peak_rss_delta_mib"] = (
                None if args.no_memory else measure_memory(lib, regime, args))
        if args.profile:
            profiles[regime] = profile_regime(base, batches[: args.warmup + 4], regime, args)
    print_table(results)
    for regime, libs in profiles.items():
        for lib, text in libs.items():
            print(f"\n--- cProfile, {regime}, {lib} (4 steps, by own time) ---\n{text}")
    meta = {
        "dataset": args.dataset, "batch_size": args.batch_size, "f_iter": args.f_iter,
        "b_iter": args.b_iter, "anderson_memory": MEMORY, "regimes": {r: REGIMES[r] for r in args.regimes},
        "threads": torch.get_num_threads(), "warmup": args.warmup, "torch": torch.__version__,
        "torchdeq": importlib.metadata.version("torchdeq"), "python": platform.python_version(),
        "machine": platform.machine(), "memory": "peak RSS (VmHWM) minus RSS before the first step, "
        "fresh subprocess per library, 3 steps",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load1_start_end": [load_start, os.getloadavg()[0]],  # a busy machine shows here
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
