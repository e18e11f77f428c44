"""Fixed-point correction for teacher training, judged on validation data.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fp_correction.py --task digits \
        --seeds 0 1 2 --weights 0 0.5 --runs runs/fp_correction \
        --out benchmarks/results/fp_correction_digits.json

For each correction weight (``teacher.fp_correction``) and seed it runs the whole pipeline
(``cdeq run TASK --set teacher.fp_correction=W seed=S threads=1``; a finished run's report is
read as it stands, an unfinished one resumed) into ``RUNS/TASK/w<W>/seed_<S>``, then prints,
from each report's validation figures only (``report["valid"]``), mean ± std over the seeds of: the converged
teacher; the best truncated solver, the anytime unrolled network, C-DEQ and C-DEQ tuned at 1-4
layer calls; the teacher's epochs. The question: does the correction make the fixed point as good
a classifier as the explicit networks, and what does it do to the truncated teacher and to the
students distilled from it. The test split is not read.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from cdeq.engine.config import merged
from cdeq.run.stages import Run, build_config

TRUNCATED = ("picard", "anderson", "broyden")
ROWS = ("cdeq", "cdeq_tuned", "unrolled_any_k", "unrolled")
BUDGETS = ("1", "2", "3", "4")


def _cell(values: list[float], scale: float) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def figures(report: dict[str, Any]) -> dict[str, Any]:
    """The validation figures of one report this benchmark compares."""
    valid = report["valid"]
    sign = 1 if report["higher_is_better"] else -1
    out: dict[str, Any] = {"teacher": valid["teacher"]["metric"],
                           "teacher_epochs": report["teacher"].get("epochs"),
                           "teacher_stopped": report["teacher"].get("stopped")}
    methods = valid["methods"]
    out["best truncated"] = {k: max((methods[s][k] for s in TRUNCATED if k in methods.get(s, {})),
                                    key=lambda v: sign * v) for k in BUDGETS}
    for name in ROWS:
        out[name] = {k: methods[name][k] for k in BUDGETS if k in methods.get(name, {})}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--runs", default="runs/fp_correction")
    parser.add_argument("--out", required=True, help="JSON file (a .txt table is written beside it)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further settings of every run (JSON values)")
    args = parser.parse_args()
    extra: dict[str, Any] = {}
    for item in args.set:
        key, value = item.split("=", 1)
        node = extra
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = json.loads(value)
    results: dict[str, list[dict[str, Any]]] = {}
    for w in args.weights:
        for seed in args.seeds:
            user = merged(extra, {"teacher": {"fp_correction": w}, "seed": seed, "threads": 1})
            out = Path(args.runs) / args.task / f"w{w:g}" / f"seed_{seed}"
            if (out / "report.json").exists():  # a finished run: its report as it stands
                report = json.loads((out / "report.json").read_text())
            else:
                with Run(out, build_config(args.task, user)) as run:
                    report = run.run_all()
            results.setdefault(f"{w:g}", []).append({"seed": seed, "run": str(out.relative_to(args.runs)),
                                                     **figures(report)})
    scale = 100 if report["metric"] == "accuracy" else 1
    weights = list(results)
    lines = [f"{args.task}: validation {report['metric']} (mean ± std over seeds {args.seeds}), by "
             "teacher.fp_correction", "",
             "| row | " + " | ".join(f"w = {w}" for w in weights) + " |",
             "|---|" + "---|" * len(weights)]
    lines.append("| converged teacher | " + " | ".join(
        _cell([r["teacher"] for r in results[w]], scale) for w in weights) + " |")
    lines.append("| teacher epochs (stopped) | " + " | ".join(
        ", ".join(f"{r['teacher_epochs']} ({r['teacher_stopped']})" for r in results[w])
        for w in weights) + " |")
    for name in ("best truncated", *ROWS):
        for k in BUDGETS:
            if all(k in r.get(name, {}) for w in weights for r in results[w]):
                lines.append(f"| {name} @ {k} | " + " | ".join(
                    _cell([r[name][k] for r in results[w]], scale) for w in weights) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"task": args.task, "metric": report["metric"],
                                         "higher_is_better": report["higher_is_better"],
                                         "weights": weights, "seeds": args.seeds, "settings": extra,
                                         "runs": results}, indent=1))
    Path(args.out).with_suffix(".txt").write_text(text)


if __name__ == "__main__":
    main()
