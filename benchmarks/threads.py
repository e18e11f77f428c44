"""The digits demo's teacher training idle and beside busy processes, by thread setting.

For each number of busy processes (``python3 -c "while True: pass"``, started before and killed
after each measurement by this script) and each thread setting, a fresh worker process builds the
digits demo's teacher and trains it for ``--steps`` optimiser steps (40 = one epoch of the demo's
1,260 training images in batches of 32; the demo's solvers and implicit backward). The time is the
wall time of that training alone (imports and data loading excluded), reported with its ratio to the
same setting's idle time.

Thread settings:

- ``1``, ``2``: ``threads=1`` / ``threads=2`` through :func:`cdeq.engine.threads.apply_thread_policy`.
- ``2-passive``: ``threads=2`` with ``OMP_WAIT_POLICY=PASSIVE`` in the worker's environment (the
  OpenMP runtime reads it when ``import torch`` loads it, so it must be set before Python starts).
- ``auto``: ``threads=0``, the automatic policy (it samples the load while the busy processes run).

Workers start without ``OMP_NUM_THREADS`` (the automatic policy would take it as the user's
choice). Fair sharing of ``C`` cores among ``n`` busy processes and this run leaves it
``C / (n + 1)`` cores; the script prints the slowdown that predicts (the one-thread idle time times
``max(1, (n + 1) / C)``, against the best idle time).

Usage::

    python benchmarks/threads.py                          # writes benchmarks/results/threads.json
    python benchmarks/threads.py --steps 3 --busy 0 1 --out /tmp/threads.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"1": (1, {}), "2": (2, {}), "2-passive": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
            "auto": (0, {})}
BUSY_LOOP = "while True: pass"


def worker(threads: int, steps: int) -> None:
    """Train the demo teacher for ``steps`` steps; print one JSON line with the times."""
    import torch

    from cdeq.engine.threads import apply_thread_policy
    from cdeq.run.teacher import TeacherConfig, train_teacher
    from cdeq.tasks.images import DigitsTask

    used = apply_thread_policy(threads)
    task = DigitsTask(DigitsTask.Config())
    model = task.build_model()
    config = TeacherConfig(max_steps=steps, epochs=steps)  # max_steps ends it
    t0, c0 = time.perf_counter(), time.process_time()
    train_teacher(task, model, config)
    print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                      "threads": used, "torch_threads": torch.get_num_threads()}))


def measure(setting: str, busy: int, steps: int) -> dict:
    """Start ``busy`` busy loops, run one worker with ``setting``, stop the loops."""
    threads, extra_env = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(extra_env)
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        if loops:
            time.sleep(1.0)  # let the scheduler see them before the worker samples the load
        cmd = [sys.executable, __file__, "--worker", str(threads), "--steps", str(steps)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        for p in loops:
            p.kill()
        for p in loops:
            p.wait()
    if res.returncode != 0:
        raise RuntimeError(f"worker {setting} beside {busy} busy failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="teacher steps per measurement (40 = one epoch)")
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 3])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "threads.json"))
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.steps)
        return
    busy_counts = sorted(set(args.busy) | {0})
    rows: dict[str, dict[str, dict]] = {}
    for busy in busy_counts:  # settings innermost: a change of machine load hits them alike
        for setting in args.settings:
            rows.setdefault(setting, {})[str(busy)] = r = measure(setting, busy, args.steps)
            print(f"  {setting:>9} beside {busy} busy: {r['wall_s']:.2f}s ({r['threads']} threads)",
                  file=sys.stderr)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    head = ["threads"] + [f"{b} busy" for b in busy_counts]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for setting, by_busy in rows.items():
        idle = by_busy["0"]["wall_s"]
        cells = [f"{by_busy[str(b)]['wall_s']:.2f}s ({by_busy[str(b)]['wall_s'] / idle:.1f}x, "
                 f"{by_busy[str(b)]['threads']}t)" for b in busy_counts]
        print(" | ".join([setting] + cells))
    # Fair sharing: beside b busy processes a run gets C / (b + 1) cores, never more than one core
    # per thread it runs; the best it can do is the one-thread idle time scaled by that share.
    best_idle = min(r["0"]["wall_s"] for r in rows.values())
    one = rows.get("1", {}).get("0", {}).get("wall_s", best_idle)
    fair = {str(b): (best_idle if b == 0 else one * max(1.0, (b + 1) / cores)) / best_idle
            for b in busy_counts}
    print(f"fair share of {cores} cores predicts, against the best idle time: " +
          ", ".join(f"{b} busy {fair[str(b)]:.1f}x" for b in busy_counts))
    meta = {"steps": args.steps, "cores": cores, "python": platform.python_version(),
            "machine": platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "fair_share_slowdown": fair, "load1_at_end": os.getloadavg()[0]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
