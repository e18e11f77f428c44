"""One process against two (torchrun, gloo on CPU): the same report, and each rank's share of
every stage.

Runs ``cdeq run TASK --quick`` with 1 process and with 2 (``torchrun --nproc_per_node 2``), one
thread each, and compares the two reports field by field (timing fields left out): the number of
fields, the largest absolute difference of any number, the fields that differ by more than
``--tol`` (relative), and the report's ``distributed`` section (samples each rank computed per
stage). A task with several variants (a graph's transductive and inductive settings) compares
each. Prints a table and writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/distributed_equal.py digits \\
        --out benchmarks/results/distributed_equal_digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cdeq.run.report import without_timing


def run(task: str, processes: int, out: Path, settings: list[str]) -> None:
    cli = ["-m", "cdeq.cli", "run", task, "--quick", "--out", str(out), "--set", "threads=1", *settings]
    prefix = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CDEQ_PROGRESS="0")
    subprocess.run(prefix + cli, env=env, check=True, capture_output=True)


def compare(a: Any, b: Any, where: str, tol: float, out: dict[str, Any]) -> None:
    """Walk both reports; count fields, the largest difference and those above ``tol``."""
    if where.endswith("/distributed"):
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out["differing"].append({"field": f"{where}/{k}", "one": a.get(k), "two": b.get(k)})
            else:
                compare(a[k], b[k], f"{where}/{k}", tol, out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            compare(x, y, f"{where}[{i}]", tol, out)
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        out["fields"] += 1
        diff = abs(float(a) - float(b))
        out["max_abs_difference"] = max(out["max_abs_difference"], diff)
        if diff > tol * max(1.0, abs(float(a))):
            out["differing"].append({"field": where, "one": a, "two": b})
    else:
        out["fields"] += 1
        if a != b:
            out["differing"].append({"field": where, "one": a, "two": b})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--set", nargs="*", default=[], help="extra run settings")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results: dict[str, Any] = {"task": args.task, "settings": ["threads=1", *args.set], "tol": args.tol,
                               "command": f"cdeq run {args.task} --quick", "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            run(args.task, n, Path(tmp) / f"p{n}", args.set)
        for report in sorted((Path(tmp) / "p1").rglob("report.json")):
            rel = report.relative_to(Path(tmp) / "p1")
            one = json.loads(report.read_text())
            two = json.loads((Path(tmp) / "p2" / rel).read_text())
            out: dict[str, Any] = {"fields": 0, "max_abs_difference": 0.0, "differing": []}
            compare(without_timing(one), without_timing(two), "", args.tol, out)
            out["distributed_one"] = one["distributed"]
            out["distributed_two"] = two["distributed"]
            results["variants"][str(rel.parent) if str(rel.parent) != "." else args.task] = out
    print(f"| {args.task} variant | fields | max abs difference | fields beyond {args.tol:g} (relative) |")
    print("|---|---|---|---|")
    for name, v in results["variants"].items():
        print(f"| {name} | {v['fields']} | {v['max_abs_difference']:.2e} | "
              f"{', '.join(d['field'] for d in v['differing']) or 'none'} |")
    print()
    print("| variant | stage | samples, 1 process | samples per rank, 2 processes |")
    print("|---|---|---|---|")
    for name, v in results["variants"].items():
        for stage, entry in v["distributed_two"]["stages"].items():
            alone = v["distributed_one"]["stages"][stage]["samples_per_rank"]
            print(f"| {name} | {stage} | {alone[0]} | {entry['samples_per_rank']} |")
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
