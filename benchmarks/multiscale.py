"""The multiscale image model against the single-map one, at equal cost, on validation data.

Reads finished run reports (``report.json`` of each seed) of two configurations, e.g. MNIST with
``task_config.scales=3`` and the default single map, and prints, per method and budget, the
validation metric (mean ± std over seeds) beside the FLOPs per sample of the whole prediction; then,
for each multiscale entry, the best single-map entry of the same method family whose FLOPs do not
exceed it (equal or lower cost). Writes the table and the numbers to JSON.

Usage::

    python benchmarks/multiscale.py --multi docs/results/mnist-scales3 --single docs/results/mnist \\
        --out benchmarks/results/multiscale_mnist.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

METHODS = ("cdeq", "cdeq_plus", "picard", "anderson")
BUDGETS = ("1", "2", "4")


def reports(folder: Path) -> list[dict[str, Any]]:
    """The seeds' reports under ``folder`` (``seed_*/report.json``, else ``report.json``)."""
    found = sorted(folder.glob("seed_*/report.json")) or [folder / "report.json"]
    return [json.loads(p.read_text()) for p in found if p.exists()]


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": [r.get("seed") for r in runs],
                           "layer_call_flops": runs[0]["cost"]["layer_call_flops"],
                           "teacher_valid": [r["valid"]["teacher"]["metric"] for r in runs],
                           "methods": {}}
    for m in METHODS:
        for k in BUDGETS:
            vals = [r["valid"]["methods"].get(m, {}).get(k) for r in runs]
            flops = [r["cost"]["flops"].get(m, {}).get(k) for r in runs]
            if None in vals or None in flops:
                continue
            out["methods"].setdefault(m, {})[k] = {"valid": vals, "flops": statistics.mean(flops)}
    return out


def table(multi: dict[str, Any], single: dict[str, Any]) -> str:
    lines = [f"multiscale: {len(multi['seeds'])} seed(s), layer call {multi['layer_call_flops'] / 1e6:.2f} "
             f"MFLOPs, converged teacher (valid) {mean_sd(multi['teacher_valid'])}",
             f"single map: {len(single['seeds'])} seed(s), layer call {single['layer_call_flops'] / 1e6:.2f} "
             f"MFLOPs, converged teacher (valid) {mean_sd(single['teacher_valid'])}", "",
             "| method | budget | multiscale valid [MFLOPs] "
             "| single map at <= its FLOPs: valid [budget, MFLOPs] |",
             "|---|---|---|---|"]
    for m, per in multi["methods"].items():
        for k, e in per.items():
            pool = [(kk, ee) for kk, ee in single["methods"].get(m, {}).items() if ee["flops"] <= e["flops"]]
            if pool:
                kk, ee = max(pool, key=lambda p: statistics.mean(p[1]["valid"]))
                other = f"{mean_sd(ee['valid'])} [{kk}, {ee['flops'] / 1e6:.2f}]"
            else:
                other = "-"
            lines.append(f"| {m} | {k} | {mean_sd(e['valid'])} [{e['flops'] / 1e6:.2f}] | {other} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multi", required=True, help="folder of the multiscale run (its seeds)")
    parser.add_argument("--single", required=True, help="folder of the single-map run (its seeds)")
    parser.add_argument("--out", default="benchmarks/results/multiscale_mnist.json")
    args = parser.parse_args(argv)
    multi, single = summary(reports(Path(args.multi))), summary(reports(Path(args.single)))
    text = table(multi, single)
    print(text)
    out = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "multi": multi, "single": single, "table": text}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
