"""Benchmark cdeq's fixed-point solvers against TorchDEQ's on the same problems.

Problems (float32, CPU):

- ``tanh-easy``: ``z = tanh(W z + U x)``, ``B=512``, ``d=256``, ``W`` symmetric with spectral radius 0.5.
- ``tanh-hard``: the same with spectral radius 0.95 (``W`` symmetric, so its norm and its spectral
  radius agree) and small inputs, so ``tanh`` stays near its linear range and the Jacobian at the fixed
  point keeps eigenvalues close to +-0.95: Picard needs well over a hundred steps.
- ``conv``: ``z = tanh(GroupNorm(conv3x3(z)) + inj)``, ``B=64``, 16 channels, 16x16.
- ``multiscale``: the image tasks' multiscale cell (``task_config.scales=3``, MDEQ's fusion of
  three resolutions) as initialised for training, ``B=64``, 16 channels, a state of three maps
  16x16, 8x8 and 4x4 (one residual over all parts). cdeq solves the tuple itself; TorchDEQ
  solves it as its ``deq(f, (a0, b0, c0))`` does, the parts flattened into one vector by its own
  multi-tensor wrapper (``MDEQWrapper``).

For every solver the script reports the mean NFE per sample (every evaluation of ``f`` on a sample
counts one: cdeq stops each sample on its own, TorchDEQ's solvers evaluate the whole batch at every
step until the worst sample is done, so theirs is counted by a wrapper around ``f`` as rows evaluated
/ ``B``; the JSON also has the largest NFE of any sample), the median wall time over ``--repeats``
runs after warm-up (the solvers take turns, so a change of machine load hits all alike), and the
fraction of samples whose relative residual ``|f(z)-z| / |f(z)|`` reached ``--tol``. Both libraries
run with the same ``torch.set_num_threads(--threads)``. TorchDEQ's solvers come from
``torchdeq.solver.get_solver`` (``fixed_point_iter``, ``anderson``, ``broyden``) with ``tol``,
``stop_mode="rel"`` and ``max_iter`` as for cdeq; Anderson keeps 5 iterates in both; TorchDEQ's
Anderson also runs with a tuned ``lam`` (its default absolute ``1e-4`` stalls on the hard case).
If TorchDEQ is not importable, only cdeq's solvers run (the script says so).

Usage::

    python benchmarks/solvers.py                      # full run, writes benchmarks/results/solvers.json
    python benchmarks/solvers.py --quick --repeats 1  # smoke test with small sizes
    python benchmarks/solvers.py --check-every 1,8    # cdeq only: host-sync interval vs it/s

With ``--check-every``, only cdeq's solvers run, once per interval, side by side (round robin),
and the table gives the loop iterations per second (iterations run: the largest NFE rounded up to
the interval) next to the NFE, which the interval does not change.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cdeq.deq import spectral_radius
from cdeq.engine.tree import leaves, relative_error, tree_map
from cdeq.solvers import get_solver
from cdeq.tasks.images.model import MultiscaleCell

try:  # TorchDEQ is optional: without it only cdeq's solvers run.
    import torchdeq
    from torchdeq.solver import get_solver as td_get_solver
    from torchdeq.utils.layer_utils import MDEQWrapper

    TORCHDEQ_ERROR: str | None = None
except Exception as err:  # pragma: no cover - depends on the environment
    torchdeq = None
    td_get_solver = MDEQWrapper = None
    TORCHDEQ_ERROR = f"{type(err).__name__}: {err}"


# --- problems ----------------------------------------------------------------------------------
def symmetric_with_radius(d: int, radius: float, gen: torch.Generator) -> Tensor:
    """A random symmetric ``d x d`` matrix whose eigenvalues spread over ``[-radius, radius]``,
    the two ends included (so its spectral radius and its norm are both ``radius``)."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    eig = torch.linspace(-radius, radius, d, dtype=torch.float64)
    return (q * eig) @ q.T


