"""Training throughput (samples/s) with 1 and 2 processes under torchrun, one thread each.

Runs the digits pipeline (teacher, recording, distillation; no baselines) with 1 process and with 2
(``torchrun --nproc_per_node 2``), alternating, ``--repeats`` times each, and reads the teacher's
and the student's training histories from the run's checkpoints: samples / seconds of the
optimiser steps (validation passes excluded). Prints a table and writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/distributed.py --repeats 2 --out /tmp/ddp_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = ["threads=1", "teacher.epochs=3", "teacher.patience=0", "task_config.train_subset=1024",
            "task_config.test_subset=64", "record.max_samples=1024", "distill.epochs=3",
            "baselines.enabled=false", "evaluate.budgets=[1]", "plans.max_nfe=1"]


def one_run(processes: int, out: Path) -> dict[str, float]:
    from cdeq.engine.io import load_checkpoint

    cli = ["-m", "cdeq.cli", "run", "digits", "--quick", "--out", str(out), "--set", *SETTINGS]
    prefix = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CDEQ_PROGRESS="0")
    subprocess.run(prefix + cli, env=env, check=True, capture_output=True)
    result = {}
    for stage in ("teacher", "student"):
        history = load_checkpoint(out / f"{stage}.ckpt")["state"]["history"]
        result[stage] = sum(history["samples"]) / sum(history["epoch_time"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="ddp_throughput.json")
    args = parser.parse_args()
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for n in (1, 2):  # alternating, so both see the same machine load
                runs[n].append(one_run(n, Path(tmp) / f"p{n}_r{r}"))
    table = {n: {stage: statistics.median(run[stage] for run in rs) for stage in ("teacher", "student")}
             for n, rs in runs.items()}
    print("| processes (1 thread each) | teacher training, samples/s | distillation, samples/s |")
    print("|---|---|---|")
    for n in (1, 2):
        print(f"| {n} | {table[n]['teacher']:.0f} | {table[n]['student']:.0f} |")
    print(f"2 / 1: teacher {table[2]['teacher'] / table[1]['teacher']:.2f}x, "
          f"distillation {table[2]['student'] / table[1]['student']:.2f}x (median of {args.repeats})")
    Path(args.out).write_text(json.dumps({"settings": SETTINGS, "median": table, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
