"""C-DEQ+ variants at equal cost, judged on validation data only.

Usage::

    python benchmarks/plus_equal_cost.py NAME=SWEEP_DIR [NAME=SWEEP_DIR ...] \
        --out benchmarks/results/plus_init_digits.json

Each ``SWEEP_DIR`` is a finished ``cdeq run --seeds N`` directory (``seed_*/`` with
``student_plus.safetensors`` and ``report.json``); a variant is made by changing its ``plus``
settings and running ``cdeq plus`` and ``cdeq evaluate`` in a copy of each seed. For every cost
``c`` in 1-4 layer-call equivalents (with the equal-cost tables' slack, from the report's
``cost.layer_calls.cdeq_plus``), it takes C-DEQ+'s largest budget that fits and reads the plan
search's loss and metric for it: the search log kept in ``student_plus.safetensors``, measured on
the selection (validation) batches. It prints the mean over seeds and writes them to ``--out``.
The test split is never read.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cdeq.run.report import COST_SLACK
from cdeq.run.stages import Run

COSTS = (1, 2, 3, 4)


def at_equal_cost(sweep: Path) -> dict[str, dict | None]:
    """``{cost: {"loss", "metric", "budget", "layer_calls"}}`` (means over seeds; ``None``: no
    budget fits on some seed)."""
    per_cost: dict[int, list] = {c: [] for c in COSTS}
    for seed in sorted(sweep.glob("seed_*")):
        calls = json.loads((seed / "report.json").read_text())["cost"]["layer_calls"]["cdeq_plus"]
        run = Run(seed)
        search = run.read_meta("student_plus")["search"]
        run.close()
        for c in COSTS:
            fit = [k for k in search if k in calls and calls[k] <= c * COST_SLACK]
            # on the search batches a larger budget is never worse (cdeq.consistency.search)
            k = max(fit, key=int) if fit else None
            per_cost[c].append(None if k is None else (search[k]["loss"], search[k]["metric"], k,
                                                       calls[k]))
    out: dict[str, dict | None] = {}
    for c, rows in per_cost.items():
        if not rows or any(r is None for r in rows):
            out[str(c)] = None
            continue
        out[str(c)] = {"loss": statistics.fmean(r[0] for r in rows),
                       "metric": statistics.fmean(r[1] for r in rows),
                       "budget": [r[2] for r in rows],
                       "layer_calls": statistics.fmean(r[3] for r in rows)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=SWEEP_DIR")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {}
    for item in args.variants:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"{item!r}: give NAME=SWEEP_DIR")
        results[name] = at_equal_cost(Path(path))
    lines = [f"{'variant':34s}" + "".join(f"  cost<={c}: loss (metric)" for c in COSTS)]
    for name, row in results.items():
        cells = ["        -" if row[str(c)] is None else
                 f"  {row[str(c)]['loss']:.4f} ({row[str(c)]['metric']:.4f})" for c in COSTS]
        lines.append(f"{name:34s}" + "".join(f"{cell:>26s}" for cell in cells))
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(json.dumps({"note": "validation (plan-search) loss and metric of "
                                          "C-DEQ+ at equal cost, mean over seeds",
                                          "slack": COST_SLACK, "variants": results}, indent=1))
    Path(args.out).with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