class TanhLayer(nn.Module):
    """``f(z, x) = tanh(z W^T + x)`` where ``x`` is the injected input ``U x``."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(torch.addmm(x, z, self.weight.T))


class ConvLayer(nn.Module):
    """``f(z, inj) = tanh(GroupNorm(conv3x3(z)) + inj)``."""

    def __init__(self, channels: int, gen: torch.Generator, scale: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(4, channels, affine=True)
        with torch.no_grad():
            w = torch.randn(self.conv.weight.shape, generator=gen)
            self.conv.weight.copy_(w / w.flatten(1).norm(dim=1).mean())
            self.norm.weight.fill_(scale)
        self.requires_grad_(False)

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        return torch.tanh(self.norm(self.conv(z)) + inj)


def make_problems(quick: bool, seed: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    batch, dim = (64, 64) if quick else (512, 256)
    problems = []
    for name, radius, input_scale in (("tanh-easy", 0.5, 1.0), ("tanh-hard", 0.95, 0.01)):
        weight = symmetric_with_radius(dim, radius, gen)
        u = torch.randn(dim, dim, generator=gen) / dim**0.5
        inj = input_scale * torch.randn(batch, dim, generator=gen) @ u.T
        problems.append({
            "name": name,
            "desc": f"tanh(Wz+Ux) B={batch} d={dim} rho(W)={radius}",
            "f": TanhLayer(weight),
            "x": inj,
            "z0": torch.zeros(batch, dim),
        })
    cb, ch, hw = (8, 16, 8) if quick else (64, 16, 16)
    layer = ConvLayer(ch, gen, scale=0.6)
    inj = torch.randn(cb, ch, hw, hw, generator=gen)
    problems.append({
        "name": "conv",
        "desc": f"tanh(GN(conv(z))+inj) B={cb} C={ch} {hw}x{hw}",
        "f": layer,
        "x": inj,
        "z0": torch.zeros(cb, ch, hw, hw),
    })
    torch.manual_seed(seed)  # the cell as the image tasks initialise it
    cell = MultiscaleCell(ch, scales=3, hidden_mult=1).requires_grad_(False)
    sizes = [hw, (hw + 1) // 2, (hw + 3) // 4]
    inj = tuple(torch.randn(cb, ch, s, s, generator=gen) for s in sizes)
    problems.append({
        "name": "multiscale",
        "desc": f"MDEQ-style 3 scales B={cb} C={ch} {'/'.join(f'{s}x{s}' for s in sizes)}",
        "f": cell,
        "x": inj,
        "z0": tuple(torch.zeros_like(t) for t in inj),
    })
    return problems


# --- runners -----------------------------------------------------------------------------------
def rel_residual(f: Callable[[Any, Any], Any], z: Any, x: Any) -> Tensor:
    """``|f(z) - z| / |f(z)|`` per sample, over every part of a structured state."""
    with torch.no_grad():
        fz = f(z, x)
    return relative_error(z, fz)


def run_cdeq(name: str, options: dict[str, Any], problem: dict[str, Any], tol: float,
             max_iter: int) -> Callable[[], dict[str, Any]]:
    solver = get_solver(name, max_iter=max_iter, tol=tol, stop_mode="rel", **options)
    f, x, z0 = problem["f"], problem["x"], problem["z0"]

    def once() -> dict[str, Any]:
        start = time.perf_counter()
        res = solver.solve(f, z0, x)
        elapsed = time.perf_counter() - start
        return {
            "time": elapsed,
            "nfe": float(res.nfe.float().mean()),
            "nfe_max": int(res.nfe.max()),
            "converged": float(res.converged.float().mean()),
            "z": res.z,
        }

    return once


def run_torchdeq(name: str, options: dict[str, Any], problem: dict[str, Any], tol: float,
                 max_iter: int) -> Callable[[], dict[str, Any]]:
    solver = td_get_solver(name)
    f, x, z0 = problem["f"], problem["x"], problem["z0"]
    batch = leaves(z0)[0].shape[0]
    rows = [0]
    wrapper = None
    if not isinstance(z0, Tensor):  # TorchDEQ's multi-tensor path: the parts as one vector
        wrapper = MDEQWrapper(lambda *parts: f(tuple(parts), x), list(z0))
        z0 = wrapper.list2vec(list(z0))

    def func(z: Tensor) -> Tensor:
        rows[0] += z.shape[0]
        return f(z, x) if wrapper is None else wrapper(z)

    def once() -> dict[str, Any]:
        rows[0] = 0
        start = time.perf_counter()
        with torch.no_grad():
            z, _, info = solver(func, z0, max_iter=max_iter, tol=tol, stop_mode="rel", **options)
        elapsed = time.perf_counter() - start
        if wrapper is not None:
            z = tuple(wrapper.vec2list(z))
        return {
            "time": elapsed,
            "nfe": rows[0] / batch,
            "nfe_max": rows[0] // batch,  # the whole batch is evaluated at every step
            "converged": float((info["rel_lowest"] <= tol).float().mean()),
            "z": z,
        }

    return once


def jacobian_radius(problem: dict[str, Any], z: Tensor, samples: int = 32) -> dict[str, float]:
    """Power-method spectral radius of ``J_f`` at the solution, on the first ``samples`` samples."""
    z = tree_map(lambda t: t[:samples], z)
    x = tree_map(lambda t: t[:samples], problem["x"])
    rho = spectral_radius(problem["f"], z, x, iters=200)
    return {"median": float(rho.median()), "max": float(rho.max())}


def summarise(runs: list[dict[str, Any]], problem: dict[str, Any]) -> dict[str, Any]:
    last = runs[-1]
    check = rel_residual(problem["f"], last["z"], problem["x"])
    return {
        "nfe": last["nfe"],
        "nfe_max": last["nfe_max"],
        "time_ms": 1000 * statistics.median(r["time"] for r in runs),
        "times_ms": [round(1000 * r["time"], 3) for r in runs],
        "converged": last["converged"],
        "check_rel_residual_max": float(check.max()),
    }


SOLVERS = [
    # (row label, library, solver name in that library, options). Memory is matched where the
    # libraries share the notion: Anderson keeps 5 iterates in both. TorchDEQ's Broyden keeps every
    # update (its default, up to max_iter); cdeq's keeps 20 and then restarts.
    ("picard", "cdeq", "picard", {}),
    ("anderson", "cdeq", "anderson", {"memory": 5}),
    ("broyden", "cdeq", "broyden", {"memory": 20}),
    ("picard", "torchdeq", "fixed_point_iter", {}),
    ("anderson", "torchdeq", "anderson", {"m": 5}),
    ("broyden", "torchdeq", "broyden", {}),
    # TorchDEQ's Anderson regularises with an absolute lam (default 1e-4), which stalls once the
    # residuals are small; this row gives it a tuned lam, so the comparison is not only with a default.
    ("anderson, torchdeq lam=1e-10", "torchdeq", "anderson", {"m": 5, "lam": 1e-10}),
]
# The cdeq row each label is compared with.
COUNTERPART = {"anderson, torchdeq lam=1e-10": "anderson"}


def check_every_rows(problems: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """cdeq's solvers at each ``--check-every`` interval, timed round robin."""
    intervals, rows = [int(v) for v in args.check_every.split(",")], []
    for problem in problems:
        for label, lib, name, options in SOLVERS:
            if lib != "cdeq" or label not in args.solvers.split(","):
                continue
            runners = [run_cdeq(name, {**options, "check_every": n}, problem, args.tol, args.max_iter)
                       for n in intervals]
            for once in runners:
                for _ in range(args.warmup):
                    once()
            runs: list[list[dict[str, Any]]] = [[] for _ in runners]
            for _ in range(args.repeats):
                for i, once in enumerate(runners):
                    runs[i].append(once())
            for n, solver_runs in zip(intervals, runs, strict=True):
                row = summarise(solver_runs, problem)
                its = min(args.max_iter, -(-row["nfe_max"] // n) * n)
                row.update({"problem": problem["name"], "solver": label, "check_every": n,
                            "iterations": its, "iterations_per_s": its / (row["time_ms"] / 1000)})
                rows.append(row)
                print(f"  {problem['name']:<10} {label:<9} check_every={n:<4} nfe={row['nfe']:7.1f} "
                      f"its={its:4d} time={row['time_ms']:8.1f} ms", file=sys.stderr)
    return rows


def check_every_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| problem | solver | check_every | NFE mean (max) | loop iterations | ms | iterations/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['solver']} | {r['check_every']} | {r['nfe']:.1f} "
                     f"({r['nfe_max']}) | {r['iterations']} | {r['time_ms']:.1f} "
                     f"| {r['iterations_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/solvers.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--problems", default="tanh-easy,tanh-hard,conv,multiscale",
                        help="comma-separated subset of tanh-easy, tanh-hard, conv, multiscale")
    parser.add_argument("--solvers", default="picard,anderson,broyden",
                        help="comma-separated subset of picard, anderson, broyden")
    parser.add_argument("--check-every", default="",
                        help="comma-separated intervals: time cdeq's solvers at each (cdeq only)")
    args = parser.parse_args(argv)
    if args.check_every:
        return main_check_every(args, argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    have_td = td_get_solver is not None
    if not have_td:
        print(f"torchdeq is not importable ({TORCHDEQ_ERROR}); running cdeq's solvers only")

    results: list[dict[str, Any]] = []
    problems_info: dict[str, Any] = {}
    wanted_problems = set(args.problems.split(","))
    wanted_solvers = set(args.solvers.split(","))
    for problem in make_problems(args.quick, args.seed):
        if problem["name"] not in wanted_problems:
            continue
        chosen = [(label, lib, name, options) for label, lib, name, options in SOLVERS
                  if (lib == "cdeq" or have_td) and label.split(",")[0] in wanted_solvers]
        runners = [(run_cdeq if lib == "cdeq" else run_torchdeq)(name, options, problem, args.tol,
                                                                 args.max_iter)
                   for _, lib, name, options in chosen]
        for once in runners:
            for _ in range(args.warmup):
                once()
        # Round robin over the solvers, so a change of machine load hits all of them alike.
        runs: list[list[dict[str, Any]]] = [[] for _ in runners]
        for _ in range(args.repeats):
            for i, once in enumerate(runners):
                runs[i].append(once())
        problem["rho"] = jacobian_radius(problem, runs[0][-1]["z"])
        for (label, lib, _, options), solver_runs in zip(chosen, runs, strict=True):
            row = summarise(solver_runs, problem)
            row.update({"problem": problem["name"], "solver": label, "library": lib,
                        "options": options})
            results.append(row)
            print(f"  {problem['name']:<10} {lib:<9} {label:<9} nfe={row['nfe']:7.1f} "
                  f"time={row['time_ms']:8.1f} ms conv={row['converged']:.3f}", file=sys.stderr)
        problems_info[problem["name"]] = {"description": problem["desc"],
                                          "jacobian_spectral_radius_at_solution": problem["rho"]}
        del runners, runs

    out = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "settings": {
            "tol": args.tol, "stop_mode": "rel", "max_iter": args.max_iter, "repeats": args.repeats,
            "warmup": args.warmup, "threads": args.threads, "seed": args.seed, "quick": args.quick,
            "problems": args.problems, "solvers": args.solvers,
        },
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__,
            "torchdeq": importlib.metadata.version("torchdeq") if have_td else None,
            "machine": platform.machine(), "processor": platform.processor(),
        },
        "problems": problems_info,
        "results": results,
    }
    out["table"] = table(results, problems_info, out["settings"])
    print()
    print(out["table"])
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return out


def main_check_every(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wanted = set(args.problems.split(","))
    problems = [p for p in make_problems(args.quick, args.seed) if p["name"] in wanted]
    rows = check_every_rows(problems, args)
    out = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: getattr(args, k) for k in ("tol", "max_iter", "repeats", "warmup", "threads",
                                                   "quick", "check_every")},
        "environment": {"torch": torch.__version__, "machine": platform.machine()},
        "results": [{k: v for k, v in r.items() if k != "times_ms"} for r in rows],
        "table": check_every_table(rows),
    }
    print(out["table"])
    default = args.out == "benchmarks/results/solvers.json"
    path = Path("benchmarks/results/solvers_check_every.json" if default else args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return out


def table(results: list[dict[str, Any]], problems: dict[str, Any], settings: dict[str, Any]) -> str:
    """A markdown table, cdeq and TorchDEQ side by side."""
    by_key = {(r["problem"], r["solver"], r["library"]): r for r in results}
    have_td = any(r["library"] == "torchdeq" for r in results)
    lines = [
        f"tol={settings['tol']} (relative residual), max_iter={settings['max_iter']}, "
        f"threads={settings['threads']}, time = median of {settings['repeats']} runs after "
        f"{settings['warmup']} warm-up",
    ]
    for name, info in problems.items():
        rho = info["jacobian_spectral_radius_at_solution"]
        lines.append(f"{name}: {info['description']}; spectral radius of J_f at z*: median "
                     f"{rho['median']:.3f}, max {rho['max']:.3f}")
    lines.append("")
    if have_td:
        lines.append("| problem | solver | NFE cdeq mean (max) | NFE torchdeq | ms cdeq | ms torchdeq "
                     "| converged cdeq | converged torchdeq |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    else:
        lines.append("| problem | solver | NFE cdeq mean (max) | ms cdeq | converged cdeq |")
        lines.append("|---|---|---:|---:|---:|")
    labels = list(dict.fromkeys(label for label, *_ in SOLVERS))
    for name in problems:
        for label in labels:
            ours = by_key.get((name, COUNTERPART.get(label, label), "cdeq"))
            theirs = by_key.get((name, label, "torchdeq"))
            if ours is None or (theirs is None and label in COUNTERPART):
                continue
            if theirs is None:
                lines.append(f"| {name} | {label} | {ours['nfe']:.1f} ({ours['nfe_max']}) "
                             f"| {ours['time_ms']:.1f} | {ours['converged']:.3f} |")
            else:
                lines.append(
                    f"| {name} | {label} | {ours['nfe']:.1f} ({ours['nfe_max']}) | {theirs['nfe']:.1f} "
                    f"| {ours['time_ms']:.1f} | {theirs['time_ms']:.1f} "
                    f"| {ours['converged']:.3f} | {theirs['converged']:.3f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
